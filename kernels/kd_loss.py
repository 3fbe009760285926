"""Fused knowledge-distillation loss, two-pass kernel: per-row loss and student gradient, any V.

The divergences (value D, row scalars A1, A2, gradient dD/ds) are the table of divergences.py.

Row loss  = soft_scale * D + hard_weight * (lse(z) - z_y)      (hard CE at T = 1)
Gradient  = grad_scale * (soft_scale / T_s * dD/ds + hard_weight * (softmax(z) - onehot(y)))
grad_scale (read from device memory: 1 / the reduction's normaliser, computed on the device) makes
the gradient that of the reduced loss, so the backward has nothing left to do for an upstream
gradient of 1. Without WRITE_GRAD (no gradient wanted) the gradient pass is skipped.
With T_s = 1 (CE_FROM_STUDENT) the hard CE's softmax is the student's own: its statistics and its
exp are shared, not computed twice.
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
Bytes requested per element, b_s / b_t the student / teacher element size (2 for bf16, 4 for fp32):
    kl, reverse_kl: 2 (b_s + b_t) + b_s      (10 for bf16)
    jsd, skew_kl, skew_reverse_kl, tvd: 3 (b_s + b_t) + b_s      (14 for bf16)

Layout. A block of BLOCK_V columns is a tile [BLOCK_V / VEC, VEC]: each tile row is one thread's
VEC contiguous elements (16 bytes: one vector load). Pass 1 keeps its maxima and sums per tile
row and folds them across threads once per row, so its loop has no cross-thread reduction.

Cache order. Successive passes run in opposite directions (pass 1 first to last block, the next
pass back, the next forward again), so each re-read starts with the blocks the previous pass
read last, which are the ones still in L2 when the row does not fit there; reads that a later
pass repeats are "evict_last", the last pass's reads and the gradient store "evict_first".
"""
import triton
import triton.language as tl

from .divergences import (JSD, cross_term_scalars, divergence_grad, divergence_scalars, divergence_value,
                          element_terms, finish_row_statistics, fold_row_statistics, load_scaled_tile,
                          log_ratio_shift)
from .row_stats import exp, row_label, store


@triton.jit
def _block_start(start, last_start, FORWARD: tl.constexpr):
    """Where the block of loop position ``start`` begins: the same (first to last block), or the
    mirror (last to first)."""
    if FORWARD:
        return start
    else:
        return last_start - start


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
    DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr, CE_FROM_STUDENT: tl.constexpr,
    WRITE_GRAD: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr,
):
    inv_temperature, inv_teacher_temperature, mix_weight, log_weight_p, log_weight_q = divergence_scalars(
        inv_temperature, inv_teacher_temperature, mix_weight, log_weight_p, log_weight_q, ACC_DTYPE)
    soft_scale = tl.full((), soft_scale, ACC_DTYPE)
    hard_weight = tl.full((), hard_weight, ACC_DTYPE)
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_row_stride
    t_row = t_ptr + row * t_row_stride
    g_row = grad_ptr + row * grad_row_stride
    TILE_ROWS: tl.constexpr = BLOCK_V // VEC
    tile = tl.arange(0, TILE_ROWS)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    last_start = (tl.cdiv(V, BLOCK_V) - 1) * BLOCK_V
    GRADIENT_FORWARD: tl.constexpr = DIVERGENCE >= JSD  # after pass 2, which runs last to first

    label, valid = row_label(labels_ptr, labels_stride, row, ignore_index, HAS_LABELS)

    if valid:
        # Pass 1, first to last block: log-sum-exps (and the kl / reverse_kl cross term).
        m_s = tl.full((TILE_ROWS,), float("-inf"), ACC_DTYPE)
        m_t = tl.full((TILE_ROWS,), float("-inf"), ACC_DTYPE)
        m_z = tl.full((TILE_ROWS,), float("-inf"), ACC_DTYPE)
        d_s = tl.zeros((TILE_ROWS,), ACC_DTYPE)
        d_t = tl.zeros((TILE_ROWS,), ACC_DTYPE)
        d_z = tl.zeros((TILE_ROWS,), ACC_DTYPE)
        cross = tl.zeros((TILE_ROWS,), ACC_DTYPE)
        for start in range(0, V, BLOCK_V):
            z, s, t, mask = load_scaled_tile(z_row, t_row, start + tile, V, inv_temperature,
                                             inv_teacher_temperature, ACC_DTYPE, "evict_last")
            m_s, d_s, m_t, d_t, m_z, d_z, cross = fold_row_statistics(
                m_s, d_s, m_t, d_t, m_z, d_z, cross, z, s, t, DIVERGENCE, HAS_CE and not CE_FROM_STUDENT)
        m_s, d_s, m_t, d_t, m_z, d_z, cross = finish_row_statistics(
            m_s, d_s, m_t, d_t, m_z, d_z, cross, DIVERGENCE, HAS_CE and not CE_FROM_STUDENT)
        if CE_FROM_STUDENT:
            m_z, d_z = m_s, d_s
        log_d_s, log_d_t = tl.log(d_s), tl.log(d_t)
        shift = log_ratio_shift(m_s, d_s, m_t, d_t)
        defined = (tl.abs(m_s + log_d_s) < float("inf")) & (tl.abs(m_t + log_d_t) < float("inf"))

        # Pass 2, last to first block: the row scalars of the mixture divergences and tvd.
        if DIVERGENCE >= JSD:
            a1 = tl.zeros((TILE_ROWS, VEC), ACC_DTYPE)
            a2 = tl.zeros((TILE_ROWS, VEC), ACC_DTYPE)
            for start in range(0, V, BLOCK_V):
                start = _block_start(start, last_start, False)
                z, s, t, mask = load_scaled_tile(z_row, t_row, start + tile, V, inv_temperature,
                                                 inv_teacher_temperature, ACC_DTYPE, "evict_last")
                # Columns past V load -inf: every term is 0 there (p = q = 0).
                b1, b2 = element_terms((s - m_s) - log_d_s, (t - m_t) - log_d_t, s - t, shift,
                                       mix_weight, log_weight_p, log_weight_q, DIVERGENCE)
                a1 += b1
                a2 += b2
            A1 = tl.sum(tl.sum(a1, axis=1), axis=0)
            A2 = tl.sum(tl.sum(a2, axis=1), axis=0)
        else:
            A1, A2 = cross_term_scalars(cross, d_s, d_t, shift, DIVERGENCE)
        loss = soft_scale * divergence_value(A1, A2, mix_weight, DIVERGENCE)

        if HAS_CE:
            in_range = (label >= 0) & (label < V)
            z_label = tl.load(z_row + label, mask=in_range, other=float("nan")).to(ACC_DTYPE)
            loss += hard_weight * ((m_z - z_label) + tl.log(d_z))
            defined = defined & in_range
        row_nan = tl.where(defined, 0.0, float("nan"))  # added to the loss and every gradient element
        store(loss_ptr + row, loss + row_nan)

        # The gradient pass, in the direction opposite to the previous pass.
        if WRITE_GRAD:
            grad_scale = tl.load(grad_scale_ptr).to(ACC_DTYPE)
            soft_grad_scale = grad_scale * soft_scale * inv_temperature
            hard_grad_scale = grad_scale * hard_weight
            log_d_z = tl.log(d_z)
            for start in range(0, V, BLOCK_V):
                start = _block_start(start, last_start, GRADIENT_FORWARD)
                z, s, t, mask = load_scaled_tile(z_row, t_row, start + tile, V, inv_temperature,
                                                 inv_teacher_temperature, ACC_DTYPE, "evict_first")
                ls = (s - m_s) - log_d_s
                g = divergence_grad(ls, (t - m_t) - log_d_t, s - t, shift, A1, A2,
                                    mix_weight, log_weight_p, log_weight_q, DIVERGENCE)
                g = soft_grad_scale * g + row_nan
                if HAS_CE:
                    softmax_z = exp(ls) if CE_FROM_STUDENT else exp((z - m_z) - log_d_z)  # exp(ls): the same q
                    g += hard_grad_scale * (softmax_z - tl.where(start + tile == label, 1.0, 0.0))
                store(g_row + start + tile, g, mask=mask, eviction_policy="evict_first")
    else:
        if WRITE_GRAD:
            for start in range(0, V, BLOCK_V):
                store(g_row + start + tile, tl.zeros((TILE_ROWS, VEC), ACC_DTYPE), mask=start + tile < V)
        store(loss_ptr + row, tl.zeros((), ACC_DTYPE))
