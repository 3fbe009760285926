"""The dense KD kernels as they were before the rework (commit 0939b4a): kept only so that the first
GPU run times them beside the new ones in one go (``FASTKD_KD_KERNEL=legacy``); delete this file
and its launcher branch once that run is in ``bench/results/``.

Forward: three passes as today's two-pass kernel, without the normaliser (the gradient is that of
the summed row losses); the old backward pass then reads and writes the gradient once to scale it
(``legacy_scale_rows_kernel``, one program per block of a row). Labels are read contiguously (the
launcher makes them so). The math is the table of divergences.py as it was then.
"""
import triton
import triton.language as tl



@triton.jit
def online_max_update(m, x):
    m_new = tl.maximum(m, tl.max(x, axis=0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, m_safe, tl.exp(m - m_safe)


@triton.jit
def log_add_exp(a, b):
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    hi_safe = tl.where(hi == float("-inf"), 0.0, hi)
    return tl.where(hi == float("-inf"), float("-inf"), hi + tl.log(1.0 + tl.exp(lo - hi_safe)))


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


@triton.jit
def _row_label(labels_ptr, row, ignore_index, HAS_LABELS: tl.constexpr):
    kept = True
    label = 0
    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        kept = label != ignore_index
    return label, kept


@triton.jit
def _to_element_type(x, ptr):
    """``x`` in ``ptr``'s element type. float64 -> bfloat16 goes through float32: the interpreter's
    direct cast returns 0 (on a GPU the double rounding can move a bf16 result by one ulp at most)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        x = x.to(tl.float32)
    return x.to(ptr.dtype.element_ty)


@triton.jit
def legacy_kd_forward_kernel(
    z_ptr, z_row_stride, t_ptr, t_row_stride, labels_ptr, grad_ptr, grad_row_stride, loss_ptr,
    V, inv_temperature: tl.float64, mix_weight: tl.float64, log_weight_p: tl.float64, log_weight_q: tl.float64,
    soft_scale: tl.float64, hard_weight: tl.float64, ignore_index,
    DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr, WRITE_GRAD: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    inv_temperature, mix_weight, log_weight_p, log_weight_q = divergence_scalars(
        inv_temperature, mix_weight, log_weight_p, log_weight_q, ACC_DTYPE)
    soft_scale = tl.full((), soft_scale, ACC_DTYPE)
    hard_weight = tl.full((), hard_weight, ACC_DTYPE)
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_row_stride
    t_row = t_ptr + row * t_row_stride
    g_row = grad_ptr + row * grad_row_stride
    cols = tl.arange(0, BLOCK_V)

    label, valid = _row_label(labels_ptr, row, ignore_index, HAS_LABELS)

    if valid:
        # Pass 1: log-sum-exps (and the kl / reverse_kl cross term).
        m_s = tl.full((), float("-inf"), ACC_DTYPE)
        m_t = tl.full((), float("-inf"), ACC_DTYPE)
        m_z = tl.full((), float("-inf"), ACC_DTYPE)
        d_s = tl.zeros((), ACC_DTYPE)
        d_t = tl.zeros((), ACC_DTYPE)
        d_z = tl.zeros((), ACC_DTYPE)
        cross = tl.zeros((), ACC_DTYPE)
        for start in range(0, V, BLOCK_V):
            z, s, t, mask = load_scaled_block(z_row, t_row, start, cols, V, inv_temperature, ACC_DTYPE)
            m_s, d_s, m_t, d_t, m_z, d_z, cross = fold_row_statistics(
                m_s, d_s, m_t, d_t, m_z, d_z, cross, z, s, t, DIVERGENCE, HAS_CE)
        log_d_s, log_d_t, log_d_z = tl.log(d_s), tl.log(d_t), tl.log(d_z)
        lse_s = m_s + log_d_s
        lse_t = m_t + log_d_t
        defined = (tl.abs(lse_s) < float("inf")) & (tl.abs(lse_t) < float("inf"))

        # Pass 2: the row scalars of the mixture divergences and tvd.
        a1 = tl.zeros((BLOCK_V,), ACC_DTYPE)
        a2 = tl.zeros((BLOCK_V,), ACC_DTYPE)
        if DIVERGENCE >= JSD:
            for start in range(0, V, BLOCK_V):
                z, s, t, mask = load_scaled_block(z_row, t_row, start, cols, V, inv_temperature, ACC_DTYPE)
                ls = (s - m_s) - log_d_s
                lt = (t - m_t) - log_d_t
                b1, b2 = row_scalar_terms(ls, lt, mix_weight, log_weight_p, log_weight_q, DIVERGENCE)
                a1 += b1
                a2 += b2
        A1 = tl.sum(a1, axis=0)
        A2 = tl.sum(a2, axis=0)
        if DIVERGENCE == REVERSE_KL:
            A1 = cross / d_s  # E = sum q (s - t)

        if DIVERGENCE == KL:
            divergence = cross / d_t - ((m_t - m_s) + (log_d_t - log_d_s))
        elif DIVERGENCE == REVERSE_KL:
            divergence = A1 - ((m_s - m_t) + (log_d_s - log_d_t))
        elif DIVERGENCE == JSD:
            divergence = mix_weight * A1 + (1.0 - mix_weight) * A2
        elif DIVERGENCE == TVD:
            divergence = 0.5 * A1
        else:
            divergence = A1
        loss = soft_scale * divergence

        if HAS_CE:
            in_range = (label >= 0) & (label < V)
            z_label = tl.load(z_row + label, mask=in_range, other=float("nan")).to(ACC_DTYPE)
            loss += hard_weight * ((m_z - z_label) + log_d_z)
            defined = defined & in_range
        row_nan = tl.where(defined, 0.0, float("nan"))  # added to the loss and every gradient element
        loss += row_nan
        tl.store(loss_ptr + row, loss.to(loss_ptr.dtype.element_ty))

        # Pass 3: the gradient.
        soft_grad_scale = soft_scale * inv_temperature
        for start in range(0, V if WRITE_GRAD else 0, BLOCK_V):
            z, s, t, mask = load_scaled_block(z_row, t_row, start, cols, V, inv_temperature, ACC_DTYPE)
            ls = (s - m_s) - log_d_s
            lt = (t - m_t) - log_d_t
            g = divergence_grad(ls, lt, s - t, A1, A2, mix_weight, log_weight_p, log_weight_q, DIVERGENCE)
            g = soft_grad_scale * g + row_nan
            if HAS_CE:
                g += hard_weight * (tl.exp((z - m_z) - log_d_z) - tl.where(start + cols == label, 1.0, 0.0))
            tl.store(g_row + start + cols, _to_element_type(g, grad_ptr), mask=mask)
    else:
        for start in range(0, V if WRITE_GRAD else 0, BLOCK_V):
            mask = start + cols < V
            tl.store(g_row + start + cols, tl.zeros((BLOCK_V,), grad_ptr.dtype.element_ty), mask=mask)
        tl.store(loss_ptr + row, tl.zeros((), loss_ptr.dtype.element_ty))


@triton.jit
def legacy_scale_rows_kernel(
    g_ptr, g_row_stride, out_ptr, out_row_stride, scale_ptr, scale_stride, V,
    ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < V
    scale = tl.load(scale_ptr + row * scale_stride).to(ACC_DTYPE)
    g = tl.load(g_ptr + row * g_row_stride + cols, mask=mask, other=0.0).to(ACC_DTYPE)
    tl.store(out_ptr + row * out_row_stride + cols, (g * scale).to(out_ptr.dtype.element_ty), mask=mask)
