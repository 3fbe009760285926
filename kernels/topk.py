"""Top-k log-probabilities of a tempered softmax in one read of the logits (``fastkd.teacher_topk``).

One row, t = logits / T, V columns:
    lse(t) = log sum_j exp(t_j)          (online max / sum-of-exps over vocabulary blocks)
    out_i  = t_{j_i} - lse(t)            for the k columns j_1..j_k of the largest t, largest first
Nothing is differentiated: the teacher is a constant.

Selection. Every value is packed with its column into one int64 key,
    key = (order_preserving_bits(float32(t_j)) << 32) | (2**32 - 1 - j),
so that comparing keys compares values first and, between equal values, puts the lower column first.
A running top-K_PAD (K_PAD = k rounded up to a power of two) is merged with each block:
    block top = tl.topk(block keys, K_PAD);  running = tl.topk(join(running, block top), K_PAD)
and a block none of whose keys beat the running K_PAD-th key is skipped. Columns past V get the
smallest int64, below every real key (including -inf logits), so they are never selected while
k <= V. Ties: equal values come out lowest column first. Float64 logits are ranked by their float32
rounding (values equal in float32 are ordered by column); their log-probabilities are exact.

Bytes per row, b the logits' element size: b * V read once (the k winners are re-loaded from the
row, which is in cache), 8 * k written. The merge costs O(BLOCK_V log^2 K_PAD) compare-exchanges on
chip per block that is not skipped: compute, not bandwidth, bounds large k.
"""
import triton
import triton.language as tl

from .row_stats import online_logsumexp_update, store

SMALLEST_KEY = tl.constexpr(-9223372036854775807 - 1)
LOW_32_BITS = tl.constexpr(0xFFFFFFFF)


@triton.jit
def _keys(t, cols, mask):
    """int64 keys ordering ``t`` descending by value, then ascending by column ``cols``."""
    bits = t.to(tl.float32).to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip magnitude bits
    key = (ordered.to(tl.int64) << 32) | (LOW_32_BITS - cols.to(tl.int64))
    return tl.where(mask, key, SMALLEST_KEY)


@triton.jit
def teacher_topk_kernel(
    x_ptr, x_row_stride, logprobs_ptr, indices_ptr, out_row_stride, V, K, inv_temperature: tl.float64,
    ACC_DTYPE: tl.constexpr, K_PAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    inv_temperature = tl.full((), inv_temperature, ACC_DTYPE)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    cols = tl.arange(0, BLOCK_V)

    m = tl.full((), float("-inf"), ACC_DTYPE)
    d = tl.zeros((), ACC_DTYPE)
    running = tl.full((K_PAD,), SMALLEST_KEY, tl.int64)
    for start in range(0, V, BLOCK_V):
        mask = start + cols < V
        t = tl.load(x_row + start + cols, mask=mask, other=float("-inf")).to(ACC_DTYPE) * inv_temperature
        m, d = online_logsumexp_update(m, d, t)
        keys = _keys(t, start + cols, mask)
        if tl.max(keys, axis=0) > tl.min(running, axis=0):
            block_top = tl.topk(keys, K_PAD)
            running = tl.topk(tl.reshape(tl.join(running, block_top), (2 * K_PAD,)), K_PAD)
    lse = m + tl.log(d)

    lanes = tl.arange(0, K_PAD)
    keep = lanes < K
    index = LOW_32_BITS - (running & LOW_32_BITS)
    t_top = tl.load(x_row + index, mask=keep, other=0.0).to(ACC_DTYPE) * inv_temperature
    out = row * out_row_stride + lanes
    store(logprobs_ptr + out, t_top - lse, mask=keep)
    store(indices_ptr + out, index, mask=keep)
