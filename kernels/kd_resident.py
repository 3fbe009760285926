"""Row-resident knowledge-distillation loss: each input read once, the row kept in registers.

The same loss and gradient as kd_loss.py (the math is at its top, the divergences' table in
divergences.py), computed from one load of the row instead of two or three:

Row loss  = soft_scale * D + hard_weight * (lse(z) - z_y)      (hard CE at T = 1)
Gradient  = grad_scale * (soft_scale / T_s * dD/ds + hard_weight * (softmax(z) - onehot(y)))

One program (one CTA) holds a whole row as a tile of ``BLOCK_V >= V`` columns. Steps, with the
row-wide reductions:
    1. load z, t once; s = z / T_s, t = t / T_t; with the hard CE, the label's logit z_y (one
       element, read again rather than picked out of the row: a sum over the row there cost the
       registers that made the jsd family spill under MAX_REGISTERS)
    2. reduction 1: the maxima m_s, m_t (and m_z for the hard CE)
    3. reduction 2: the sums of exps d_s, d_t (d_z), kl's or reverse_kl's cross term
    4. the divergences without a cross term: reduction 3, the row scalars A1, A2 (element_terms)
    5. the loss, and the gradient (divergence_grad) written once, each CTA its own slice
Bytes moved per element: b_s + b_t + b_s (6 for bf16), every divergence (and a few a row: the label, its logit).
With ``inplace`` the gradient overwrites the student: the row is loaded before any store.
Ignored rows (y == ignore_index) get loss 0 and gradient 0 without reading the logits; undefined
rows (no finite log-sum-exp of s or t, or with the hard CE a label outside [0, V)) a NaN loss and
an all-NaN gradient row, exactly as kd_loss.py.
"""
import triton
import triton.language as tl

from .divergences import (JSD, cross_term_elements, cross_term_scalars, divergence_grad, element_terms,
                          gradient_factors, log_ratio_shift, loss_scalars, row_loss)
from .row_stats import exp, finite, log_prob, row_label, store
from .row_tiles import load_tile


@triton.jit
def row_maxima(s, t, z, HAS_CE: tl.constexpr):
    """max s, max t (and max z) over the row (z's maximum is -inf without CE)."""
    m_z = tl.max(z, 0) if HAS_CE else tl.full((), float("-inf"), s.dtype)
    return tl.max(s, 0), tl.max(t, 0), m_z


@triton.jit
def row_sums(e_s, e_t, cross, e_z, WITH_CROSS: tl.constexpr, HAS_CE: tl.constexpr):
    """The sums over the row of the operands each configuration needs (0 for the others)."""
    sum_cross = tl.sum(cross, 0) if WITH_CROSS else tl.zeros((), e_s.dtype)
    d_z = tl.sum(e_z, 0) if HAS_CE else tl.zeros((), e_s.dtype)
    return tl.sum(e_s, 0), tl.sum(e_t, 0), sum_cross, d_z


@triton.jit
def row_scalars(a1, a2):
    """A1, A2: the sums of the element terms over the row."""
    return tl.sum(a1, 0), tl.sum(a2, 0)


@triton.jit
def kd_resident_kernel(
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
    ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr,   # BLOCK_V >= V
):
    inv_temperature, inv_teacher_temperature, mix_weight, log_weight_p, log_weight_q, soft_scale, hard_weight = (
        loss_scalars(inv_temperature, inv_teacher_temperature, mix_weight, log_weight_p, log_weight_q, soft_scale,
                     hard_weight, ACC_DTYPE))
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_row_stride
    t_row = t_ptr + row * t_row_stride
    g_row = grad_ptr + row * grad_row_stride
    cols = tl.arange(0, BLOCK_V)

    label, valid = row_label(labels_ptr, labels_stride, row, ignore_index, HAS_LABELS)

    if valid:
        mask = cols < V
        z = load_tile(z_row, cols, mask, 1.0, ACC_DTYPE, "evict_first")
        s = z * inv_temperature
        t = load_tile(t_row, cols, mask, inv_teacher_temperature, ACC_DTYPE, "evict_first")
        z_label = tl.zeros((), ACC_DTYPE)
        if HAS_CE:  # the label's logit, read before the reductions' barriers (any in-place store is after them)
            z_label = tl.load(z_row + label, mask=(label >= 0) & (label < V), other=float("nan")).to(ACC_DTYPE)
        m_s, m_t, m_z = row_maxima(s, t, z, HAS_CE)
        e_s = exp(s - finite(m_s))
        e_t = exp(t - finite(m_t))
        d_s, d_t, cross, d_z = row_sums(
            e_s, e_t, cross_term_elements(e_s, e_t, s - m_s, t - m_t, DIVERGENCE), exp(z - finite(m_z)),
            DIVERGENCE < JSD, HAS_CE)
        log_d_s, log_d_t = tl.log(d_s), tl.log(d_t)
        shift = log_ratio_shift(d_s, d_t)
        defined = (tl.abs(m_s + log_d_s) < float("inf")) & (tl.abs(m_t + log_d_t) < float("inf"))
        ls = (s - m_s) - log_d_s
        lt = (t - m_t) - log_d_t
        s_minus_t = (s - m_s) - (t - m_t)  # with shift: ls - lt, centred (divergences.py)
        q = e_s * (1.0 / d_s)
        p = e_t * (1.0 / d_t)

        if DIVERGENCE >= JSD:
            a1, a2 = element_terms(ls, lt, q, p, s_minus_t, shift, mix_weight, log_weight_p, log_weight_q, DIVERGENCE)
            A1, A2 = row_scalars(a1, a2)  # columns past V load -inf: every term is 0 there
        else:
            A1, A2 = cross_term_scalars(cross, d_s, d_t, shift, DIVERGENCE)
        log_d_z = tl.log(d_z)
        loss, row_nan = row_loss(A1, A2, mix_weight, soft_scale, hard_weight, m_z, log_d_z, z_label, label, V,
                                 defined, DIVERGENCE, HAS_CE)
        store(loss_ptr + row, loss)

        if WRITE_GRAD:
            soft_grad_scale, hard_grad_scale = gradient_factors(grad_scale_ptr, soft_scale, inv_temperature, hard_weight,
                                                                ACC_DTYPE)
            g = divergence_grad(ls, lt, q, p, s_minus_t, shift, A1, A2, mix_weight, log_weight_p, log_weight_q,
                                DIVERGENCE)
            g = soft_grad_scale * g + row_nan
            if HAS_CE:
                g += hard_grad_scale * (exp(log_prob(z, m_z, log_d_z)) - tl.where(cols == label, 1.0, 0.0))
            store(g_row + cols, g, mask=mask, eviction_policy="evict_first")
    else:
        if WRITE_GRAD:
            store(g_row + cols, tl.zeros((BLOCK_V,), ACC_DTYPE), mask=cols < V)
        store(loss_ptr + row, tl.zeros((), ACC_DTYPE))
