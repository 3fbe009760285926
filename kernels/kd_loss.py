"""Fused knowledge-distillation loss: per-row loss and student gradient in one kernel.

The divergences (value D, row scalars A1, A2, gradient dD/ds) are the table of divergences.py.

Row loss  = soft_scale * D + hard_weight * (lse(z) - z_y)      (hard CE at T = 1)
Gradient  = grad_scale * (soft_scale / T_s * dD/ds + hard_weight * (softmax(z) - onehot(y)))
grad_scale (read from device memory: 1 / the reduction's normaliser, computed on the device) makes
the gradient that of the reduced loss, so the backward has nothing left to do for an upstream
gradient of 1. Without WRITE_GRAD (no gradient wanted) pass 3 is skipped.
Ignored rows (y == ignore_index) get loss 0 and gradient 0 without reading the logits.
Undefined rows get a NaN loss and an all-NaN gradient row, so the failure cannot pass unseen:
a row whose s or t has no finite log-sum-exp (entirely -inf, or holding a NaN or a +inf), and,
with the hard CE, a label outside [0, V) that is not ignore_index (never an out-of-bounds read).

Passes over the row (each reads student and teacher once):
    1. online max / sum-of-exps of s, t (and z for the hard CE); kl and reverse_kl also fold their
       cross term sum p (t - s) or sum q (s - t) into the same pass, so D is known after it.
    2. jsd, skew_kl, skew_reverse_kl and tvd only: the row scalars A1, A2, which need the
       normalised p and q (hence lse of both) at every element; no cheaper order exists.
    3. the gradient, written once.
Bytes moved per element, b_s / b_t the student / teacher element size (2 for bf16, 4 for fp32):
    kl, reverse_kl: 2 (b_s + b_t) + b_s      (10 for bf16)
    jsd, skew_kl, skew_reverse_kl, tvd: 3 (b_s + b_t) + b_s      (14 for bf16)
"""
import triton
import triton.language as tl

from .divergences import (JSD, cross_term_scalars, divergence_grad, divergence_scalars, divergence_value,
                          element_terms, fold_row_statistics, load_scaled_block, log_ratio_shift)
from .row_stats import row_label, store


@triton.jit
def kd_forward_kernel(
    z_ptr, z_row_stride,            # student logits [N, V], any float dtype, unit column stride
    t_ptr, t_row_stride,            # teacher logits [N, V], any float dtype, unit column stride
    labels_ptr, labels_stride,      # labels [N] int32 / int64 (read when HAS_LABELS)
    grad_ptr, grad_row_stride,      # student gradient [N, V], student dtype (written when WRITE_GRAD)
    grad_scale_ptr,                 # [1] float32 / float64: the gradient's factor (1 / normaliser)
    loss_ptr,                       # per-row loss [N], float32 (float64 for float64 input)
    V, inv_temperature: tl.float64, inv_teacher_temperature: tl.float64, mix_weight: tl.float64,
    log_weight_p: tl.float64, log_weight_q: tl.float64, soft_scale: tl.float64, hard_weight: tl.float64,
    ignore_index,
    DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr, WRITE_GRAD: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    inv_temperature, inv_teacher_temperature, mix_weight, log_weight_p, log_weight_q = divergence_scalars(
        inv_temperature, inv_teacher_temperature, mix_weight, log_weight_p, log_weight_q, ACC_DTYPE)
    soft_scale = tl.full((), soft_scale, ACC_DTYPE)
    hard_weight = tl.full((), hard_weight, ACC_DTYPE)
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_row_stride
    t_row = t_ptr + row * t_row_stride
    g_row = grad_ptr + row * grad_row_stride
    cols = tl.arange(0, BLOCK_V)

    label, valid = row_label(labels_ptr, labels_stride, row, ignore_index, HAS_LABELS)

    if valid:
        # Pass 1: log-sum-exps (and the kl / reverse_kl cross term).
        m_s = tl.full((), float("-inf"), ACC_DTYPE)
        m_t = tl.full((), float("-inf"), ACC_DTYPE)
        m_z = tl.full((), float("-inf"), ACC_DTYPE)
        d_s = tl.zeros((), ACC_DTYPE)
        d_t = tl.zeros((), ACC_DTYPE)
        d_z = tl.zeros((), ACC_DTYPE)
        cross = tl.zeros((), ACC_DTYPE)
        for start in range(0, V, BLOCK_V):
            z, s, t, mask = load_scaled_block(z_row, t_row, start, cols, V, inv_temperature,
                                              inv_teacher_temperature, ACC_DTYPE)
            m_s, d_s, m_t, d_t, m_z, d_z, cross = fold_row_statistics(
                m_s, d_s, m_t, d_t, m_z, d_z, cross, z, s, t, DIVERGENCE, HAS_CE)
        log_d_s, log_d_t = tl.log(d_s), tl.log(d_t)
        shift = log_ratio_shift(m_s, d_s, m_t, d_t)
        defined = (tl.abs(m_s + log_d_s) < float("inf")) & (tl.abs(m_t + log_d_t) < float("inf"))

        # Pass 2: the row scalars of the mixture divergences and tvd.
        a1 = tl.zeros((BLOCK_V,), ACC_DTYPE)
        a2 = tl.zeros((BLOCK_V,), ACC_DTYPE)
        if DIVERGENCE >= JSD:
            for start in range(0, V, BLOCK_V):
                z, s, t, mask = load_scaled_block(z_row, t_row, start, cols, V, inv_temperature,
                                                  inv_teacher_temperature, ACC_DTYPE)
                b1, b2 = element_terms((s - m_s) - log_d_s, (t - m_t) - log_d_t, s - t, shift,
                                       mix_weight, log_weight_p, log_weight_q, DIVERGENCE)
                a1 += tl.where(mask, b1, 0.0)
                a2 += tl.where(mask, b2, 0.0)
        A1 = tl.sum(a1, axis=0)
        A2 = tl.sum(a2, axis=0)
        if DIVERGENCE < JSD:
            A1, A2 = cross_term_scalars(cross, d_s, d_t, shift, DIVERGENCE)
        loss = soft_scale * divergence_value(A1, A2, mix_weight, DIVERGENCE)

        if HAS_CE:
            in_range = (label >= 0) & (label < V)
            z_label = tl.load(z_row + label, mask=in_range, other=float("nan")).to(ACC_DTYPE)
            loss += hard_weight * ((m_z - z_label) + tl.log(d_z))
            defined = defined & in_range
        row_nan = tl.where(defined, 0.0, float("nan"))  # added to the loss and every gradient element
        store(loss_ptr + row, loss + row_nan)

        # Pass 3: the gradient.
        if WRITE_GRAD:
            grad_scale = tl.load(grad_scale_ptr).to(ACC_DTYPE)
            soft_grad_scale = grad_scale * soft_scale * inv_temperature
            hard_grad_scale = grad_scale * hard_weight
            log_d_z = tl.log(d_z)
            for start in range(0, V, BLOCK_V):
                z, s, t, mask = load_scaled_block(z_row, t_row, start, cols, V, inv_temperature,
                                                  inv_teacher_temperature, ACC_DTYPE)
                g = divergence_grad((s - m_s) - log_d_s, (t - m_t) - log_d_t, s - t, shift, A1, A2,
                                    mix_weight, log_weight_p, log_weight_q, DIVERGENCE)
                g = soft_grad_scale * g + row_nan
                if HAS_CE:
                    g += hard_grad_scale * (tl.exp((z - m_z) - log_d_z) - tl.where(start + cols == label, 1.0, 0.0))
                store(g_row + start + cols, g, mask=mask)
    else:
        if WRITE_GRAD:
            for start in range(0, V, BLOCK_V):
                store(g_row + start + cols, tl.zeros((BLOCK_V,), ACC_DTYPE), mask=start + cols < V)
        store(loss_ptr + row, tl.zeros((), ACC_DTYPE))
