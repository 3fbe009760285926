"""Vocabulary-parallel KD loss: the kernels that run on one rank's shard of the vocabulary.

A rank holds columns [c0, c0 + W) of the student logits z and teacher logits (V = the sum of the
ranks' W). Notation and the divergence table are those of divergences.py, with every lse over all
V columns.

partial_stats_kernel (one pass over the shard; one row of STATS per row):
    m_s, m_t, m_z    shard maxima of s, t and z
    d_s, d_t, d_z    sum e^(s - m_s), sum e^(t - m_t), sum e^(z - m_z) over the shard
    cross            kl: sum e^(t - m_t) ((t - m_t) - (s - m_s)); reverse_kl: the same with s and t
                     swapped; else 0 (divergences.fold_row_statistics, centred on the maxima)
    z_y              z at the label when this shard owns it, else 0
The host combines these across ranks (fastkd/distributed.py) into ROW, the same columns for the
whole row: the maxima M over ranks (0 for a row entirely -inf), d = sum_r d_r e^(m_r - M), the
cross term re-centred on the row's maxima (divergences.recentre_cross), z_y; then A1, A2, nan_row.
Every log-probability is taken from them as (s - M_s) - log d_s (row_stats.log_prob), never as
s - lse(s), which rounds at the scale of |M_s|; the log-ratio from s_minus_t = (s - M_s) - (t - M_t)
and the shift log(d_s / d_t), centred as kd_loss.py centres kl (s - t would round at the scale of
the logits' offsets, which differ between s and t at T_s != T_t).

row_scalars_kernel (every divergence whose gradient reads A1, A2: all but kl; after the row's
maxima and sums are known): the shard's part of the row scalars A1, A2; the host sums them across
ranks into ROW. reverse_kl takes them too, though its loss comes from the cross term: its gradient at a
one-hot q is exact only from A1, A2 whose terms round as its own (the single-device kernels'
centre at the student's argmax would need the teacher's logit there from the one rank that holds it).

shard_finish_kernel: the row loss (the same on every rank) and the shard's columns of the gradient
of kd_loss.py, from ROW: D = divergence_value(A1, A2) (for kl and reverse_kl with the scalars of the
cross term, as kd_loss.py; the gradient reads ROW's A1, A2), loss = soft_scale D + hard_weight
(lse_z - z_y) + nan_row, gradient grad_scale (soft_scale / T_s dD/ds_j + hard_weight (e^(z_j -
lse_z) - [j == y])) + nan_row.
nan_row is 0, or NaN for a row kd_loss makes NaN (no student or teacher distribution, a label
outside [0, V), or an inconsistent shard layout).

Ignored rows (y == ignore_index) get neutral statistics (maxima -inf, sums 0), loss 0 and a zero
gradient without reading the logits. Bytes moved per element are those of the fused single-GPU
kernel but reverse_kl's: 2 (b_s + b_t) + b_s for kl, 3 (b_s + b_t) + b_s for the others, reverse_kl
included (its row_scalars_kernel pass). Each loop walks the shard's aligned body and then its head
and tail, as kd_loss.py (row_tiles.py).
"""
import triton
import triton.language as tl

from .divergences import (JSD, cross_term_scalars, divergence_grad, divergence_scalars, divergence_value,
                          element_terms, finish_row_statistics, fold_row_tile, gradient_factors, init_row_statistics,
                          log_ratio_shift, loss_scalars)
from .row_stats import exp, log_prob, row_label, store
from .row_tiles import body_pointer, body_tile, edge_tile, load_tile, row_split, zero_row

# Columns of STATS [N, 8] and ROW [N, 11] (STATS's, then three), in the order of
# fastkd.backends.VOCAB_PARALLEL_STATS and VOCAB_PARALLEL_ROW (a test checks the correspondence).
# (constexpr: jit code reads only those.)
M_S, M_T, M_Z, D_S, D_T, D_Z, CROSS, Z_Y = (tl.constexpr(i) for i in range(8))
A1, A2, NAN_ROW = (tl.constexpr(i) for i in range(8, 11))
STATS_WIDTH = tl.constexpr(8)
ROW_WIDTH = tl.constexpr(11)


@triton.jit
def partial_stats_kernel(
    z_ptr, z_row_stride,            # student shard [N, W], any float dtype
    t_ptr, t_row_stride,            # teacher shard [N, W], any float dtype
    labels_ptr, labels_stride,      # global labels [N] int32 / int64 (HAS_LABELS)
    stats_ptr,                      # STATS [N, 8], float32 (float64 for float64 input)
    W, vocab_start, inv_temperature: tl.float64, inv_teacher_temperature: tl.float64, ignore_index,
    DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr,
):
    inv_temperature = tl.full((), inv_temperature, ACC_DTYPE)
    inv_teacher_temperature = tl.full((), inv_teacher_temperature, ACC_DTYPE)
    row = tl.program_id(0).to(tl.int64)
    label, kept = row_label(labels_ptr, labels_stride, row, ignore_index, HAS_LABELS)
    width = tl.where(kept, W, 0)  # an ignored row reads nothing: its statistics stay neutral
    head, n = row_split(row * z_row_stride, width, VEC, ALIGNED)
    z_row = body_pointer(z_ptr, row * z_row_stride, head, VEC, ALIGNED)
    t_rows = (body_pointer(t_ptr, row * t_row_stride, head, VEC, ALIGNED),)
    out = stats_ptr + row * STATS_WIDTH

    stats = init_row_statistics(BLOCK_V // VEC, ACC_DTYPE, 1)
    z_y = tl.zeros((), ACC_DTYPE)
    for start in range(0, n, BLOCK_V):
        offsets, mask = body_tile(start, n, BLOCK_V, VEC)
        stats = fold_row_tile(stats, z_row, t_rows, offsets, mask, inv_temperature, inv_teacher_temperature,
                              ACC_DTYPE, "", DIVERGENCE, HAS_CE, 1, ARGMAX_CENTRE=False)
    edge, edge_mask = edge_tile(head, n, width, BLOCK_V, VEC)
    stats = fold_row_tile(stats, z_row, t_rows, edge, edge_mask, inv_temperature, inv_teacher_temperature,
                          ACC_DTYPE, "", DIVERGENCE, HAS_CE, 1, ARGMAX_CENTRE=False)
    # The cross term centred on the shard's maxima: the host re-centres it on the row's.
    m_s, d_s, m_ts, d_ts, m_z, d_z, cross, _ = finish_row_statistics(stats, DIVERGENCE, HAS_CE, 1,
                                                                     ARGMAX_CENTRE=False)
    m_t, d_t = m_ts[0], d_ts[0]
    if kept:
        if HAS_CE:
            local_label = label - vocab_start
            owned = (local_label >= 0) & (local_label < W)
            z_y = tl.load(z_row + (local_label - head), mask=owned, other=0.0).to(ACC_DTYPE)

    store(out + M_S, m_s)
    store(out + M_T, m_t)
    store(out + M_Z, m_z)
    store(out + D_S, d_s)
    store(out + D_T, d_t)
    store(out + D_Z, d_z)
    store(out + CROSS, cross)
    store(out + Z_Y, z_y)


@triton.jit
def _shard_log_probs(s, t, m_s, log_d_s, m_t, log_d_t):
    """ls, lt and s_minus_t = (s - m_s) - (t - m_t) of a tile, from the row's maxima and log sums
    of exps."""
    return log_prob(s, m_s, log_d_s), log_prob(t, m_t, log_d_t), (s - m_s) - (t - m_t)


@triton.jit
def _row_statistics(values):
    """A row's maxima m_s, m_t, the logs of its sums of exps and the shift of the centred
    s_minus_t, log(d_s / d_t), from ROW."""
    m_s, m_t = tl.load(values + M_S), tl.load(values + M_T)
    d_s, d_t = tl.load(values + D_S), tl.load(values + D_T)
    return m_s, tl.log(d_s), m_t, tl.log(d_t), log_ratio_shift(d_s, d_t)


@triton.jit
def _shard_terms(a1, a2, z_row, t_row, offsets, mask, inv_temperature, inv_teacher_temperature, m_s, log_d_s, m_t,
                 log_d_t, shift, mix_weight, log_weight_p, log_weight_q, ACC_DTYPE: tl.constexpr,
                 DIVERGENCE: tl.constexpr):
    """a1, a2 plus one tile's element terms (0 where masked: the tile loads -inf, p = q = 0)."""
    s = load_tile(z_row, offsets, mask, inv_temperature, ACC_DTYPE, "")
    t = load_tile(t_row, offsets, mask, inv_teacher_temperature, ACC_DTYPE, "")
    ls, lt, s_minus_t = _shard_log_probs(s, t, m_s, log_d_s, m_t, log_d_t)
    b1, b2 = element_terms(ls, lt, exp(ls), exp(lt), s_minus_t, shift, mix_weight, log_weight_p, log_weight_q,
                           DIVERGENCE)
    return a1 + b1, a2 + b2


@triton.jit
def _shard_gradient(g_row, z_row, t_row, offsets, mask, columns, label, inv_temperature, inv_teacher_temperature, m_s,
                    log_d_s, m_t, log_d_t, shift, m_z, log_d_z, A1, A2, mix_weight, log_weight_p, log_weight_q,
                    soft_grad_scale, hard_grad_scale, nan_row, ACC_DTYPE: tl.constexpr, DIVERGENCE: tl.constexpr,
                    HAS_CE: tl.constexpr):
    """One tile of the shard's gradient (``columns`` and ``label`` local to the shard)."""
    z = load_tile(z_row, offsets, mask, 1.0, ACC_DTYPE, "")
    s = z * inv_temperature
    t = load_tile(t_row, offsets, mask, inv_teacher_temperature, ACC_DTYPE, "")
    ls, lt, s_minus_t = _shard_log_probs(s, t, m_s, log_d_s, m_t, log_d_t)
    g = soft_grad_scale * divergence_grad(ls, lt, exp(ls), exp(lt), s_minus_t, shift, A1, A2, mix_weight,
                                          log_weight_p, log_weight_q, DIVERGENCE)
    g += nan_row
    if HAS_CE:
        g += hard_grad_scale * (exp(log_prob(z, m_z, log_d_z)) - tl.where(columns == label, 1.0, 0.0))
    store(g_row + offsets, g, mask=mask)


@triton.jit
def row_scalars_kernel(
    z_ptr, z_row_stride,            # student shard [N, W]
    t_ptr, t_row_stride,            # teacher shard [N, W]
    labels_ptr, labels_stride,      # global labels [N] (HAS_LABELS)
    row_ptr,                        # ROW [N, 11] (m_s, m_t, d_s, d_t read), accumulation dtype
    scalars_ptr,                    # the shard's A1, A2 [N, 2], accumulation dtype
    W, inv_temperature: tl.float64, inv_teacher_temperature: tl.float64, mix_weight: tl.float64,
    log_weight_p: tl.float64, log_weight_q: tl.float64, ignore_index,
    DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr,
    VEC: tl.constexpr, ALIGNED: tl.constexpr,
):
    inv_temperature, inv_teacher_temperature, mix_weight, log_weight_p, log_weight_q = divergence_scalars(
        inv_temperature, inv_teacher_temperature, mix_weight, log_weight_p, log_weight_q, ACC_DTYPE)
    row = tl.program_id(0).to(tl.int64)
    head, n = row_split(row * z_row_stride, W, VEC, ALIGNED)
    z_row = body_pointer(z_ptr, row * z_row_stride, head, VEC, ALIGNED)
    t_row = body_pointer(t_ptr, row * t_row_stride, head, VEC, ALIGNED)
    label, kept = row_label(labels_ptr, labels_stride, row, ignore_index, HAS_LABELS)

    a1 = tl.zeros((BLOCK_V // VEC, VEC), ACC_DTYPE)
    a2 = tl.zeros((BLOCK_V // VEC, VEC), ACC_DTYPE)
    if kept:
        m_s, log_d_s, m_t, log_d_t, shift = _row_statistics(row_ptr + row * ROW_WIDTH)
        for start in range(0, n, BLOCK_V):
            offsets, mask = body_tile(start, n, BLOCK_V, VEC)
            a1, a2 = _shard_terms(a1, a2, z_row, t_row, offsets, mask, inv_temperature, inv_teacher_temperature,
                                  m_s, log_d_s, m_t, log_d_t, shift, mix_weight, log_weight_p, log_weight_q,
                                  ACC_DTYPE, DIVERGENCE)
        edge, edge_mask = edge_tile(head, n, W, BLOCK_V, VEC)
        a1, a2 = _shard_terms(a1, a2, z_row, t_row, edge, edge_mask, inv_temperature, inv_teacher_temperature,
                              m_s, log_d_s, m_t, log_d_t, shift, mix_weight, log_weight_p, log_weight_q, ACC_DTYPE,
                              DIVERGENCE)
    store(scalars_ptr + row * 2, tl.sum(tl.sum(a1, axis=1), axis=0))
    store(scalars_ptr + row * 2 + 1, tl.sum(tl.sum(a2, axis=1), axis=0))


@triton.jit
def shard_finish_kernel(
    z_ptr, z_row_stride,            # student shard [N, W]
    t_ptr, t_row_stride,            # teacher shard [N, W]
    labels_ptr, labels_stride,      # global labels [N] (HAS_LABELS)
    row_ptr,                        # ROW [N, 11], accumulation dtype
    grad_ptr, grad_row_stride,      # shard gradient [N, W], student dtype (WRITE_GRAD)
    grad_scale_ptr,                 # [1] float: 1 / the reduction's normaliser
    loss_ptr,                       # per-row loss [N], accumulation dtype
    W, vocab_start, inv_temperature: tl.float64, inv_teacher_temperature: tl.float64, mix_weight: tl.float64,
    log_weight_p: tl.float64, log_weight_q: tl.float64, soft_scale: tl.float64, hard_weight: tl.float64,
    ignore_index,
    DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr, WRITE_GRAD: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr,
):
    inv_temperature, inv_teacher_temperature, mix_weight, log_weight_p, log_weight_q, soft_scale, hard_weight = (
        loss_scalars(inv_temperature, inv_teacher_temperature, mix_weight, log_weight_p, log_weight_q, soft_scale,
                     hard_weight, ACC_DTYPE))
    row = tl.program_id(0).to(tl.int64)
    head, n = row_split(row * z_row_stride, W, VEC, ALIGNED)
    z_row = body_pointer(z_ptr, row * z_row_stride, head, VEC, ALIGNED)
    t_row = body_pointer(t_ptr, row * t_row_stride, head, VEC, ALIGNED)
    g_row = body_pointer(grad_ptr, row * grad_row_stride, head, VEC, ALIGNED)
    label, kept = row_label(labels_ptr, labels_stride, row, ignore_index, HAS_LABELS)

    if kept:
        values = row_ptr + row * ROW_WIDTH
        m_s, log_d_s, m_t, log_d_t, shift = _row_statistics(values)
        m_z, log_d_z = tl.load(values + M_Z), tl.log(tl.load(values + D_Z))
        nan_row = tl.load(values + NAN_ROW)
        A1_row = tl.load(values + A1)  # exchanged for every divergence but kl, whose gradient reads none
        A2_row = tl.load(values + A2)
        value_A1, value_A2 = A1_row, A2_row
        if DIVERGENCE < JSD:  # kl's and reverse_kl's loss: from the cross term, centred (no cancellation)
            value_A1, value_A2 = cross_term_scalars(tl.load(values + CROSS), tl.load(values + D_S),
                                                    tl.load(values + D_T), shift, DIVERGENCE)
        loss = soft_scale * divergence_value(value_A1, value_A2, mix_weight, DIVERGENCE) + nan_row
        if HAS_CE:
            loss -= hard_weight * log_prob(tl.load(values + Z_Y), m_z, log_d_z)
        store(loss_ptr + row, loss)
        if WRITE_GRAD:
            soft_grad_scale, hard_grad_scale = gradient_factors(grad_scale_ptr, soft_scale, inv_temperature, hard_weight,
                                                                ACC_DTYPE)
            local_label = label - vocab_start
            for start in range(0, n, BLOCK_V):
                offsets, mask = body_tile(start, n, BLOCK_V, VEC)
                _shard_gradient(g_row, z_row, t_row, offsets, mask, head + offsets, local_label, inv_temperature,
                                inv_teacher_temperature, m_s, log_d_s, m_t, log_d_t, shift, m_z, log_d_z, A1_row,
                                A2_row, mix_weight, log_weight_p, log_weight_q, soft_grad_scale, hard_grad_scale,
                                nan_row, ACC_DTYPE, DIVERGENCE, HAS_CE)
            edge, edge_mask = edge_tile(head, n, W, BLOCK_V, VEC)
            _shard_gradient(g_row, z_row, t_row, edge, edge_mask, head + edge, local_label, inv_temperature,
                            inv_teacher_temperature, m_s, log_d_s, m_t, log_d_t, shift, m_z, log_d_z, A1_row,
                            A2_row, mix_weight, log_weight_p, log_weight_q, soft_grad_scale, hard_grad_scale,
                            nan_row, ACC_DTYPE, DIVERGENCE, HAS_CE)
    else:
        store(loss_ptr + row, tl.zeros((), ACC_DTYPE))
        if WRITE_GRAD:
            zero_row(g_row, head, n, W, ACC_DTYPE, BLOCK_V, VEC)
