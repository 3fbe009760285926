"""Launchers of the vocabulary-parallel kernels (``kernels/vocab_parallel.py``) on one rank's shard.

Same conventions as ``fastkd.launch``: 2-D inputs with a unit column stride (any row stride), block
sizes from ``fastkd.launch``'s heuristic (``block_v`` overrides it), triton imported on first use.
``fastkd.torch_vocab_parallel`` is the pure-PyTorch peer with the same functions and signatures.

STATS [N, 8] columns: the shard's m_s, m_t, m_z, d_s, d_t, d_z, cross, z_y (see the kernel file).
ROW [N, 7] columns: the global lse_s, lse_t, lse_z, D, A1, A2 of each row and nan_row (0, or NaN
for a row whose loss and gradient are NaN).
"""
from .buffers import accumulation_dtype, empty, gradient_buffer
from .launch import _block_and_warps, _tl_dtype
from .options import DIVERGENCES, KDOptions

STATS = ("m_s", "m_t", "m_z", "d_s", "d_t", "d_z", "cross", "z_y")
ROW = ("lse_s", "lse_t", "lse_z", "divergence", "A1", "A2", "nan_row")


def _kernels():
    import triton.language as tl

    from .kernels import vocab_parallel

    return tl, vocab_parallel


def partial_stats(student, teacher, labels, opts: KDOptions, vocab_start, *, block_v=None):
    """The shard's per-row STATS ``[N, 8]`` (float32; float64 for float64 input)."""
    tl, kernels = _kernels()
    N, W = student.shape
    acc = accumulation_dtype(student.dtype, teacher.dtype)
    stats = empty((N, len(STATS)), dtype=acc, device=student.device)
    if N == 0:
        return stats
    block, warps = _block_and_warps(W, block_v)
    kernels.partial_stats_kernel[(N,)](
        student, student.stride(0), teacher, teacher.stride(0), labels if labels is not None else stats, stats,
        W, vocab_start, 1.0 / opts.temperature, opts.ignore_index,
        DIVERGENCE=DIVERGENCES.index(opts.divergence), HAS_LABELS=labels is not None,
        HAS_CE=opts.hard_weight != 0, ACC_DTYPE=_tl_dtype(tl, acc), BLOCK_V=block, num_warps=warps,
    )
    return stats


def row_scalars(student, teacher, labels, row, opts: KDOptions, *, block_v=None):
    """The shard's part of the row scalars A1, A2 ``[N, 2]`` from the global lse's in ``row``."""
    tl, kernels = _kernels()
    N, W = student.shape
    scalars = empty((N, 2), dtype=row.dtype, device=student.device)
    if N == 0:
        return scalars
    block, warps = _block_and_warps(W, block_v)
    mix, log_wp, log_wq = opts.mixture_weights()
    kernels.row_scalars_kernel[(N,)](
        student, student.stride(0), teacher, teacher.stride(0), labels if labels is not None else row,
        row, scalars, W, 1.0 / opts.temperature, mix, log_wp, log_wq, opts.ignore_index,
        DIVERGENCE=DIVERGENCES.index(opts.divergence), HAS_LABELS=labels is not None,
        ACC_DTYPE=_tl_dtype(tl, row.dtype), BLOCK_V=block, num_warps=warps,
    )
    return scalars


def shard_gradient(student, teacher, labels, row, opts: KDOptions, vocab_start, *, inplace=False, block_v=None):
    """The gradient of the row losses w.r.t. the shard ``[N, W]`` (student dtype), from ``row``.
    With ``inplace`` it is written into ``student``'s storage."""
    tl, kernels = _kernels()
    N, W = student.shape
    grad = gradient_buffer(student, inplace, True)
    if N == 0:
        return grad
    block, warps = _block_and_warps(W, block_v)
    mix, log_wp, log_wq = opts.mixture_weights()
    kernels.shard_gradient_kernel[(N,)](
        student, student.stride(0), teacher, teacher.stride(0), labels if labels is not None else row,
        row, grad, grad.stride(0), W, vocab_start, 1.0 / opts.temperature, mix, log_wp, log_wq,
        opts.soft_scale / opts.temperature, opts.hard_weight, opts.ignore_index,
        DIVERGENCE=DIVERGENCES.index(opts.divergence), HAS_LABELS=labels is not None,
        HAS_CE=opts.hard_weight != 0, ACC_DTYPE=_tl_dtype(tl, row.dtype), BLOCK_V=block, num_warps=warps,
    )
    return grad
