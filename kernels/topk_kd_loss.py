"""KD loss against a sparse top-k teacher: per-row loss and the dense student gradient in one kernel.

Notation (one row): z student logits, s = z / T, V columns, ls = log q = s - lse(s) over the full
vocabulary, computed as (s - max s) - log(sum exp(s - max s)) (row_stats.log_prob), as every
log-probability here (the hard CE's, the renormalised teacher's): s - lse(s) would round at the
scale of |lse(s)|. The teacher is k listed columns j_1..j_k with log-probabilities lt_i (already at
temperature T, as ``teacher_topk`` returns them). The divergence is taken between two distributions
on a few points b, with log-masses lp_b (teacher) and lq_b (student):

tail          points b                          lp_b                       lq_b
bucket        the k listed, and one tail        lt_i; log(1 - sum exp lt)  ls_{j_i}; log(1 - sum q_{j_i})
renormalize   the k listed                      lt_i - lse_i(lt)           ls_{j_i}   (mass < 1)
ignore        the k listed                      lt_i                       ls_{j_i}   (mass < 1)

D = sum_b term_b, term_b = divergence_value of the point's element terms a1, a2 (the table of
divergences.py, with ls, lt the points' lq, lp), and g_b = dD/dq_b (p fixed) and h_b = q_b g_b
(its limit where q_b = 0) from divergences.point_grad.

Gradient. Each point's q_b is softmax(s) summed over its columns (the tail bucket: the unlisted
ones), so the chain rule gives, with S = sum_b h_b:
    listed column j = j_i:   dD/ds_j = h_i - q_j S
    any other column:        dD/ds_j = q_j (g_tail - S)        (g_tail = 0 without a tail point)
In the bucket mode the points form a distribution and h_b - q_b S is the dense table's gradient of
the (k+1)-point distributions. The renormalize / ignore student is not normalised on its points
(sum q < 1), where the dense table (which uses sum q = 1) does not apply but this does.

Row loss = soft_scale * D + hard_weight * (lse(z) - z_y)                 (hard CE at T = 1)
Gradient = grad_scale * (soft_scale / T * dD/ds + hard_weight * (softmax(z) - onehot(y))) at every
column, grad_scale (read from device memory) 1 / the reduction's normaliser.

Tail masses. The teacher's is 1 - sum exp lt by log1mexp (expm1 when the sum is near 1), 0 if the
sum rounds above 1, and 0 when k = V. The student's is 1 - sum q_{j_i}, computed so that it does
not cancel to 0 when the listed columns hold nearly all the mass: pass 1 also sums exp(s) over the
columns below the smallest listed s (surely unlisted), d_low; then
    tail = (d_low + max(0, d - d_low - sum_i exp(s_{j_i} - m))) / d    (d = sum exp(s - m))
which equals 1 - sum q in exact arithmetic and keeps the small-logit part of the tail to full
relative precision.

Order of work per row: (A) gather the k listed logits: smallest listed s, lse over the listed s
and over lt, and the index check; (1) one pass over the row: lse(s), d_low (bucket), lse(z) (CE);
(B) the k-point terms: D and S; (C) the listed gradients, to a [N, k] scratch row (read before
pass 2, so that in-place gradients never read overwritten logits); (2) one pass writing the
unlisted-column gradient q_j (g_tail - S) everywhere; a CTA barrier; (D) the listed gradients
scattered over it. Bytes per row, b_s the student element size: 2 b_s V read (the second read
mostly from L2 on a GPU), b_s V written, plus about 3 k (4 + 4 + b_s) gathered and 8 k of scratch.
Undefined rows get a NaN loss and an all-NaN gradient row, as in kernels/kd_loss.py: a student row
with no finite lse(s), an index outside [0, V) (never an out-of-bounds access) and, with the hard
CE, a label outside [0, V). Repeated indices are not detected here: unvalidated, topk_kd_loss sets
a row that repeats one out of range first.
Ignored rows (y == ignore_index) get loss 0 and gradient 0 without reading anything else.
"""
import triton
import triton.language as tl

from .divergences import divergence_value, element_terms, gradient_factors, loss_scalars, point_grad
from .row_stats import exp, fold_tile, log_prob, online_max_update, row_label, store, tile_rows_to_row
from .row_tiles import body_pointer, body_tile, edge_tile, load_tile, row_split, zero_row

BUCKET = tl.constexpr(0)
RENORMALIZE = tl.constexpr(1)
IGNORE = tl.constexpr(2)


@triton.jit
def point_terms(lp, lq, mix_weight, log_weight_p, log_weight_q, DIVERGENCE: tl.constexpr):
    """(term_b, h_b, g_b) per point: D's term (divergences.py's element terms, whose value is linear
    in them) and divergences.point_grad."""
    a1, a2 = element_terms(lq, lp, exp(lq), exp(lp), lq - lp, 0.0, mix_weight, log_weight_p, log_weight_q, DIVERGENCE)
    h, g = point_grad(lp, lq, mix_weight, log_weight_p, log_weight_q, DIVERGENCE)
    return divergence_value(a1, a2, mix_weight, DIVERGENCE), h, g


@triton.jit
def log1mexp(x):
    """log(1 - exp(x)) for x < 0, -inf for x >= 0; near 0 through expm1(x) = (u - 1) x / log u,
    u = exp(x) (Kahan), which keeps full relative precision where 1 - u would cancel."""
    u = exp(x)
    log_u = tl.where(u == 1.0, 1.0, tl.log(u))
    expm1 = tl.where(u == 1.0, x, (u - 1.0) * x / log_u)
    value = tl.where(x > -0.6931471805599453, tl.log(-expm1), tl.log(1.0 - u))
    return tl.where(x >= 0, float("-inf"), value)


@triton.jit
def _listed(z_row, lt_row, idx_row, k0, lanes, K, V, inv_temperature, ACC_DTYPE: tl.constexpr):
    """One block of the listed points: lane mask, index (0 where out of range), the out-of-range
    lanes, and z, s = z / T and lt at them."""
    live = k0 + lanes < K
    index = tl.load(idx_row + k0 + lanes, mask=live, other=0).to(tl.int64)
    bad = live & ((index < 0) | (index >= V))
    index = tl.where(bad, 0, index)
    z = tl.load(z_row + index, mask=live, other=float("-inf")).to(ACC_DTYPE)
    lt = tl.load(lt_row + k0 + lanes, mask=live, other=float("-inf")).to(ACC_DTYPE)
    return live, index, bad, z, z * inv_temperature, lt


@triton.jit
def _row_sums(sums, z_row, offsets, mask, inv_temperature, s_floor, ACC_DTYPE: tl.constexpr, TAIL: tl.constexpr,
              HAS_CE: tl.constexpr):
    """Pass (1) on one tile: the per-tile-row (m_s, d_s, d_low, m_z, d_z) folded with it."""
    m_s, d_s, d_low, m_z, d_z = sums
    z = load_tile(z_row, offsets, mask, 1.0, ACC_DTYPE, "")
    s = z * inv_temperature
    m_s, d_s, e_s, alpha_s = fold_tile(m_s, d_s, s)
    if TAIL == BUCKET:
        d_low = d_low * alpha_s + tl.sum(tl.where(s < s_floor, e_s, 0.0), axis=1)
    if HAS_CE:
        m_z, d_z, _, _ = fold_tile(m_z, d_z, z)
    return m_s, d_s, d_low, m_z, d_z


@triton.jit
def _teacher_point(lt, m_kt, log_d_kt, TAIL: tl.constexpr):
    """lp of the listed points: lt, renormalised over them with ``renormalize`` (m_kt, d_kt: the
    maximum and sum of exps of the listed lt)."""
    if TAIL == RENORMALIZE:
        return log_prob(lt, m_kt, log_d_kt)
    return lt


@triton.jit
def _unlisted_gradient(g_row, z_row, offsets, mask, columns, label, inv_temperature, m_s, log_d_s, m_z, log_d_z,
                       c_tail, soft_grad_scale, hard_grad_scale, row_nan, ACC_DTYPE: tl.constexpr,
                       HAS_CE: tl.constexpr):
    """Pass (2) on one tile: q_j (g_tail - S) (and the hard CE's gradient) at its columns."""
    z = load_tile(z_row, offsets, mask, 1.0, ACC_DTYPE, "")
    q = exp(log_prob(z * inv_temperature, m_s, log_d_s))
    grad = soft_grad_scale * tl.where(q > 0, q * c_tail, 0.0) + row_nan
    if HAS_CE:
        grad += hard_grad_scale * (exp(log_prob(z, m_z, log_d_z)) - tl.where(columns == label, 1.0, 0.0))
    store(g_row + offsets, grad, mask=mask)


@triton.jit
def topk_kd_forward_kernel(
    z_ptr, z_row_stride,            # student logits [N, V], any float dtype
    lt_ptr, lt_row_stride,          # teacher log-probabilities [N, K], any float dtype
    idx_ptr, idx_row_stride,        # their columns [N, K], int32 / int64
    labels_ptr, labels_stride,      # labels [N] int32 / int64 (HAS_LABELS)
    grad_ptr, grad_row_stride,      # student gradient [N, V], student dtype (WRITE_GRAD)
    grad_scale_ptr,                 # [1] float: 1 / the reduction's normaliser
    scratch_ptr,                    # [N, K] accumulation dtype: the listed gradients between passes
    loss_ptr,                       # per-row loss [N], accumulation dtype
    V, K, inv_temperature: tl.float64, mix_weight: tl.float64, log_weight_p: tl.float64, log_weight_q: tl.float64,
    soft_scale: tl.float64, hard_weight: tl.float64, ignore_index,
    DIVERGENCE: tl.constexpr, TAIL: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr,
    WRITE_GRAD: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    VEC: tl.constexpr, ALIGNED: tl.constexpr,  # the row walk of the student and its gradient (row_tiles.py)
):
    inv_temperature, _, mix_weight, log_weight_p, log_weight_q, soft_scale, hard_weight = loss_scalars(
        inv_temperature, inv_temperature, mix_weight, log_weight_p, log_weight_q, soft_scale, hard_weight, ACC_DTYPE)
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_row_stride
    lt_row = lt_ptr + row * lt_row_stride
    idx_row = idx_ptr + row * idx_row_stride
    g_row = grad_ptr + row * grad_row_stride
    scratch_row = scratch_ptr + row * K
    lanes = tl.arange(0, BLOCK_K)
    # The passes over the row walk it from its first aligned group (z_row and g_row are for gathers).
    head, n = row_split(row * z_row_stride, V, VEC, ALIGNED)
    z_body = body_pointer(z_ptr, row * z_row_stride, head, VEC, ALIGNED)
    g_body = body_pointer(grad_ptr, row * grad_row_stride, head, VEC, ALIGNED)

    label, valid = row_label(labels_ptr, labels_stride, row, ignore_index, HAS_LABELS)

    if valid:
        # (A) The listed points: smallest s, lse over the listed s and over lt, index check.
        s_floor = tl.full((), float("inf"), ACC_DTYPE)
        m_ks = tl.full((), float("-inf"), ACC_DTYPE)
        m_kt = tl.full((), float("-inf"), ACC_DTYPE)
        d_ks = tl.zeros((), ACC_DTYPE)
        d_kt = tl.zeros((), ACC_DTYPE)
        n_bad = tl.zeros((), tl.int32)
        for k0 in range(0, K, BLOCK_K):
            live, index, bad, z, s, lt = _listed(z_row, lt_row, idx_row, k0, lanes, K, V, inv_temperature, ACC_DTYPE)
            s_floor = tl.minimum(s_floor, tl.min(tl.where(live, s, float("inf")), axis=0))
            m_ks, safe_ks, alpha_ks = online_max_update(m_ks, s)
            d_ks = d_ks * alpha_ks + tl.sum(exp(s - safe_ks), axis=0)
            m_kt, safe_kt, alpha_kt = online_max_update(m_kt, lt)
            d_kt = d_kt * alpha_kt + tl.sum(exp(lt - safe_kt), axis=0)
            n_bad += tl.sum(bad.to(tl.int32), axis=0)
        log_d_ks = tl.log(d_ks)
        log_d_kt = tl.log(d_kt)

        # (1) One pass over the row: lse(s), the surely-unlisted mass d_low, lse(z).
        sums = (tl.full((BLOCK_V // VEC,), float("-inf"), ACC_DTYPE), tl.zeros((BLOCK_V // VEC,), ACC_DTYPE),
                tl.zeros((BLOCK_V // VEC,), ACC_DTYPE), tl.full((BLOCK_V // VEC,), float("-inf"), ACC_DTYPE),
                tl.zeros((BLOCK_V // VEC,), ACC_DTYPE))
        for start in range(0, n, BLOCK_V):
            offsets, mask = body_tile(start, n, BLOCK_V, VEC)
            sums = _row_sums(sums, z_body, offsets, mask, inv_temperature, s_floor, ACC_DTYPE, TAIL, HAS_CE)
        edge, edge_mask = edge_tile(head, n, V, BLOCK_V, VEC)
        m_s, d_s, d_low, m_z, d_z = _row_sums(sums, z_body, edge, edge_mask, inv_temperature, s_floor, ACC_DTYPE,
                                              TAIL, HAS_CE)
        _, d_low = tile_rows_to_row(m_s, d_low)
        m_s, d_s = tile_rows_to_row(m_s, d_s)
        m_z, d_z = tile_rows_to_row(m_z, d_z)
        log_d_s = tl.log(d_s)
        log_d_z = tl.log(d_z)

        # The tail point (bucket).
        lp_tail = tl.full((), float("-inf"), ACC_DTYPE)
        lq_tail = tl.full((), float("-inf"), ACC_DTYPE)
        if TAIL == BUCKET:
            if K < V:
                lp_tail = log1mexp(m_kt + log_d_kt)
                m_s_safe = tl.where(m_s == float("-inf"), 0.0, m_s)
                d_listed = exp((m_ks - m_s_safe) + log_d_ks)
                d_tail = d_low + tl.maximum(d_s - d_low - d_listed, 0.0)
                lq_tail = tl.log(d_tail) - tl.log(d_s)

        # (B) The k-point terms: D and S.
        D = tl.zeros((), ACC_DTYPE)
        S = tl.zeros((), ACC_DTYPE)
        for k0 in range(0, K, BLOCK_K):
            live, index, bad, z, s, lt = _listed(z_row, lt_row, idx_row, k0, lanes, K, V, inv_temperature, ACC_DTYPE)
            term, h, g = point_terms(_teacher_point(lt, m_kt, log_d_kt, TAIL), log_prob(s, m_s, log_d_s), mix_weight,
                                     log_weight_p, log_weight_q, DIVERGENCE)
            D += tl.sum(tl.where(live, term, 0.0), axis=0)
            S += tl.sum(tl.where(live, h, 0.0), axis=0)
        g_tail = 0.0
        if TAIL == BUCKET:
            term_tail, h_tail, g_at_tail = point_terms(lp_tail, lq_tail, mix_weight, log_weight_p, log_weight_q,
                                                       DIVERGENCE)
            D += term_tail
            S += h_tail
            g_tail = tl.where(lq_tail > float("-inf"), g_at_tail, 0.0)
        c_tail = g_tail - S

        loss = soft_scale * D
        defined = (tl.abs(m_s + log_d_s) < float("inf")) & (n_bad == 0)
        if HAS_CE:
            in_range = (label >= 0) & (label < V)
            z_label = tl.load(z_row + label, mask=in_range, other=float("nan")).to(ACC_DTYPE)
            loss -= hard_weight * log_prob(z_label, m_z, log_d_z)
            defined = defined & in_range
        row_nan = tl.where(defined, 0.0, float("nan"))  # added to the loss and every gradient element
        loss += row_nan
        store(loss_ptr + row, loss)

        if WRITE_GRAD:
            soft_grad_scale, hard_grad_scale = gradient_factors(grad_scale_ptr, soft_scale, inv_temperature, hard_weight,
                                                                ACC_DTYPE)
            # (C) The listed gradients, to scratch (before pass 2 may overwrite the logits in place).
            for k0 in range(0, K, BLOCK_K):
                live, index, bad, z, s, lt = _listed(
                    z_row, lt_row, idx_row, k0, lanes, K, V, inv_temperature, ACC_DTYPE)
                lq = log_prob(s, m_s, log_d_s)
                term, h, g = point_terms(_teacher_point(lt, m_kt, log_d_kt, TAIL), lq, mix_weight, log_weight_p,
                                         log_weight_q, DIVERGENCE)
                q = exp(lq)
                grad = soft_grad_scale * (h - tl.where(q > 0, q * S, 0.0)) + row_nan
                if HAS_CE:
                    grad += hard_grad_scale * (exp(log_prob(z, m_z, log_d_z)) - tl.where(index == label, 1.0, 0.0))
                store(scratch_row + k0 + lanes, grad, mask=live)

            # (2) The unlisted-column gradient at every column.
            for start in range(0, n, BLOCK_V):
                offsets, mask = body_tile(start, n, BLOCK_V, VEC)
                _unlisted_gradient(g_body, z_body, offsets, mask, head + offsets, label, inv_temperature, m_s,
                                   log_d_s, m_z, log_d_z, c_tail, soft_grad_scale, hard_grad_scale, row_nan,
                                   ACC_DTYPE, HAS_CE)
            edge, edge_mask = edge_tile(head, n, V, BLOCK_V, VEC)
            _unlisted_gradient(g_body, z_body, edge, edge_mask, head + edge, label, inv_temperature, m_s, log_d_s,
                               m_z, log_d_z, c_tail, soft_grad_scale, hard_grad_scale, row_nan, ACC_DTYPE, HAS_CE)

            # (D) The listed gradients over it: every store of pass 2 lands first.
            tl.debug_barrier()
            for k0 in range(0, K, BLOCK_K):
                live = k0 + lanes < K
                index = tl.load(idx_row + k0 + lanes, mask=live, other=0).to(tl.int64)
                ok = live & (index >= 0) & (index < V)
                grad = tl.load(scratch_row + k0 + lanes, mask=ok, other=0.0)
                store(g_row + index, grad, mask=ok)
    else:
        if WRITE_GRAD:
            zero_row(g_body, head, n, V, ACC_DTYPE, BLOCK_V, VEC)
        store(loss_ptr + row, tl.zeros((), ACC_DTYPE))
