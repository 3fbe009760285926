"""Backward of a loss whose gradient was computed in the forward: out[r, j] = g[r, j] * scale[r].

``scale`` holds the upstream gradient already divided by the reduction's normaliser, as one value
per row (reduction="none") or one value for all rows (stride 0). Reads and writes each element once.
"""
import triton
import triton.language as tl


@triton.jit
def scale_rows_kernel(
    g_ptr, g_row_stride, out_ptr, out_row_stride, scale_ptr, scale_stride, V,
    ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < V
    scale = tl.load(scale_ptr + row * scale_stride).to(ACC_DTYPE)
    g = tl.load(g_ptr + row * g_row_stride + cols, mask=mask, other=0.0).to(ACC_DTYPE)
    tl.store(out_ptr + row * out_row_stride + cols, (g * scale).to(out_ptr.dtype.element_ty), mask=mask)
