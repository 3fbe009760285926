"""Launchers of the top-k kernels (``kernels/topk.py``, ``kernels/topk_kd_loss.py``).

Same conventions as ``fastkd.launch``: 2-D inputs with a unit column stride (any row stride),
block-size overrides for tests, Triton imported on first use.
"""
import math

import torch

from . import launch
from .buffers import accumulation_dtype, empty, gradient_buffer
from .options import DIVERGENCES, KDOptions
from .topk_options import TAILS

MAX_TOPK_K = 1024  # the one-pass selection keeps k keys on chip; larger k uses torch.topk
MAX_BLOCK_K = 1024


def _kernels():
    import triton.language as tl

    from .kernels import topk, topk_kd_loss

    return tl, topk, topk_kd_loss


def _pow2(n):
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def teacher_topk(logits, k, temperature, *, block_v=None):
    """Top-k log-probabilities of softmax(logits / T) ``[N, k]`` (float32; float64 for float64
    logits), sorted descending, and their columns ``[N, k]`` int32. Needs k <= ``MAX_TOPK_K``."""
    tl, topk, _ = _kernels()
    N, V = logits.shape
    acc = accumulation_dtype(logits.dtype)
    logprobs = empty((N, k), dtype=acc, device=logits.device)
    indices = empty((N, k), dtype=torch.int32, device=logits.device)
    if N == 0:
        return logprobs, indices
    if k > MAX_TOPK_K:
        raise ValueError(f"the Triton top-k kernel takes k <= {MAX_TOPK_K}, got k={k}")
    k_pad = max(2, _pow2(k))
    block, warps = launch._block_and_warps(V, block_v)
    block = max(block, k_pad)
    topk.teacher_topk_kernel[(N,)](
        logits, logits.stride(0), logprobs, indices, k, V, k, 1.0 / temperature,
        ACC_DTYPE=launch._tl_dtype(tl, acc), K_PAD=k_pad, BLOCK_V=block, num_warps=warps,
    )
    return logprobs, indices


def topk_kd_forward(student, teacher_logprobs, teacher_indices, labels, opts: KDOptions, tail, *,
                    inplace=False, need_grad=True, block_v=None, block_k=None):
    """Per-row loss ``[N]`` and the dense student gradient ``[N, V]`` of the top-k KD loss, as
    ``fastkd.launch.kd_forward`` (the math is at the top of ``kernels/topk_kd_loss.py``)."""
    tl, _, topk_kd_loss = _kernels()
    N, V = student.shape
    K = teacher_logprobs.shape[1]
    acc = accumulation_dtype(student.dtype, teacher_logprobs.dtype)
    loss = empty(N, dtype=acc, device=student.device)
    grad = gradient_buffer(student, inplace, need_grad)
    if N == 0:
        return loss, grad
    # The listed columns' gradients, parked between the kernel's passes (see its docstring).
    scratch = loss if grad is None else empty((N, K), dtype=acc, device=student.device)
    block, warps = launch._block_and_warps(V, block_v)
    block_k = block_k or min(MAX_BLOCK_K, max(2, _pow2(K)))
    mix, log_wp, log_wq = opts.mixture_weights()
    topk_kd_loss.topk_kd_forward_kernel[(N,)](
        student, student.stride(0), teacher_logprobs, teacher_logprobs.stride(0),
        teacher_indices, teacher_indices.stride(0), labels if labels is not None else loss,
        loss if grad is None else grad, 0 if grad is None else grad.stride(0),
        scratch, loss,
        V, K, 1.0 / opts.temperature, mix, log_wp, log_wq,
        opts.soft_scale, opts.hard_weight, opts.ignore_index,
        DIVERGENCE=DIVERGENCES.index(opts.divergence), TAIL=TAILS.index(tail),
        HAS_LABELS=labels is not None, HAS_CE=opts.hard_weight != 0, WRITE_GRAD=grad is not None,
        ACC_DTYPE=launch._tl_dtype(tl, acc), BLOCK_V=block, BLOCK_K=block_k, num_warps=warps,
    )
    return loss, grad
