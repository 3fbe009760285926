"""The divergences, per element: the math shared by the row kernels (kd_loss.py, vocab_parallel.py).

Notation (one row): z student logits, s = z / T, t = teacher logits / T, V columns.
    ls = log q = s - lse(s)      lt = log p = t - lse(t)
    computed as (s - max s) - log(sum exp(s - max s)): rounding lse(s), which is as large as the
    logits, would put an error of eps |s| on every log-probability, and through q = exp(ls) on D
    (times |ls - lt|, up to 1e4 / T for skew 0 at scaled logits); the max cancels exactly instead.
For D(q) any divergence, dD/ds_j = q_j (g_j - sum_i q_i g_i) with g_i = dD/dq_i; the table is that
identity worked out. M is the mixture, log M = log_add_exp(log w_p + lt, log w_q + ls).

divergence        D                              w_p, w_q       dD/ds_j
kl                sum p (lt - ls)                -              q_j - p_j
reverse_kl        sum q (ls - lt)                -              q_j (ls_j - lt_j - D) = q_j (s_j - t_j - E)
                  E = sum q (s - t), free of the large lse terms that would cancel
jsd (beta)        beta A1 + (1-beta) A2          beta, 1-beta   (1-beta) q_j (ls_j - lM_j - A2)
                  A1 = sum p (lt - lM), A2 = sum q (ls - lM)
skew_kl (a)       A1 = sum p (lt - lM)           a, 1-a         (1-a) (q_j A2 - r_j)
                  r_j = p_j q_j / M_j, A2 = sum r
skew_reverse_kl   A1 = sum q (ls - lM)           1-a, a         q_j (ls_j - lM_j - a q_j / M_j - (A1 - A2))
 (a)              A2 = sum a q^2 / M  (a q / M <= 1 is taken as exp(log a + ls - lM): no 0 * inf at a = 0)
tvd               A1 / 2, A1 = sum |p - q|       -              q_j (A2 - sign(p_j - q_j)) / 2
                  A2 = sum q sign(p - q)                        (subgradient 0 where p = q)

fold_row_statistics is the first pass over a row (or a shard of it); row_scalar_terms gives the
per-element terms of A1, A2 (the caller sums them over a row, or over a shard and then across
ranks); divergence_grad gives dD/ds_j from ls, lt, s - t and the row's A1, A2 (reverse_kl passes E
as A1).
"""
import triton
import triton.language as tl

from .row_stats import log_add_exp, online_max_update

KL = tl.constexpr(0)
REVERSE_KL = tl.constexpr(1)
JSD = tl.constexpr(2)
SKEW_KL = tl.constexpr(3)
SKEW_REVERSE_KL = tl.constexpr(4)
TVD = tl.constexpr(5)


@triton.jit
def divergence_scalars(inv_temperature, mix_weight, log_weight_p, log_weight_q, ACC_DTYPE: tl.constexpr):
    """1 / T and the mixture weights (float64 kernel arguments) in the accumulation dtype."""
    return (tl.full((), inv_temperature, ACC_DTYPE), tl.full((), mix_weight, ACC_DTYPE),
            tl.full((), log_weight_p, ACC_DTYPE), tl.full((), log_weight_q, ACC_DTYPE))


@triton.jit
def load_scaled_block(z_row, t_row, start, cols, width, inv_temperature, ACC_DTYPE: tl.constexpr):
    """One block of a row: raw student logits z, s = z / T, t = teacher / T (-inf past ``width``)."""
    mask = start + cols < width
    z = tl.load(z_row + start + cols, mask=mask, other=float("-inf")).to(ACC_DTYPE)
    t = tl.load(t_row + start + cols, mask=mask, other=float("-inf")).to(ACC_DTYPE) * inv_temperature
    return z, z * inv_temperature, t, mask


@triton.jit
def fold_row_statistics(m_s, d_s, m_t, d_t, m_z, d_z, cross, z, s, t,
                        DIVERGENCE: tl.constexpr, HAS_CE: tl.constexpr):
    """Fold one block into the running maxima m and sums of exps d of s, t (and z for the hard CE),
    and into kl's cross term sum e^(t - m_t) (t - s) or reverse_kl's sum e^(s - m_s) (s - t)."""
    m_s, safe_s, alpha_s = online_max_update(m_s, s)
    m_t, safe_t, alpha_t = online_max_update(m_t, t)
    e_s = tl.exp(s - safe_s)
    e_t = tl.exp(t - safe_t)
    d_s = d_s * alpha_s + tl.sum(e_s, axis=0)
    d_t = d_t * alpha_t + tl.sum(e_t, axis=0)
    if DIVERGENCE == KL:
        cross = cross * alpha_t + tl.sum(tl.where(e_t > 0, e_t * (t - s), 0.0), axis=0)
    if DIVERGENCE == REVERSE_KL:
        cross = cross * alpha_s + tl.sum(tl.where(e_s > 0, e_s * (s - t), 0.0), axis=0)
    if HAS_CE:
        m_z, safe_z, alpha_z = online_max_update(m_z, z)
        d_z = d_z * alpha_z + tl.sum(tl.exp(z - safe_z), axis=0)
    return m_s, d_s, m_t, d_t, m_z, d_z, cross


@triton.jit
def sign(p, q):
    return tl.where(p > q, 1.0, tl.where(p < q, -1.0, 0.0))


@triton.jit
def skew_kl_ratio(ls, lt, lm, p, mix_weight):
    """r = p q / M of skew_kl from log q, log p and log M, guarded by log q (not q): with a tiny
    skew, r ~ p / (1 - skew) where q underflows. At skew 0 with q = 0 its limit p."""
    return tl.where(ls > float("-inf"), tl.exp(lt + ls - lm), tl.where(mix_weight == 0, p, 0.0))


@triton.jit
def row_scalar_terms(ls, lt, mix_weight, log_weight_p, log_weight_q, DIVERGENCE: tl.constexpr):
    """Per-element terms of A1 and A2 for jsd, skew_kl, skew_reverse_kl and tvd."""
    q = tl.exp(ls)
    p = tl.exp(lt)
    if DIVERGENCE == TVD:
        a1 = tl.abs(p - q)
        a2 = q * sign(p, q)
    else:
        lm = log_add_exp(log_weight_p + lt, log_weight_q + ls)
        if DIVERGENCE == JSD:
            a1 = tl.where(p > 0, p * (lt - lm), 0.0)
            a2 = tl.where(q > 0, q * (ls - lm), 0.0)
        elif DIVERGENCE == SKEW_KL:
            a1 = tl.where(p > 0, p * (lt - lm), 0.0)
            a2 = skew_kl_ratio(ls, lt, lm, p, mix_weight)
        else:
            a1 = tl.where(q > 0, q * (ls - lm), 0.0)
            a2 = tl.where(q > 0, tl.exp(log_weight_q + 2.0 * ls - lm), 0.0)
    return a1, a2


@triton.jit
def divergence_grad(ls, lt, s_minus_t, A1, A2, mix_weight, log_weight_p, log_weight_q,
                    DIVERGENCE: tl.constexpr):
    """dD/ds_j per element from log q, log p, s - t and the row scalars A1, A2 (E for reverse_kl)."""
    q = tl.exp(ls)
    p = tl.exp(lt)
    if DIVERGENCE == KL:
        g = q - p
    elif DIVERGENCE == REVERSE_KL:
        g = tl.where(q > 0, q * (s_minus_t - A1), 0.0)
    elif DIVERGENCE == TVD:
        g = 0.5 * q * (A2 - sign(p, q))
    else:
        lm = log_add_exp(log_weight_p + lt, log_weight_q + ls)
        if DIVERGENCE == JSD:
            g = (1.0 - mix_weight) * tl.where(q > 0, q * (ls - lm - A2), 0.0)
        elif DIVERGENCE == SKEW_KL:
            g = (1.0 - mix_weight) * (q * A2 - skew_kl_ratio(ls, lt, lm, p, mix_weight))
        else:
            g = tl.where(q > 0, q * (ls - lm - tl.exp(log_weight_q + ls - lm) - (A1 - A2)), 0.0)
    return g
