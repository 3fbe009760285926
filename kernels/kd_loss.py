"""Fused knowledge-distillation loss: per-row loss and student gradient in one kernel.

Notation and the divergences (value D, row scalars A1, A2, gradient dD/ds) are in divergences.py.

Row loss  = soft_scale * D + hard_weight * (lse(z) - z_y)      (hard CE at T = 1)
Gradient  = soft_scale / T * dD/ds + hard_weight * (softmax(z) - onehot(y))
Without WRITE_GRAD (no gradient wanted) pass 3 is skipped.
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
Rows that fit on chip re-read from cache, so on a GPU the repeat reads mostly hit L2.
"""
import triton
import triton.language as tl

from .divergences import (JSD, KL, REVERSE_KL, TVD, divergence_grad, divergence_scalars, fold_row_statistics,
                          load_scaled_block, row_scalar_terms)
from .row_stats import row_label


@triton.jit
def _to_element_type(x, ptr):
    """``x`` in ``ptr``'s element type. float64 -> bfloat16 goes through float32: the interpreter's
    direct cast returns 0 (on a GPU the double rounding can move a bf16 result by one ulp at most)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        x = x.to(tl.float32)
    return x.to(ptr.dtype.element_ty)


@triton.jit
def kd_forward_kernel(
    z_ptr, z_row_stride, t_ptr, t_row_stride, labels_ptr, grad_ptr, grad_row_stride, loss_ptr,
    V, inv_temperature: tl.float64, mix_weight: tl.float64, log_weight_p: tl.float64, log_weight_q: tl.float64,
    soft_scale: tl.float64, hard_weight: tl.float64, ignore_index,
    DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr, WRITE_GRAD: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    inv_temperature, mix_weight, log_weight_p, log_weight_q = divergence_scalars(
        inv_temperature, mix_weight, log_weight_p, log_weight_q, ACC_DTYPE)
    soft_scale = tl.full((), soft_scale, ACC_DTYPE)
    hard_weight = tl.full((), hard_weight, ACC_DTYPE)
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_row_stride
    t_row = t_ptr + row * t_row_stride
    g_row = grad_ptr + row * grad_row_stride
    cols = tl.arange(0, BLOCK_V)

    label, valid = row_label(labels_ptr, row, ignore_index, HAS_LABELS)

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
            z, s, t, mask = load_scaled_block(z_row, t_row, start, cols, V, inv_temperature, ACC_DTYPE)
            m_s, d_s, m_t, d_t, m_z, d_z, cross = fold_row_statistics(
                m_s, d_s, m_t, d_t, m_z, d_z, cross, z, s, t, DIVERGENCE, HAS_CE)
        log_d_s, log_d_t, log_d_z = tl.log(d_s), tl.log(d_t), tl.log(d_z)
        lse_s = m_s + log_d_s
        lse_t = m_t + log_d_t
        defined = (tl.abs(lse_s) < float("inf")) & (tl.abs(lse_t) < float("inf"))

        # Pass 2: the row scalars of the mixture divergences and tvd.
        a1 = tl.zeros((BLOCK_V,), ACC_DTYPE)
        a2 = tl.zeros((BLOCK_V,), ACC_DTYPE)
        if DIVERGENCE >= JSD:
            for start in range(0, V, BLOCK_V):
                z, s, t, mask = load_scaled_block(z_row, t_row, start, cols, V, inv_temperature, ACC_DTYPE)
                ls = (s - m_s) - log_d_s
                lt = (t - m_t) - log_d_t
                b1, b2 = row_scalar_terms(ls, lt, mix_weight, log_weight_p, log_weight_q, DIVERGENCE)
                a1 += b1
                a2 += b2
        A1 = tl.sum(a1, axis=0)
        A2 = tl.sum(a2, axis=0)
        if DIVERGENCE == REVERSE_KL:
            A1 = cross / d_s  # E = sum q (s - t)

        if DIVERGENCE == KL:
            divergence = cross / d_t - ((m_t - m_s) + (log_d_t - log_d_s))
        elif DIVERGENCE == REVERSE_KL:
            divergence = A1 - ((m_s - m_t) + (log_d_s - log_d_t))
        elif DIVERGENCE == JSD:
            divergence = mix_weight * A1 + (1.0 - mix_weight) * A2
        elif DIVERGENCE == TVD:
            divergence = 0.5 * A1
        else:
            divergence = A1
        loss = soft_scale * divergence

        if HAS_CE:
            in_range = (label >= 0) & (label < V)
            z_label = tl.load(z_row + label, mask=in_range, other=float("nan")).to(ACC_DTYPE)
            loss += hard_weight * ((m_z - z_label) + log_d_z)
            defined = defined & in_range
        row_nan = tl.where(defined, 0.0, float("nan"))  # added to the loss and every gradient element
        loss += row_nan
        tl.store(loss_ptr + row, loss.to(loss_ptr.dtype.element_ty))

        # Pass 3: the gradient.
        soft_grad_scale = soft_scale * inv_temperature
        for start in range(0, V if WRITE_GRAD else 0, BLOCK_V):
            z, s, t, mask = load_scaled_block(z_row, t_row, start, cols, V, inv_temperature, ACC_DTYPE)
            ls = (s - m_s) - log_d_s
            lt = (t - m_t) - log_d_t
            g = divergence_grad(ls, lt, s - t, A1, A2, mix_weight, log_weight_p, log_weight_q, DIVERGENCE)
            g = soft_grad_scale * g + row_nan
            if HAS_CE:
                g += hard_weight * (tl.exp((z - m_z) - log_d_z) - tl.where(start + cols == label, 1.0, 0.0))
            tl.store(g_row + start + cols, _to_element_type(g, grad_ptr), mask=mask)
    else:
        for start in range(0, V if WRITE_GRAD else 0, BLOCK_V):
            mask = start + cols < V
            tl.store(g_row + start + cols, tl.zeros((BLOCK_V,), grad_ptr.dtype.element_ty), mask=mask)
        tl.store(loss_ptr + row, tl.zeros((), loss_ptr.dtype.element_ty))
