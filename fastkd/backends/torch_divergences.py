"""The divergences in PyTorch: the mirror of ``kernels/divergences.py``.

Same functions, same order, same table (value D from the row scalars A1, A2, per-element terms,
dD/ds, and the top-k point derivatives), written with whole-tensor ops over ``[rows, V]`` (row
scalars ``[rows, 1]``). The kernels' plumbing (divergence_scalars, load_scaled_block) has no
mirror, and fold_row_statistics takes whole rows at once. See that file for the notation.
"""
import torch

from ..options import KDOptions


def _where(live, x):
    return torch.where(live, x, torch.zeros((), dtype=x.dtype, device=x.device))


def finite(m):
    """A finite stand-in for a maximum that is -inf (a row entirely -inf)."""
    return torch.where(m == float("-inf"), torch.zeros((), dtype=m.dtype, device=m.device), m)


def cross_term_elements(e_s, e_t, s, t, opts: KDOptions):
    """The terms of kl's cross term e^(t - m_t) (t - s), or reverse_kl's e^(s - m_s) (s - t), 0 where
    the weight is 0."""
    if opts.divergence == "kl":
        return _where(e_t > 0, e_t * (t - s))
    return _where(e_s > 0, e_s * (s - t))


def fold_row_statistics(s, t, opts: KDOptions):
    """Row maxima m and sums of exps d of s and t ``[rows, 1]``, and kl's cross term
    sum e^(t - m_t) (t - s) or reverse_kl's sum e^(s - m_s) (s - t) (0 for the others)."""
    m_s, m_t = s.amax(-1, keepdim=True), t.amax(-1, keepdim=True)
    e_s, e_t = (s - finite(m_s)).exp(), (t - finite(m_t)).exp()
    cross = torch.zeros_like(m_s)
    if opts.has_cross_term:
        cross = cross_term_elements(e_s, e_t, s, t, opts).sum(-1, keepdim=True)
    return m_s, e_s.sum(-1, keepdim=True), m_t, e_t.sum(-1, keepdim=True), cross


def mixture_log_prob(lts, log_teacher_weights):
    """log p of the teachers' mixture p = sum_i w_i p_i from their log-probabilities ``lts`` (-inf
    where every p_i is 0)."""
    terms = torch.stack([lt + log_w for lt, log_w in zip(lts, log_teacher_weights)])
    hi = terms.amax(0)
    return torch.where(hi == float("-inf"), hi, finite(hi) + (terms - finite(hi)).exp().sum(0).log())


def log_ratio_shift(m_s, d_s, m_t, d_t):
    """shift = lse(s) - lse(t) from maxima and sums of exps, exact to a few ulps of its own size."""
    return (m_s - m_t) + torch.log(d_s / d_t)


def cross_term_scalars(cross, d_s, d_t, shift, opts: KDOptions):
    """A1, A2 of kl and reverse_kl from the first pass: the cross term summed against the row's
    maximum of t (kl) or s (reverse_kl), the sums of exps d_s, d_t and the shift."""
    return (cross / d_t, -shift) if opts.divergence == "kl" else (cross / d_s, shift)


def log_mixture(ls, lt, log_weight_p, log_weight_q):
    return torch.logaddexp(lt + log_weight_p, ls + log_weight_q)


def sign(x):
    return torch.sign(x)


def skew_kl_ratio(ls, lt, lm, p, mix_weight):
    """r = p q / M of skew_kl from log q, log p and log M, guarded by log q (not q): with a tiny
    skew, r ~ p / (1 - skew) where q underflows. At skew 0 with q = 0 its limit p."""
    return torch.where(ls > float("-inf"), (lt + ls - lm).exp(), p if mix_weight == 0 else torch.zeros_like(p))


def element_terms(ls, lt, s_minus_t, shift, opts: KDOptions):
    """The per-element terms a1, a2 of the row scalars A1, A2."""
    q, p = ls.exp(), lt.exp()
    name = opts.divergence
    if name == "kl":
        return _where(p > 0, -p * s_minus_t), -p * shift
    if name == "reverse_kl":
        return _where(q > 0, q * s_minus_t), q * shift
    if name == "tvd":
        return (p - q).abs(), q * sign(shift - s_minus_t)
    mix, log_wp, log_wq = opts.mixture_weights()
    lm = log_mixture(ls, lt, log_wp, log_wq)
    if name == "jsd":
        return _where(p > 0, p * (lt - lm)), _where(q > 0, q * (ls - lm))
    if name == "skew_kl":
        return _where(p > 0, p * (lt - lm)), skew_kl_ratio(ls, lt, lm, p, mix)
    return _where(q > 0, q * (ls - lm)), _where(q > 0, (log_wq + 2 * ls - lm).exp())


def divergence_value(A1, A2, opts: KDOptions):
    """D from the row scalars (elementwise too: the terms are linear)."""
    name = opts.divergence
    if name in ("kl", "reverse_kl"):
        return A1 - A2
    if name == "jsd":
        return opts.beta * A1 + (1 - opts.beta) * A2
    if name == "tvd":
        return 0.5 * A1
    return A1


def divergence_grad(ls, lt, s_minus_t, shift, A1, A2, opts: KDOptions):
    """dD/ds per element for a normalised student."""
    q = ls.exp()
    name = opts.divergence
    if name == "kl":
        return q - lt.exp()
    if name == "reverse_kl":
        return _where(q > 0, q * (s_minus_t - A1))
    if name == "tvd":
        return 0.5 * q * (A2 - sign(shift - s_minus_t))
    mix, log_wp, log_wq = opts.mixture_weights()
    lm = log_mixture(ls, lt, log_wp, log_wq)
    if name == "jsd":
        return (1 - mix) * _where(q > 0, q * (ls - lm - A2))
    if name == "skew_kl":
        return (1 - mix) * (q * A2 - skew_kl_ratio(ls, lt, lm, lt.exp(), mix))
    # a q / M as exp(log a + ls - lm): 0 at a = 0, not 0 * inf.
    return _where(q > 0, q * (ls - lm - (log_wq + ls - lm).exp() - (A1 - A2)))


def point_grad(lp, lq, opts: KDOptions):
    """(h, g) per point of a top-k distribution: g = dD/dq (p fixed), h = q g (its limit at q = 0)."""
    p, q = lp.exp(), lq.exp()
    name = opts.divergence
    if name == "kl":
        return -p, -(lp - lq).exp()
    if name == "reverse_kl":
        g = lq - lp + 1
        return _where(q > 0, q * g), g
    if name == "tvd":
        g = -0.5 * sign(lp - lq)
        return q * g, g
    mix, log_wp, log_wq = opts.mixture_weights()
    lm = log_mixture(lq, lp, log_wp, log_wq)
    if name == "jsd":
        g = (1 - mix) * (lq - lm)
        return _where(q > 0, q * g), g
    if name == "skew_kl":
        return -(1 - mix) * skew_kl_ratio(lq, lp, lm, p, mix), -(1 - mix) * (lp - lm).exp()
    g = lq - lm + 1 - mix * (lq - lm).exp()
    return _where(q > 0, q * g), g
