"""The result of ``teacher_topk``: top-k teacher log-probabilities with the temperature they were
taken at, as one value that survives reshaping, so ``topk_kd_loss`` and the cache can refuse a
mismatch."""
import torch

from .options import KDOptions, check_temperature


class TopK(tuple):
    """``(logprobs, indices)`` of a teacher's top k, with ``temperature``: unpacks as the pair.

    ``logprobs``: ``[..., k]`` float log-probabilities of ``softmax(z_t / temperature)``;
    ``indices``: ``[..., k]`` integer vocabulary ids; ``temperature``: the float they were taken
    at, or None where unknown (then taken to be at the loss's temperature, as a plain tensor is).

    Being a tuple, ``topk[0]`` is ``logprobs``; the methods below apply to both tensors and keep
    the temperature (a method of the tensors themselves gives a plain tensor, which has none):
    ``view(*shape)``, ``reshape(*shape)``, ``flatten(start_dim=0, end_dim=-2)``, ``rows(key)``
    (``logprobs[key]``, ``indices[key]`` for an index of the leading dims: an int, slice, mask or
    index tensor), ``contiguous()`` and ``to(device=None, dtype=None, non_blocking=False)`` (the
    device for both, ``dtype`` for ``logprobs`` only; the indices keep theirs). Shapes are of the
    leading dims and end in k: ``topk.view(-1, k)``.
    """

    def __new__(cls, logprobs: torch.Tensor, indices: torch.Tensor, temperature=None):
        if not isinstance(logprobs, torch.Tensor) or not isinstance(indices, torch.Tensor):
            raise TypeError(f"TopK takes tensors logprobs and indices, got {type(logprobs).__name__} and "
                            f"{type(indices).__name__}")
        if logprobs.shape != indices.shape or logprobs.dim() == 0:
            raise ValueError(f"TopK: logprobs shape {tuple(logprobs.shape)} and indices shape "
                             f"{tuple(indices.shape)} must be the same [..., k]")
        self = super().__new__(cls, (logprobs, indices))
        self.temperature = None if temperature is None else check_temperature(temperature)
        return self

    def __getnewargs__(self):  # pickling (DataLoader workers) calls __new__ with these
        return (*self, self.temperature)

    @property
    def logprobs(self):
        return self[0]

    @property
    def indices(self):
        return self[1]

    def _apply(self, fn):
        return TopK(fn(self[0]), fn(self[1]), self.temperature)

    def view(self, *shape):
        return self._apply(lambda x: x.view(*shape))

    def reshape(self, *shape):
        return self._apply(lambda x: x.reshape(*shape))

    def flatten(self, start_dim=0, end_dim=-2):
        """The leading dims ``start_dim``..``end_dim`` flattened into one (default: all, giving
        ``[N, k]``); ``end_dim`` must leave the last dim (k) alone."""
        if end_dim % self[0].dim() == self[0].dim() - 1:
            raise ValueError("TopK.flatten: end_dim must leave the last dim (k) alone")
        return self._apply(lambda x: x.flatten(start_dim, end_dim))

    def rows(self, key):
        return self._apply(lambda x: x[key])

    def contiguous(self):
        return self._apply(torch.Tensor.contiguous)

    def to(self, device=None, dtype=None, non_blocking=False):
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        return TopK(self[0].to(device=device, dtype=dtype, non_blocking=non_blocking),
                    self[1].to(device=device, non_blocking=non_blocking), self.temperature)

    def __repr__(self):
        return (f"TopK(logprobs={tuple(self[0].shape)} {self[0].dtype}, indices={tuple(self[1].shape)} "
                f"{self[1].dtype}, temperature={self.temperature})")


def split_topk(teacher_logprobs, teacher_indices, temperature, name, remedy):
    """``(logprobs, indices)`` of a ``TopK`` (with ``teacher_indices`` None) or of the two plain
    tensors. ValueError when a ``TopK`` was taken at another temperature than ``temperature`` (called
    ``name`` in the message, which ends with ``remedy``): stored log-probabilities cannot be
    re-tempered. A plain tensor, or a ``TopK`` of unknown temperature, is taken to be at it."""
    if not isinstance(teacher_logprobs, TopK):
        if teacher_indices is None:
            raise TypeError("teacher_indices is required unless the teacher is a fastkd.TopK (what teacher_topk and "
                            "TeacherCache return)")
        return teacher_logprobs, teacher_indices
    if teacher_indices is not None:
        raise TypeError("a fastkd.TopK holds the indices: pass it alone, without teacher_indices")
    stored = teacher_logprobs.temperature
    if stored is not None and stored != temperature:
        raise ValueError(f"the top-k teacher was taken at temperature {stored} (its .temperature), but {name} is "
                         f"{temperature}: stored log-probabilities cannot be re-tempered; "
                         + remedy.format(stored=stored))
    return tuple(teacher_logprobs)


def topk_teacher(teacher_logprobs, teacher_indices, opts: KDOptions):
    """``split_topk`` against a loss's teacher temperature (declared, or the student's)."""
    name = ("teacher_temperature" if opts.teacher_temperature is not None
            else "temperature (teacher_temperature not given)")
    return split_topk(teacher_logprobs, teacher_indices, opts.teacher_T, name,
                      "pass teacher_temperature={stored} to use them as stored (the student stays at temperature=), "
                      "or take them again at the temperature you want")
