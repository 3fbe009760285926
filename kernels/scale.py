"""Backward of a loss whose gradient was computed in the forward: out[r, j] = g[r, j] * scale[r].

``scale`` is the upstream gradient read from device memory: one value per row (reduction="none",
``scale_stride`` 1) or one value for all rows (``scale_stride`` 0). The forward already applied the
reduction's normaliser, so with an upstream gradient of 1 and ``out`` the saved gradient itself
(IN_PLACE) there is nothing to do: each program reads the one value and returns. Otherwise each
element is read and written once. One program per row (the loop covers its V columns, in 16-byte
groups at any V and row stride: row_tiles.py).
"""
import triton
import triton.language as tl

from .row_stats import store
from .row_tiles import body_pointer, body_tile, edge_tile, row_split


@triton.jit
def _scale_tile(out_row, g_row, offsets, mask, scale, ACC_DTYPE: tl.constexpr):
    g = tl.load(g_row + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
    store(out_row + offsets, g * scale, mask=mask)


@triton.jit
def scale_rows_kernel(
    g_ptr, g_row_stride,            # saved gradient [N, V], any float dtype, unit column stride
    out_ptr, out_row_stride,        # result [N, V], g's dtype (g itself when IN_PLACE)
    scale_ptr, scale_stride,        # upstream gradient: [N] (stride 1) or one value (stride 0)
    V, IN_PLACE: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(scale_ptr + row * scale_stride).to(ACC_DTYPE)
    width = V
    if IN_PLACE:
        width = tl.where(scale == 1, 0, V)  # nothing to do: no loop iteration, an empty edge
    head, n = row_split(row * g_row_stride, width, VEC, ALIGNED)
    g_row = body_pointer(g_ptr, row * g_row_stride, head, VEC, ALIGNED)
    out_row = body_pointer(out_ptr, row * out_row_stride, head, VEC, ALIGNED)
    for start in range(0, n, BLOCK_V):
        offsets, mask = body_tile(start, n, BLOCK_V, VEC)
        _scale_tile(out_row, g_row, offsets, mask, scale, ACC_DTYPE)
    edge, edge_mask = edge_tile(head, n, width, BLOCK_V, VEC)
    _scale_tile(out_row, g_row, edge, edge_mask, scale, ACC_DTYPE)
