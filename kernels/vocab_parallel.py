"""Vocabulary-parallel KD loss: the kernels that run on one rank's shard of the vocabulary.

A rank holds columns [c0, c0 + W) of the student logits z and teacher logits (V = the sum of the
ranks' W). Notation and the divergence table are those of divergences.py: s = z / T, t = teacher / T,
ls = s - lse(s), lt = t - lse(t), q = exp(ls), p = exp(lt), M the mixture, lse over all V columns.

partial_stats_kernel (one pass over the shard; one row of STATS per row):
    m_s, m_t, m_z    shard maxima of s, t and z
    d_s, d_t, d_z    sum e^(s - m_s), sum e^(t - m_t), sum e^(z - m_z) over the shard
    cross            kl: sum e^(t - m_t) (t - s); reverse_kl: sum e^(s - m_s) (s - t); else 0
    z_y              z at the label when this shard owns it, else 0
The host combines these across ranks (fastkd/distributed.py): with M = max over ranks of m,
    d = sum_r d_r e^(m_r - M),  lse = M + log d,  kl: D = cross / d_t - (lse_t - lse_s)
and reverse_kl: D = cross / d_s - (lse_s - lse_t), cross rescaled like d_t (kl) or d_s.

row_scalars_kernel (jsd, skew_kl, skew_reverse_kl, tvd, after the global lse's are known):
    the shard's part of the row scalars A1, A2 of divergences.py's table; the host sums them.

shard_gradient_kernel: the shard's columns of the gradient of kd_loss.py,
    soft_scale / T * dD/ds_j + nan_row + hard_weight * (e^(z_j - lse_z) - [j == y]),
from the global row values ROW = (lse_s, lse_t, lse_z, D, A1, A2, nan_row). reverse_kl keeps
E = sum q (s - t) = cross / d_s in A1 and uses dD/ds_j = q_j (s_j - t_j - E), as kd_loss.py does
(the large lse's never enter the gradient). nan_row is 0, or NaN for a row kd_loss makes NaN (no
finite lse_s or lse_t, a label outside [0, V), or an inconsistent shard layout).

Ignored rows (y == ignore_index) get neutral statistics (maxima -inf, sums 0) and a zero gradient
without reading the logits. Bytes moved per element are those of the fused single-GPU kernel:
2 (b_s + b_t) + b_s for kl and reverse_kl, 3 (b_s + b_t) + b_s for the others.
"""
import triton
import triton.language as tl

from .divergences import (divergence_grad, divergence_scalars, fold_row_statistics, load_scaled_block,
                          row_scalar_terms)
from .row_stats import row_label

# Columns of STATS [N, 8] and ROW [N, 7]; fastkd/launch_vocab_parallel.py names the same order.
# (constexpr: jit code may read only constexpr globals.)
M_S, M_T, M_Z, D_S, D_T, D_Z, CROSS, Z_Y = (tl.constexpr(i) for i in range(8))
LSE_S, LSE_T, LSE_Z, DIV, A1, A2, NAN_ROW = (tl.constexpr(i) for i in range(7))
STATS_WIDTH = tl.constexpr(8)
ROW_WIDTH = tl.constexpr(7)


@triton.jit
def partial_stats_kernel(
    z_ptr, z_row_stride, t_ptr, t_row_stride, labels_ptr, stats_ptr,
    W, vocab_start, inv_temperature: tl.float64, ignore_index,
    DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    inv_temperature = tl.full((), inv_temperature, ACC_DTYPE)
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_row_stride
    t_row = t_ptr + row * t_row_stride
    out = stats_ptr + row * STATS_WIDTH
    cols = tl.arange(0, BLOCK_V)
    label, kept = row_label(labels_ptr, row, ignore_index, HAS_LABELS)

    m_s = tl.full((), float("-inf"), ACC_DTYPE)
    m_t = tl.full((), float("-inf"), ACC_DTYPE)
    m_z = tl.full((), float("-inf"), ACC_DTYPE)
    d_s = tl.zeros((), ACC_DTYPE)
    d_t = tl.zeros((), ACC_DTYPE)
    d_z = tl.zeros((), ACC_DTYPE)
    cross = tl.zeros((), ACC_DTYPE)
    z_y = tl.zeros((), ACC_DTYPE)
    if kept:
        for start in range(0, W, BLOCK_V):
            z, s, t, mask = load_scaled_block(z_row, t_row, start, cols, W, inv_temperature, ACC_DTYPE)
            m_s, d_s, m_t, d_t, m_z, d_z, cross = fold_row_statistics(
                m_s, d_s, m_t, d_t, m_z, d_z, cross, z, s, t, DIVERGENCE, HAS_CE)
        if HAS_CE:
            local_label = label - vocab_start
            owned = (local_label >= 0) & (local_label < W)
            z_y = tl.load(z_row + local_label, mask=owned, other=0.0).to(ACC_DTYPE)

    tl.store(out + M_S, m_s)
    tl.store(out + M_T, m_t)
    tl.store(out + M_Z, m_z)
    tl.store(out + D_S, d_s)
    tl.store(out + D_T, d_t)
    tl.store(out + D_Z, d_z)
    tl.store(out + CROSS, cross)
    tl.store(out + Z_Y, z_y)


@triton.jit
def row_scalars_kernel(
    z_ptr, z_row_stride, t_ptr, t_row_stride, labels_ptr, row_ptr, scalars_ptr,
    W, inv_temperature: tl.float64, mix_weight: tl.float64, log_weight_p: tl.float64, log_weight_q: tl.float64,
    ignore_index,
    DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    inv_temperature, mix_weight, log_weight_p, log_weight_q = divergence_scalars(
        inv_temperature, mix_weight, log_weight_p, log_weight_q, ACC_DTYPE)
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_row_stride
    t_row = t_ptr + row * t_row_stride
    cols = tl.arange(0, BLOCK_V)
    kept = True
    if HAS_LABELS:
        kept = tl.load(labels_ptr + row).to(tl.int64) != ignore_index

    a1 = tl.zeros((BLOCK_V,), ACC_DTYPE)
    a2 = tl.zeros((BLOCK_V,), ACC_DTYPE)
    if kept:
        lse_s = tl.load(row_ptr + row * ROW_WIDTH + LSE_S)
        lse_t = tl.load(row_ptr + row * ROW_WIDTH + LSE_T)
        for start in range(0, W, BLOCK_V):
            z, s, t, mask = load_scaled_block(z_row, t_row, start, cols, W, inv_temperature, ACC_DTYPE)
            b1, b2 = row_scalar_terms(s - lse_s, t - lse_t, mix_weight, log_weight_p, log_weight_q, DIVERGENCE)
            a1 += tl.where(mask, b1, 0.0)
            a2 += tl.where(mask, b2, 0.0)
    tl.store(scalars_ptr + row * 2, tl.sum(a1, axis=0))
    tl.store(scalars_ptr + row * 2 + 1, tl.sum(a2, axis=0))


@triton.jit
def shard_gradient_kernel(
    z_ptr, z_row_stride, t_ptr, t_row_stride, labels_ptr, row_ptr, grad_ptr, grad_row_stride,
    W, vocab_start, inv_temperature: tl.float64, mix_weight: tl.float64, log_weight_p: tl.float64,
    log_weight_q: tl.float64, soft_grad_scale: tl.float64, hard_weight: tl.float64, ignore_index,
    DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    inv_temperature, mix_weight, log_weight_p, log_weight_q = divergence_scalars(
        inv_temperature, mix_weight, log_weight_p, log_weight_q, ACC_DTYPE)
    hard_weight = tl.full((), hard_weight, ACC_DTYPE)
    soft_grad_scale = tl.full((), soft_grad_scale, ACC_DTYPE)
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_row_stride
    t_row = t_ptr + row * t_row_stride
    g_row = grad_ptr + row * grad_row_stride
    cols = tl.arange(0, BLOCK_V)
    label, kept = row_label(labels_ptr, row, ignore_index, HAS_LABELS)

    if kept:
        local_label = label - vocab_start
        values = row_ptr + row * ROW_WIDTH
        lse_s = tl.load(values + LSE_S)
        lse_t = tl.load(values + LSE_T)
        lse_z = tl.load(values + LSE_Z)
        A1_row = tl.load(values + A1)
        A2_row = tl.load(values + A2)
        nan_row = tl.load(values + NAN_ROW)
        for start in range(0, W, BLOCK_V):
            z, s, t, mask = load_scaled_block(z_row, t_row, start, cols, W, inv_temperature, ACC_DTYPE)
            g = soft_grad_scale * divergence_grad(s - lse_s, t - lse_t, s - t, A1_row, A2_row,
                                                  mix_weight, log_weight_p, log_weight_q, DIVERGENCE)
            g += nan_row
            if HAS_CE:
                g += hard_weight * (tl.exp(z - lse_z) - tl.where(start + cols == local_label, 1.0, 0.0))
            tl.store(g_row + start + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)
    else:
        for start in range(0, W, BLOCK_V):
            mask = start + cols < W
            tl.store(g_row + start + cols, tl.zeros((BLOCK_V,), grad_ptr.dtype.element_ty), mask=mask)
