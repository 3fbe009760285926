"""Fused knowledge-distillation loss: per-row loss and student gradient in one kernel.

Notation (one row): z student logits, s = z / T, t = teacher logits / T, V columns.
    ls = log q = s - lse(s)      lt = log p = t - lse(t)
For D(q) any divergence, dD/ds_j = q_j (g_j - sum_i q_i g_i) with g_i = dD/dq_i; the table is that
identity worked out. M is the mixture, log M = log_add_exp(log w_p + lt, log w_q + ls).

divergence        D                              w_p, w_q       dD/ds_j
kl                sum p (lt - ls)                -              q_j - p_j
reverse_kl        sum q (ls - lt)                -              q_j (ls_j - lt_j - D)
jsd (beta)        beta A1 + (1-beta) A2          beta, 1-beta   (1-beta) q_j (ls_j - lM_j - A2)
                  A1 = sum p (lt - lM), A2 = sum q (ls - lM)
skew_kl (a)       A1 = sum p (lt - lM)           a, 1-a         (1-a) (q_j A2 - r_j)
                  r_j = p_j q_j / M_j, A2 = sum r
skew_reverse_kl   A1 = sum q (ls - lM)           1-a, a         q_j (ls_j - lM_j - a q_j / M_j - (A1 - a A2))
 (a)              A2 = sum q^2 / M
tvd               A1 / 2, A1 = sum |p - q|       -              q_j (A2 - sign(p_j - q_j)) / 2
                  A2 = sum q sign(p - q)                        (subgradient 0 where p = q)

Row loss  = soft_scale * D + hard_weight * (lse(z) - z_y)      (hard CE at T = 1)
Gradient  = soft_scale / T * dD/ds + hard_weight * (softmax(z) - onehot(y))
Without WRITE_GRAD (no gradient wanted) pass 3 is skipped.
Ignored rows (y == ignore_index) get loss 0 and gradient 0 without reading the logits.
A label outside [0, V) that is not ignore_index gives that row a NaN loss (never an out-of-bounds read).

Passes over the row (each reads student and teacher once):
    1. online max / sum-of-exps of s, t (and z for the hard CE); kl and reverse_kl also fold their
       cross term sum p (t - s) or sum q (s - t) into the same pass, so D is known after it.
    2. jsd, skew_kl, skew_reverse_kl and tvd only: the row scalars A1, A2, which need the
       normalised p and q (hence lse of both) at every element; no cheaper order exists.
    3. the gradient, written once.
Bytes moved per element, b_s / b_t the student / teacher element size (2 for bf16, 4 for fp32):
    kl, reverse_kl: 2 (b_s + b_t) + b_s      (10 for bf16)
    jsd, skew_kl, skew_reverse_kl, tvd: 3 (b_s + b_t) + b_s      (14 for bf16)
Rows that fit on chip re-read from cache, so on a GPU the repeat reads mostly hit L2.
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
def _load_row_block(z_row, t_row, start, cols, V, inv_temperature, ACC_DTYPE: tl.constexpr):
    mask = start + cols < V
    z = tl.load(z_row + start + cols, mask=mask, other=float("-inf")).to(ACC_DTYPE)
    t = tl.load(t_row + start + cols, mask=mask, other=float("-inf")).to(ACC_DTYPE) * inv_temperature
    return z, z * inv_temperature, t, mask


@triton.jit
def kd_forward_kernel(
    z_ptr, z_row_stride, t_ptr, t_row_stride, labels_ptr, grad_ptr, grad_row_stride, loss_ptr,
    V, inv_temperature, mix_weight, log_weight_p, log_weight_q,
    soft_scale, hard_weight, ignore_index,
    DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr, WRITE_GRAD: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_row_stride
    t_row = t_ptr + row * t_row_stride
    g_row = grad_ptr + row * grad_row_stride
    cols = tl.arange(0, BLOCK_V)

    valid = True
    label = 0
    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        valid = label != ignore_index

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
            z, s, t, mask = _load_row_block(z_row, t_row, start, cols, V, inv_temperature, ACC_DTYPE)
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
        lse_s = m_s + tl.log(d_s)
        lse_t = m_t + tl.log(d_t)

        # Pass 2: the row scalars of the mixture divergences and tvd.
        a1 = tl.zeros((BLOCK_V,), ACC_DTYPE)
        a2 = tl.zeros((BLOCK_V,), ACC_DTYPE)
        if DIVERGENCE >= JSD:
            for start in range(0, V, BLOCK_V):
                z, s, t, mask = _load_row_block(z_row, t_row, start, cols, V, inv_temperature, ACC_DTYPE)
                ls = s - lse_s
                lt = t - lse_t
                q = tl.exp(ls)
                p = tl.exp(lt)
                if DIVERGENCE == TVD:
                    a1 += tl.abs(p - q)
                    a2 += q * tl.where(p > q, 1.0, tl.where(p < q, -1.0, 0.0))
                else:
                    lm = log_add_exp(log_weight_p + lt, log_weight_q + ls)
                    if DIVERGENCE == JSD:
                        a1 += tl.where(p > 0, p * (lt - lm), 0.0)
                        a2 += tl.where(q > 0, q * (ls - lm), 0.0)
                    if DIVERGENCE == SKEW_KL:
                        a1 += tl.where(p > 0, p * (lt - lm), 0.0)
                        a2 += tl.where(q > 0, tl.exp(lt + ls - lm), tl.where(mix_weight == 0, p, 0.0))
                    if DIVERGENCE == SKEW_REVERSE_KL:
                        a1 += tl.where(q > 0, q * (ls - lm), 0.0)
                        a2 += tl.where(q > 0, tl.exp(2.0 * ls - lm), 0.0)
        A1 = tl.sum(a1, axis=0)
        A2 = tl.sum(a2, axis=0)

        if DIVERGENCE == KL:
            divergence = cross / d_t - (lse_t - lse_s)
        elif DIVERGENCE == REVERSE_KL:
            divergence = cross / d_s - (lse_s - lse_t)
        elif DIVERGENCE == JSD:
            divergence = mix_weight * A1 + (1.0 - mix_weight) * A2
        elif DIVERGENCE == TVD:
            divergence = 0.5 * A1
        else:
            divergence = A1
        loss = soft_scale * divergence

        lse_z = m_z + tl.log(d_z)
        if HAS_CE:
            in_range = (label >= 0) & (label < V)
            z_label = tl.load(z_row + label, mask=in_range, other=float("nan")).to(ACC_DTYPE)
            loss += hard_weight * (lse_z - z_label)
        tl.store(loss_ptr + row, loss.to(loss_ptr.dtype.element_ty))

        # Pass 3: the gradient.
        soft_grad_scale = soft_scale * inv_temperature
        for start in range(0, V if WRITE_GRAD else 0, BLOCK_V):
            z, s, t, mask = _load_row_block(z_row, t_row, start, cols, V, inv_temperature, ACC_DTYPE)
            ls = s - lse_s
            lt = t - lse_t
            q = tl.exp(ls)
            p = tl.exp(lt)
            if DIVERGENCE == KL:
                g = q - p
            elif DIVERGENCE == REVERSE_KL:
                g = tl.where(q > 0, q * (ls - lt - divergence), 0.0)
            elif DIVERGENCE == TVD:
                g = 0.5 * q * (A2 - tl.where(p > q, 1.0, tl.where(p < q, -1.0, 0.0)))
            else:
                lm = log_add_exp(log_weight_p + lt, log_weight_q + ls)
                if DIVERGENCE == JSD:
                    g = (1.0 - mix_weight) * tl.where(q > 0, q * (ls - lm - A2), 0.0)
                elif DIVERGENCE == SKEW_KL:
                    r = tl.where(q > 0, tl.exp(lt + ls - lm), tl.where(mix_weight == 0, p, 0.0))
                    g = (1.0 - mix_weight) * (q * A2 - r)
                else:
                    g = tl.where(q > 0, q * (ls - lm - mix_weight * tl.exp(ls - lm) - (A1 - mix_weight * A2)), 0.0)
            g = soft_grad_scale * g
            if HAS_CE:
                g += hard_weight * (tl.exp(z - lse_z) - tl.where(start + cols == label, 1.0, 0.0))
            tl.store(g_row + start + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)
    else:
        for start in range(0, V if WRITE_GRAD else 0, BLOCK_V):
            mask = start + cols < V
            tl.store(g_row + start + cols, tl.zeros((BLOCK_V,), grad_ptr.dtype.element_ty), mask=mask)
        tl.store(loss_ptr + row, tl.zeros((), loss_ptr.dtype.element_ty))
