"""Fused linear + KD loss: the KD loss of ``hidden @ weight.T + bias`` without the ``[N, V]`` logits.

The rows (tokens) are cut into chunks of ``chunk`` rows. For each chunk, with h = hidden rows
``[chunk, H]``:

    z = h W^T + b                         student logits   [chunk, V]  (one reused buffer)
    z_t = h_t W_t^T + b_t  (no grad)      teacher logits   [chunk, V]  (or a slice of teacher_logits)
    loss_rows, G = kd_forward(z, z_t)     the fused per-row KD forward; G = d loss_rows / dz is
                                          written over z (inplace), so no second buffer
    dL/dh[rows] = G W                     [chunk, H]
    dL/dW      += G^T h                   [V, H], accumulated in float32 (float64 for float64)
    dL/db      += sum over rows of G      [V]

These are the gradients of the row losses' sum. The reduction divides them by a normaliser (kept
rows, times V for "mean"; a device tensor, never read on the host), and the backward multiplies
them by the upstream gradient, as ``fastkd.autograd.KDLossFunction`` does. ``reduction="none"``
has one upstream gradient per row, which is unknown when the forward runs, so there the forward
computes only the row losses and the backward recomputes the chunks with G scaled row by row
(twice the matmul work, the same bounded memory).

Memory beyond the inputs: the ``[N, H]`` hidden gradient, the ``[V, H]`` weight-gradient
accumulator (plus the weight-dtype copy returned for bf16/fp16 weights), and two ``[chunk, V]``
logits blocks (the torch backend adds its few work buffers of CHUNK_BYTES each, as for kd_loss).
That is O(chunk V + N H + V H), never O(N V).

Default chunk (``default_chunk_size``): ``H // 4`` rows rounded down to a power of two, clamped to
[MIN_CHUNK_ROWS, MAX_CHUNK_ROWS], then halved (not below MIN_CHUNK_ROWS) while one ``[chunk, V]``
float32 block exceeds MAX_CHUNK_LOGITS_BYTES. Tying the chunk to H keeps each logits block at most
a quarter of the weight (chunk V <= V H / 4), so the logits never dominate the ``[V, H]`` gradient
that must be held anyway, and for real models (H >= 1024) gives chunks of 256+ rows, enough for
the three matmuls of a chunk (2 chunk H V flops each, for one read of the V H weight) to run near
full speed (H = 1024, V = 32000 on a CPU: 64 rows 21, 256 rows 31, 4096 rows 36 GFLOP/s).
"""
import numbers
from typing import Optional

import torch
from torch import Tensor

from .autograd import graph_is_kept
from .backends import flat_labels, implementation, resolve_backend
from .buffers import accumulation_dtype, empty
from .ops import autocast_off, pack_kd_scalars, unpack_kd_options
from .options import FLOAT_DTYPES, check_backend, check_labels, check_logits, make_options, make_reduction
from .reduction import normaliser

MIN_CHUNK_ROWS = 16
MAX_CHUNK_ROWS = 1024
MAX_CHUNK_LOGITS_BYTES = 2**30


def default_chunk_size(V, H):
    """Rows per chunk for vocabulary ``V`` and hidden size ``H`` (the rule in the module docstring)."""
    rows = min(MAX_CHUNK_ROWS, max(MIN_CHUNK_ROWS, 1 << max(0, (max(H, 1) // 4).bit_length() - 1)))
    while rows > MIN_CHUNK_ROWS and rows * V * 4 > MAX_CHUNK_LOGITS_BYTES:
        rows //= 2
    return rows


def _kd_forward(backend, z, z_t, labels, opts, need_grad):
    """Row losses and the logits gradient, written over ``z``."""
    one = torch.ones(1, dtype=accumulation_dtype(z.dtype, z_t.dtype), device=z.device)
    if backend == "triton":
        return implementation("triton").kd_forward(z, z_t, labels, one, opts, inplace=True, need_grad=need_grad)
    # The chunk is already bounded; small work buffers keep the torch backend's share of it small.
    return implementation("torch").kd_forward(z, z_t, labels, one, opts, inplace=True, need_grad=need_grad,
                                              chunk_bytes=4 * 2**20)


# ---------------------------------------------------------------------------------------------
# The chunk loop


def _linear_into(out, x, weight, bias):
    """``out = x @ weight.T (+ bias)`` without a temporary."""
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def _chunked_pass(hidden, weight, bias, teacher, labels, opts, backend, chunk, *, want, row_scale=None):
    """One pass over the rows of ``hidden`` ``[N, H]``.

    ``teacher`` is ``("logits", z_t [N, V])`` or ``("linear", h_t [N, Ht], W_t, b_t)``. ``want``:
    which of (hidden, weight, bias) gradients to compute; ``row_scale`` ``[N]`` multiplies each
    row's logits gradient first (the "none" reduction's backward). Returns the row losses ``[N]``
    and the gradients (hidden in its dtype, weight and bias in the accumulation dtype) or None.
    """
    want_hidden, want_weight, want_bias = want
    need_grad = want_hidden or want_weight or want_bias
    N, V = hidden.shape[0], weight.shape[0]
    acc = accumulation_dtype(weight.dtype)
    device = hidden.device
    t_dtype = teacher[1].dtype
    row_loss = torch.zeros(N, dtype=accumulation_dtype(hidden.dtype, t_dtype), device=device)
    grad_hidden = empty((N, hidden.shape[1]), dtype=hidden.dtype, device=device) if want_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=acc, device=device) if want_weight else None
    grad_bias = torch.zeros(V, dtype=acc, device=device) if want_bias else None

    rows = min(chunk, N)
    z_buffer = empty((rows, V), dtype=hidden.dtype, device=device)
    t_buffer = empty((rows, V), dtype=t_dtype, device=device) if teacher[0] == "linear" else None
    impl = implementation(backend)
    for r0 in range(0, N, chunk):
        r1 = min(N, r0 + chunk)
        h = hidden[r0:r1]
        z = _linear_into(z_buffer[: r1 - r0], h, weight, bias)
        if teacher[0] == "logits":
            z_t = teacher[1][r0:r1]
            z_t = z_t if z_t.stride(-1) == 1 else z_t.contiguous()
        else:
            _, t_hidden, t_weight, t_bias = teacher
            z_t = _linear_into(t_buffer[: r1 - r0], t_hidden[r0:r1], t_weight, t_bias)
        label = None if labels is None else labels[r0:r1]
        loss, g = _kd_forward(backend, z, z_t, label, opts, need_grad)
        row_loss[r0:r1] = loss
        if not need_grad:
            continue
        if row_scale is not None:
            g = impl.scale_rows(g, row_scale[r0:r1], out=g)
        if want_hidden:
            torch.mm(g, weight, out=grad_hidden[r0:r1])
        if want_weight:
            if g.dtype == acc:
                grad_weight.addmm_(g.t(), h)
            else:  # bf16/fp16: one product per chunk in the weight dtype, summed in float32
                grad_weight.add_(torch.mm(g.t(), h))
        if want_bias:
            grad_bias.add_(g.sum(0, dtype=acc))
    return row_loss, grad_hidden, grad_weight, grad_bias


# ---------------------------------------------------------------------------------------------
# The chunk loop as one custom operator, so that torch.compile keeps it whole (see fastkd.ops)


@torch.library.custom_op("fastkd::fused_linear_pass", mutates_args=())
def _fused_linear_pass(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], t_hidden: Optional[Tensor],
                       t_weight: Optional[Tensor], t_bias: Optional[Tensor], t_logits: Optional[Tensor],
                       labels: Optional[Tensor], row_scale: Optional[Tensor], scalars: Tensor, divergence: str,
                       t2_scale: bool, ignore_index: int, backend: str, chunk: int, want_hidden: bool,
                       want_weight: bool, want_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    opts = unpack_kd_options(scalars, divergence, t2_scale, ignore_index)
    teacher = ("logits", t_logits) if t_logits is not None else ("linear", t_hidden, t_weight, t_bias)
    with autocast_off(hidden.device):
        results = _chunked_pass(hidden, weight, bias, teacher, labels, opts, backend, chunk,
                                want=(want_hidden, want_weight, want_bias), row_scale=row_scale)
    return tuple(hidden.new_empty(0) if r is None else r for r in results)


@_fused_linear_pass.register_fake
def _(hidden, weight, bias, t_hidden, t_weight, t_bias, t_logits, labels, row_scale, scalars, divergence,
      t2_scale, ignore_index, backend, chunk, want_hidden, want_weight, want_bias):
    acc = accumulation_dtype(weight.dtype)
    t_dtype = (t_logits if t_logits is not None else t_hidden).dtype
    none = hidden.new_empty(0)
    return (hidden.new_empty(hidden.shape[0], dtype=accumulation_dtype(hidden.dtype, t_dtype)),
            hidden.new_empty(hidden.shape) if want_hidden else none,
            weight.new_empty(weight.shape, dtype=acc) if want_weight else none,
            weight.new_empty(weight.shape[0], dtype=acc) if want_bias else none)


def _chunked_pass_op(hidden, weight, bias, teacher, labels, opts, backend, chunk, *, want, row_scale=None):
    """``_chunked_pass`` through the ``fastkd::fused_linear_pass`` operator: same arguments and results."""
    if teacher[0] == "logits":
        t_hidden, t_weight, t_bias, t_logits = None, None, None, teacher[1]
    else:
        (_, t_hidden, t_weight, t_bias), t_logits = teacher, None
    row_loss, *grads = torch.ops.fastkd.fused_linear_pass(
        hidden, weight, bias, t_hidden, t_weight, t_bias, t_logits, labels, row_scale, pack_kd_scalars(opts),
        opts.divergence, opts.t2_scale, opts.ignore_index, backend, chunk, *want)
    return (row_loss, *(grad if wanted else None for grad, wanted in zip(grads, want)))


def _autocast_inputs(*tensors):
    """Under ``torch.autocast``, the matmul operands in autocast's dtype, as ``F.linear`` would take
    them (float32 ones only; float64 stays, as autocast leaves it)."""
    device = tensors[0].device.type if isinstance(tensors[0], torch.Tensor) else None
    if device is None or not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.dtype == torch.float32 else x for x in tensors)


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
    def forward(ctx, hidden, weight, bias, t_hidden, t_weight, t_bias, t_logits, labels, opts, reduction, backend,
                chunk, out_shape):
        want = tuple(ctx.needs_input_grad[:3])
        want = (want[0], want[1], want[2] and bias is not None)
        teacher = ("logits", t_logits) if t_logits is not None else ("linear", t_hidden, t_weight, t_bias)
        N, V = hidden.shape[0], weight.shape[0]
        ctx.opts, ctx.reduction, ctx.backend, ctx.chunk, ctx.want = opts, reduction, backend, chunk, want
        ctx.dtypes = (hidden.dtype, weight.dtype)

        if reduction.kind == "none":
            row_loss, *_ = _chunked_pass_op(hidden, weight, bias, teacher, labels, opts, backend, chunk,
                                         want=(False, False, False))
            if any(want):
                ctx.save_for_backward(hidden, weight, bias, t_hidden, t_weight, t_bias, t_logits, labels)
            return row_loss.reshape(out_shape)

        row_loss, *grads = _chunked_pass_op(hidden, weight, bias, teacher, labels, opts, backend, chunk, want=want)
        denominator = normaliser(reduction, labels, N, V, opts.ignore_index, device=hidden.device,
                                 dtype=row_loss.dtype)
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
        if ctx.reduction.kind == "none":
            hidden, weight, bias, t_hidden, t_weight, t_bias, t_logits, labels = ctx.saved_tensors
            teacher = ("logits", t_logits) if t_logits is not None else ("linear", t_hidden, t_weight, t_bias)
            row_scale = grad_loss.reshape(-1).to(accumulation_dtype(hidden.dtype, teacher[1].dtype))
            _, grad_hidden, grad_weight, grad_bias = _chunked_pass_op(
                hidden, weight, bias, teacher, labels, opts, ctx.backend, ctx.chunk, want=want,
                row_scale=row_scale)
            grad_weight = None if grad_weight is None else grad_weight.to(weight_dtype)
            grad_bias = None if grad_bias is None else grad_bias.to(weight_dtype)
        else:
            grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
            scale = grad_loss.reshape(()).to(acc)
            if ctx.denominator is not None:
                scale = scale / ctx.denominator
            # The saved gradients are ours: scale them in place unless the graph may run backward again.
            in_place = not graph_is_kept()
            grad_hidden = _scaled(grad_hidden, scale, hidden_dtype, in_place)
            grad_weight = _scaled(grad_weight, scale, weight_dtype, in_place)
            grad_bias = _scaled(grad_bias, scale, weight_dtype, in_place)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None, None, None, None


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
                         reduction="batchmean", inplace=False, backend="auto", num_items_in_batch=None):
    """``kd_loss(student_hidden @ student_weight.T + student_bias, teacher logits, **kd_options)``
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

    ``num_items_in_batch`` (gradient accumulation) replaces the kept-row count, as in
    ``fastkd.kd_loss``. Under ``torch.autocast`` the float32 hidden states, weights and biases are
    cast to autocast's dtype, as ``F.linear`` would cast them (the logits chunks are in that dtype,
    the statistics float32). Works inside ``torch.compile(fullgraph=True)``: the chunk loop is the
    custom operator ``fastkd::fused_linear_pass``.
    """
    (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
     teacher_bias) = _autocast_inputs(student_hidden, student_weight, student_bias, teacher_hidden,
                                      teacher_weight, teacher_bias)
    opts = make_options(temperature=temperature, divergence=divergence, beta=beta, skew=skew,
                        ignore_index=ignore_index, hard_weight=hard_weight, soft_weight=soft_weight,
                        t2_scale=t2_scale)
    check_fused_inputs(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                       teacher_bias, teacher_logits, labels, opts)
    chunk_size = check_chunk_size(chunk_size)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    reduction = make_reduction(reduction, num_items_in_batch)
    backend = resolve_backend(backend, student_hidden)

    V, H = student_weight.shape
    lead = student_hidden.shape[:-1]
    hidden2 = student_hidden.reshape(-1, H)
    t_hidden2 = None if teacher_hidden is None else teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    t_logits2 = None if teacher_logits is None else teacher_logits.reshape(-1, V)
    labels1 = flat_labels(labels)
    chunk = chunk_size or default_chunk_size(V, H)
    return FusedLinearKDFunction.apply(hidden2, student_weight, student_bias, t_hidden2, teacher_weight,
                                       teacher_bias, t_logits2, labels1, opts, reduction, backend, chunk, lead)


class FusedLinearKDLoss(torch.nn.Module):
    """``fused_linear_kd_loss`` as a module:

        loss_fn = FusedLinearKDLoss(temperature=2.0)
        loss = loss_fn(student_hidden, student.lm_head.weight, teacher_hidden, teacher.lm_head.weight, labels)

    Takes the keyword options of ``fastkd.kd_loss`` (checked here, once) and ``chunk_size``.
    """

    def __init__(self, *, temperature=1.0, divergence="kl", beta=0.5, skew=0.1, ignore_index=-100,
                 hard_weight=0.0, soft_weight=1.0, t2_scale=True, reduction="batchmean",
                 inplace=False, backend="auto", chunk_size=None):
        super().__init__()
        self.options = dict(temperature=temperature, divergence=divergence, beta=beta, skew=skew,
                            ignore_index=ignore_index, hard_weight=hard_weight, soft_weight=soft_weight,
                            t2_scale=t2_scale, reduction=reduction)
        make_options(**{k: v for k, v in self.options.items() if k != "reduction"})
        make_reduction(reduction)
        if not isinstance(inplace, bool):
            raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
        self.inplace, self.backend = inplace, check_backend(backend)
        self.chunk_size = check_chunk_size(chunk_size)

    def forward(self, student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, labels=None, *,
                teacher_logits=None, student_bias=None, teacher_bias=None, num_items_in_batch=None):
        return fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                    teacher_logits=teacher_logits, student_bias=student_bias,
                                    teacher_bias=teacher_bias, chunk_size=self.chunk_size, labels=labels,
                                    inplace=self.inplace, backend=self.backend,
                                    num_items_in_batch=num_items_in_batch, **self.options)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in {**self.options, "chunk_size": self.chunk_size}.items())
