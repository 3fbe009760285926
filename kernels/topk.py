"""Top-k log-probabilities of a tempered softmax in one read of the logits (``fastkd.teacher_topk``).

One row, t = logits / T, V columns, m = max_j t_j:
    d      = sum_j exp(t_j - m)          (online max / sum-of-exps per tile row, folded once a row)
    out_i  = (t_{j_i} - m) - log d       for the k columns j_1..j_k of the largest t, largest first
(= t_{j_i} - lse(t), but no term rounds at the scale of t itself: the first is -log d, and the k
log-probabilities sum to at most 1 within a few ulps however large the logits are.)
Nothing is differentiated: the teacher is a constant.

The row is walked in whole 16-byte groups (row_tiles.py): its aligned body in tiles of BLOCK_V
columns, then its head and tail in one edge tile of max(K_PAD, 2 VEC) columns, so the loads are
16 bytes wide at any V and row stride. Each tile is folded into the log-sum-exp and the selection.

Selection. Every value is packed with its column into one int64 key,
    key = (order_preserving_bits(float32(t_j)) << 32) | (2**32 - 1 - j),
so that comparing keys compares values first and, between equal values, puts the lower column first.
A running top-K_PAD (K_PAD = k rounded up to a power of two) is merged with each tile:
    tile top = tl.topk(tile keys, K_PAD);  running = tl.topk(join(running, tile top), K_PAD)
unless the tile's largest float32 t is below ``floor``, the float32 value of the running K_PAD-th
key: then no key of the tile can enter the list, and the tile costs its log-sum-exp and one float
maximum. ``floor`` is -inf while the list holds a column-less key, so no tile is skipped before the
list holds K_PAD real keys (or all real keys of a row of fewer than K_PAD columns). Columns past V
get the smallest int64, below every real key (including -inf logits), so they are never selected
while k <= V. Ties: equal values come out lowest column first, whatever order the tiles are
visited in. Float64 logits are ranked by their float32 rounding (values equal in float32 are
ordered by column); their log-probabilities are exact. A row with a NaN has NaN log-probabilities
(at k distinct columns of the row: a tile whose maximum is NaN is merged, never skipped).

Bytes per row, b the logits' element size: b * V read once (the k winners are re-loaded from the
row, which is in cache), 8 * k written. The merge costs O(BLOCK_V log^2 K_PAD) compare-exchanges on
chip per tile that is not skipped: compute, not bandwidth, bounds large k.
"""
import triton
import triton.language as tl

from .row_stats import fold_tile, online_logsumexp_update, store, tile_rows_to_row
from .row_tiles import body_pointer, body_tile, edge_tile, load_tile, row_split

SMALLEST_KEY = tl.constexpr(-9223372036854775807 - 1)
LOW_32_BITS = tl.constexpr(0xFFFFFFFF)


@triton.jit
def _order(bits):
    """Order-preserving int32 of float32 ``bits`` (negative floats: flip the magnitude bits), and
    back: the map is its own inverse."""
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _keys(t, cols, mask):
    """int64 keys ordering ``t`` descending by value, then ascending by column ``cols``."""
    ordered = _order(t.to(tl.float32).to(tl.int32, bitcast=True))
    key = (ordered.to(tl.int64) << 32) | (LOW_32_BITS - cols.to(tl.int64))
    return tl.where(mask, key, SMALLEST_KEY)


@triton.jit
def _floor(running):
    """float32 value of the smallest running key; -inf while that key is SMALLEST_KEY (no column)."""
    smallest = tl.min(running, axis=0)
    value = _order((smallest >> 32).to(tl.int32)).to(tl.float32, bitcast=True)
    return tl.where(smallest == SMALLEST_KEY, float("-inf"), value)


@triton.jit
def _merge(running, keys, K_PAD: tl.constexpr):
    """The top K_PAD of ``running`` and the 1-D ``keys``."""
    return tl.topk(tl.reshape(tl.join(running, tl.topk(keys, K_PAD)), (2 * K_PAD,)), K_PAD)


@triton.jit
def _fold(m, d, running, floor, x_row, offsets, mask, head, inv_temperature, ACC_DTYPE: tl.constexpr,
          K_PAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """One body tile: per-tile-row log-sum-exp (m, d), and the running top K_PAD keys and their floor."""
    t = load_tile(x_row, offsets, mask, inv_temperature, ACC_DTYPE, "")
    m, d, _, _ = fold_tile(m, d, t)
    top = tl.max(tl.max(t, axis=1), axis=0).to(tl.float32)
    if (top >= floor) | (top != top):  # a NaN maximum merges too: never skip a tile on a NaN
        running = _merge(running, tl.reshape(_keys(t, head + offsets, mask), (BLOCK_V,)), K_PAD)
        floor = _floor(running)
    return m, d, running, floor


@triton.jit
def teacher_topk_kernel(
    x_ptr, x_row_stride, logprobs_ptr, indices_ptr, out_row_stride, V, K, inv_temperature: tl.float64,
    ACC_DTYPE: tl.constexpr, K_PAD: tl.constexpr, BLOCK_V: tl.constexpr,
    VEC: tl.constexpr, ALIGNED: tl.constexpr,  # the row walk (row_tiles.py)
):
    inv_temperature = tl.full((), inv_temperature, ACC_DTYPE)
    row = tl.program_id(0).to(tl.int64)
    head, n = row_split(row * x_row_stride, V, VEC, ALIGNED)
    x_row = body_pointer(x_ptr, row * x_row_stride, head, VEC, ALIGNED)

    m = tl.full((BLOCK_V // VEC,), float("-inf"), ACC_DTYPE)
    d = tl.zeros((BLOCK_V // VEC,), ACC_DTYPE)
    running = tl.full((K_PAD,), SMALLEST_KEY, tl.int64)
    floor = tl.full((), float("-inf"), tl.float32)
    for start in range(0, n, BLOCK_V):
        offsets, mask = body_tile(start, n, BLOCK_V, VEC)
        m, d, running, floor = _fold(m, d, running, floor, x_row, offsets, mask, head, inv_temperature, ACC_DTYPE,
                                     K_PAD, BLOCK_V)
    m, d = tile_rows_to_row(m, d)
    # The head and the tail, fewer than 2 VEC columns, in a tile of EDGE columns: a smaller merge.
    EDGE: tl.constexpr = K_PAD if K_PAD > 2 * VEC else 2 * VEC
    edge, edge_mask = edge_tile(head, n, V, EDGE, VEC)
    t = load_tile(x_row, edge, edge_mask, inv_temperature, ACC_DTYPE, "")
    m, d = online_logsumexp_update(m, d, tl.reshape(t, (EDGE,)))
    running = _merge(running, tl.reshape(_keys(t, head + edge, edge_mask), (EDGE,)), K_PAD)

    lanes = tl.arange(0, K_PAD)
    keep = lanes < K
    index = LOW_32_BITS - (running & LOW_32_BITS)
    t_top = tl.load(x_ptr + row * x_row_stride + index, mask=keep, other=0.0).to(ACC_DTYPE) * inv_temperature
    out = row * out_row_stride + lanes
    store(logprobs_ptr + out, (t_top - m) - tl.log(d), mask=keep)
    store(indices_ptr + out, index, mask=keep)
