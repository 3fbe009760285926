"""Small jit helpers shared by the row kernels: exp and log as the hardware does them, online
log-sum-exp, the log of a mixture, a row's label, and the one way every kernel stores a result.

exp and log. ``tl.exp`` compiles to four instructions around the hardware's ex2 (a scaling for
results below 2^-126) and ``tl.log`` to a ~30-instruction software logarithm; per element, in the
row loops, that was most of the JSD family's instruction count. ``exp(x)`` here is one multiply and
the ex2 unit (``tl.exp2``: ex2.approx.ftz), and ``log(x)`` one multiply and the lg2 unit
(lg2.approx.ftz), for float32: relative error about 2^-22 (a few ulps), with results below 2^-126
flushed to 0 (probabilities under 1.2e-38, whose terms in every divergence are below 1e-36; every
place a log-space quantity matters when a probability underflows is guarded in log space). float64
keeps the exact libdevice functions (gradcheck runs through it). Under the interpreter
(TRITON_INTERPRET=1: the CPU tests), which cannot run PTX, ``log`` is ``tl.log2`` (the same formula
to a few ulps) and ``exp`` flushes float32 results below 2^-126 to 0 as the hardware does, so the
CPU tests see the flush (at T = 0.05, logits of 1e4, skew near 0, every underflow case).
"""
import os

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
_COMPILED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")  # read when kernels are first used
SMALLEST_NORMAL = tl.constexpr(1.1754943508222875e-38)


@triton.jit
def exp(x):
    y = tl.exp2(x * LOG2E)
    if not _COMPILED and x.dtype == tl.float32:
        y = tl.where(y < SMALLEST_NORMAL, 0.0, y)  # ex2.approx.ftz, as compiled
    return y


@triton.jit
def log(x):
    if _COMPILED and x.dtype == tl.float32:
        y = tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                      pack=1)
    else:
        y = tl.log2(x)
    return y * LN2


@triton.jit
def finite(m):
    """A finite stand-in (0) for a maximum that is -inf (nothing but -inf so far)."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def online_max_update(m, x):
    """New running max of ``m`` and block ``x``, a finite stand-in for it, and the factor
    ``exp(m - new)`` that rescales sums taken against the old max (0 when the old max was -inf)."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    m_safe = finite(m_new)
    return m_new, m_safe, exp(m - m_safe)


@triton.jit
def fold_tile(m, d, x):
    """Fold a tile ``x`` [R, C] whose rows each belong to one thread into running maxima ``m`` [R]
    and sums ``d = sum exp(x - m)`` [R] per tile row, so no value crosses threads inside a loop.
    Returns the new m, d, exp(x - m) [R, C] and the factor exp(m_old - m) [R] that rescaled d."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    m_safe = finite(m_new)
    alpha = exp(m - m_safe)
    e = exp(x - m_safe[:, None])
    return m_new, d * alpha + tl.sum(e, axis=1), e, alpha


@triton.jit
def log_prob(x, m, log_d):
    """A log-probability of a row from its maximum m and log_d = log(sum exp(x - m)): (x - m) - log_d,
    each step exact to a few ulps of its own size. Never x - (m + log_d): that sum rounds at |m|, so
    a log-probability near 0 (a peaked or converged row) and exp of it would err by eps |m|."""
    return (x - m) - log_d


@triton.jit
def tile_rows_to_row(m, d):
    """The row's maximum and sum of exps from the per-tile-row ones: M = max m, D = sum d e^(m - M)
    (once per row: the only reduction across threads)."""
    M = tl.max(m, axis=0)
    return M, tl.sum(d * exp(m - finite(M)), axis=0)


@triton.jit
def online_logsumexp_update(m, d, x):
    """Fold block ``x`` into running max ``m`` and ``d = sum exp(x - m)``; lse = m + log(d)."""
    m_new, m_safe, alpha = online_max_update(m, x)
    return m_new, d * alpha + tl.sum(exp(x - m_safe), axis=0)


@triton.jit
def log_add_exp(a, b):
    """log(exp(a) + exp(b)), exact when either side underflows and -inf when both are -inf."""
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    return tl.where(hi == float("-inf"), float("-inf"), hi + log(1.0 + exp(lo - finite(hi))))


@triton.jit
def row_label(labels_ptr, labels_stride, row, ignore_index, HAS_LABELS: tl.constexpr):
    """This row's label (0 without labels) from labels ``[N]`` with stride ``labels_stride`` (a view
    such as ``labels[:, j]`` is read in place), and whether the row counts (label != ignore_index)."""
    kept = True
    label = 0
    if HAS_LABELS:
        label = tl.load(labels_ptr + row * labels_stride).to(tl.int64)
        kept = label != ignore_index
    return label, kept


@triton.jit
def store(ptr, x, mask=None, eviction_policy=None):
    """Store ``x`` in ``ptr``'s element type: every kernel's results go through here. float64 ->
    bfloat16 goes through float32 (the interpreter's direct cast returns 0; on a GPU the double
    rounding can move a bf16 result by one ulp at most). (A default of None, not "", for the
    eviction policy: Triton 3.6 cannot take a string default of a jit function.)"""
    if ptr.dtype.element_ty == tl.bfloat16:
        x = x.to(tl.float32)
    if eviction_policy is None:
        tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask, eviction_policy=eviction_policy)
