"""The one place that launches Triton kernels: allocates outputs, picks block sizes and grids.

Every launcher takes 2-D tensors whose last dimension is contiguous (any row stride) and an optional
``block_v`` override so tests can force the multi-block paths at tiny V. Triton and the kernels are
imported on first use, never at ``import fastkd``.
"""
import math

import torch

from .buffers import accumulation_dtype, empty, gradient_buffer
from .options import DIVERGENCES, KDOptions

MAX_BLOCK_V = 4096


def _kernels():
    import triton.language as tl

    from .kernels import kd_loss, scale, softmax

    return tl, kd_loss, scale, softmax


def _block_and_warps(V, block_v):
    block = block_v or min(MAX_BLOCK_V, 1 << max(0, math.ceil(math.log2(max(V, 1)))))
    block = max(block, 16)
    warps = 16 if block >= 4096 else 8 if block >= 2048 else 4
    return block, warps


def _tl_dtype(tl, dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def kd_forward(student, teacher, labels, opts: KDOptions, *, inplace=False, need_grad=True, block_v=None):
    """Per-row loss ``[N]`` (float32, float64 for float64 input) and student gradient ``[N, V]``
    (student dtype; for the sum reduction with an upstream gradient of 1, None unless
    ``need_grad``). With ``inplace`` the gradient is written into ``student``'s storage."""
    tl, kd_loss, _, _ = _kernels()
    N, V = student.shape
    acc = accumulation_dtype(student.dtype, teacher.dtype)
    loss = empty(N, dtype=acc, device=student.device)
    grad = gradient_buffer(student, inplace, need_grad)
    if N == 0:
        return loss, grad
    block, warps = _block_and_warps(V, block_v)
    mix, log_wp, log_wq = opts.mixture_weights()
    kd_loss.kd_forward_kernel[(N,)](
        student, student.stride(0), teacher, teacher.stride(0),
        labels if labels is not None else loss, loss if grad is None else grad,
        0 if grad is None else grad.stride(0), loss,
        V, 1.0 / opts.temperature, mix, log_wp, log_wq,
        opts.soft_scale, opts.hard_weight, opts.ignore_index,
        DIVERGENCE=DIVERGENCES.index(opts.divergence), HAS_LABELS=labels is not None,
        HAS_CE=opts.hard_weight != 0, WRITE_GRAD=grad is not None, ACC_DTYPE=_tl_dtype(tl, acc), BLOCK_V=block, num_warps=warps,
    )
    return loss, grad


def scale_rows(grad, scale, *, out=None, block_v=None):
    """``grad * scale[:, None]`` (``scale`` of one value per row, or one value), written to ``out``
    (which may be ``grad`` itself)."""
    tl, _, scale_kernels, _ = _kernels()
    N, V = grad.shape
    out = empty((N, V), dtype=grad.dtype, device=grad.device) if out is None else out
    if N == 0 or V == 0:
        return out
    block, warps = _block_and_warps(V, block_v)
    scale_kernels.scale_rows_kernel[(N, math.ceil(V / block))](
        grad, grad.stride(0), out, out.stride(0), scale, 0 if scale.numel() == 1 else scale.stride(0), V,
        ACC_DTYPE=_tl_dtype(tl, accumulation_dtype(grad.dtype)), BLOCK_V=block, num_warps=warps,
    )
    return out


def softmax_forward(x, temperature, *, log, block_v=None):
    tl, _, _, softmax = _kernels()
    N, V = x.shape
    y = empty((N, V), dtype=x.dtype, device=x.device)
    if N == 0:
        return y
    block, warps = _block_and_warps(V, block_v)
    softmax.softmax_forward_kernel[(N,)](
        x, x.stride(0), y, y.stride(0), V, 1.0 / temperature,
        LOG=log, ACC_DTYPE=_tl_dtype(tl, accumulation_dtype(x.dtype)), BLOCK_V=block, num_warps=warps,
    )
    return y


def softmax_backward(y, dy, temperature, *, log, block_v=None):
    tl, _, _, softmax = _kernels()
    N, V = y.shape
    dx = empty((N, V), dtype=y.dtype, device=y.device)
    if N == 0:
        return dx
    block, warps = _block_and_warps(V, block_v)
    softmax.softmax_backward_kernel[(N,)](
        y, y.stride(0), dy, dy.stride(0), dx, dx.stride(0), V, 1.0 / temperature,
        LOG=log, ACC_DTYPE=_tl_dtype(tl, accumulation_dtype(y.dtype, dy.dtype)), BLOCK_V=block, num_warps=warps,
    )
    return dx
