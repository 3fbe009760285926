"""The divergences: every kernel's per-element math and the value from the row scalars.

The one table of the Triton side; ``fastkd/backends/torch_divergences.py`` is its torch mirror
(same functions, same order). Used by the dense kernel (kd_loss.py), the top-k kernel
(topk_kd_loss.py) and the vocabulary-parallel kernels (vocab_parallel.py).

Notation (one row): z student logits, s = z / T_s, t = teacher logits / T_t, V columns.
    ls = log q = s - lse(s)      lt = log p = t - lse(t)
    computed as (s - max s) - log(sum exp(s - max s)): rounding lse(s), which is as large as the
    logits, would put an error of eps |s| on every log-probability; the max cancels exactly instead.
    s_minus_t and shift: ls - lt = s_minus_t - shift, with shift a row constant. Single-teacher
    kernels pass the centred s_minus_t = (s - c_s) - (t - c_t) and
    shift = log(d_s / d_t) + ((m_s - c_s) - (m_t - c_t)) (log_ratio_shift), the centres c the
    maxima m, or in the two-pass kernel's reverse_kl the cross term's (below) (the vocabulary-parallel shards
    s - t and lse(s) - lse(t)): each exact to a few ulps of its own size, so log-ratios near 0 (a
    converged student) and the sign of p - q are not lost under the eps |lse| of ls - lt. Top-k
    passes ls - lt and 0.
For D(q) any divergence, dD/ds_j = q_j (g_j - sum_i q_i g_i) with g_i = dD/dq_i; the table is that
identity worked out. M is the mixture, log M = log_add_exp(log w_p + lt, log w_q + ls).

divergence        a1 (summed: A1)        a2 (summed: A2)    D from A1, A2      dD/ds_j
kl                -p s_minus_t           -p shift           A1 - A2            q_j - p_j
reverse_kl        q s_minus_t            q shift            A1 - A2            q_j (ls_j - lt_j - D)
jsd (beta)        p (lt - lM)            q (ls - lM)        b A1 + (1-b) A2    (1-b) q_j (ls_j - lM_j - A2)
skew_kl (a)       p (lt - lM)            r = p q / M        A1                 (1-a) (q_j A2 - r_j)
skew_reverse_kl   q (ls - lM)            a q^2 / M          A1                 q_j (ls_j - lM_j - a q_j / M_j - (A1 - A2))
tvd               |p - q|                q sign(p - q)      A1 / 2             q_j (A2 - sign(p_j - q_j)) / 2
mixture weights: jsd (w_p, w_q) = (b, 1-b); skew_kl (a, 1-a); skew_reverse_kl (1-a, a).
(kl and reverse_kl need no element pass in a single-teacher kernel: A1 is the cross term
sum e^(t - m_t) ((t - m_t) - (s - c_s)) / d_t (kl) or sum e^(s - m_s) ((s - m_s) - (t - c_t)) / d_s
(reverse_kl), the weights' side centred on its maximum and the other side, with ARGMAX_CENTRE
(the two-pass kernel's reverse_kl), on its logit at the weights' argmax (c_t = t at argmax s;
else, and for kl, whose gradient q - p never reads the cross term, on its maximum), both
summed against running values and re-centred as they move (recentre_cross), and A2 = -shift (kl)
or shift: terms of the size of the row's spread, where sum p (t - s) - (lse(s) - lse(t)) would
cancel two of the size |z / T|. reverse_kl's gradient reads ls - lt - D as
(s_minus_t - A1) - (shift - A2) (right for any pair; with the cross term shift - A2 = 0): where q
is one-hot (|z / T| ~ 1e4) s_minus_t = 0 at the argmax and A1 = 0 exactly, where centring t on
its maximum rounded t - m_t twice, once per element and once through the re-centring, and the
two differed by eps |t - m_t|, 10x float32 PyTorch's error. The argmax costs pass 1 a compare, a
select and a max an element (modelled +12 % at V = 50257, nothing at 128256, where bytes bound it).)
a q / M <= 1 is taken as exp(log a + ls - lM): no 0 * inf at a = 0; tvd's sign is 0 where p = q.
jsd's lt - lM and ls - lM are taken against log M here, which near convergence rounds like
float32 PyTorch's (D ~ r^2 / 8 against an eps |ls| rounding a term): the torch table forms them
from r = ls - lt instead (fastkd/backends/torch_divergences.py, mixture_log_ratios), but that form
(two logs and two divisions more an element) modelled 2.7x slower here and was not kept.)

Top-k (topk_kd_loss.py) takes D between two distributions on a few points with log-masses lp, lq,
the student's not necessarily normalised there, so its gradient needs the derivatives one level
down, per point (``point_grad``): g = dD/dq (p fixed) and h = q g (its limit where q = 0):
kl                g = -p / q                      h = -p
reverse_kl        g = lq - lp + 1                 h = q g
jsd (beta)        g = (1-b) (lq - lM)             h = q g
skew_kl (a)       g = -(1-a) p / M                h = -(1-a) r
skew_reverse_kl   g = lq - lM + 1 - a q / M       h = q g
tvd               g = -sign(p - q) / 2            h = q g
"""
import triton
import triton.language as tl

from .row_stats import exp, finite, fold_tile, log, log_add_exp, log_prob, tile_rows_to_row
from .row_tiles import load_teacher_tiles, load_tile

# Codes of fastkd.divergences.DIVERGENCES, in its order (a test checks the correspondence). Every
# table below has one branch per code and fails to compile (tl.static_assert) for any other.
KL = tl.constexpr(0)
REVERSE_KL = tl.constexpr(1)
JSD = tl.constexpr(2)
SKEW_KL = tl.constexpr(3)
SKEW_REVERSE_KL = tl.constexpr(4)
TVD = tl.constexpr(5)


@triton.jit
def divergence_scalars(inv_temperature, inv_teacher_temperature, mix_weight, log_weight_p, log_weight_q,
                       ACC_DTYPE: tl.constexpr):
    """1 / T_s, 1 / T_t and the mixture weights (float64 kernel arguments) in the accumulation dtype."""
    return (tl.full((), inv_temperature, ACC_DTYPE), tl.full((), inv_teacher_temperature, ACC_DTYPE),
            tl.full((), mix_weight, ACC_DTYPE), tl.full((), log_weight_p, ACC_DTYPE),
            tl.full((), log_weight_q, ACC_DTYPE))


@triton.jit
def loss_scalars(inv_temperature, inv_teacher_temperature, mix_weight, log_weight_p, log_weight_q, soft_scale,
                 hard_weight, ACC_DTYPE: tl.constexpr):
    """``divergence_scalars`` and the loss's weights soft_scale, hard_weight, in the accumulation dtype."""
    return divergence_scalars(inv_temperature, inv_teacher_temperature, mix_weight, log_weight_p, log_weight_q,
                              ACC_DTYPE) + (tl.full((), soft_scale, ACC_DTYPE), tl.full((), hard_weight, ACC_DTYPE))


@triton.jit
def gradient_factors(grad_scale_ptr, soft_scale, inv_temperature, hard_weight, ACC_DTYPE: tl.constexpr):
    """The factors of dD/ds and of the hard CE's softmax(z) - onehot(y) in the gradient, each times
    grad_scale (read from device memory: 1 / the reduction's normaliser): soft_scale / T_s, hard_weight."""
    grad_scale = tl.load(grad_scale_ptr).to(ACC_DTYPE)
    return grad_scale * soft_scale * inv_temperature, grad_scale * hard_weight


@triton.jit
def cross_term_elements(e_s, e_t, s_c, t_c, DIVERGENCE: tl.constexpr):
    """The terms of kl's cross term e^(t - m_t) ((t - m_t) - (s - m_s)), or reverse_kl's
    e^(s - m_s) ((s - m_s) - (t - m_t)), from the centred s_c = s - m_s, t_c = t - m_t; 0 where the
    weight is 0."""
    if DIVERGENCE == KL:
        terms = tl.where(e_t > 0, e_t * (t_c - s_c), 0.0)
    elif DIVERGENCE == REVERSE_KL:
        terms = tl.where(e_s > 0, e_s * (s_c - t_c), 0.0)
    else:  # no cross term (kernels compute it unconditionally and use it only for kl, reverse_kl)
        terms = tl.zeros_like(e_s)
    return terms


@triton.jit
def recentre_cross(cross, d_s, d_t, c_s, new_c_s, c_t, new_c_t, DIVERGENCE: tl.constexpr):
    """A cross term summed against the centres c_s, c_t, re-centred on new_c_s, new_c_t (the weights'
    side centred on its maximum: its weights, summing to d_t (kl) or d_s (reverse_kl) against the old
    one, are rescaled with it): each of its terms moves by (c_t - new_c_t) - (c_s - new_c_s) (kl),
    the opposite (reverse_kl). 0 stays 0."""
    weight = d_t if DIVERGENCE == KL else d_s
    move = (finite(c_t) - finite(new_c_t)) - (finite(c_s) - finite(new_c_s))
    if DIVERGENCE == REVERSE_KL:
        move = -move
        alpha = exp(c_s - finite(new_c_s))
    elif DIVERGENCE == KL:
        alpha = exp(c_t - finite(new_c_t))
    else:  # no cross term: nothing to re-centre
        alpha = tl.zeros_like(cross)
    return alpha * (cross + tl.where(weight > 0, weight * move, 0.0))


@triton.jit
def fold_row_statistics(m_s, d_s, m_ts, d_ts, m_z, d_z, cross, centre, z, s, ts, DIVERGENCE: tl.constexpr,
                        HAS_CE: tl.constexpr, NUM_TEACHERS: tl.constexpr, ARGMAX_CENTRE: tl.constexpr):
    """Fold one tile [R, C] into the running maxima m and sums of exps d [R] of s, of each teacher's
    t (tuples m_ts, d_ts) and of z (hard CE), and, with one teacher, into kl's cross term
    sum e^(t - m_t) ((t - m_t) - (s - c_s)) or reverse_kl's sum e^(s - m_s) ((s - m_s) - (t - c_t)),
    its other side centred (ARGMAX_CENTRE) on ``centre``, that side's logit at the weights' running
    argmax (c_s, c_t: the table above), else on that side's running maximum; re-centred as they
    move. Per tile row (one thread's: no cross-thread work in the loop)."""
    old_m_s, old_d_s = m_s, d_s
    m_s, d_s, e_s, alpha_s = fold_tile(m_s, d_s, s)
    new_m_ts = ()
    new_d_ts = ()
    for i in tl.static_range(NUM_TEACHERS):
        m_t, d_t, e_t, alpha_t = fold_tile(m_ts[i], d_ts[i], ts[i])
        new_m_ts = new_m_ts + (m_t,)
        new_d_ts = new_d_ts + (d_t,)
    if NUM_TEACHERS == 1 and (DIVERGENCE == KL or DIVERGENCE == REVERSE_KL):
        # w: the weights' side (kl: t, reverse_kl: s); x: the other.
        if DIVERGENCE == KL:
            w, x, old_m_w, m_w, old_m_x, m_x = ts[0], s, m_ts[0], new_m_ts[0], old_m_s, m_s
        else:
            w, x, old_m_w, m_w, old_m_x, m_x = s, ts[0], old_m_s, m_s, m_ts[0], new_m_ts[0]
        if ARGMAX_CENTRE:
            at_argmax = tl.max(tl.where(w == m_w[:, None], x, float("-inf")), axis=1)
            old_c = centre
            centre = tl.where(m_w > old_m_w, finite(at_argmax), centre)  # a new maximum in this tile
            c = centre
        else:
            old_c, c = old_m_x, finite(m_x)
        if DIVERGENCE == KL:
            cross = recentre_cross(cross, old_d_s, d_ts[0], old_c, c, old_m_w, m_w, DIVERGENCE)
            terms = cross_term_elements(e_s, e_t, x - c[:, None], w - finite(m_w)[:, None], DIVERGENCE)
        else:
            cross = recentre_cross(cross, old_d_s, d_ts[0], old_m_w, m_w, old_c, c, DIVERGENCE)
            terms = cross_term_elements(e_s, e_t, w - finite(m_w)[:, None], x - c[:, None], DIVERGENCE)
        cross += tl.sum(terms, axis=1)
    if HAS_CE:
        m_z, d_z, _, _ = fold_tile(m_z, d_z, z)
    return m_s, d_s, new_m_ts, new_d_ts, m_z, d_z, cross, centre


@triton.jit
def init_row_statistics(TILE_ROWS: tl.constexpr, ACC_DTYPE: tl.constexpr, NUM_TEACHERS: tl.constexpr):
    """The statistics ``fold_row_tile`` folds tiles into, before the first: (m_s, d_s, m_ts, d_ts,
    m_z, d_z, cross, centre), maxima -inf, sums and centre 0, [TILE_ROWS] each (m_ts, d_ts: one per
    teacher)."""
    m_ts = ()
    d_ts = ()
    for i in tl.static_range(NUM_TEACHERS):
        m_ts = m_ts + (tl.full((TILE_ROWS,), float("-inf"), ACC_DTYPE),)
        d_ts = d_ts + (tl.zeros((TILE_ROWS,), ACC_DTYPE),)
    return (tl.full((TILE_ROWS,), float("-inf"), ACC_DTYPE), tl.zeros((TILE_ROWS,), ACC_DTYPE), m_ts, d_ts,
            tl.full((TILE_ROWS,), float("-inf"), ACC_DTYPE), tl.zeros((TILE_ROWS,), ACC_DTYPE),
            tl.zeros((TILE_ROWS,), ACC_DTYPE), tl.zeros((TILE_ROWS,), ACC_DTYPE))


@triton.jit
def fold_row_tile(stats, z_row, t_rows, offsets, mask, inv_temperature, inv_teacher_temperature,
                  ACC_DTYPE: tl.constexpr, EVICTION: tl.constexpr, DIVERGENCE: tl.constexpr, HAS_CE: tl.constexpr,
                  NUM_TEACHERS: tl.constexpr, ARGMAX_CENTRE: tl.constexpr):
    """Load the student's and each teacher's tile at ``offsets`` (row_tiles.py) and fold it into
    ``stats`` (``fold_row_statistics``)."""
    z = load_tile(z_row, offsets, mask, 1.0, ACC_DTYPE, EVICTION)
    ts = load_teacher_tiles(t_rows, offsets, mask, inv_teacher_temperature, ACC_DTYPE, EVICTION, NUM_TEACHERS)
    m_s, d_s, m_ts, d_ts, m_z, d_z, cross, centre = stats
    return fold_row_statistics(m_s, d_s, m_ts, d_ts, m_z, d_z, cross, centre, z, z * inv_temperature, ts,
                               DIVERGENCE, HAS_CE, NUM_TEACHERS, ARGMAX_CENTRE)


@triton.jit
def finish_row_statistics(stats, DIVERGENCE: tl.constexpr, HAS_CE: tl.constexpr, NUM_TEACHERS: tl.constexpr,
                          ARGMAX_CENTRE: tl.constexpr):
    """The row's maxima and sums of exps, its cross term re-centred on the row's centres, and those
    centres (c_s, c_t) (the table above; the maxima where there is none, or without ARGMAX_CENTRE:
    s - c_s is then the s - m_s the caller computes anyway) from the per-tile-row ones of
    ``fold_row_statistics``: once per row, across threads."""
    m_s, d_s, m_ts, d_ts, m_z, d_z, cross, centre = stats
    M_s, D_s = tile_rows_to_row(m_s, d_s)
    M_ts = ()
    D_ts = ()
    for i in tl.static_range(NUM_TEACHERS):
        M_t, D_t = tile_rows_to_row(m_ts[i], d_ts[i])
        M_ts = M_ts + (M_t,)
        D_ts = D_ts + (D_t,)
    c_s, c_t = M_s, M_ts[0]
    if NUM_TEACHERS == 1 and (DIVERGENCE == KL or DIVERGENCE == REVERSE_KL):
        m_w, M_w, m_x, M_x = (m_ts[0], M_ts[0], m_s, M_s) if DIVERGENCE == KL else (m_s, M_s, m_ts[0], M_ts[0])
        if ARGMAX_CENTRE:
            # The centre of the tile row that holds the weights' maximum (the largest, on a tie).
            c, C = centre, finite(tl.max(tl.where(m_w == M_w, centre, float("-inf")), axis=0))
        else:
            c, C = m_x, M_x
        if DIVERGENCE == KL:
            cross = recentre_cross(cross, d_s, d_ts[0], c, C, m_w, M_w, DIVERGENCE)
            c_s = C
        else:
            cross = recentre_cross(cross, d_s, d_ts[0], m_w, M_w, c, C, DIVERGENCE)
            c_t = C
    M_z, D_z = tl.max(m_z, axis=0), tl.sum(d_z, axis=0)
    if HAS_CE:
        M_z, D_z = tile_rows_to_row(m_z, d_z)
    return M_s, D_s, M_ts, D_ts, M_z, D_z, tl.sum(cross, axis=0), (c_s, c_t)


@triton.jit
def mixture_log_prob(ts, m_ts, log_d_ts, log_teacher_weights, NUM_TEACHERS: tl.constexpr):
    """log p of the teachers' mixture p = sum_i w_i softmax(t_i), in log space:
    logsumexp_i(log w_i + lt_i), lt_i = log_prob(t_i, m_i, log_d_i) (-inf where every teacher's p is 0)."""
    lts = ()
    for i in tl.static_range(NUM_TEACHERS):
        lts = lts + (log_teacher_weights[i] + log_prob(ts[i], m_ts[i], log_d_ts[i]),)
    hi = lts[0]
    for i in tl.static_range(1, NUM_TEACHERS):
        hi = tl.maximum(hi, lts[i])
    hi_safe = finite(hi)
    total = tl.zeros_like(hi)
    for i in tl.static_range(NUM_TEACHERS):
        total += exp(lts[i] - hi_safe)
    return tl.where(hi == float("-inf"), float("-inf"), hi_safe + log(total))


@triton.jit
def log_ratio_shift(d_s, d_t, m_s=None, m_t=None, centres=None):
    """The shift of the centred s_minus_t = (s - c_s) - (t - c_t), from the sums of exps d against
    the maxima m and the ``centres`` (c_s, c_t): log(d_s / d_t) + ((m_s - c_s) - (m_t - c_t));
    log(d_s / d_t) without centres (centred on the maxima)."""
    shift = tl.log(d_s / d_t)
    if centres is not None:
        shift += (finite(m_s) - centres[0]) - (finite(m_t) - centres[1])
    return shift


@triton.jit
def cross_term_scalars(cross, d_s, d_t, shift, DIVERGENCE: tl.constexpr):
    """A1, A2 of kl and reverse_kl from the first pass: the cross term, the sums of exps d_s, d_t,
    and the shift of the same centres (``log_ratio_shift``)."""
    if DIVERGENCE == KL:
        A1 = cross / d_t
        A2 = -shift
    elif DIVERGENCE == REVERSE_KL:
        A1 = cross / d_s
        A2 = shift
    else:
        tl.static_assert(False, "cross_term_scalars: only kl and reverse_kl have a cross term")
    return A1, A2


@triton.jit
def log_mixture(ls, lt, log_weight_p, log_weight_q):
    return log_add_exp(log_weight_p + lt, log_weight_q + ls)


@triton.jit
def sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@triton.jit
def skew_kl_ratio(ls, lt, lm, p, mix_weight):
    """r = p q / M of skew_kl from log q, log p and log M, guarded by log q (not q): with a tiny
    skew, r ~ p / (1 - skew) where q underflows. At skew 0 with q = 0 its limit p."""
    return tl.where(ls > float("-inf"), exp(lt + ls - lm), tl.where(mix_weight == 0, p, 0.0))


@triton.jit
def element_terms(ls, lt, q, p, s_minus_t, shift, mix_weight, log_weight_p, log_weight_q, DIVERGENCE: tl.constexpr):
    """The per-element terms a1, a2 of the row scalars A1, A2 (the table above), from log q, log p,
    q, p (the caller's: e^(s - m) / d is cheaper and closer than exp(ls)), s_minus_t and shift."""
    if DIVERGENCE == KL:
        a1 = tl.where(p > 0, -p * s_minus_t, 0.0)
        a2 = -p * shift
    elif DIVERGENCE == REVERSE_KL:
        a1 = tl.where(q > 0, q * s_minus_t, 0.0)
        a2 = q * shift
    elif DIVERGENCE == TVD:
        a1 = tl.abs(p - q)
        a2 = q * sign(shift - s_minus_t)
    else:
        lm = log_mixture(ls, lt, log_weight_p, log_weight_q)
        if DIVERGENCE == JSD:
            a1 = tl.where(p > 0, p * (lt - lm), 0.0)
            a2 = tl.where(q > 0, q * (ls - lm), 0.0)
        elif DIVERGENCE == SKEW_KL:
            a1 = tl.where(p > 0, p * (lt - lm), 0.0)
            a2 = skew_kl_ratio(ls, lt, lm, p, mix_weight)
        elif DIVERGENCE == SKEW_REVERSE_KL:
            a1 = tl.where(q > 0, q * (ls - lm), 0.0)
            a2 = tl.where(q > 0, exp(log_weight_q + 2.0 * ls - lm), 0.0)
        else:
            tl.static_assert(False, "no branch for this DIVERGENCE code (fastkd.divergences)")
    return a1, a2


@triton.jit
def divergence_value(A1, A2, mix_weight, DIVERGENCE: tl.constexpr):
    """D from the row scalars (elementwise on blocks too: the terms are linear)."""
    if DIVERGENCE == KL or DIVERGENCE == REVERSE_KL:
        value = A1 - A2
    elif DIVERGENCE == JSD:
        value = mix_weight * A1 + (1.0 - mix_weight) * A2
    elif DIVERGENCE == TVD:
        value = 0.5 * A1
    elif DIVERGENCE == SKEW_KL or DIVERGENCE == SKEW_REVERSE_KL:
        value = A1
    else:
        tl.static_assert(False, "no branch for this DIVERGENCE code (fastkd.divergences)")
    return value


@triton.jit
def row_loss(A1, A2, mix_weight, soft_scale, hard_weight, m_z, log_d_z, z_label, label, V, defined,
             DIVERGENCE: tl.constexpr, HAS_CE: tl.constexpr):
    """A row's loss soft_scale D + hard_weight CE, and row_nan: 0, or NaN where the row is undefined
    (``defined`` false, or with the hard CE a label outside [0, V)), to be added to the loss and to
    every gradient element. CE = -log_prob(z_y) = (m_z - z_y) + log d_z (row_stats.log_prob)."""
    loss = soft_scale * divergence_value(A1, A2, mix_weight, DIVERGENCE)
    if HAS_CE:
        loss -= hard_weight * log_prob(z_label, m_z, log_d_z)
        defined = defined & (label >= 0) & (label < V)
    row_nan = tl.where(defined, 0.0, float("nan"))
    return loss + row_nan, row_nan


@triton.jit
def divergence_grad(ls, lt, q, p, s_minus_t, shift, A1, A2, mix_weight, log_weight_p, log_weight_q,
                    DIVERGENCE: tl.constexpr):
    """dD/ds_j per element for a normalised student (the table above)."""
    if DIVERGENCE == KL:
        g = q - p
    elif DIVERGENCE == REVERSE_KL:
        g = tl.where(q > 0, q * ((s_minus_t - A1) - (shift - A2)), 0.0)
    elif DIVERGENCE == TVD:
        g = 0.5 * q * (A2 - sign(shift - s_minus_t))
    else:
        lm = log_mixture(ls, lt, log_weight_p, log_weight_q)
        if DIVERGENCE == JSD:
            g = (1.0 - mix_weight) * tl.where(q > 0, q * (ls - lm - A2), 0.0)
        elif DIVERGENCE == SKEW_KL:
            g = (1.0 - mix_weight) * (q * A2 - skew_kl_ratio(ls, lt, lm, p, mix_weight))
        elif DIVERGENCE == SKEW_REVERSE_KL:
            g = tl.where(q > 0, q * (ls - lm - exp(log_weight_q + ls - lm) - (A1 - A2)), 0.0)
        else:
            tl.static_assert(False, "no branch for this DIVERGENCE code (fastkd.divergences)")
    return g


@triton.jit
def point_grad(lp, lq, mix_weight, log_weight_p, log_weight_q, DIVERGENCE: tl.constexpr):
    """(h, g) per point of a top-k distribution: g = dD/dq (p fixed), h = q g (its limit at q = 0)."""
    p = exp(lp)
    q = exp(lq)
    if DIVERGENCE == KL:
        g = -exp(lp - lq)
        h = -p
    elif DIVERGENCE == REVERSE_KL:
        g = lq - lp + 1.0
        h = tl.where(q > 0, q * g, 0.0)
    elif DIVERGENCE == TVD:
        g = -0.5 * sign(lp - lq)
        h = q * g
    else:
        lm = log_mixture(lq, lp, log_weight_p, log_weight_q)
        if DIVERGENCE == JSD:
            g = (1.0 - mix_weight) * (lq - lm)
            h = tl.where(q > 0, q * g, 0.0)
        elif DIVERGENCE == SKEW_KL:
            g = -(1.0 - mix_weight) * exp(lp - lm)
            h = -(1.0 - mix_weight) * skew_kl_ratio(lq, lp, lm, p, mix_weight)
        elif DIVERGENCE == SKEW_REVERSE_KL:
            g = lq - lm + 1.0 - mix_weight * exp(lq - lm)
            h = tl.where(q > 0, q * g, 0.0)
        else:
            tl.static_assert(False, "no branch for this DIVERGENCE code (fastkd.divergences)")
    return h, g
