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

These are the gradients of the row losses' sum times ``grad_scale``: the kernels take the
reduction's 1 / normaliser (``fastkd.reduction``), so the backward only multiplies them by the
upstream gradient, as for ``kd_loss``. ``reduction="none"`` has one upstream gradient per row,
which is unknown when the forward runs, so there the forward computes only the row losses and the
backward recomputes the chunks with G scaled row by row (twice the matmul work, the same bounded
memory).

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
its work buffers, as for kd_loss: see ``fastkd.backends.torch``; without a float32-output matmul, bf16/fp16 inputs
add a float32 copy of the chunk's hidden rows ``[chunk, H]`` and one weight tile of
UPCAST_TILE_BYTES). That is O(chunk V + N H + V H), never O(N V).

Default chunk (``default_chunk_size``): ``H // 4`` rows rounded down to a power of two, clamped to
[MATMUL_ROWS, MAX_CHUNK_ROWS], then halved (not below MIN_CHUNK_ROWS) while the chunk's float32
blocks together exceed MAX_CHUNK_BYTES, on the CPU CPU_CHUNK_BYTES. The CPU's cap is what bounds
the memory at large vocabularies, where the weight gradient that both fused and unfused paths hold
is most of it: at V = 128256, H = 2048, N = 2048 (fp32 JSD, fwd + bwd) the 512 rows of the 1 GiB
cap took 1536 MiB of peak extra memory, 0.37 times TRL's chunked divergence's 4111 MiB, of which
1002 MiB is the float32 weight gradient itself (so 0.24 times is the floor there); 128 rows hold
125 MiB of blocks instead of 501 MiB. It leaves V = 32000 at the H // 4 rows. Tying the chunk to H
keeps each block at most a quarter of the weight's elements (chunk V <= V H / 4) for real models
(H >= 1024), so the two or three float32 blocks stay below the float32 ``[V, H]`` weight-gradient
accumulator that must be held anyway.
MATMUL_ROWS is the least that lets the three matmuls of a chunk (2 chunk H V flops each,
for one read of the V H weight) run near full speed (H = 1024, V = 32000 on a CPU: 64 rows 21,
256 rows 31, 4096 rows 36 GFLOP/s): with a small H, chunks of H // 4 rows made the fused loss
slower than the unfused one (H = 256, V = 32000, fp32 fwd + bwd on 2 shared cores, N = 4096, one
run, 3 alternating rounds: 64-row chunks 1.40 times the time of materialising the logits, 256 rows
0.93 times); there the blocks may exceed the (small) weight, by 256 V floats.
The chunk is the driver's own, independent of the torch backend's chunks (``kd_forward`` cuts each
driver chunk into its own, which its worker threads share).
"""
import functools
import math

import torch

from .backends import implementation
from .buffers import accumulation_dtype, empty
from .options import IDENTITY, check_logit_transform

MIN_CHUNK_ROWS = 16
MATMUL_ROWS = 256
MAX_CHUNK_ROWS = 1024
MAX_CHUNK_BYTES = 2**30  # all the float32 [chunk, V] blocks of a chunk together
CPU_CHUNK_BYTES = 128 * 2**20  # the same on the CPU
UPCAST_TILE_BYTES = 8 * 2**20  # the float32 weight tile of the upcast product (no float32-output matmul)


def default_chunk_size(V, H, blocks=2, device_type="cuda"):
    """Rows per chunk for vocabulary ``V``, hidden size ``H``, ``blocks`` float32 ``[chunk, V]``
    buffers (2; 3 with a student softcap) and the tensors' ``device_type``: the rule in the module
    docstring."""
    rows = min(MAX_CHUNK_ROWS, max(MATMUL_ROWS, 1 << max(0, (max(H, 1) // 4).bit_length() - 1)))
    max_bytes = CPU_CHUNK_BYTES if device_type == "cpu" else MAX_CHUNK_BYTES
    while rows > MIN_CHUNK_ROWS and blocks * rows * V * 4 > max_bytes:
        rows //= 2
    return rows


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


def _student_entropy(z, temperature):
    """Per-row entropy of softmax(z / T) of chunk logits ``z`` (after the logit transform), in z's
    dtype; no gradient. A -inf column adds 0. Transient memory: one ``[chunk, V]`` block (two when
    T != 1)."""
    q = torch.softmax(z if temperature == 1.0 else z / temperature, dim=-1)
    return torch.special.entr(q, out=q).sum(-1)


def _low_precision_view(buffer, dtype, shape):
    """A ``dtype`` tensor of ``shape`` on the storage of the wider contiguous ``buffer``."""
    return buffer.view(-1).view(dtype)[: math.prod(shape)].view(shape)


# ---------------------------------------------------------------------------------------------
# The chunk loop


def _teacher_chunk(teacher, buffer, r0, r1, transform):
    """One teacher's logits for rows [r0, r1): a slice of its logits, or f_t(h_t W_t^T + b_t) in ``buffer``."""
    if teacher[0] == "logits":
        z_t = teacher[1][r0:r1]
        return z_t if z_t.stride(-1) == 1 else z_t.contiguous()
    _, t_hidden, t_weight, t_bias = teacher
    return _transform_(_linear_into(buffer[: r1 - r0], t_hidden[r0:r1], t_weight, t_bias), transform)


def chunked_pass(hidden, weight, bias, teachers, labels, grad_scale, opts, backend, chunk, *, want, row_scale=None,
                 transforms=(IDENTITY, IDENTITY), chunk_loss=None, want_entropy=False):
    """One pass over the rows of ``hidden`` ``[N, H]``.

    ``teachers``: a tuple of ``("logits", z_t [N, V])`` or ``("linear", h_t [N, Ht], W_t, b_t)``,
    one per teacher (their mixture, with ``opts.teacher_weights``). ``want``:
    which of (hidden, weight, bias) gradients to compute; ``grad_scale`` ``[1]`` multiplies every
    logits gradient (the reduction's 1 / normaliser); ``row_scale`` ``[N]`` multiplies each row's
    (the "none" reduction's backward); ``transforms``: the student's and the teacher's
    ``LogitTransform``; ``chunk_loss(z, z_ts, labels, need_grad) -> (row losses, G')`` replaces the
    backend's ``kd_forward`` (the vocabulary-parallel loss: ``fastkd.vocab_parallel_linear``);
    ``want_entropy``: also the student's entropy per row, of softmax(f_s(z) / T) from the same
    chunk logits (no gradient). Returns the row losses ``[N]``, the gradients (hidden in its dtype,
    weight and bias in the accumulation dtype) or None, and the row entropies ``[N]`` (accumulation
    dtype) or None.
    """
    want_hidden, want_weight, want_bias = want
    need_grad = want_hidden or want_weight or want_bias
    student_transform, teacher_transform = transforms
    N, V = hidden.shape[0], weight.shape[0]
    acc = accumulation_dtype(weight.dtype)
    device = hidden.device
    row_loss = torch.zeros(N, dtype=accumulation_dtype(hidden.dtype, *(t[1].dtype for t in teachers)), device=device)
    grad_hidden = empty((N, hidden.shape[1]), dtype=hidden.dtype, device=device) if want_hidden else None
    # The first chunk's product is written into grad_weight, the others added: no pass to zero it.
    grad_weight = (empty if N else torch.zeros)(weight.shape, dtype=acc, device=device) if want_weight else None
    grad_bias = torch.zeros(V, dtype=acc, device=device) if want_bias else None
    entropy = torch.zeros(N, dtype=acc, device=device) if want_entropy else None

    # The chunk buffers (module docstring, Memory): float32 student and teacher logits, tanh for a
    # student softcap's gradient, and G in the weight dtype for bf16/fp16 weights.
    rows = min(chunk, N)
    z_buffer = empty((rows, V), dtype=acc, device=device)
    t_buffers = [empty((rows, V), dtype=accumulation_dtype(t[1].dtype), device=device) if t[0] == "linear" else None
                 for t in teachers]
    t_buffer = t_buffers[0]
    keep_tanh = need_grad and student_transform.softcap is not None
    tanh_buffer = empty((rows, V), dtype=acc, device=device) if keep_tanh else None
    g_buffer = None
    if (want_hidden or want_weight) and weight.dtype != acc:
        g_buffer = (_low_precision_view(t_buffer, weight.dtype, (rows, V)) if t_buffer is not None
                    else empty((rows, V), dtype=weight.dtype, device=device))
    impl = implementation(backend)
    for r0 in range(0, N, chunk):
        r1 = min(N, r0 + chunk)
        h = hidden[r0:r1]
        tanh = None if tanh_buffer is None else tanh_buffer[: r1 - r0]
        z = _transform_(_linear_into(z_buffer[: r1 - r0], h, weight, bias), student_transform, tanh)
        if want_entropy:  # before the KD forward overwrites z with its gradient
            entropy[r0:r1] = _student_entropy(z, opts.temperature)
        z_ts = [_teacher_chunk(t, buffer, r0, r1, teacher_transform) for t, buffer in zip(teachers, t_buffers)]
        label = None if labels is None else labels[r0:r1]
        # Row losses and the logits gradient (times grad_scale), written over z.
        if chunk_loss is None:
            loss, g = impl.kd_forward(z, z_ts, label, grad_scale, opts, inplace=True, need_grad=need_grad)
        else:
            loss, g = chunk_loss(z, z_ts, label, need_grad)
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
                grad_weight.addmm_(g.t(), h) if r0 else torch.mm(g.t(), h, out=grad_weight)
            else:  # bf16/fp16: one product per chunk in the weight dtype, summed in float32
                product = torch.mm(g.t(), h)
                grad_weight.add_(product) if r0 else grad_weight.copy_(product)
    return row_loss, grad_hidden, grad_weight, grad_bias, entropy
