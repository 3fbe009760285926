"""Fused knowledge-distillation loss, two-pass kernel: per-row loss and student gradient, any V.

The divergences (value D, row scalars A1, A2, gradient dD/ds) are the table of divergences.py.
The teacher is one row, or the mixture p = sum_i w_i softmax(t_i) of NUM_TEACHERS rows (weights
summing to 1), formed per element in log space (divergences.mixture_log_prob), never stored.

Row loss  = soft_scale * D + hard_weight * (lse(z) - z_y)      (hard CE at T = 1)
Gradient  = grad_scale * (soft_scale / T_s * dD/ds + hard_weight * (softmax(z) - onehot(y)))
grad_scale (read from device memory: 1 / the reduction's normaliser, computed on the device) makes
the gradient that of the reduced loss, so the backward has nothing left to do for an upstream
gradient of 1. Without WRITE_GRAD (no gradient wanted) the gradient pass is skipped. With T_s = 1
(CE_FROM_STUDENT) the hard CE's softmax is the student's own: its statistics and its exp are
shared, not computed twice.
Ignored rows (y == ignore_index) get loss 0 and gradient 0 without reading the logits.
Undefined rows get a NaN loss and an all-NaN gradient row, so the failure cannot pass unseen:
a row whose s or any t has no finite log-sum-exp (entirely -inf, or holding a NaN or a +inf),
and, with the hard CE, a label outside [0, V) that is not ignore_index (never an out-of-bounds
read).

Passes over the row (each reads the student and every teacher once):
    1. online max / sum-of-exps of s, each t (and z for the hard CE); with one teacher kl and
       reverse_kl also fold their centred cross term (divergences.py) into it, so D is known
       after it.
    2. the divergences without a cross term, and every divergence of a mixture of teachers: the row
       scalars A1, A2, which need the normalised p and q (hence every lse) at every element.
    3. the gradient, written once.
Bytes requested per element, b_s the student's element size, b_t the sum of the teachers' (2 for
one bf16 teacher, 4 for fp32):
    one teacher, kl and reverse_kl: 2 (b_s + b_t) + b_s      (10 for bf16)
    otherwise: 3 (b_s + b_t) + b_s      (14 for one bf16 teacher, 20 for two)

Layout. A block of BLOCK_V columns is a tile [BLOCK_V / VEC, VEC]: each tile row is one thread's
VEC contiguous elements (16 bytes: one vector load). Each pass walks the row's aligned body in such
tiles and its unaligned head and tail in one edge tile beside the loop (row_tiles.py), so its loads
are 16 bytes whatever V and the row strides. Pass 1 keeps its maxima and sums per tile row and
folds them across threads once per row, so its loop has no cross-thread reduction.

Cache order. Successive passes run in opposite directions (pass 1 first to last block, the next
pass back, the next forward again), so each re-read starts with the blocks the previous pass
read last, which are the ones still in L2 when the row does not fit there; reads that a later
pass repeats are "evict_last", the last pass's reads and the gradient store "evict_first".
"""
import triton
import triton.language as tl

from .divergences import (JSD, REVERSE_KL, cross_term_scalars, divergence_grad, element_terms,
                          finish_row_statistics, fold_row_tile, gradient_factors, init_row_statistics, log_ratio_shift,
                          loss_scalars, mixture_log_prob, row_loss)
from .row_stats import exp, row_label, store
from .row_tiles import body_pointer, body_tile, edge_tile, load_teacher_tiles, load_tile, row_split, zero_row


@triton.jit
def _block_start(start, last_start, FORWARD: tl.constexpr):
    """Where the block of loop position ``start`` begins: the same (first to last block), or the
    mirror (last to first)."""
    if FORWARD:
        return start
    else:
        return last_start - start


@triton.jit
def _log_probs(s, ts, m_s, d_s, log_d_s, m_ts, d_ts, log_d_ts, centres, shift, log_teacher_weights,
               NUM_TEACHERS: tl.constexpr):
    """ls, lt, q, p, and (s_minus_t, shift) with ls - lt = s_minus_t - shift (divergences.py):
    (s - c_s) - (t - c_t) (``centres``) and the row's shift for one teacher, ls - lt and 0 for a mixture.
    q = e^(s - m_s) / d_s, p likewise (one teacher) or exp(lt) (a mixture)."""
    ls = (s - m_s) - log_d_s
    q = exp(s - m_s) * (1.0 / d_s)
    if NUM_TEACHERS == 1:
        t = ts[0]
        lt = (t - m_ts[0]) - log_d_ts[0]
        p = exp(t - m_ts[0]) * (1.0 / d_ts[0])
        s_minus_t = (s - centres[0]) - (t - centres[1])
        row_shift = shift
    else:
        lt = mixture_log_prob(ts, m_ts, log_d_ts, log_teacher_weights, NUM_TEACHERS)
        p = exp(lt)
        s_minus_t = ls - lt
        row_shift = 0.0
    return ls, lt, q, p, s_minus_t, row_shift


@triton.jit
def _row_terms(a1, a2, z_row, t_rows, offsets, mask, inv_temperature, inv_teacher_temperature, m_s, d_s, log_d_s,
               m_ts, d_ts, log_d_ts, centres, shift, log_teacher_weights, mix_weight, log_weight_p, log_weight_q,
               ACC_DTYPE: tl.constexpr, DIVERGENCE: tl.constexpr, NUM_TEACHERS: tl.constexpr):
    """Pass 2 on one tile: a1, a2 plus the tile's element terms (0 where masked: p = q = 0)."""
    s = load_tile(z_row, offsets, mask, inv_temperature, ACC_DTYPE, "evict_last")
    ts = load_teacher_tiles(t_rows, offsets, mask, inv_teacher_temperature, ACC_DTYPE, "evict_last", NUM_TEACHERS)
    ls, lt, q, p, s_minus_t, row_shift = _log_probs(s, ts, m_s, d_s, log_d_s, m_ts, d_ts, log_d_ts, centres, shift,
                                                    log_teacher_weights, NUM_TEACHERS)
    b1, b2 = element_terms(ls, lt, q, p, s_minus_t, row_shift, mix_weight, log_weight_p, log_weight_q, DIVERGENCE)
    return a1 + b1, a2 + b2


@triton.jit
def _gradient_tile(g_row, z_row, t_rows, offsets, mask, columns, label, inv_temperature, inv_teacher_temperature,
                   m_s, d_s, log_d_s, m_ts, d_ts, log_d_ts, centres, shift, log_teacher_weights, A1, A2, mix_weight,
                   log_weight_p, log_weight_q, m_z, log_d_z, soft_grad_scale, hard_grad_scale, row_nan,
                   ACC_DTYPE: tl.constexpr, DIVERGENCE: tl.constexpr, NUM_TEACHERS: tl.constexpr,
                   HAS_CE: tl.constexpr, CE_FROM_STUDENT: tl.constexpr):
    """The gradient pass on one tile: read it (the last read, "evict_first") and store its gradient."""
    z = load_tile(z_row, offsets, mask, 1.0, ACC_DTYPE, "evict_first")
    ts = load_teacher_tiles(t_rows, offsets, mask, inv_teacher_temperature, ACC_DTYPE, "evict_first", NUM_TEACHERS)
    ls, lt, q, p, s_minus_t, row_shift = _log_probs(z * inv_temperature, ts, m_s, d_s, log_d_s, m_ts, d_ts, log_d_ts,
                                                    centres, shift, log_teacher_weights, NUM_TEACHERS)
    g = divergence_grad(ls, lt, q, p, s_minus_t, row_shift, A1, A2, mix_weight, log_weight_p, log_weight_q,
                        DIVERGENCE)
    g = soft_grad_scale * g + row_nan
    if HAS_CE:
        softmax_z = q if CE_FROM_STUDENT else exp((z - m_z) - log_d_z)
        g += hard_grad_scale * (softmax_z - tl.where(columns == label, 1.0, 0.0))
    store(g_row + offsets, g, mask=mask, eviction_policy="evict_first")


@triton.jit
def kd_forward_kernel(
    z_ptr, z_row_stride,            # student logits [N, V], any float dtype, unit column stride
    teacher_ptrs, teacher_row_strides,  # NUM_TEACHERS teacher logits [N, V] (any float dtypes) and row strides
    labels_ptr, labels_stride,      # labels [N] int32 / int64 (read when HAS_LABELS)
    grad_ptr, grad_row_stride,      # student gradient [N, V], student dtype (written when WRITE_GRAD)
    grad_scale_ptr,                 # [1] float32 / float64: the gradient's factor (1 / normaliser)
    loss_ptr,                       # per-row loss [N], float32 (float64 for float64 input)
    V, inv_temperature: tl.float64, inv_teacher_temperature: tl.float64, mix_weight: tl.float64,
    log_weight_p: tl.float64, log_weight_q: tl.float64, soft_scale: tl.float64, hard_weight: tl.float64,
    log_teacher_weight_0: tl.float64, log_teacher_weight_1: tl.float64, log_teacher_weight_2: tl.float64,
    log_teacher_weight_3: tl.float64,  # log w_i of the mixture of teachers (the first NUM_TEACHERS)
    ignore_index,
    DIVERGENCE: tl.constexpr, NUM_TEACHERS: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr,
    CE_FROM_STUDENT: tl.constexpr, WRITE_GRAD: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr,
    VEC: tl.constexpr, ALIGNED: tl.constexpr,  # ALIGNED: every row stride (the gradient's too) equal modulo VEC
):
    inv_temperature, inv_teacher_temperature, mix_weight, log_weight_p, log_weight_q, soft_scale, hard_weight = (
        loss_scalars(inv_temperature, inv_teacher_temperature, mix_weight, log_weight_p, log_weight_q, soft_scale,
                     hard_weight, ACC_DTYPE))
    log_teacher_weights = (tl.full((), log_teacher_weight_0, ACC_DTYPE), tl.full((), log_teacher_weight_1, ACC_DTYPE),
                           tl.full((), log_teacher_weight_2, ACC_DTYPE), tl.full((), log_teacher_weight_3, ACC_DTYPE))
    row = tl.program_id(0).to(tl.int64)
    head, n = row_split(row * z_row_stride, V, VEC, ALIGNED)
    # Every row pointer at column head, the start of the row's aligned body (row_tiles.py).
    z_row = body_pointer(z_ptr, row * z_row_stride, head, VEC, ALIGNED)
    t_rows = ()
    for i in tl.static_range(NUM_TEACHERS):
        t_rows = t_rows + (body_pointer(teacher_ptrs[i], row * teacher_row_strides[i], head, VEC, ALIGNED),)
    g_row = body_pointer(grad_ptr, row * grad_row_stride, head, VEC, ALIGNED)
    last_start = (tl.cdiv(n, BLOCK_V) - 1) * BLOCK_V
    ELEMENT_PASS: tl.constexpr = DIVERGENCE >= JSD or NUM_TEACHERS > 1
    Z_STATS: tl.constexpr = HAS_CE and not CE_FROM_STUDENT
    # reverse_kl's gradient reads its cross term (divergences.py); kl's, q - p, does not, and
    # centring it on the argmax would cost pass 1 three instructions an element.
    ARGMAX_CENTRE: tl.constexpr = DIVERGENCE == REVERSE_KL

    label, valid = row_label(labels_ptr, labels_stride, row, ignore_index, HAS_LABELS)

    if valid:
        # Pass 1, the edge, then first to last block: log-sum-exps (and the kl / reverse_kl cross term).
        # (The edge before the loop, here and in pass 2, the gradient's after it: fewest registers.)
        edge, edge_mask = edge_tile(head, n, V, BLOCK_V, VEC)
        stats = fold_row_tile(init_row_statistics(BLOCK_V // VEC, ACC_DTYPE, NUM_TEACHERS), z_row, t_rows, edge,
                              edge_mask, inv_temperature, inv_teacher_temperature, ACC_DTYPE, "evict_last", DIVERGENCE,
                              Z_STATS, NUM_TEACHERS, ARGMAX_CENTRE=ARGMAX_CENTRE)
        for start in range(0, n, BLOCK_V):
            offsets, mask = body_tile(start, n, BLOCK_V, VEC)
            stats = fold_row_tile(stats, z_row, t_rows, offsets, mask, inv_temperature, inv_teacher_temperature,
                                  ACC_DTYPE, "evict_last", DIVERGENCE, Z_STATS, NUM_TEACHERS,
                                  ARGMAX_CENTRE=ARGMAX_CENTRE)
        m_s, d_s, m_ts, d_ts, m_z, d_z, cross, centres = finish_row_statistics(stats, DIVERGENCE, Z_STATS,
                                                                              NUM_TEACHERS, ARGMAX_CENTRE=ARGMAX_CENTRE)
        if CE_FROM_STUDENT:
            m_z, d_z = m_s, d_s
        log_d_s = tl.log(d_s)
        defined = tl.abs(m_s + log_d_s) < float("inf")
        log_d_ts = ()
        for i in tl.static_range(NUM_TEACHERS):
            log_d_ts = log_d_ts + (tl.log(d_ts[i]),)
            defined = defined & (tl.abs(m_ts[i] + log_d_ts[i]) < float("inf"))
        shift = log_ratio_shift(d_s, d_ts[0], m_s, m_ts[0], centres)

        # Pass 2, last to first block: the row scalars, when the first pass could not give them.
        if ELEMENT_PASS:
            edge, edge_mask = edge_tile(head, n, V, BLOCK_V, VEC)
            a1, a2 = _row_terms(tl.zeros((BLOCK_V // VEC, VEC), ACC_DTYPE), tl.zeros((BLOCK_V // VEC, VEC), ACC_DTYPE),
                                z_row, t_rows, edge, edge_mask, inv_temperature, inv_teacher_temperature, m_s, d_s,
                                log_d_s, m_ts, d_ts, log_d_ts, centres, shift, log_teacher_weights, mix_weight,
                                log_weight_p, log_weight_q, ACC_DTYPE, DIVERGENCE, NUM_TEACHERS)
            for start in range(0, n, BLOCK_V):
                offsets, mask = body_tile(_block_start(start, last_start, False), n, BLOCK_V, VEC)
                a1, a2 = _row_terms(a1, a2, z_row, t_rows, offsets, mask, inv_temperature, inv_teacher_temperature,
                                    m_s, d_s, log_d_s, m_ts, d_ts, log_d_ts, centres, shift, log_teacher_weights,
                                    mix_weight, log_weight_p, log_weight_q, ACC_DTYPE, DIVERGENCE, NUM_TEACHERS)
            A1 = tl.sum(tl.sum(a1, axis=1), axis=0)
            A2 = tl.sum(tl.sum(a2, axis=1), axis=0)
        else:
            A1, A2 = cross_term_scalars(cross, d_s, d_ts[0], shift, DIVERGENCE)
        z_label = tl.zeros((), ACC_DTYPE)
        if HAS_CE:
            z_label = tl.load(z_row + (label - head), mask=(label >= 0) & (label < V), other=float("nan"))
            z_label = z_label.to(ACC_DTYPE)
        log_d_z = tl.log(d_z)
        loss, row_nan = row_loss(A1, A2, mix_weight, soft_scale, hard_weight, m_z, log_d_z, z_label, label, V,
                                 defined, DIVERGENCE, HAS_CE)
        store(loss_ptr + row, loss)

        # The gradient pass, in the direction opposite to the previous pass.
        if WRITE_GRAD:
            soft_grad_scale, hard_grad_scale = gradient_factors(grad_scale_ptr, soft_scale, inv_temperature, hard_weight,
                                                                ACC_DTYPE)
            for start in range(0, n, BLOCK_V):
                offsets, mask = body_tile(_block_start(start, last_start, ELEMENT_PASS), n, BLOCK_V, VEC)
                _gradient_tile(g_row, z_row, t_rows, offsets, mask, head + offsets, label, inv_temperature,
                               inv_teacher_temperature, m_s, d_s, log_d_s, m_ts, d_ts, log_d_ts, centres, shift,
                               log_teacher_weights, A1, A2, mix_weight, log_weight_p, log_weight_q, m_z, log_d_z,
                               soft_grad_scale, hard_grad_scale, row_nan, ACC_DTYPE, DIVERGENCE, NUM_TEACHERS, HAS_CE,
                               CE_FROM_STUDENT)
            edge, edge_mask = edge_tile(head, n, V, 2 * VEC, VEC)
            _gradient_tile(g_row, z_row, t_rows, edge, edge_mask, head + edge, label, inv_temperature,
                           inv_teacher_temperature, m_s, d_s, log_d_s, m_ts, d_ts, log_d_ts, centres, shift,
                           log_teacher_weights, A1, A2, mix_weight, log_weight_p, log_weight_q, m_z, log_d_z,
                           soft_grad_scale, hard_grad_scale, row_nan, ACC_DTYPE, DIVERGENCE, NUM_TEACHERS, HAS_CE,
                           CE_FROM_STUDENT)
    else:
        if WRITE_GRAD:
            zero_row(g_row, head, n, V, ACC_DTYPE, BLOCK_V, VEC)
        store(loss_ptr + row, tl.zeros((), ACC_DTYPE))
