"""Small jit helpers shared by the row kernels: online log-sum-exp, the log of a mixture, a row's
label, and the one way every kernel stores a result."""
import triton
import triton.language as tl


@triton.jit
def online_max_update(m, x):
    """New running max of ``m`` and block ``x``, a finite stand-in for it, and the factor
    ``exp(m - new)`` that rescales sums taken against the old max (0 when the old max was -inf)."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, m_safe, tl.exp(m - m_safe)


@triton.jit
def online_logsumexp_update(m, d, x):
    """Fold block ``x`` into running max ``m`` and ``d = sum exp(x - m)``; lse = m + log(d)."""
    m_new, m_safe, alpha = online_max_update(m, x)
    return m_new, d * alpha + tl.sum(tl.exp(x - m_safe), axis=0)


@triton.jit
def log_add_exp(a, b):
    """log(exp(a) + exp(b)), exact when either side underflows and -inf when both are -inf."""
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    hi_safe = tl.where(hi == float("-inf"), 0.0, hi)
    return tl.where(hi == float("-inf"), float("-inf"), hi + tl.log(1.0 + tl.exp(lo - hi_safe)))


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
def store(ptr, x, mask=None):
    """Store ``x`` in ``ptr``'s element type: every kernel's results go through here. float64 ->
    bfloat16 goes through float32 (the interpreter's direct cast returns 0; on a GPU the double
    rounding can move a bf16 result by one ulp at most)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        x = x.to(tl.float32)
    tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)
