"""The O(V) gradient pass of the top-K ULD loss (``fastkd.uld_loss(..., k=K)``, Triton backend).

One row, s = z / T, q = softmax(s) = exp((s - m) - log d) with m = z_max / T the largest s and
log d = -log q of the largest (from the top-k kernel's pass; never exp(s - lse), which rounds at
|lse|: row_stats.log_prob). The loss's gradient with respect to q is g_j = sign(q_(i) - p_(i)) - sign(R_s - R_t) on the K columns
of the student's top K and 0 elsewhere, so with c = sum_k q_k g_k (K terms, computed on the host
side from the top K):

    dW / dz_j = (1 / T) q_j (g_j - c)

This kernel writes the part every column has, out[r, j] = coef[r] * q_j with
coef = -c * scale / T (0 for an ignored row, whose gradient is then 0 whatever its logits); the K
top columns are overwritten afterwards with (1 / T) q_j (g_j - c) * scale (an [N, K] scatter).
Bytes per row: the logits read once, the gradient written once, in 16-byte groups at any V and
row stride (row_tiles.py).
"""
import triton
import triton.language as tl

from .row_stats import exp, log_prob, store
from .row_tiles import body_pointer, body_tile, edge_tile, load_tile, row_split


@triton.jit
def _gradient_tile(out_row, z_row, offsets, mask, m, log_d, coef, inv_temperature, ACC_DTYPE: tl.constexpr):
    q = exp(log_prob(load_tile(z_row, offsets, mask, inv_temperature, ACC_DTYPE, ""), m, log_d))
    store(out_row + offsets, tl.where(coef == 0, 0.0, coef * q), mask=mask)


@triton.jit
def uld_topk_grad_kernel(
    z_ptr, z_row_stride,            # student logits [N, V], any float dtype, unit column stride
    out_ptr, out_row_stride,        # gradient [N, V], the student's dtype
    z_max_ptr, log_d_ptr, coef_ptr,  # [N] each, ACC_DTYPE: the largest logit, log d (above) and coef
    V, inv_temperature, ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    m = tl.load(z_max_ptr + row).to(ACC_DTYPE) * inv_temperature  # as load_tile scales the row
    log_d = tl.load(log_d_ptr + row).to(ACC_DTYPE)
    coef = tl.load(coef_ptr + row).to(ACC_DTYPE)
    head, n = row_split(row * z_row_stride, V, VEC, ALIGNED)
    z_row = body_pointer(z_ptr, row * z_row_stride, head, VEC, ALIGNED)
    out_row = body_pointer(out_ptr, row * out_row_stride, head, VEC, ALIGNED)
    for start in range(0, n, BLOCK_V):
        offsets, mask = body_tile(start, n, BLOCK_V, VEC)
        _gradient_tile(out_row, z_row, offsets, mask, m, log_d, coef, inv_temperature, ACC_DTYPE)
    edge, edge_mask = edge_tile(head, n, V, BLOCK_V, VEC)
    _gradient_tile(out_row, z_row, edge, edge_mask, m, log_d, coef, inv_temperature, ACC_DTYPE)
