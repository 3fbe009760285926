"""The result of ``teacher_topk``: top-k teacher log-probabilities with the temperature they were
taken at, as one value that survives reshaping, so ``topk_kd_loss`` and the cache can refuse a
mismatch."""
import torch


class TopK(tuple):
    """``(logprobs, indices)`` of a teacher's top k, with ``temperature``: unpacks as the pair.

    ``logprobs``: ``[..., k]`` float log-probabilities of ``softmax(z_t / temperature)``;
    ``indices``: ``[..., k]`` integer vocabulary ids; ``temperature``: the float they were taken
    at, or None where unknown.
    """

    def __new__(cls, logprobs: torch.Tensor, indices: torch.Tensor, temperature=None):
        self = super().__new__(cls, (logprobs, indices))
        self.temperature = None if temperature is None else float(temperature)
        return self

    @property
    def logprobs(self):
        return self[0]

    @property
    def indices(self):
        return self[1]

    def __repr__(self):
        return (f"TopK(logprobs={tuple(self[0].shape)} {self[0].dtype}, indices={tuple(self[1].shape)} "
                f"{self[1].dtype}, temperature={self.temperature})")
