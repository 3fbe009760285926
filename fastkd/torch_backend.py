"""The pure-PyTorch backend: the fused kernels' results on any device, chunked over rows.

Same contract as ``fastkd.launch.kd_forward`` (per-row loss and the student gradient computed in
the forward, from closed-form gradients rather than autograd), so the extra memory of forward +
backward is the ``[N, V]`` gradient plus one chunk of float32 temporaries, whatever N is. The math
is the table at the top of ``kernels/kd_loss.py``, written with whole-row tensor ops.
"""
import torch

from .buffers import accumulation_dtype, gradient_buffer
from .options import KDOptions

CHUNK_BYTES = 32 * 2**20  # of one float32 [rows, V] temporary; a chunk holds about eight


def chunk_rows(V, chunk_bytes):
    return max(1, chunk_bytes // (4 * max(V, 1)))


def _where_live(live, x):
    return torch.where(live, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _sign(p, q):
    return torch.sign(p - q)


def divergence_and_grad(ls, lt, opts: KDOptions):
    """Per-row divergence D(p || q) and dD/ds, from log q = ``ls`` and log p = ``lt`` ``[rows, V]``."""
    q, p = ls.exp(), lt.exp()
    name = opts.divergence
    if name == "kl":
        return _where_live(p > 0, p * (lt - ls)).sum(-1), q - p
    if name == "reverse_kl":
        D = _where_live(q > 0, q * (ls - lt)).sum(-1)
        return D, _where_live(q > 0, q * (ls - lt - D[:, None]))
    if name == "tvd":
        sign = _sign(p, q)
        A2 = (q * sign).sum(-1, keepdim=True)
        return 0.5 * (p - q).abs().sum(-1), 0.5 * q * (A2 - sign)
    mix, log_wp, log_wq = opts.mixture_weights()
    lm = torch.logaddexp(lt + log_wp, ls + log_wq)
    if name == "jsd":
        A1 = _where_live(p > 0, p * (lt - lm)).sum(-1)
        A2 = _where_live(q > 0, q * (ls - lm)).sum(-1, keepdim=True)
        return mix * A1 + (1 - mix) * A2[:, 0], (1 - mix) * _where_live(q > 0, q * (ls - lm - A2))
    if name == "skew_kl":
        r = torch.where(q > 0, (lt + ls - lm).exp(), p if mix == 0 else torch.zeros_like(p))
        D = _where_live(p > 0, p * (lt - lm)).sum(-1)
        return D, (1 - mix) * (q * r.sum(-1, keepdim=True) - r)
    if name == "skew_reverse_kl":
        A1 = _where_live(q > 0, q * (ls - lm)).sum(-1, keepdim=True)
        A2 = _where_live(q > 0, (2 * ls - lm).exp()).sum(-1, keepdim=True)
        g = _where_live(q > 0, q * (ls - lm - mix * (ls - lm).exp() - (A1 - mix * A2)))
        return A1[:, 0], g
    raise ValueError(f"unknown divergence {name!r}")


def _hard_ce_and_grad(z, labels):
    """Cross-entropy at T = 1 per row (NaN for a label outside [0, V)) and its gradient."""
    V = z.shape[-1]
    in_range = (labels >= 0) & (labels < V)
    safe = torch.where(in_range, labels, 0).long()
    log_q1 = torch.log_softmax(z, -1)
    ce = -log_q1.gather(1, safe[:, None])[:, 0]
    ce = torch.where(in_range, ce, torch.full_like(ce, float("nan")))
    grad = log_q1.exp()
    grad.scatter_add_(1, safe[:, None], -in_range[:, None].to(grad.dtype))
    return ce, grad


def kd_forward(student, teacher, labels, opts: KDOptions, *, inplace=False, need_grad=True, chunk_bytes=None):
    """Per-row loss ``[N]`` and student gradient ``[N, V]``, as ``fastkd.launch.kd_forward``."""
    N, V = student.shape
    acc = accumulation_dtype(student.dtype, teacher.dtype)
    loss = torch.empty(N, dtype=acc, device=student.device)
    grad = gradient_buffer(student, inplace, need_grad)
    T = opts.temperature
    rows = chunk_rows(V, chunk_bytes or CHUNK_BYTES)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        z = student[r0:r1].to(acc)
        ls = torch.log_softmax(z / T, -1)
        lt = torch.log_softmax(teacher[r0:r1].to(acc) / T, -1)
        D, g = divergence_and_grad(ls, lt, opts)
        row_loss = opts.soft_scale * D
        g = g * (opts.soft_scale / T)
        if labels is not None:
            label = labels[r0:r1]
            if opts.hard_weight != 0:
                ce, ce_grad = _hard_ce_and_grad(z, label)
                row_loss = row_loss + opts.hard_weight * ce
                g = g + opts.hard_weight * ce_grad
            keep = label != opts.ignore_index
            row_loss = _where_live(keep, row_loss)
            g = _where_live(keep[:, None], g)
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
