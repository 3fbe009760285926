"""DTensor inputs: ``kd_loss``, ``topk_kd_loss`` and ``fused_linear_kd_loss`` on tensors sharded
with ``torch.distributed.tensor`` (tensor parallelism, FSDP2, device meshes).

The functional API calls ``has_dtensor`` first; only when it is true does a call come here. That
check imports nothing: a DTensor can only exist once ``torch.distributed.tensor`` is imported.

The student's placements decide, one per mesh dimension:

    Shard(last dim)        the vocabulary (``loss_parallel``-style logits): ``vocab_parallel_kd_loss``
                           over that mesh dimension's group, on the local shards, no gather; several
                           teachers as their mixture's log p on the rank's columns
                           (``fastkd.distributed.mixture_teacher``: 2 more all-reduces, one float32
                           ``[N, V / P]`` buffer); ``check_finite`` judges whole rows
                           (``fastkd.distributed.check_finite_shards``: 1 all-reduce)
    Shard(a leading dim)   rows (data or sequence parallel): the loss of the local rows; "batchmean"
                           and "mean" divide by the global kept-row count (one all-reduce of a
                           count per such mesh dimension) and the loss is summed over the ranks
                           (one all-reduce of a scalar); the backward has no collective
    Replicate              nothing: every rank computes the same loss

Partial placements, or a vocabulary sharded over two mesh dimensions, raise ``ValueError`` naming
the placements. Other DTensor arguments (teachers, labels, top-k values) must sit on the student's
mesh with the student's placements (labels and top-k values: Replicate where the student shards
the vocabulary); plain tensors are taken as this rank's local part. ``num_items_in_batch``, when
given, is the global count already (the Hugging Face convention) and is used as it is.

The loss comes back as a DTensor replicated over the mesh (``reduction="none"``: the row losses
with the student's row placements); the student's gradient is a DTensor with the student's
placements.

``fused_linear_kd_loss``:
- hidden states a DTensor (Replicate, or Shard of a leading dim for rows) and the head a DTensor
  ``Shard(0)`` on one mesh dimension (tensor parallelism): ``fastkd.vocab_parallel_linear`` over
  that dimension's group. The teacher's head may be a DTensor with the same placements or a plain
  ``[V, Ht]`` tensor (this rank's rows are used); ``teacher_logits`` a DTensor with the vocabulary
  sharded alike, or plain ``[..., V]`` (this rank's columns); lists of them for several teachers
  (their mixture, 2 more all-reduces per chunk). ``return_entropy`` is refused.
- hidden states a plain tensor and the head a DTensor sharded by ``fully_shard`` (FSDP2: each
  rank's own rows): the head (and a DTensor teacher head) is gathered once per call, the loss is
  this rank's (a plain tensor, normalised by its own rows, as FSDP2 losses are), and the head's
  gradient comes back with the head's placements, averaged over the mesh as FSDP2 averages
  gradients (one reduce-scatter).
"""
import dataclasses
import sys

import torch

from .backends import flat_labels, resolve_backend
from .buffers import accumulation_dtype
from .distributed import check_finite_shards, group_name, mixture_teacher
from .fused_linear import default_chunk_size
from .options import (IDENTITY, as_teachers, check_bool, check_chunk_size, check_fused_inputs, check_kd_inputs,
                      check_teacher_weights, check_transforms, make_options, make_reduction)
from .vocab_parallel_linear import VocabParallelLinearKDFunction


def _dtensor_class():
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def has_dtensor(*args):
    """Whether any argument (or an entry of a list argument) is a DTensor; imports nothing."""
    cls = _dtensor_class()
    if cls is None:
        return False
    for x in args:  # a loop, not any() of a generator: every call of every entry point runs this
        if isinstance(x, cls) or (isinstance(x, (list, tuple)) and any(isinstance(y, cls) for y in x)):
            return True
    return False


class _Layout:
    """What a DTensor's placements say: its mesh, the mesh dims that shard rows and the one (or
    None) that shards the vocabulary (the last tensor dim, or ``vocab_dim``)."""

    def __init__(self, name, x, vocab_dim=-1):
        from torch.distributed.tensor import DTensor

        if not isinstance(x, DTensor):
            raise TypeError(f"{name} must be a DTensor when another argument is one, got {type(x).__name__}")
        self.mesh, self.placements = x.device_mesh, tuple(x.placements)
        vocab_dim %= x.ndim
        self.row_dims, vocab = [], []
        for d, p in enumerate(self.placements):
            if p.is_shard():
                (vocab if p.dim % x.ndim == vocab_dim else self.row_dims).append(d)
            elif not p.is_replicate():
                raise ValueError(f"{name} has placements {self.placements}: {p} cannot be served (shard the "
                                 "vocabulary, shard or replicate the rows)")
        if len(vocab) > 1:
            raise ValueError(f"{name} has placements {self.placements}: its vocabulary is sharded over mesh "
                             f"dimensions {vocab}; one at most can be served")
        self.vocab_dim = vocab[0] if vocab else None

    def group(self):
        return self.mesh.get_group(self.vocab_dim)

    def row_placements(self):
        """The placements of a tensor of the rows alone (labels, row losses): Replicate for the vocabulary."""
        from torch.distributed.tensor import Replicate

        return tuple(Replicate() if d == self.vocab_dim else p for d, p in enumerate(self.placements))

    def local(self, name, x, placements=None):
        """``x`` on this rank: a DTensor's local tensor (on this mesh, with ``placements``, default
        the layout's) or a plain tensor as it is (also None and lists)."""
        from torch.distributed.tensor import DTensor

        if isinstance(x, (list, tuple)):
            return [self.local(f"{name}[{i}]", y, placements) for i, y in enumerate(x)]
        if not isinstance(x, DTensor):
            return x
        placements = self.placements if placements is None else placements
        if x.device_mesh != self.mesh or tuple(x.placements) != placements:
            raise ValueError(f"{name} has placements {tuple(x.placements)} on {x.device_mesh}; expected "
                             f"{placements} on {self.mesh} (the student's layout)")
        return x.to_local()

    def head(self, x):
        """A DTensor head's (or bias's) local tensor; as every rank's rows contribute to its gradient,
        that gradient is summed over the row mesh dims on its way back to ``x``'s placements."""
        if x is None or not x.requires_grad or not self.row_dims:
            return None if x is None else x.to_local()
        return _HeadLocal.apply(x, self.row_dims)

    def global_items(self, labels, rows, ignore_index, kwargs):
        """``num_items_in_batch`` for the local call of ``rows`` (this rank's student, logits or
        hidden states): the given one, or the kept-row count over the mesh dims that shard rows
        (None when no dim does: the local count is the global one)."""
        if kwargs["num_items_in_batch"] is not None or not self.row_dims or \
                kwargs["reduction"] not in ("batchmean", "mean"):
            return kwargs["num_items_in_batch"]
        count = (torch.full((), rows.shape[:-1].numel(), dtype=torch.int64, device=rows.device) if labels is None else
                 (labels.detach() != ignore_index).sum())
        return _SumOverRows.apply(count, self)

    def wrap(self, loss, reduction, row_shape):
        """The local loss as a DTensor: summed over the row mesh dims and replicated, or (``"none"``)
        the row losses with the row placements."""
        from torch.distributed.tensor import DTensor, Replicate

        if reduction == "none":
            stride = torch.empty(row_shape, device="meta").stride()
            return DTensor.from_local(loss, self.mesh, self.row_placements(), run_check=False,
                                      shape=torch.Size(row_shape), stride=stride)
        if self.row_dims:
            loss = _SumOverRows.apply(loss, self)
        return DTensor.from_local(loss, self.mesh, [Replicate()] * self.mesh.ndim, run_check=False)


class _HeadLocal(torch.autograd.Function):
    """``x.to_local()``, whose gradient (a different one on each rank of the row mesh dims) is
    summed over those dims and returned with ``x``'s placements."""

    @staticmethod
    def forward(ctx, x, row_dims):
        ctx.spec = x.device_mesh, tuple(x.placements), x.shape, x.stride()
        ctx.row_dims = row_dims
        local = x.to_local()
        return local.view_as(local)  # a new tensor: the DTensor's own local tensor gets no grad_fn

    @staticmethod
    def backward(ctx, grad):
        from torch.distributed.tensor import DTensor, Partial

        mesh, placements, shape, stride = ctx.spec
        partial = [Partial() if d in ctx.row_dims else p for d, p in enumerate(placements)]
        summed = DTensor.from_local(grad, mesh, partial, run_check=False, shape=shape, stride=stride)
        return summed.redistribute(mesh, placements), None


class _SumOverRows(torch.autograd.Function):
    """The sum of a tensor over the ranks of the layout's row mesh dims (one all-reduce per dim);
    its backward is the identity: each rank's part enters the sum once."""

    @staticmethod
    def forward(ctx, x, layout):
        import torch.distributed as dist

        total = x.detach().clone()
        for d in layout.row_dims:
            dist.all_reduce(total, group=layout.mesh.get_group(d))
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _vocab_start(x, layout, dim=-1):
    """The global offset of this rank's vocabulary shard of ``x`` along ``dim`` (uneven shards included)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(x.shape, layout.mesh, layout.placements)
    return offset[dim]


# The keyword arguments of kd_loss and fused_linear_kd_loss that make_options takes (teacher_weights apart).
_KD_OPTIONS = ("temperature", "divergence", "beta", "skew", "ignore_index", "hard_weight", "soft_weight", "t2_scale",
               "teacher_temperature")


def kd_loss(kwargs, local_loss, vocab_parallel_loss):
    """``fastkd.kd_loss`` (``local_loss``) of DTensor arguments ``kwargs`` (module docstring)."""
    student = kwargs.pop("student_logits")
    layout = _Layout("student_logits", student)
    teachers = layout.local("teacher_logits", kwargs.pop("teacher_logits"))
    labels = layout.local("labels", kwargs.pop("labels"), layout.row_placements())
    local = student.to_local()
    kwargs["num_items_in_batch"] = layout.global_items(labels, local, kwargs["ignore_index"], kwargs)
    if layout.vocab_dim is None:
        loss = local_loss(local, teachers, labels=labels, **kwargs)
    else:
        group = layout.group()
        teachers = as_teachers(teachers)
        check_finite = check_bool("check_finite", kwargs.pop("check_finite"))
        weights = check_teacher_weights(kwargs.pop("teacher_weights"), len(teachers))
        opts = make_options(**{name: kwargs[name] for name in _KD_OPTIONS}, teacher_weights=weights)
        check_kd_inputs(local, teachers, labels, opts)
        if check_finite:
            check_finite_shards(local, teachers, labels, opts, student.shape[-1], group)
        dtype = accumulation_dtype(local.dtype, *(t.dtype for t in teachers))
        teacher, opts = mixture_teacher(teachers, opts, dtype, group_name(group))
        kwargs["teacher_temperature"] = opts.teacher_temperature
        loss = vocab_parallel_loss(local, teacher, labels=labels, group=group,
                                   vocab_start=_vocab_start(student, layout), **kwargs)
    return layout.wrap(loss, kwargs["reduction"], student.shape[:-1])


def topk_kd_loss(kwargs, local_loss):
    """``fastkd.topk_kd_loss`` (``local_loss``) of DTensor arguments: rows sharded or replicated."""
    student = kwargs.pop("student_logits")
    layout = _Layout("student_logits", student)
    if layout.vocab_dim is not None:
        raise ValueError(f"topk_kd_loss cannot serve student_logits placements {layout.placements}: the top-k "
                         "teacher lists global token ids; shard the rows, or gather the vocabulary")
    logprobs, indices = (layout.local(name, kwargs.pop(name)) for name in ("teacher_logprobs", "teacher_indices"))
    labels = layout.local("labels", kwargs.pop("labels"))
    local = student.to_local()
    kwargs["num_items_in_batch"] = layout.global_items(labels, local, kwargs["ignore_index"], kwargs)
    loss = local_loss(local, logprobs, indices, labels=labels, **kwargs)
    return layout.wrap(loss, kwargs["reduction"], student.shape[:-1])


def _gathered(name, x):
    """A DTensor head (or bias) gathered whole on this rank, once; its gradient goes back to ``x``'s
    placements averaged over the mesh (FSDP2's convention). Plain tensors pass unchanged."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    if isinstance(x, (list, tuple)):
        return [_gathered(f"{name}[{i}]", y) for i, y in enumerate(x)]
    if not isinstance(x, DTensor):
        return x
    mesh = x.device_mesh
    full = x.redistribute(mesh, [Replicate()] * mesh.ndim)
    return full.to_local(grad_placements=[Partial("avg")] * mesh.ndim) if x.requires_grad else full.to_local()


_HEADS = ("student_weight", "student_bias", "teacher_weight", "teacher_bias")


def fused_linear_kd_loss(kwargs, local_loss):
    """``fastkd.fused_linear_kd_loss`` (``local_loss``) of DTensor arguments (module docstring)."""
    hidden = kwargs["student_hidden"]
    if not isinstance(hidden, _dtensor_class()):  # FSDP2: this rank's rows, the head gathered once
        return local_loss(**{name: _gathered(name, x) if name in _HEADS else x for name, x in kwargs.items()})
    layout = _Layout("student_hidden", hidden)
    if layout.vocab_dim is not None:
        raise ValueError(f"student_hidden has placements {layout.placements}: its hidden dimension is sharded; "
                         "shard or replicate the rows")
    if kwargs["return_entropy"]:
        raise ValueError("return_entropy is not available with DTensor student_hidden (it is with plain hidden "
                         "states and an FSDP2 head)")
    weight = kwargs["student_weight"]
    if isinstance(weight, _dtensor_class()):
        head = _Layout("student_weight", weight, vocab_dim=0)
        served = head.mesh == layout.mesh and not head.row_dims and (
            head.vocab_dim is None or layout.placements[head.vocab_dim].is_replicate())
        if not served:
            raise ValueError(f"student_weight placements {head.placements} on {head.mesh} cannot be served with "
                             f"student_hidden placements {layout.placements} on {layout.mesh}: shard the head by "
                             "vocabulary rows (Shard(0)) over a mesh dimension that replicates the hidden states")
        layout.vocab_dim = head.vocab_dim
    kwargs = dict(kwargs)
    hidden = kwargs.pop("student_hidden").to_local()
    labels = layout.local("labels", kwargs.pop("labels"))
    kwargs["num_items_in_batch"] = layout.global_items(labels, hidden, kwargs["ignore_index"], kwargs)
    kwargs["teacher_hidden"] = layout.local("teacher_hidden", kwargs["teacher_hidden"])
    if layout.vocab_dim is None:
        heads = {name: _replicated(name, kwargs[name], layout) for name in _HEADS}
        loss = local_loss(hidden, **{**kwargs, **heads}, labels=labels)
    else:
        loss = _vocab_parallel_linear(hidden, labels, weight, head, layout, kwargs)
    return layout.wrap(loss, kwargs["reduction"], hidden.shape[:-1])


def _replicated(name, x, layout):
    """A head that every rank holds whole: a replicated DTensor's local tensor, or a plain tensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(x, (list, tuple)):
        return [_replicated(f"{name}[{i}]", y, layout) for i, y in enumerate(x)]
    if isinstance(x, DTensor) and not all(p.is_replicate() for p in x.placements):
        raise ValueError(f"{name} has placements {tuple(x.placements)} while student_weight is replicated")
    return layout.head(x) if isinstance(x, DTensor) else x


def _vocab_slice(name, x, layout, placements, v0, width, dim):
    """This rank's vocabulary slice of a teacher head, bias or logits: a DTensor with ``placements``
    (the student head's; the logits': the rows' and the vocabulary's) as its local tensor, or a
    plain tensor of the whole vocabulary, narrowed along ``dim``."""
    from torch.distributed.tensor import DTensor

    if isinstance(x, (list, tuple)):
        return [_vocab_slice(f"{name}[{i}]", y, layout, placements, v0, width, dim) for i, y in enumerate(x)]
    if x is None:
        return None
    if isinstance(x, DTensor):
        if x.device_mesh != layout.mesh or tuple(x.placements) != tuple(placements):
            raise ValueError(f"{name} has placements {tuple(x.placements)} on {x.device_mesh}; expected "
                             f"{tuple(placements)} on {layout.mesh} (the vocabulary sharded as student_weight's)")
        return layout.head(x)
    return x.narrow(dim, v0, width)


def _vocab_parallel_linear(hidden, labels, weight, head, layout, kw):
    """The vocabulary-parallel fused linear loss of the local tensors (``fastkd.vocab_parallel_linear``),
    validated as ``fastkd.fused_linear_kd_loss`` validates its arguments."""
    from torch.distributed.tensor import Shard

    local_weight = layout.head(weight)
    v0, width = _vocab_start(weight, head, dim=0), local_weight.shape[0]
    heads = (layout, head.placements, v0, width, 0)
    bias = _vocab_slice("student_bias", kw["student_bias"], *heads)
    t_weight = _vocab_slice("teacher_weight", kw["teacher_weight"], *heads)
    t_bias = _vocab_slice("teacher_bias", kw["teacher_bias"], *heads)
    logits = [Shard(hidden.ndim - 1) if d == head.vocab_dim else p for d, p in enumerate(layout.placements)]
    t_logits = _vocab_slice("teacher_logits", kw["teacher_logits"], layout, logits, v0, width, -1)
    opts = make_options(**{name: kw[name] for name in _KD_OPTIONS})
    teachers = check_fused_inputs(hidden, local_weight, bias, kw["teacher_hidden"], t_weight, t_bias, t_logits,
                                  labels, opts)
    opts = dataclasses.replace(opts, teacher_weights=check_teacher_weights(kw["teacher_weights"], len(teachers)))
    transforms = check_transforms(kw["student_logit_scale"], kw["student_softcap"], kw["teacher_logit_scale"],
                                  kw["teacher_softcap"])
    if t_logits is not None and transforms[1] != IDENTITY:
        raise ValueError("teacher_logit_scale and teacher_softcap transform teacher_hidden @ teacher_weight.T; "
                         "teacher_logits are taken as they are: pass them already transformed")
    reduction = make_reduction(kw["reduction"], kw["num_items_in_batch"])
    backend = resolve_backend(kw["backend"], hidden)
    H = hidden.shape[-1]
    blocks = 1 + len(teachers) + (len(teachers) > 1) + (kw["student_softcap"] is not None)  # + the mixture's log p
    chunk = check_chunk_size(kw["chunk_size"]) or default_chunk_size(width, H, blocks=blocks)
    teachers = tuple((kind, x.reshape(-1, x.shape[-1]), *rest) for kind, x, *rest in teachers)  # [N, Ht] / [N, W]
    return VocabParallelLinearKDFunction.apply(
        hidden.reshape(-1, H), local_weight, bias, teachers, flat_labels(labels), opts, reduction, backend, chunk,
        hidden.shape[:-1], transforms, group_name(head.group()), v0, weight.shape[0])
