"""The divergences in PyTorch: the mirror of ``kernels/divergences.py``.

Same functions, same order, same table (value D from the row scalars A1, A2, per-element terms,
dD/ds, and the top-k point derivatives); see that file for the notation. Where a kernel holds a
tile of one row in registers, the torch backend holds a chunk of rows: ``[rows, V]`` tensors (row
scalars ``[rows, 1]``) in buffers allocated once per call and reused by every chunk. On the CPU
every torch op is a pass over the chunk's memory, and a pass that writes in place costs about half
of one that writes a third buffer; so the functions write into the ``out`` buffers they are given
or over their inputs, and ``Elements`` holds each per-element quantity of a chunk that the
kernels' functions take as arguments (ls, lt, q, p, s_minus_t, shift), plus log M and sign(p - q),
computed once, on first use: a kernel recomputes log M in each pass. One difference: here jsd reads
lt - lM and ls - lM from ls - lt (``mixture_log_ratios``; accurate near convergence), the kernels
from log M (as float32 PyTorch; the accurate form modelled 2.7x slower there). The kernels' plumbing
(divergence_scalars, load_tile, load_teacher_tiles, finish_row_statistics, row_loss) has no
mirror, and fold_row_statistics takes whole rows at once.

``_masked_product(w, x, out)`` is the kernels' ``tl.where(w > 0, w * x, 0.0)``: w * x with the
NaNs of 0 * inf cleared (torch.where does not vectorise on the CPU: it costs twenty passes of a
multiply). The weight w is a probability and x a log-ratio: in a row with finite log-sum-exps, x
is NaN or infinite with w = 0 only where a log-probability is -inf, so those NaNs are the only
ones; a row with a NaN or +inf input is undefined and set NaN as a whole by the caller. One case
differs from tl.where: where w > 0 and x is inf - inf = NaN, which happens only in a row whose
divergence is +inf (a log-ratio of +inf meets a row scalar of +inf), w * x is 0 here and NaN in
the kernels; that row's gradient is not finite either way.
"""
import torch

from ..options import KDOptions

INF = float("inf")


def _nan_to_zero(x):
    return x.nan_to_num_(nan=0.0, posinf=INF, neginf=-INF)


def _masked_product(weight, x, out=None):
    """``weight * x``, 0 where the weight is 0 (into ``out``; see the module docstring)."""
    return _nan_to_zero(torch.mul(weight, x, out=out))


def finite(m):
    """A finite stand-in for a maximum that is -inf (a row entirely -inf)."""
    return m.clamp(min=torch.finfo(m.dtype).min)


def _no_branch(name):
    """Every table here has one branch per registry entry (fastkd.divergences); nothing falls through."""
    return ValueError(f"no branch for divergence {name!r} in the torch table")


class Elements:
    """One chunk of rows as the table reads it: ls, lt, q, p, s_minus_t ``[rows, V]`` and ``shift``
    ``[rows, 1]`` (or a number), the kernels' arguments, plus lm (log M) and sign_p_minus_q.
    Each is defined (``define``) as a tensor or as a function that computes it, and computed once,
    on first use, so that the element_terms and divergence_grad of a chunk read the same buffers
    and a quantity that no formula of the divergence reads costs nothing. Defaults: q = exp(ls),
    p = exp(lt), lm = log_mixture(ls, lt), sign_p_minus_q = sign(shift - s_minus_t), lt_minus_lm
    and ls_minus_lm = mixture_log_ratios(ls - lt), in buffers of ``work`` (``take()`` /
    ``give_back()``)."""

    def __init__(self, opts: KDOptions, work, shift=0.0, **sources):
        self.opts, self.work, self.shift = opts, work, shift
        self._sources, self._values = sources, {}

    def define(self, **sources):
        self._sources.update(sources)

    def _get(self, name):
        if name not in self._values:
            # The defaults are methods looked up here: stored, they would keep self alive in a cycle.
            source = self._sources[name] if name in self._sources else getattr(self, "_" + name)
            self._values[name] = source if isinstance(source, torch.Tensor) else source()
        return self._values[name]

    ls = property(lambda self: self._get("ls"))
    lt = property(lambda self: self._get("lt"))
    q = property(lambda self: self._get("q"))
    p = property(lambda self: self._get("p"))
    s_minus_t = property(lambda self: self._get("s_minus_t"))
    lm = property(lambda self: self._get("lm"))
    sign_p_minus_q = property(lambda self: self._get("sign_p_minus_q"))
    lt_minus_lm = property(lambda self: self._get("lt_minus_lm"))
    ls_minus_lm = property(lambda self: self._get("ls_minus_lm"))

    def _q(self):
        return torch.exp(self.ls, out=self.work.take())

    def _p(self):
        return torch.exp(self.lt, out=self.work.take())

    def _lm(self):
        _, log_weight_p, log_weight_q = self.opts.mixture_weights
        scratch = self.work.take()
        lm = log_mixture(self.ls, self.lt, log_weight_p, log_weight_q, self.work.take(), scratch)
        self.work.give_back(scratch)
        return lm

    def _sign_p_minus_q(self):  # lt - ls = shift - s_minus_t
        out = self.work.take()
        return sign(torch.sub(self.shift, self.s_minus_t, out=out), out)

    def _log_ratios_to_mixture(self):
        """lt - lM and ls - lM, both at once (``mixture_log_ratios``)."""
        r, out = torch.sub(self.ls, self.lt, out=self.work.take()), self.work.take()
        self._values["lt_minus_lm"], self._values["ls_minus_lm"] = mixture_log_ratios(
            r, self.opts.mixture_weights[0], out, self.work.take())
        self.work.give_back(out)

    def _lt_minus_lm(self):
        self._log_ratios_to_mixture()
        return self._values["lt_minus_lm"]

    def _ls_minus_lm(self):
        self._log_ratios_to_mixture()
        return self._values["ls_minus_lm"]


def _reads_log_probabilities(opts: KDOptions):
    """Whether the divergence's formulas read ls and lt (the mixture divergences, through log M);
    the others read q, p and s_minus_t only."""
    return opts.entry.mixture is not None


def cross_term_elements(e_s, e_t, x: Elements, opts: KDOptions, out):
    """The terms of kl's cross term e^(t - m_t) ((t - m_t) - (s - m_s)), or reverse_kl's
    e^(s - m_s) ((s - m_s) - (t - m_t)), 0 where the weight is 0, into ``out`` (``x.s_minus_t``
    centred)."""
    if opts.divergence == "kl":  # e_t (t - s) = -(e_t (s - t)), exactly
        return _masked_product(e_t, x.s_minus_t, out).neg_()
    if opts.divergence == "reverse_kl":
        return _masked_product(e_s, x.s_minus_t, out)
    raise _no_branch(opts.divergence)


def recentre_cross(cross, weight, m_s, new_m_s, m_t, new_m_t, opts: KDOptions):
    """A cross term summed against the maxima m_s, m_t, re-centred on new_m_s, new_m_t (its weights,
    summing to ``weight`` against the old maximum, rescaled with them): each of its terms moves by
    (m_t - new_m_t) - (m_s - new_m_s) (kl), the opposite (reverse_kl). 0 stays 0."""
    move = (finite(m_t) - finite(new_m_t)) - (finite(m_s) - finite(new_m_s))
    if opts.divergence == "kl":
        alpha = torch.exp(m_t - finite(new_m_t))
    elif opts.divergence == "reverse_kl":
        move, alpha = -move, torch.exp(m_s - finite(new_m_s))
    else:
        raise _no_branch(opts.divergence)
    return alpha * (cross + torch.where(weight > 0, weight * move, 0.0))


def fold_row_statistics(s, t, x: Elements, opts: KDOptions):
    """Row maxima m and sums of exps d of s and t ``[rows, 1]``, and kl's cross term
    sum e^(t - m_t) ((t - m_t) - (s - m_s)) or reverse_kl's sum e^(s - m_s) ((s - m_s) - (t - m_t))
    (0 for the others): terms of the size of the row's spread, not of |s| or |t|.

    In place: s and t become s - m_s and t - m_t, then ``x.s_minus_t`` is computed from them (the
    centred (s - m_s) - (t - m_t), whose shift is ``log_ratio_shift``) where the divergence reads
    it; ``x`` is given ls, lt as those minus log d and q = e_s / d_s, p = e_t / d_t as the kernels;
    the exps e = e^(s - m) overwrite s and t too where no ls, lt is read."""
    log_probabilities = _reads_log_probabilities(opts)
    m_s, m_t = s.amax(-1, keepdim=True), t.amax(-1, keepdim=True)
    s.sub_(finite(m_s))
    t.sub_(finite(m_t))
    if not log_probabilities:
        x.s_minus_t  # noqa: B018 - computed from the centred s and t before the exps overwrite them
    e_s = torch.exp(s, out=x.work.take() if log_probabilities else s)
    e_t = torch.exp(t, out=x.work.take() if log_probabilities else t)
    d_s, d_t = e_s.sum(-1, keepdim=True), e_t.sum(-1, keepdim=True)
    cross = torch.zeros_like(m_s)
    if opts.has_cross_term:
        terms = cross_term_elements(e_s, e_t, x, opts, x.work.take())
        cross = terms.sum(-1, keepdim=True)
        x.work.give_back(terms)
    x.define(q=lambda: e_s.mul_(d_s.reciprocal()), p=lambda: e_t.mul_(d_t.reciprocal()))
    if log_probabilities:
        x.define(ls=lambda: s.sub_(d_s.log()), lt=lambda: t.sub_(d_t.log()))
    return m_s, d_s, m_t, d_t, cross


def mixture_log_prob(lts, log_teacher_weights, work):
    """log p of the teachers' mixture p = sum_i w_i p_i from their log-probabilities ``lts`` (-inf
    where every p_i is 0), as the kernel forms it: hi = max_i(log w_i + lt_i), then
    hi + log sum_i exp(log w_i + lt_i - hi). In place in the chunk's buffers: ``lts`` (buffers of
    ``work``) are overwritten, the result is in the first one's, the others and the one buffer
    taken for hi are given back. No ``[teachers, rows, V]`` stack: the chunk's buffers are all the
    memory a mixture takes, whatever the number of teachers."""
    terms = [lt.add_(log_w) for lt, log_w in zip(lts, log_teacher_weights)]
    hi = work.take().copy_(terms[0])
    for term in terms[1:]:
        torch.maximum(hi, term, out=hi)
    hi.clamp_(min=torch.finfo(hi.dtype).min)  # finite(hi) in place; where every p_i is 0 the result is -inf
    total = terms[0].sub_(hi).exp_()
    for term in terms[1:]:
        total.add_(term.sub_(hi).exp_())
    work.give_back(*terms[1:])
    out = total.log_().add_(hi)
    work.give_back(hi)
    return out


def log_ratio_shift(d_s, d_t):
    """The shift of the centred s_minus_t = (s - m_s) - (t - m_t): log(d_s / d_t). (The kernels'
    also takes the centres of kl's and reverse_kl's cross term; whole rows here are centred on their
    maxima: no running maxima to re-centre, no rounding of the re-centring to avoid.)"""
    return torch.log(d_s / d_t)


def cross_term_scalars(cross, d_s, d_t, shift, opts: KDOptions):
    """A1, A2 of kl and reverse_kl from the first pass: the cross term centred on the row's maxima,
    the sums of exps d_s, d_t, and shift = log(d_s / d_t) (both of the size of the row's spread)."""
    if opts.divergence == "kl":
        return cross / d_t, -shift
    if opts.divergence == "reverse_kl":
        return cross / d_s, shift
    raise _no_branch(opts.divergence)


def log_mixture(ls, lt, log_weight_p, log_weight_q, out=None, scratch=None):
    """log M into ``out`` (``scratch``: one more buffer of the same shape)."""
    return torch.logaddexp(torch.add(lt, log_weight_p, out=out), torch.add(ls, log_weight_q, out=scratch),
                           out=out)


def mixture_log_ratios(r, weight_p, out, scratch):
    """lt - lM and ls - lM for M = w_p p + (1 - w_p) q from the log-ratio r = ls - lt (overwritten),
    as (``r``'s buffer, ``scratch``; ``out``: a work buffer): h = log1p(w expm1(-|r|)) with w = w_p
    where r > 0 and 1 - w_p where r < 0, lt - lM = -(h + max(r, 0)) and ls - lM = min(r, 0) - h
    (kernels/divergences.py, jsd)."""
    h = torch.abs(r, out=out).neg_().expm1_()
    h.mul_(weight_p if weight_p == 0.5 else sign(r, scratch).mul_(weight_p - 0.5).add_(0.5)).log1p_()
    ls_minus_lm = torch.clamp(r, max=0, out=scratch).sub_(h)
    return r.clamp_(min=0).add_(h).neg_(), ls_minus_lm


def sign(x, out=None):
    """-1, 0 or 1; 0 at NaN too (torch.sign's convention), as the kernels'."""
    return torch.sign(x, out=out)


def skew_kl_ratio(ls, lt, lm, p, mix_weight, out=None):
    """r = p q / M of skew_kl from log q, log p and log M, guarded by log q (not q): with a tiny
    skew, r ~ p / (1 - skew) where q underflows. At skew 0 with q = 0 its limit p."""
    r = torch.add(lt, ls, out=out).sub_(lm).exp_()
    if mix_weight == 0:
        return torch.where(ls > -INF, r, p, out=r)
    # With mix_weight > 0, lm is finite wherever ls or lt is: where ls = -inf, r is exp(-inf) = 0,
    # or NaN ((-inf) - (-inf)) where lt = -inf too.
    return _nan_to_zero(r)


def element_terms(x: Elements, opts: KDOptions, out1, out2):
    """The per-element terms a1, a2 of the row scalars A1, A2, into ``out1``, ``out2``."""
    name = opts.divergence
    if name == "kl":
        return _masked_product(x.p, x.s_minus_t, out1).neg_(), torch.mul(x.p, x.shift, out=out2).neg_()
    if name == "reverse_kl":
        return _masked_product(x.q, x.s_minus_t, out1), torch.mul(x.q, x.shift, out=out2)
    if name == "tvd":
        return torch.sub(x.p, x.q, out=out1).abs_(), torch.mul(x.q, x.sign_p_minus_q, out=out2)
    mix, log_wp, log_wq = opts.mixture_weights
    if name == "jsd":
        return _masked_product(x.p, x.lt_minus_lm, out1), _masked_product(x.q, x.ls_minus_lm, out2)
    if name == "skew_kl":
        return (_masked_product(x.p, torch.sub(x.lt, x.lm, out=out1), out1),
                skew_kl_ratio(x.ls, x.lt, x.lm, x.p, mix, out2))
    if name == "skew_reverse_kl":
        # a2 = 0 where q = 0: there ls = -inf, so 2 ls - lm is -inf, or NaN where lm = -inf too.
        a2 = _nan_to_zero(torch.mul(x.ls, 2.0, out=out2).add_(log_wq).sub_(x.lm).exp_())
        return _masked_product(x.q, torch.sub(x.ls, x.lm, out=out1), out1), a2
    raise _no_branch(name)


def divergence_value(A1, A2, opts: KDOptions):
    """D from the row scalars (elementwise too: the terms are linear)."""
    name = opts.divergence
    if name in ("kl", "reverse_kl"):
        return A1 - A2
    if name == "jsd":
        return opts.beta * A1 + (1 - opts.beta) * A2
    if name == "tvd":
        return 0.5 * A1
    if name in ("skew_kl", "skew_reverse_kl"):
        return A1
    raise _no_branch(name)


def divergence_grad(x: Elements, A1, A2, opts: KDOptions, out, scale=1.0):
    """dD/ds per element for a normalised student, times ``scale`` (a number or per row
    ``[rows, 1]``), into ``out``."""
    name = opts.divergence
    if name == "kl":
        return torch.sub(x.q, x.p, out=out).mul_(scale)
    if name == "reverse_kl":
        ratio = torch.sub(x.s_minus_t, A1, out=out).sub_(x.shift - A2)  # ls - lt - D
        return _masked_product(x.q, ratio, out).mul_(scale)
    if name == "tvd":
        return torch.sub(A2, x.sign_p_minus_q, out=out).mul_(x.q).mul_(0.5 * scale)
    mix, log_wp, log_wq = opts.mixture_weights
    if name == "jsd":
        return _masked_product(x.q, torch.sub(x.ls_minus_lm, A2, out=out), out).mul_((1 - mix) * scale)
    if name not in ("skew_kl", "skew_reverse_kl"):
        raise _no_branch(name)
    scratch = x.work.take()
    if name == "skew_kl":
        r = skew_kl_ratio(x.ls, x.lt, x.lm, x.p, mix, scratch)
        g = torch.mul(x.q, A2, out=out).sub_(r).mul_((1 - mix) * scale)
    else:  # skew_reverse_kl
        # a q / M as exp(log a + ls - lm): 0 at a = 0, not 0 * inf.
        log_ratio = torch.sub(x.ls, x.lm, out=out)
        a_q_over_m = torch.add(log_ratio, log_wq, out=scratch).exp_()
        g = _masked_product(x.q, log_ratio.sub_(a_q_over_m).sub_(A1 - A2), out).mul_(scale)
    x.work.give_back(scratch)
    return g


def point_grad(lp, lq, opts: KDOptions):
    """(h, g) per point of a top-k distribution: g = dD/dq (p fixed), h = q g (its limit at q = 0)."""
    p, q = lp.exp(), lq.exp()
    name = opts.divergence
    if name == "kl":
        return -p, -(lp - lq).exp()
    if name == "reverse_kl":
        g = lq - lp + 1
        return _masked_product(q, g), g
    if name == "tvd":
        g = -0.5 * sign(lp - lq)
        return q * g, g
    mix, log_wp, log_wq = opts.mixture_weights
    lm = log_mixture(lq, lp, log_wp, log_wq)
    if name == "jsd":
        g = (1 - mix) * (lq - lm)
        return _masked_product(q, g), g
    if name == "skew_kl":
        return -(1 - mix) * skew_kl_ratio(lq, lp, lm, p, mix), -(1 - mix) * (lp - lm).exp()
    if name == "skew_reverse_kl":
        g = lq - lm + 1 - mix * (lq - lm).exp()
        return _masked_product(q, g), g
    raise _no_branch(name)
