"""The pure-PyTorch backend: the fused kernels' results on any device, chunked over rows.

Same contract as ``fastkd.launch.kd_forward`` (per-row loss and the student gradient computed in
the forward, from closed-form gradients rather than autograd), so the extra memory of forward +
backward is the ``[N, V]`` gradient plus one chunk of float32 temporaries, whatever N is. The math
is the table at the top of ``kernels/kd_loss.py``, written with whole-row tensor ops.
"""
import torch

from .buffers import accumulation_dtype, empty, gradient_buffer
from .options import KDOptions

# Of one float32 [rows, V] work buffer (there are four). Large enough that the per-op overhead of
# CPU threading stays small next to the work (at 4 MiB, N = 4096, V = 32000 took 7x longer on a busy
# 2-core machine), small enough that the workspace stays a fraction of the [N, V] gradient.
CHUNK_BYTES = 32 * 2**20


def chunk_rows(V, chunk_bytes):
    return max(1, chunk_bytes // (4 * max(V, 1)))


def _where_live(live, x):
    return torch.where(live, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _finite_products(x):
    """``x`` with the NaNs of ``0 * inf`` (a zero probability times an infinite log-ratio) set to 0."""
    return x.nan_to_num_(nan=0.0, posinf=float("inf"), neginf=float("-inf"))


def skew_kl_ratio(ls, lt, lm, p, mix):
    """r = p q / M of skew_kl from log q, log p and log M, guarded by log q (not q): with a tiny
    skew, r ~ p / (1 - skew) where q underflows. At skew 0 with q = 0 its limit p."""
    return torch.where(ls > float("-inf"), (lt + ls - lm).exp(), p if mix == 0 else torch.zeros_like(p))


def divergence_and_grad(s, t, q, p, lse_s, lse_t, opts: KDOptions):
    """Per-row divergence D(p || q) ``[rows]`` and dD/ds ``[rows, V]`` from the tempered logits
    ``s``, ``t``, their softmaxes ``q``, ``p`` and log-sum-exps ``[rows, 1]``. Works in place where
    it can: overwrites ``s`` and ``t``, and ``q`` for kl; ``p`` is left alone."""
    name = opts.divergence
    if name == "kl":
        cross = _finite_products(torch.sub(t, s, out=s).mul_(p)).sum(-1)  # sum p (t - s)
        return cross - (lse_t - lse_s)[:, 0], q.sub_(p)
    if name == "reverse_kl":
        # D = E - (lse_s - lse_t) and ls - lt - D = (s - t) - E with E = sum q (s - t), as the kernel:
        # the large log-sum-exps never enter the gradient, where they would cancel.
        diff = torch.sub(s, t, out=s)
        E = _finite_products(torch.mul(diff, q, out=t)).sum(-1, keepdim=True)
        return (E - (lse_s - lse_t))[:, 0], _finite_products(diff.sub_(E).mul_(q))
    if name == "tvd":
        diff = torch.sub(p, q, out=t)
        D = 0.5 * torch.linalg.vector_norm(diff, 1, dim=-1)
        sign = diff.sign_()
        A2 = torch.mul(q, sign, out=s).sum(-1, keepdim=True)
        return D, sign.sub_(A2).mul_(q).mul_(-0.5)  # q (A2 - sign) / 2
    ls, lt = s.sub_(lse_s), t.sub_(lse_t)
    mix, log_wp, log_wq = opts.mixture_weights()
    lm = torch.logaddexp(lt + log_wp, ls + log_wq)
    if name == "jsd":
        A1 = _where_live(p > 0, p * (lt - lm)).sum(-1)
        A2 = _where_live(q > 0, q * (ls - lm)).sum(-1, keepdim=True)
        return mix * A1 + (1 - mix) * A2[:, 0], (1 - mix) * _where_live(q > 0, q * (ls - lm - A2))
    if name == "skew_kl":
        r = skew_kl_ratio(ls, lt, lm, p, mix)
        D = _where_live(p > 0, p * (lt - lm)).sum(-1)
        return D, (1 - mix) * (q * r.sum(-1, keepdim=True) - r)
    if name == "skew_reverse_kl":
        A1 = _where_live(q > 0, q * (ls - lm)).sum(-1, keepdim=True)
        # a q / M and a q^2 / M as exp(log a + ...): bounded, and 0 (not 0 * inf) at a = 0.
        A2 = _where_live(q > 0, (log_wq + 2 * ls - lm).exp()).sum(-1, keepdim=True)
        g = _where_live(q > 0, q * (ls - lm - (log_wq + ls - lm).exp() - (A1 - A2)))
        return A1[:, 0], g
    raise ValueError(f"unknown divergence {name!r}")


def _scaled_copy(x, factor, out):
    """``out = x * factor`` computed in ``out``'s dtype (one pass when the dtypes already agree)."""
    if x.dtype == out.dtype:
        return torch.mul(x, factor, out=out)
    return out.copy_(x).mul_(factor)


def _softmax_into(x, out):
    """softmax of ``x`` over the last dim written to ``out`` (normalised by the row sum, so rows sum
    to 1 to rounding), and the row log-sum-exps ``[rows, 1]``; NaN rows where no finite lse exists."""
    m = x.amax(-1, keepdim=True)
    torch.sub(x, m, out=out).exp_()
    total = out.sum(-1, keepdim=True)
    out.div_(total)
    return m + total.log()


def kd_forward(student, teacher, labels, opts: KDOptions, *, inplace=False, need_grad=True, chunk_bytes=None):
    """Per-row loss ``[N]`` and student gradient ``[N, V]``, as ``fastkd.launch.kd_forward``.

    Each chunk of rows works in four preallocated float32 (float64) buffers: s, t, q = softmax(s)
    and p = softmax(t), overwritten in place where the math allows, so the temporaries stay bounded
    and the loop allocates little. Rows with no distribution (no finite log-sum-exp of s or t) or a
    label outside [0, V) with the hard CE are NaN, loss and whole gradient row; ignored rows are 0."""
    N, V = student.shape
    acc = accumulation_dtype(student.dtype, teacher.dtype)
    loss = empty(N, dtype=acc, device=student.device)
    grad = gradient_buffer(student, inplace, need_grad)
    inv_T = 1.0 / opts.temperature
    rows = max(1, min(N, chunk_rows(V, chunk_bytes or CHUNK_BYTES)))
    ws_s, ws_t, ws_q, ws_p = (empty((rows, V), dtype=acc, device=student.device) for _ in range(4))
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        s, t, q, p = ws_s[: r1 - r0], ws_t[: r1 - r0], ws_q[: r1 - r0], ws_p[: r1 - r0]
        _scaled_copy(student[r0:r1], inv_T, s)
        _scaled_copy(teacher[r0:r1], inv_T, t)
        lse_s, lse_t = _softmax_into(s, q), _softmax_into(t, p)
        defined = torch.isfinite(lse_s[:, 0]) & torch.isfinite(lse_t[:, 0])
        D, g = divergence_and_grad(s, t, q, p, lse_s, lse_t, opts)
        row_loss = opts.soft_scale * D
        g.mul_(opts.soft_scale * inv_T)
        if labels is not None:
            label = labels[r0:r1]
            if opts.hard_weight != 0:
                # The hard CE at T = 1: its softmax goes into p's buffer, free by now.
                in_range = (label >= 0) & (label < V)
                safe = torch.where(in_range, label, 0).long()[:, None]
                z_label = student[r0:r1].gather(1, safe)[:, 0].to(acc)
                lse_z = _softmax_into(p.copy_(student[r0:r1]), p)[:, 0]
                p.scatter_add_(1, safe, -in_range[:, None].to(acc))
                row_loss = row_loss + opts.hard_weight * (lse_z - z_label)
                g.add_(p, alpha=opts.hard_weight)
                defined = defined & in_range
            keep = label != opts.ignore_index
        row_loss = row_loss.masked_fill(~defined, float("nan"))
        g.masked_fill_(~defined[:, None], float("nan"))
        if labels is not None:
            row_loss = row_loss.masked_fill(~keep, 0.0)
            g.masked_fill_(~keep[:, None], 0.0)
        loss[r0:r1] = row_loss
        if grad is not None:
            grad[r0:r1] = g
    return loss, grad


def scale_rows(grad, scale, *, out=None):
    """``grad * scale[:, None]``; ``out=grad`` scales in place."""
    scale = scale.reshape(-1, 1)
    return grad.mul_(scale) if out is grad else (grad * scale).to(grad.dtype)


def softmax(x, temperature, dim, *, log):
    """Tempered (log-)softmax with float32 statistics, differentiated by autograd."""
    acc = accumulation_dtype(x.dtype)
    fn = torch.log_softmax if log else torch.softmax
    return fn(x.to(acc) / temperature, dim=dim).to(x.dtype)
