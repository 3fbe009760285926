"""Backward of a loss whose gradient was computed in the forward: out[r, j] = g[r, j] * scale[r].

``scale`` is the upstream gradient read from device memory: one value per row (reduction="none",
``scale_stride`` 1) or one value for all rows (``scale_stride`` 0). The forward already applied the
reduction's normaliser, so with an upstream gradient of 1 and ``out`` the saved gradient itself
(IN_PLACE) there is nothing to do: each program reads the one value and returns. Otherwise each
element is read and written once. One program per row (the loop covers its V columns).
"""
import triton
import triton.language as tl

from .row_stats import store


@triton.jit
def scale_rows_kernel(
    g_ptr, g_row_stride,            # saved gradient [N, V], any float dtype, unit column stride
    out_ptr, out_row_stride,        # result [N, V], g's dtype (g itself when IN_PLACE)
    scale_ptr, scale_stride,        # upstream gradient: [N] (stride 1) or one value (stride 0)
    V, IN_PLACE: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(scale_ptr + row * scale_stride).to(ACC_DTYPE)
    width = V
    if IN_PLACE:
        width = tl.where(scale == 1, 0, V)  # nothing to do: the loop runs no iteration
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, width, BLOCK_V):
        mask = start + cols < V
        g = tl.load(g_ptr + row * g_row_stride + start + cols, mask=mask, other=0.0).to(ACC_DTYPE)
        store(out_ptr + row * out_row_stride + start + cols, g * scale, mask=mask)
