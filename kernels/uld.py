"""The O(V) gradient pass of the top-K ULD loss (``fastkd.uld_loss(..., k=K)``, Triton backend).

One row, s = z / T, q = softmax(s), lse = log sum_j exp(s_j) (from the top-k kernel's pass). The
loss's gradient with respect to q is g_j = sign(q_(i) - p_(i)) - sign(R_s - R_t) on the K columns
of the student's top K and 0 elsewhere, so with c = sum_k q_k g_k (K terms, computed on the host
side from the top K):

    dW / dz_j = (1 / T) q_j (g_j - c)

This kernel writes the part every column has, out[r, j] = coef[r] * exp(s_j - lse[r]) with
coef = -c * scale / T (0 for an ignored row, whose gradient is then 0 whatever its logits); the K
top columns are overwritten afterwards with (1 / T) q_j (g_j - c) * scale (an [N, K] scatter).
Bytes per row: the logits read once, the gradient written once.
"""
import triton
import triton.language as tl

from .row_stats import exp, store


@triton.jit
def uld_topk_grad_kernel(
    z_ptr, z_row_stride,            # student logits [N, V], any float dtype, unit column stride
    out_ptr, out_row_stride,        # gradient [N, V], the student's dtype
    lse_ptr, coef_ptr,              # [N] each, ACC_DTYPE: log-sum-exp of z / T, and coef (above)
    V, inv_temperature, ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    lse = tl.load(lse_ptr + row).to(ACC_DTYPE)
    coef = tl.load(coef_ptr + row).to(ACC_DTYPE)
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        mask = start + cols < V
        z = tl.load(z_ptr + row * z_row_stride + start + cols, mask=mask, other=float("-inf")).to(ACC_DTYPE)
        q = exp(z * inv_temperature - lse)
        store(out_ptr + row * out_row_stride + start + cols, tl.where(coef == 0, 0.0, coef * q), mask=mask)
