"""The registry of divergences: one entry per divergence, the one place its host side is declared.

An entry holds the divergence's name, its parameter (``beta`` or ``skew``) and that parameter's
check, the weights of the mixture M it uses, whether D is known after the first pass (a cross
term, summed against the maximum of the teacher's or the student's side), its textbook formula
(``fastkd.reference`` calls it: the oracle) and the eager idiom the benchmark times against.
Everything else derives from it: the option checks and mixture weights (``fastkd.options``), the
bench's and the audit's cases, the tests' list. Its position in ``REGISTRY`` is its integer code
in the kernels (``kernels/divergences.py`` defines the same codes as constexprs; a test checks
them), and the divergences with a cross term come first: the kernels test ``DIVERGENCE < JSD``.

Adding a divergence: an entry here, its branch in ``kernels/divergences.py`` and in
``fastkd/backends/torch_divergences.py``, its row in the README's table (docs/architecture.md).

Notation: ``log_p``, ``log_q`` the teacher's and the student's log-probabilities ``[N, V]``,
``s``, ``t`` the raw student and teacher logits, ``T`` the temperature, ``a`` the parameter's value.
"""
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F


def log_weight(weight):
    """log of a mixture weight, -inf for 0; taken in Python (float64), so that a weight below
    float32's range does not become log 0."""
    return math.log(weight) if weight > 0 else float("-inf")


# ------------------------------------------------------------------------------- textbook formulas
# Plain PyTorch, autograd for gradients. ``0 * log 0``: terms whose weight is 0 are dropped with
# torch.where, their inputs replaced by 0 *before* the arithmetic so that autograd never multiplies
# a zero gradient by an infinite partial (the "double where" rule).


def weighted_log_ratio(w, log_w, log_r):
    """sum_j w_j (log w_j - log r_j) over the last dim, with 0 where w_j = 0."""
    live = w > 0
    log_w = torch.where(live, log_w, 0.0)
    log_r = torch.where(live, log_r, 0.0)
    return torch.where(live, w * (log_w - log_r), 0.0).sum(-1)


def log_mixture(log_ps, weights):
    """log sum_i w_i p_i from the log-probabilities ``log_ps``, by a log-sum-exp (-inf where every
    p_i is 0)."""
    terms = torch.stack([lp + log_weight(w) for lp, w in zip(log_ps, weights)])
    dead = (terms == float("-inf")).all(0)
    return torch.where(dead, float("-inf"), torch.logsumexp(torch.where(dead, 0.0, terms), 0))


def _kl(log_p, log_q, a):
    return weighted_log_ratio(log_p.exp(), log_p, log_q)


def _reverse_kl(log_p, log_q, a):
    return weighted_log_ratio(log_q.exp(), log_q, log_p)


def _jsd(log_p, log_q, beta):
    log_m = log_mixture((log_p, log_q), (beta, 1.0 - beta))
    return (beta * weighted_log_ratio(log_p.exp(), log_p, log_m)
            + (1.0 - beta) * weighted_log_ratio(log_q.exp(), log_q, log_m))


def _skew_kl(log_p, log_q, skew):
    return weighted_log_ratio(log_p.exp(), log_p, log_mixture((log_p, log_q), (skew, 1.0 - skew)))


def _skew_reverse_kl(log_p, log_q, skew):
    return weighted_log_ratio(log_q.exp(), log_q, log_mixture((log_q, log_p), (skew, 1.0 - skew)))


def _tvd(log_p, log_q, a):
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


# ------------------------------------------------------------------------------- eager idioms
# What a user writes for each divergence (batchmean over the N rows): the bench's baseline.


def _log_softmaxes(s, t, T):
    return F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)


def _log_mix(log_a, log_b, weight_a):
    """log(weight_a * a + (1 - weight_a) * b) from log a and log b."""
    return torch.logsumexp(torch.stack([log_a + math.log(weight_a), log_b + math.log(1 - weight_a)]), dim=0)


def _eager_kl(s, t, T, a):
    return F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T**2


def _eager_reverse_kl(s, t, T, a):
    ls, lt = _log_softmaxes(s, t, T)
    return F.kl_div(lt, ls, reduction="batchmean", log_target=True) * T**2


def _eager_jsd(s, t, T, beta):  # TRL's generalized_jsd_loss for 0 < beta < 1, rows of [N, V]
    ls, lt = _log_softmaxes(s, t, T)
    lm = _log_mix(lt, ls, beta)
    kl_teacher = F.kl_div(lm, lt, reduction="none", log_target=True)
    kl_student = F.kl_div(lm, ls, reduction="none", log_target=True)
    return (beta * kl_teacher + (1 - beta) * kl_student).sum() / s.shape[0]


def _eager_skew_kl(s, t, T, skew):
    ls, lt = _log_softmaxes(s, t, T)
    return F.kl_div(_log_mix(lt, ls, skew), lt, reduction="batchmean", log_target=True) * T**2


def _eager_skew_reverse_kl(s, t, T, skew):
    ls, lt = _log_softmaxes(s, t, T)
    return F.kl_div(_log_mix(ls, lt, skew), ls, reduction="batchmean", log_target=True) * T**2


def _eager_tvd(s, t, T, a):
    return 0.5 * (F.softmax(t / T, -1) - F.softmax(s / T, -1)).abs().sum() / s.shape[0]


# ------------------------------------------------------------------------------- parameter checks


def _check_beta(divergence, beta):
    if beta in (0.0, 1.0):
        other = "kl" if beta == 0.0 else "reverse_kl"
        raise ValueError(
            f"beta={beta} makes the generalized JSD identically 0; use divergence={other!r} "
            "for the endpoint (TRL switches to unscaled KL there silently)")
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1) for divergence={divergence!r}, got {beta}")


def _check_skew(divergence, skew):
    if not 0.0 <= skew < 1.0:
        raise ValueError(f"skew must be in [0, 1) for divergence={divergence!r}, got {skew}")


@dataclass(frozen=True)
class Parameter:
    name: str                                  # its keyword argument
    check: Callable[[str, float], None]        # check(divergence name, value): ValueError naming it


BETA = Parameter("beta", _check_beta)
SKEW = Parameter("skew", _check_skew)


# ------------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Divergence:
    name: str
    formula: str                               # D as the README's table writes it (a test checks)
    reference: Callable                        # reference(log_p, log_q, a) -> D per row
    parameter: Optional[Parameter] = None
    # (w_p, w_q) of the mixture M = w_p p + w_q q, from the parameter; None: no mixture.
    mixture: Optional[Callable[[float], tuple]] = None
    # D known after the first pass from a cross term summed against the maximum of this side's
    # logits ("teacher" or "student"); None: D needs the row scalars A1, A2 (another pass).
    cross_term: Optional[str] = None
    eager: Optional[Callable] = None           # eager(s, t, T, a) -> loss; None: the bench uses the reference
    eager_formula: Optional[str] = None        # that idiom in one line (the bench's legend)
    eager_t2_scale: bool = True                # whether that idiom scales by T**2

    def parameter_value(self, **values):
        """The parameter's value ``a`` among ``values`` (the keyword arguments ``beta``, ``skew``);
        None for a divergence without a parameter."""
        return None if self.parameter is None else values[self.parameter.name]

    def check(self, **values):
        """Check the parameter's value among ``values``: ValueError naming it."""
        if self.parameter is not None:
            self.parameter.check(self.name, self.parameter_value(**values))

    def mixture_weights(self, a):
        """(mix_weight, log w_p, log w_q) of M for the parameter value ``a``; zeros without a mixture."""
        if self.mixture is None:
            return 0.0, 0.0, 0.0
        w_p, w_q = self.mixture(a)
        return a, log_weight(w_p), log_weight(w_q)


REGISTRY = (
    Divergence("kl", "KL(p ‖ q)", _kl, cross_term="teacher", eager=_eager_kl,
               eager_formula='kl_div(log_softmax(s/T), softmax(t/T), "batchmean")·T²'),
    Divergence("reverse_kl", "KL(q ‖ p)", _reverse_kl, cross_term="student", eager=_eager_reverse_kl,
               eager_formula='kl_div(log_softmax(t/T), log_softmax(s/T), "batchmean", log_target=True)·T²'),
    Divergence("jsd", "β KL(p ‖ M) + (1−β) KL(q ‖ M), M = β p + (1−β) q", _jsd, BETA,
               mixture=lambda beta: (beta, 1.0 - beta), eager=_eager_jsd, eager_t2_scale=False,
               eager_formula="TRL's generalized_jsd_loss: Σ β·kl_div(log m, log p) + (1−β)·kl_div(log m, log q) "
                             "/ N, log m = logsumexp(log β + log p, log(1−β) + log q), unscaled"),
    Divergence("skew_kl", "KL(p ‖ α p + (1−α) q)", _skew_kl, SKEW,
               mixture=lambda skew: (skew, 1.0 - skew), eager=_eager_skew_kl,
               eager_formula='kl_div(log(α p + (1−α) q), log p, "batchmean", log_target=True)·T²'),
    Divergence("skew_reverse_kl", "KL(q ‖ α q + (1−α) p)", _skew_reverse_kl, SKEW,
               mixture=lambda skew: (1.0 - skew, skew), eager=_eager_skew_reverse_kl,
               eager_formula='kl_div(log(α q + (1−α) p), log q, "batchmean", log_target=True)·T²'),
    Divergence("tvd", "½ Σ abs(p − q)", _tvd, eager=_eager_tvd, eager_t2_scale=False,
               eager_formula="½ Σ abs(softmax(t/T) − softmax(s/T)) / N"),
)
DIVERGENCES = tuple(entry.name for entry in REGISTRY)  # the names; the position is the kernel code
_BY_NAME = {entry.name: entry for entry in REGISTRY}


def lookup(name):
    """The registry's entry ``name``; ValueError naming ``divergence`` for any other value."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown divergence {name!r}; expected one of "
                         f"{', '.join(map(repr, DIVERGENCES))}") from None
