"""Tempered softmax and log-softmax over the last dimension, forward and backward.

Math, per row x of length V at temperature T (s = x / T):

    forward      y_j  = softmax(s)_j     = exp(ly_j)
                 ly_j = log_softmax(s)_j = (s_j - m) - log d,  m = max s, d = sum_i exp(s_i - m)
    backward     dx_j = y_j * (dy_j - sum_i dy_i * y_i) / T        (softmax)
                 dx_j = (dy_j - exp(ly_j) * sum_i dy_i) / T        (log_softmax)

m and d come from an online max / sum-of-exps over vocabulary blocks, kept per tile row and folded
across threads once per row, so any V works with one program per row. (Never s_j - lse(s): lse
rounds at the scale of |m|, which moves a log-probability near 0, and its gradient, by eps |m|.)
Each loop walks the row's aligned body, then its head and tail in one edge tile (row_tiles.py):
16-byte loads at any V and row stride. Bytes per element: forward reads x twice (the second read
usually hits cache when a row fits in L2) and writes y once; backward reads y and dy twice and
writes dx once.
"""
import triton
import triton.language as tl

from .row_stats import exp, fold_tile, log_prob, store, tile_rows_to_row
from .row_tiles import body_pointer, body_tile, edge_tile, load_tile, row_split


@triton.jit
def _fold(m, d, x_row, offsets, mask, inv_temperature, ACC_DTYPE: tl.constexpr):
    m, d, _, _ = fold_tile(m, d, load_tile(x_row, offsets, mask, inv_temperature, ACC_DTYPE, ""))
    return m, d


@triton.jit
def _forward_tile(y_row, x_row, offsets, mask, inv_temperature, m, log_d, LOG: tl.constexpr,
                  ACC_DTYPE: tl.constexpr):
    out = log_prob(load_tile(x_row, offsets, mask, inv_temperature, ACC_DTYPE, ""), m, log_d)
    if not LOG:
        out = exp(out)
    store(y_row + offsets, out, mask=mask)


@triton.jit
def softmax_forward_kernel(
    x_ptr, x_row_stride, y_ptr, y_row_stride, V, inv_temperature: tl.float64,
    LOG: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr,
):
    inv_temperature = tl.full((), inv_temperature, ACC_DTYPE)
    row = tl.program_id(0).to(tl.int64)
    head, n = row_split(row * x_row_stride, V, VEC, ALIGNED)
    x_row = body_pointer(x_ptr, row * x_row_stride, head, VEC, ALIGNED)
    y_row = body_pointer(y_ptr, row * y_row_stride, head, VEC, ALIGNED)

    m = tl.full((BLOCK_V // VEC,), float("-inf"), ACC_DTYPE)
    d = tl.zeros((BLOCK_V // VEC,), ACC_DTYPE)
    for start in range(0, n, BLOCK_V):
        offsets, mask = body_tile(start, n, BLOCK_V, VEC)
        m, d = _fold(m, d, x_row, offsets, mask, inv_temperature, ACC_DTYPE)
    edge, edge_mask = edge_tile(head, n, V, BLOCK_V, VEC)  # here and below: not live across a loop
    m, d = _fold(m, d, x_row, edge, edge_mask, inv_temperature, ACC_DTYPE)
    m, d = tile_rows_to_row(m, d)
    log_d = tl.log(d)

    for start in range(0, n, BLOCK_V):
        offsets, mask = body_tile(start, n, BLOCK_V, VEC)
        _forward_tile(y_row, x_row, offsets, mask, inv_temperature, m, log_d, LOG, ACC_DTYPE)
    edge, edge_mask = edge_tile(head, n, V, BLOCK_V, VEC)
    _forward_tile(y_row, x_row, edge, edge_mask, inv_temperature, m, log_d, LOG, ACC_DTYPE)


@triton.jit
def _dot_tile(acc, y_row, dy_row, offsets, mask, LOG: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """acc plus the tile's dy (log_softmax) or dy * y (softmax)."""
    dy = tl.load(dy_row + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
    if LOG:
        return acc + dy
    else:
        return acc + dy * tl.load(y_row + offsets, mask=mask, other=0.0).to(ACC_DTYPE)


@triton.jit
def _backward_tile(dx_row, y_row, dy_row, offsets, mask, total, inv_temperature, LOG: tl.constexpr,
                   ACC_DTYPE: tl.constexpr):
    dy = tl.load(dy_row + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
    y = tl.load(y_row + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
    if LOG:
        dx = dy - exp(y) * total
    else:
        dx = y * (dy - total)
    store(dx_row + offsets, dx * inv_temperature, mask=mask)


@triton.jit
def softmax_backward_kernel(
    y_ptr, y_row_stride, dy_ptr, dy_row_stride, dx_ptr, dx_row_stride, V, inv_temperature: tl.float64,
    LOG: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr,
):
    inv_temperature = tl.full((), inv_temperature, ACC_DTYPE)
    row = tl.program_id(0).to(tl.int64)
    head, n = row_split(row * y_row_stride, V, VEC, ALIGNED)
    y_row = body_pointer(y_ptr, row * y_row_stride, head, VEC, ALIGNED)
    dy_row = body_pointer(dy_ptr, row * dy_row_stride, head, VEC, ALIGNED)
    dx_row = body_pointer(dx_ptr, row * dx_row_stride, head, VEC, ALIGNED)

    acc = tl.zeros((BLOCK_V // VEC, VEC), ACC_DTYPE)
    for start in range(0, n, BLOCK_V):
        offsets, mask = body_tile(start, n, BLOCK_V, VEC)
        acc = _dot_tile(acc, y_row, dy_row, offsets, mask, LOG, ACC_DTYPE)
    edge, edge_mask = edge_tile(head, n, V, BLOCK_V, VEC)
    acc = _dot_tile(acc, y_row, dy_row, edge, edge_mask, LOG, ACC_DTYPE)
    total = tl.sum(tl.sum(acc, axis=1), axis=0)

    for start in range(0, n, BLOCK_V):
        offsets, mask = body_tile(start, n, BLOCK_V, VEC)
        _backward_tile(dx_row, y_row, dy_row, offsets, mask, total, inv_temperature, LOG, ACC_DTYPE)
    edge, edge_mask = edge_tile(head, n, V, BLOCK_V, VEC)
    _backward_tile(dx_row, y_row, dy_row, edge, edge_mask, total, inv_temperature, LOG, ACC_DTYPE)
