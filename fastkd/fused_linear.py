"""Fused linear + KD loss: the KD loss of ``hidden @ weight.T + bias`` without the ``[N, V]`` logits.

The rows (tokens) are cut into chunks of ``chunk`` rows. For each chunk, with h = hidden rows
``[chunk, H]``:

    z = h W^T + b                         student logits   [chunk, V] float32 (one reused buffer)
    z' = f_s(z)                           the student's logit transform, in place (below)
    z_t = f_t(h_t W_t^T + b_t)  (no grad) teacher logits   [chunk, V] float32 (or a slice of teacher_logits)
    loss_rows, G' = kd_forward(z', z_t)   the fused per-row KD forward; G' = d loss_rows / dz' is
                                          written over z (inplace), so no second buffer
    G = G' * f_s'(z)                      in place
    dL/db      += sum over rows of G      [V]
    dL/dh[rows] = G W                     [chunk, H]
    dL/dW      += G^T h                   [V, H], accumulated in float32 (float64 for float64)

These are the gradients of the row losses' sum. The reduction divides them by a normaliser (kept
rows, times V for "mean"; a device tensor, never read on the host), and the backward multiplies
them by the upstream gradient, as ``fastkd.autograd.KDLossFunction`` does. ``reduction="none"``
has one upstream gradient per row, which is unknown when the forward runs, so there the forward
computes only the row losses and the backward recomputes the chunks with G scaled row by row
(twice the matmul work, the same bounded memory).

Logit transforms. Some models post-process their LM head's output (Gemma 2's final logit
softcapping, Cohere's logit scale, Granite's logits scaling). Each side has its own
``f(z) = c tanh(s z / c)`` with softcap c, or ``f(z) = s z`` without one; s defaults to 1. The
gradient is ``f'(z) = s (1 - tanh^2(s z / c))`` (or s), applied to G' in place. Keeping
``tanh(s z / c)`` for it costs the student one more float32 ``[chunk, V]`` block (the KD forward
overwrites z' with G').

Precision. The chunk logits are float32 whatever the weight dtype (float64 for float64): a bf16
or fp16 matmul writes its float32 accumulator as it is (``torch.mm(..., out_dtype=float32)``,
where the device has it: CUDA), or, elsewhere (CPU), the product is taken in float32 from
upcast operands: the chunk's hidden rows once, the weight in tiles of UPCAST_TILE_BYTES, so no
float32 copy of the whole ``[V, H]`` weight is ever made. Rounding the logits to bf16 instead
would cost tens of percent of gradient accuracy once the student is close to the teacher: the
rounding error of z (about 2^-9 |z|) then outweighs z - z_t itself, and G' = q - p is mostly
that error. G itself is rounded to the weight dtype for the two gradient matmuls, which then run
at that dtype's speed: that error is relative to G (2^-9), so the gradients stay within a few
tenths of a percent. The bf16 copy of G goes into the teacher block, free by then (a float32
block holds two bf16 ones), or, with teacher_logits, into a half-size block of its own.

Memory beyond the inputs: the ``[N, H]`` hidden gradient, the ``[V, H]`` weight-gradient
accumulator (plus the weight-dtype copy returned for bf16/fp16 weights), and the chunk buffers:
at most two float32 ``[chunk, V]`` blocks, three with a student softcap (the torch backend adds
its few work buffers of 4 MiB, as for kd_loss; without a float32-output matmul, bf16/fp16 inputs
add a float32 copy of the chunk's hidden rows ``[chunk, H]`` and one weight tile of
UPCAST_TILE_BYTES). That is O(chunk V + N H + V H), never O(N V).

Default chunk (``default_chunk_size``): ``H // 4`` rows rounded down to a power of two, clamped to
[MIN_CHUNK_ROWS, MAX_CHUNK_ROWS], then halved (not below MIN_CHUNK_ROWS) while the chunk's
float32 blocks together exceed MAX_CHUNK_BYTES. Tying the chunk to H keeps each block at most a
quarter of the weight's elements (chunk V <= V H / 4), so the two or three float32 blocks stay
below the float32 ``[V, H]`` weight-gradient accumulator that must be held anyway, and for real
models (H >= 1024) gives chunks of 256+ rows, enough for the three matmuls of a chunk
(2 chunk H V flops each, for one read of the V H weight) to run near full speed (H = 1024,
V = 32000 on a CPU: 64 rows 21, 256 rows 31, 4096 rows 36 GFLOP/s).
"""
import functools
import math
import numbers
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import launch, torch_backend
from .autograd import _graph_is_kept, items_normaliser
from .backends import resolve_backend
from .buffers import accumulation_dtype, empty
from .ops import autocast_off, pack_kd_scalars, unpack_kd_options
from .options import (FLOAT_DTYPES, check_backend, check_labels, check_logits, check_num_items_in_batch,
                      make_options)

MIN_CHUNK_ROWS = 16
MAX_CHUNK_ROWS = 1024
MAX_CHUNK_BYTES = 2**30  # all the float32 [chunk, V] blocks of a chunk together
UPCAST_TILE_BYTES = 8 * 2**20  # the float32 weight tile of the upcast product (no float32-output matmul)


def default_chunk_size(V, H, blocks=2):
    """Rows per chunk for vocabulary ``V``, hidden size ``H`` and ``blocks`` float32 ``[chunk, V]``
    buffers (2; 3 with a student softcap): the rule in the module docstring."""
    rows = min(MAX_CHUNK_ROWS, max(MIN_CHUNK_ROWS, 1 << max(0, (max(H, 1) // 4).bit_length() - 1)))
    while rows > MIN_CHUNK_ROWS and blocks * rows * V * 4 > MAX_CHUNK_BYTES:
        rows //= 2
    return rows


class LogitTransform(NamedTuple):
    """``z -> softcap * tanh(scale * z / softcap)``, or ``scale * z`` when softcap is None."""
    scale: float = 1.0
    softcap: Optional[float] = None


IDENTITY = LogitTransform()


def _impl(backend):
    return launch if backend == "triton" else torch_backend


def _kd_forward(backend, z, z_t, labels, opts, need_grad):
    """Row losses and the logits gradient, written over ``z``."""
    if backend == "triton":
        return launch.kd_forward(z, z_t, labels, opts, inplace=True, need_grad=need_grad)
    # The chunk is already bounded; small work buffers keep the torch backend's share of it small.
    return torch_backend.kd_forward(z, z_t, labels, opts, inplace=True, need_grad=need_grad, chunk_bytes=4 * 2**20)


# ---------------------------------------------------------------------------------------------
# Chunk logits: float32 products, the transforms and their gradient


@functools.cache
def _mm_has_float32_output(device_type, dtype):
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` runs for ``dtype`` operands on this
    device type (CUDA in recent PyTorch; not the CPU). Asked once per (device type, dtype)."""
    if device_type != "cuda":
        return False
    try:
        one = torch.ones(1, 1, dtype=dtype, device=device_type)
        torch.mm(one, one, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return True


def _linear_into(out, x, weight, bias):
    """``out = x @ weight.T (+ bias)`` in ``out``'s dtype (float32, float64 for float64 inputs)
    without a temporary: bf16/fp16 products are summed and kept in float32, never rounded to
    their own dtype (module docstring, Precision)."""
    if x.dtype == out.dtype:
        if bias is None:
            return torch.mm(x, weight.t(), out=out)
        return torch.addmm(bias, x, weight.t(), out=out)
    if _mm_has_float32_output(x.device.type, x.dtype):
        torch.mm(x, weight.t(), out_dtype=out.dtype, out=out)
    else:
        x_wide = x.to(out.dtype)
        tile = max(1, UPCAST_TILE_BYTES // (weight.shape[1] * out.element_size()))
        for v0 in range(0, weight.shape[0], tile):
            torch.mm(x_wide, weight[v0:v0 + tile].to(out.dtype).t(), out=out[:, v0:v0 + tile])
    return out if bias is None else out.add_(bias)


def _transform_(z, transform, tanh_out=None):
    """``z <- f(z)`` in place (``LogitTransform``); ``tanh_out`` receives ``tanh(scale z / softcap)``
    for the gradient."""
    scale, softcap = transform
    if softcap is None:
        return z if scale == 1.0 else z.mul_(scale)
    z.mul_(scale / softcap).tanh_()
    if tanh_out is not None:
        tanh_out.copy_(z)
    return z.mul_(softcap)


def _transform_gradient_(g, transform, tanh):
    """``g <- g f'(z)`` in place: ``g scale (1 - tanh^2)`` (``tanh`` is overwritten), or ``g scale``."""
    scale, softcap = transform
    if softcap is None:
        return g if scale == 1.0 else g.mul_(scale)
    return g.mul_(tanh.square_().mul_(-scale).add_(scale))


def linear_logits(hidden, weight, bias=None, *, logit_scale=1.0, softcap=None):
    """The logits the fused path computes for ``hidden`` ``[..., H]``: ``f(hidden @ weight.T + bias)``
    with f the logit transform (``logit_scale``, ``softcap``: module docstring), ``[..., V]``,
    float32 (float64 for float64 inputs), no gradient. This is O(rows V) memory: call it on a few
    rows (``DistillationTrainer`` checks models' own logits with it)."""
    transform = check_logit_transform("", logit_scale, softcap)
    H = weight.shape[1]
    rows = hidden.reshape(-1, H)
    out = torch.empty((rows.shape[0], weight.shape[0]), dtype=accumulation_dtype(hidden.dtype),
                      device=hidden.device)
    with torch.no_grad():
        _transform_(_linear_into(out, rows, weight, bias), transform)
    return out.reshape(*hidden.shape[:-1], weight.shape[0])


def _low_precision_view(buffer, dtype, shape):
    """A ``dtype`` tensor of ``shape`` on the storage of the wider contiguous ``buffer``."""
    return buffer.view(-1).view(dtype)[: math.prod(shape)].view(shape)


# ---------------------------------------------------------------------------------------------
# The chunk loop


def _chunked_pass(hidden, weight, bias, teacher, labels, opts, backend, chunk, *, want, row_scale=None,
                  transforms=(IDENTITY, IDENTITY)):
    """One pass over the rows of ``hidden`` ``[N, H]``.

    ``teacher`` is ``("logits", z_t [N, V])`` or ``("linear", h_t [N, Ht], W_t, b_t)``. ``want``:
    which of (hidden, weight, bias) gradients to compute; ``row_scale`` ``[N]`` multiplies each
    row's logits gradient first (the "none" reduction's backward); ``transforms``: the student's
    and the teacher's ``LogitTransform``. Returns the row losses ``[N]`` and the gradients (hidden
    in its dtype, weight and bias in the accumulation dtype) or None.
    """
    want_hidden, want_weight, want_bias = want
    need_grad = want_hidden or want_weight or want_bias
    student_transform, teacher_transform = transforms
    N, V = hidden.shape[0], weight.shape[0]
    acc = accumulation_dtype(weight.dtype)
    device = hidden.device
    t_dtype = teacher[1].dtype
    row_loss = torch.zeros(N, dtype=accumulation_dtype(hidden.dtype, t_dtype), device=device)
    grad_hidden = empty((N, hidden.shape[1]), dtype=hidden.dtype, device=device) if want_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=acc, device=device) if want_weight else None
    grad_bias = torch.zeros(V, dtype=acc, device=device) if want_bias else None

    # The chunk buffers (module docstring, Memory): float32 student and teacher logits, tanh for a
    # student softcap's gradient, and G in the weight dtype for bf16/fp16 weights.
    rows = min(chunk, N)
    z_buffer = empty((rows, V), dtype=acc, device=device)
    t_buffer = (empty((rows, V), dtype=accumulation_dtype(t_dtype), device=device) if teacher[0] == "linear"
                else None)
    keep_tanh = need_grad and student_transform.softcap is not None
    tanh_buffer = empty((rows, V), dtype=acc, device=device) if keep_tanh else None
    g_buffer = None
    if (want_hidden or want_weight) and weight.dtype != acc:
        g_buffer = (_low_precision_view(t_buffer, weight.dtype, (rows, V)) if t_buffer is not None
                    else empty((rows, V), dtype=weight.dtype, device=device))
    impl = _impl(backend)
    for r0 in range(0, N, chunk):
        r1 = min(N, r0 + chunk)
        h = hidden[r0:r1]
        tanh = None if tanh_buffer is None else tanh_buffer[: r1 - r0]
        z = _transform_(_linear_into(z_buffer[: r1 - r0], h, weight, bias), student_transform, tanh)
        if teacher[0] == "logits":
            z_t = teacher[1][r0:r1]
            z_t = z_t if z_t.stride(-1) == 1 else z_t.contiguous()
        else:
            _, t_hidden, t_weight, t_bias = teacher
            z_t = _transform_(_linear_into(t_buffer[: r1 - r0], t_hidden[r0:r1], t_weight, t_bias),
                              teacher_transform)
        label = None if labels is None else labels[r0:r1]
        loss, g = _kd_forward(backend, z, z_t, label, opts, need_grad)
        row_loss[r0:r1] = loss
        if not need_grad:
            continue
        if row_scale is not None:
            g = impl.scale_rows(g, row_scale[r0:r1], out=g)
        g = _transform_gradient_(g, student_transform, tanh)
        if want_bias:
            grad_bias.add_(g.sum(0, dtype=acc))
        if g_buffer is not None:  # the teacher logits, if in g_buffer's storage, are no longer needed
            g = g_buffer[: r1 - r0].copy_(g)
        if want_hidden:
            torch.mm(g, weight, out=grad_hidden[r0:r1])
        if want_weight:
            if g.dtype == acc:
                grad_weight.addmm_(g.t(), h)
            else:  # bf16/fp16: one product per chunk in the weight dtype, summed in float32
                grad_weight.add_(torch.mm(g.t(), h))
    return row_loss, grad_hidden, grad_weight, grad_bias


# ---------------------------------------------------------------------------------------------
# The chunk loop as one custom operator, so that torch.compile keeps it whole (see fastkd.ops)


@torch.library.custom_op("fastkd::fused_linear_pass", mutates_args=())
def _fused_linear_pass(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], t_hidden: Optional[Tensor],
                       t_weight: Optional[Tensor], t_bias: Optional[Tensor], t_logits: Optional[Tensor],
                       labels: Optional[Tensor], row_scale: Optional[Tensor], scalars: Tensor, divergence: str,
                       t2_scale: bool, ignore_index: int, backend: str, chunk: int, want_hidden: bool,
                       want_weight: bool, want_bias: bool, student_scale: float, student_softcap: Optional[float],
                       teacher_scale: float, teacher_softcap: Optional[float]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    opts = unpack_kd_options(scalars, divergence, t2_scale, ignore_index)
    teacher = ("logits", t_logits) if t_logits is not None else ("linear", t_hidden, t_weight, t_bias)
    transforms = LogitTransform(student_scale, student_softcap), LogitTransform(teacher_scale, teacher_softcap)
    with autocast_off(hidden.device):
        results = _chunked_pass(hidden, weight, bias, teacher, labels, opts, backend, chunk,
                                want=(want_hidden, want_weight, want_bias), row_scale=row_scale,
                                transforms=transforms)
    return tuple(hidden.new_empty(0) if r is None else r for r in results)


@_fused_linear_pass.register_fake
def _(hidden, weight, bias, t_hidden, t_weight, t_bias, t_logits, labels, row_scale, scalars, divergence,
      t2_scale, ignore_index, backend, chunk, want_hidden, want_weight, want_bias, student_scale, student_softcap,
      teacher_scale, teacher_softcap):
    acc = accumulation_dtype(weight.dtype)
    t_dtype = (t_logits if t_logits is not None else t_hidden).dtype
    none = hidden.new_empty(0)
    return (hidden.new_empty(hidden.shape[0], dtype=accumulation_dtype(hidden.dtype, t_dtype)),
            hidden.new_empty(hidden.shape) if want_hidden else none,
            weight.new_empty(weight.shape, dtype=acc) if want_weight else none,
            weight.new_empty(weight.shape[0], dtype=acc) if want_bias else none)


def _chunked_pass_op(hidden, weight, bias, teacher, labels, opts, backend, chunk, *, want, row_scale=None,
                     transforms=(IDENTITY, IDENTITY)):
    """``_chunked_pass`` through the ``fastkd::fused_linear_pass`` operator: same arguments and results."""
    if teacher[0] == "logits":
        t_hidden, t_weight, t_bias, t_logits = None, None, None, teacher[1]
    else:
        (_, t_hidden, t_weight, t_bias), t_logits = teacher, None
    row_loss, *grads = torch.ops.fastkd.fused_linear_pass(
        hidden, weight, bias, t_hidden, t_weight, t_bias, t_logits, labels, row_scale, pack_kd_scalars(opts),
        opts.divergence, opts.t2_scale, opts.ignore_index, backend, chunk, *want, *transforms[0], *transforms[1])
    return (row_loss, *(grad if wanted else None for grad, wanted in zip(grads, want)))


def _autocast_inputs(*tensors):
    """Under ``torch.autocast``, the matmul operands in autocast's dtype, as ``F.linear`` would take
    them (float32 ones only; float64 stays, as autocast leaves it)."""
    device = tensors[0].device.type if isinstance(tensors[0], torch.Tensor) else None
    if device is None or not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.dtype == torch.float32 else x for x in tensors)


def _normaliser(labels, N, V, opts):
    """What the row losses' sum is divided by: None ("sum", "none"), a number, or a device tensor."""
    if opts.reduction in ("sum", "none"):
        return None
    if labels is None:
        return N * (V if opts.reduction == "mean" else 1) or 1
    kept = (labels != opts.ignore_index).sum().clamp_min(1)
    return kept * V if opts.reduction == "mean" else kept


def _scaled(grad, scale, dtype, in_place):
    """``grad * scale`` in ``dtype``, overwriting ``grad`` when allowed and the dtype matches."""
    if grad is None:
        return None
    if in_place and grad.dtype == dtype:
        return grad.mul_(scale)
    return (grad * scale).to(dtype)


class FusedLinearKDFunction(torch.autograd.Function):
    """Inputs are 2-D (``[N, H]`` hidden, ``[N, V]`` teacher logits, ``[N]`` labels), validated."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, t_hidden, t_weight, t_bias, t_logits, labels, opts, backend,
                chunk, out_shape, num_items_in_batch=None, transforms=(IDENTITY, IDENTITY)):
        want = tuple(ctx.needs_input_grad[:3])
        want = (want[0], want[1], want[2] and bias is not None)
        teacher = ("logits", t_logits) if t_logits is not None else ("linear", t_hidden, t_weight, t_bias)
        N, V = hidden.shape[0], weight.shape[0]
        ctx.opts, ctx.backend, ctx.chunk, ctx.want, ctx.transforms = opts, backend, chunk, want, transforms
        ctx.dtypes = (hidden.dtype, weight.dtype)

        if opts.reduction == "none":
            row_loss, *_ = _chunked_pass_op(hidden, weight, bias, teacher, labels, opts, backend, chunk,
                                            want=(False, False, False), transforms=transforms)
            if any(want):
                ctx.save_for_backward(hidden, weight, bias, t_hidden, t_weight, t_bias, t_logits, labels)
            return row_loss.reshape(out_shape)

        row_loss, *grads = _chunked_pass_op(hidden, weight, bias, teacher, labels, opts, backend, chunk, want=want,
                                            transforms=transforms)
        denominator = _normaliser(labels, N, V, opts)
        if num_items_in_batch is not None and denominator is not None:  # replaces the kept-row count
            items = items_normaliser(num_items_in_batch, hidden.device)
            denominator = items * V if opts.reduction == "mean" else items
        loss = row_loss.sum() if denominator is None else row_loss.sum() / denominator
        if any(want):
            ctx.save_for_backward(*grads)
        ctx.denominator = denominator
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        opts, want = ctx.opts, ctx.want
        hidden_dtype, weight_dtype = ctx.dtypes
        acc = accumulation_dtype(weight_dtype)
        if opts.reduction == "none":
            hidden, weight, bias, t_hidden, t_weight, t_bias, t_logits, labels = ctx.saved_tensors
            teacher = ("logits", t_logits) if t_logits is not None else ("linear", t_hidden, t_weight, t_bias)
            row_scale = grad_loss.reshape(-1).to(accumulation_dtype(hidden.dtype, teacher[1].dtype))
            _, grad_hidden, grad_weight, grad_bias = _chunked_pass_op(
                hidden, weight, bias, teacher, labels, opts, ctx.backend, ctx.chunk, want=want,
                row_scale=row_scale, transforms=ctx.transforms)
            grad_weight = None if grad_weight is None else grad_weight.to(weight_dtype)
            grad_bias = None if grad_bias is None else grad_bias.to(weight_dtype)
        else:
            grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
            scale = grad_loss.reshape(()).to(acc)
            if ctx.denominator is not None:
                scale = scale / ctx.denominator
            # The saved gradients are ours: scale them in place unless the graph may run backward again.
            in_place = not _graph_is_kept()
            grad_hidden = _scaled(grad_hidden, scale, hidden_dtype, in_place)
            grad_weight = _scaled(grad_weight, scale, weight_dtype, in_place)
            grad_bias = _scaled(grad_bias, scale, weight_dtype, in_place)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# Argument checks (shapes, dtypes, devices only: nothing reads tensor values)


def _check_tensor(name, x, dim=None):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if dim is None and x.dim() == 0:
        raise ValueError(f"{name} must have a hidden dimension [..., H], got a 0-d tensor")
    if dim is not None and x.dim() != dim:
        raise ValueError(f"{name} must be {dim}-d, got shape {tuple(x.shape)}")


def _check_linear(prefix, hidden, weight, bias, device):
    """Check ``{prefix}_hidden`` [..., H], ``{prefix}_weight`` [V, H], ``{prefix}_bias`` [V] or None."""
    names = f"{prefix}_hidden", f"{prefix}_weight", f"{prefix}_bias"
    _check_tensor(names[0], hidden)
    _check_tensor(names[1], weight, dim=2)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{names[1]} shape {tuple(weight.shape)} is not [V, H] for {names[0]} of hidden "
                         f"size H = {hidden.shape[-1]} (shape {tuple(hidden.shape)})")
    tensors = [(names[0], hidden), (names[1], weight)]
    if bias is not None:
        _check_tensor(names[2], bias, dim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{names[2]} shape {tuple(bias.shape)} does not match V = {weight.shape[0]} "
                             f"of {names[1]}")
        tensors.append((names[2], bias))
    for name, x in tensors[1:]:
        if x.dtype != hidden.dtype:
            raise TypeError(f"{name} is {x.dtype} but {names[0]} is {hidden.dtype}; the matmul needs one dtype")
    for name, x in tensors:
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} and student_hidden on {device}")
    return tensors


def _check_teacher_constant(name, x):
    if x.requires_grad:
        raise ValueError(f"{name} requires grad; the teacher is a constant: pass {name}.detach()")


def check_fused_inputs(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                       teacher_bias, teacher_logits, labels, opts):
    """Check the tensors of a fused linear KD call against each other and the options."""
    device = student_hidden.device if isinstance(student_hidden, torch.Tensor) else None
    _check_linear("student", student_hidden, student_weight, student_bias, device)
    if student_weight.shape[0] == 0:
        raise ValueError("student_weight has an empty vocabulary dimension (V = 0)")
    lead, V = tuple(student_hidden.shape[:-1]), student_weight.shape[0]

    if teacher_logits is not None:
        if teacher_hidden is not None or teacher_weight is not None or teacher_bias is not None:
            raise ValueError("pass the teacher either as teacher_hidden and teacher_weight (and teacher_bias) "
                             "or as teacher_logits, not both")
        check_logits("teacher_logits", teacher_logits)
        if tuple(teacher_logits.shape) != lead + (V,):
            raise ValueError(f"teacher_logits shape {tuple(teacher_logits.shape)} is not the student logits "
                             f"shape {lead + (V,)} (student_hidden leading dims and V of student_weight)")
        if teacher_logits.device != device:
            raise ValueError(f"teacher_logits is on {teacher_logits.device} and student_hidden on {device}")
        _check_teacher_constant("teacher_logits", teacher_logits)
    else:
        if teacher_hidden is None and teacher_weight is None:
            raise ValueError("no teacher: pass teacher_hidden and teacher_weight, or teacher_logits")
        if teacher_hidden is None or teacher_weight is None:
            missing = "teacher_hidden" if teacher_hidden is None else "teacher_weight"
            raise ValueError(f"{missing} is missing: a teacher given by hidden states needs both "
                             "teacher_hidden and teacher_weight (or pass teacher_logits instead)")
        tensors = _check_linear("teacher", teacher_hidden, teacher_weight, teacher_bias, device)
        if tuple(teacher_hidden.shape[:-1]) != lead:
            raise ValueError(f"teacher_hidden shape {tuple(teacher_hidden.shape)} and student_hidden shape "
                             f"{tuple(student_hidden.shape)} differ in their leading (token) dims")
        if teacher_weight.shape[0] != V:
            raise ValueError(f"teacher_weight has V = {teacher_weight.shape[0]} rows and student_weight "
                             f"V = {V}; student and teacher need the same vocabulary")
        for name, x in tensors:
            _check_teacher_constant(name, x)

    check_labels(student_hidden, labels, opts, name="student_hidden")


def check_logit_transform(side, logit_scale, softcap):
    """``LogitTransform(logit_scale, softcap)`` of one side (``"student"``, ``"teacher"``), checked:
    real, finite and > 0 (``softcap`` may be None); errors name ``{side}_logit_scale`` / ``{side}_softcap``."""
    prefix = f"{side}_" if side else ""
    for name, value in ((f"{prefix}logit_scale", logit_scale), (f"{prefix}softcap", softcap)):
        if value is None and name.endswith("softcap"):
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            kind = "a real number or None" if name.endswith("softcap") else "a real number"
            raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be finite and > 0, got {value}")
    return LogitTransform(float(logit_scale), None if softcap is None else float(softcap))


def check_transforms(student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap):
    """The (student, teacher) ``LogitTransform`` pair, checked."""
    return (check_logit_transform("student", student_logit_scale, student_softcap),
            check_logit_transform("teacher", teacher_logit_scale, teacher_softcap))


def check_chunk_size(chunk_size):
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return int(chunk_size)


# ---------------------------------------------------------------------------------------------
# Public API


def fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, *,
                         teacher_logits=None, student_bias=None, teacher_bias=None, chunk_size=None,
                         temperature=1.0, divergence="kl", beta=0.5, skew=0.1, labels=None,
                         ignore_index=-100, hard_weight=0.0, soft_weight=1.0, t2_scale=True,
                         reduction="batchmean", inplace=False, backend="auto", num_items_in_batch=None,
                         student_logit_scale=1.0, student_softcap=None, teacher_logit_scale=1.0,
                         teacher_softcap=None):
    """``kd_loss(f_s(student_hidden @ student_weight.T + student_bias), teacher logits, **kd_options)``
    without materialising the ``[N, V]`` logits.

    student_hidden ``[..., H]``, student_weight ``[V, H]`` (the ``lm_head.weight`` layout),
    student_bias ``[V]`` or None. The teacher is either ``teacher_hidden`` ``[..., Ht]`` with
    ``teacher_weight`` ``[V, Ht]`` (and ``teacher_bias``), whose logits are computed chunk by chunk
    under no-grad (Ht may differ from H), or precomputed ``teacher_logits`` ``[..., V]``. Teacher
    tensors are constants: one that requires grad is a ValueError (detach it).

    The keyword options are ``fastkd.kd_loss``'s (divergence, temperature, t2_scale, labels,
    hard_weight, ignore_index, reduction, backend, ...) with the same meaning and result.
    ``inplace`` is accepted for parity and has no effect: the chunk logits are always private
    buffers that the gradient overwrites. Gradients flow to student_hidden, student_weight and
    student_bias (the weight and bias gradients are summed over chunks in float32, float64 for
    float64, and returned in the weight's dtype). Rows are processed ``chunk_size`` at a time
    (default ``default_chunk_size(V, H)``), so the extra memory is O(chunk V + N H + V H).
    With ``reduction="none"`` the backward recomputes the logits chunk by chunk (the per-row
    upstream gradient is not known in the forward).

    Logit transforms, for models that post-process their LM head's output: the logits of a side
    are ``f(z) = softcap * tanh(logit_scale * z / softcap)`` when its softcap is given, else
    ``logit_scale * z``, with z = hidden @ weight.T + bias (``student_logit_scale``,
    ``student_softcap``, ``teacher_logit_scale``, ``teacher_softcap``; real, finite, > 0; defaults:
    no transform). Gemma 2/3 ``final_logit_softcapping`` is the softcap, Cohere ``logit_scale`` the
    scale, Granite ``logits_scaling`` d the scale 1 / d. They apply chunk by chunk, with their
    gradient; a student softcap adds one float32 ``[chunk, V]`` block. ``teacher_logits`` are
    taken as they are: the teacher's transform with them is a ValueError.

    The chunk logits are float32 whatever the weights' dtype (float64 for float64): bf16/fp16
    products are summed and kept in float32 (rounding the logits to bf16 costs tens of percent of
    gradient accuracy when the student is close to the teacher); the gradient matmuls take the
    logits gradient in the weight dtype. Module docstring: Precision and Memory.

    ``num_items_in_batch`` (gradient accumulation) replaces the kept-row count, as in
    ``fastkd.kd_loss``. Under ``torch.autocast`` the float32 hidden states, weights and biases are
    cast to autocast's dtype, as ``F.linear`` would cast them (the logits chunks are float32 all
    the same, the products of those bf16/fp16 operands). Works inside
    ``torch.compile(fullgraph=True)``: the chunk loop is the custom operator
    ``fastkd::fused_linear_pass``.
    """
    (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
     teacher_bias) = _autocast_inputs(student_hidden, student_weight, student_bias, teacher_hidden,
                                      teacher_weight, teacher_bias)
    opts = make_options(temperature=temperature, divergence=divergence, beta=beta, skew=skew,
                        ignore_index=ignore_index, hard_weight=hard_weight, soft_weight=soft_weight,
                        t2_scale=t2_scale, reduction=reduction)
    check_fused_inputs(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                       teacher_bias, teacher_logits, labels, opts)
    chunk_size = check_chunk_size(chunk_size)
    transforms = check_transforms(student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap)
    if teacher_logits is not None and transforms[1] != IDENTITY:
        raise ValueError("teacher_logit_scale and teacher_softcap transform teacher_hidden @ teacher_weight.T; "
                         "teacher_logits are taken as they are: pass them already transformed")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    num_items_in_batch = check_num_items_in_batch(num_items_in_batch, opts.reduction)
    backend = resolve_backend(backend, student_hidden)

    V, H = student_weight.shape
    lead = student_hidden.shape[:-1]
    hidden2 = student_hidden.reshape(-1, H)
    t_hidden2 = None if teacher_hidden is None else teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    t_logits2 = None if teacher_logits is None else teacher_logits.reshape(-1, V)
    # contiguous: the Triton launcher (launch.kd_forward) takes no label stride and reads labels as dense
    labels1 = None if labels is None else labels.reshape(-1).contiguous()
    chunk = chunk_size or default_chunk_size(V, H, blocks=2 if transforms[0].softcap is None else 3)
    return FusedLinearKDFunction.apply(hidden2, student_weight, student_bias, t_hidden2, teacher_weight,
                                       teacher_bias, t_logits2, labels1, opts, backend, chunk, lead,
                                       num_items_in_batch, transforms)


class FusedLinearKDLoss(torch.nn.Module):
    """``fused_linear_kd_loss`` as a module:

        loss_fn = FusedLinearKDLoss(temperature=2.0)
        loss = loss_fn(student_hidden, student.lm_head.weight, teacher_hidden, teacher.lm_head.weight, labels)

    Takes the keyword options of ``fastkd.kd_loss`` (checked here, once), ``chunk_size`` and the
    logit transforms ``student_logit_scale``, ``student_softcap``, ``teacher_logit_scale``,
    ``teacher_softcap`` of ``fused_linear_kd_loss``.
    """

    def __init__(self, *, temperature=1.0, divergence="kl", beta=0.5, skew=0.1, ignore_index=-100,
                 hard_weight=0.0, soft_weight=1.0, t2_scale=True, reduction="batchmean",
                 inplace=False, backend="auto", chunk_size=None, student_logit_scale=1.0, student_softcap=None,
                 teacher_logit_scale=1.0, teacher_softcap=None):
        super().__init__()
        self.options = dict(temperature=temperature, divergence=divergence, beta=beta, skew=skew,
                            ignore_index=ignore_index, hard_weight=hard_weight, soft_weight=soft_weight,
                            t2_scale=t2_scale, reduction=reduction)
        make_options(**self.options)
        if not isinstance(inplace, bool):
            raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
        self.inplace, self.backend = inplace, check_backend(backend)
        self.chunk_size = check_chunk_size(chunk_size)
        self.transforms = dict(student_logit_scale=student_logit_scale, student_softcap=student_softcap,
                               teacher_logit_scale=teacher_logit_scale, teacher_softcap=teacher_softcap)
        check_transforms(**self.transforms)

    def forward(self, student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, labels=None, *,
                teacher_logits=None, student_bias=None, teacher_bias=None, num_items_in_batch=None):
        return fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                    teacher_logits=teacher_logits, student_bias=student_bias,
                                    teacher_bias=teacher_bias, chunk_size=self.chunk_size, labels=labels,
                                    inplace=self.inplace, backend=self.backend,
                                    num_items_in_batch=num_items_in_batch, **self.options, **self.transforms)

    def extra_repr(self):
        shown = {**self.options, "chunk_size": self.chunk_size, **self.transforms}
        return ", ".join(f"{k}={v!r}" for k, v in shown.items())
