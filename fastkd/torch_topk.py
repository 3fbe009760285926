"""Pure-PyTorch peers of ``fastkd.launch_topk``: same signatures and results, chunked over rows.

The loss uses the closed-form gradients written at the top of ``kernels/topk_kd_loss.py``; the
only difference is the student's tail bucket, which here is summed directly over the unlisted
columns (their q, with the listed ones zeroed by a scatter), where the kernel, which never builds
such a row, uses the cancellation-free formula of its docstring. Per chunk of rows the work is
done in one ``[rows, V]`` buffer (s, then q, then the gradient), so the memory beyond the
gradient is that buffer and ``logsumexp``'s temporary (two more with the hard CE).
"""
import math

import torch

from . import torch_backend
from .buffers import accumulation_dtype, empty, gradient_buffer
from .options import KDOptions


def _chunks(N, V, chunk_bytes):
    rows = torch_backend.chunk_rows(V, chunk_bytes or torch_backend.CHUNK_BYTES)
    return ((r0, min(N, r0 + rows)) for r0 in range(0, N, rows))


def teacher_topk(logits, k, temperature, *, chunk_bytes=None):
    """As ``fastkd.launch_topk.teacher_topk``, with ``torch.topk`` (whose order among equal values
    is not specified) and ``torch.logsumexp``."""
    N, V = logits.shape
    acc = accumulation_dtype(logits.dtype)
    logprobs = empty((N, k), dtype=acc, device=logits.device)
    indices = empty((N, k), dtype=torch.int32, device=logits.device)
    for r0, r1 in _chunks(N, V, chunk_bytes):
        t = logits[r0:r1].to(acc) / temperature
        values, columns = t.topk(k, dim=-1, largest=True, sorted=True)
        logprobs[r0:r1] = values - t.logsumexp(-1, keepdim=True)
        indices[r0:r1] = columns
    return logprobs, indices


def _where_live(live, x):
    return torch.where(live, x, torch.zeros((), dtype=x.dtype, device=x.device))


def point_terms(lp, lq, opts: KDOptions):
    """(term_b, h_b, g_b) of the table in ``kernels/topk_kd_loss.py``, elementwise."""
    p, q = lp.exp(), lq.exp()
    name = opts.divergence
    if name == "kl":
        return _where_live(p > 0, p * (lp - lq)), -p, -(lp - lq).exp()
    if name == "reverse_kl":
        g = lq - lp + 1
        return _where_live(q > 0, q * (lq - lp)), _where_live(q > 0, q * g), g
    if name == "tvd":
        g = -0.5 * torch.sign(p - q)
        return 0.5 * (p - q).abs(), q * g, g
    mix, log_wp, log_wq = opts.mixture_weights()
    lm = torch.logaddexp(lp + log_wp, lq + log_wq)
    if name == "jsd":
        term = mix * _where_live(p > 0, p * (lp - lm)) + (1 - mix) * _where_live(q > 0, q * (lq - lm))
        g = (1 - mix) * (lq - lm)
        return term, _where_live(q > 0, q * g), g
    if name == "skew_kl":
        r = torch_backend.skew_kl_ratio(lq, lp, lm, p, mix)
        return _where_live(p > 0, p * (lp - lm)), -(1 - mix) * r, -(1 - mix) * (lp - lm).exp()
    if name == "skew_reverse_kl":
        g = lq - lm + 1 - mix * (lq - lm).exp()
        return _where_live(q > 0, q * (lq - lm)), _where_live(q > 0, q * g), g
    raise ValueError(f"unknown divergence {name!r}")


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, -inf for x >= 0 (the teacher's tail mass when x = lse(lt))."""
    value = torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
    return torch.where(x >= 0, torch.full_like(x, float("-inf")), value)


def _hard_ce(z, labels, need_grad):
    """Cross-entropy at T = 1 per row, its gradient (or None), and whether each label is in [0, V)."""
    in_range = (labels >= 0) & (labels < z.shape[-1])
    safe = torch.where(in_range, labels, 0).long()[:, None]
    lse = z.logsumexp(-1, keepdim=True)
    grad = (z - lse).exp_().scatter_add_(1, safe, -in_range[:, None].to(z.dtype)) if need_grad else None
    return lse[:, 0] - z.gather(1, safe)[:, 0], grad, in_range


def topk_kd_forward(student, teacher_logprobs, teacher_indices, labels, opts: KDOptions, tail, *,
                    inplace=False, need_grad=True, chunk_bytes=None):
    """Per-row loss ``[N]`` and student gradient ``[N, V]``, as ``fastkd.launch_topk.topk_kd_forward``:
    a row with an index outside [0, V) is NaN; repeated indices must not occur (the caller sees to it)."""
    N, V = student.shape
    K = teacher_logprobs.shape[1]
    acc = accumulation_dtype(student.dtype, teacher_logprobs.dtype)
    loss = empty(N, dtype=acc, device=student.device)
    grad = gradient_buffer(student, inplace, need_grad)
    T, neg_inf, nan = opts.temperature, float("-inf"), float("nan")
    big = torch.finfo(acc).max
    for r0, r1 in _chunks(N, V, chunk_bytes):
        z = student[r0:r1]
        index = teacher_indices[r0:r1].long()
        label = None if labels is None else labels[r0:r1]
        # A row with an index outside [0, V) is NaN, as in the kernel; it and the ignored rows (which
        # may hold anything) compute on valid stand-in indices.
        defined = ((index >= 0) & (index < V)).all(-1)
        index = torch.where(defined[:, None], index, torch.arange(K, device=index.device).expand_as(index))
        lt = teacher_logprobs[r0:r1].to(acc)
        row_loss = torch.zeros(r1 - r0, dtype=acc, device=student.device)
        if label is not None and opts.hard_weight != 0:  # before z's storage may become the gradient
            ce, ce_grad, label_in_range = _hard_ce(z.to(acc), label, grad is not None)
            defined = defined & label_in_range
            row_loss += opts.hard_weight * ce

        # One [rows, V] buffer, the gradient's own rows when they are in the accumulation dtype:
        # s = z / T, then e = exp(s - max s), then e at the unlisted columns, then the gradient.
        rows = None if grad is None else grad[r0:r1]
        e = rows if rows is not None and rows.dtype == acc else empty(z.shape, dtype=acc, device=z.device)
        torch.mul(z, 1.0 / T, out=e)
        s_listed = e.gather(1, index)
        m = e.amax(-1, keepdim=True)
        e.sub_(m).exp_()
        d = e.sum(-1, keepdim=True)
        lse_s = m + d.log()
        defined = defined & torch.isfinite(lse_s[:, 0])
        lq = s_listed - lse_s
        lp = lt - lt.logsumexp(-1, keepdim=True) if tail == "renormalize" else lt
        term, h, _ = point_terms(lp, lq, opts)
        D, S = term.sum(-1), h.sum(-1)
        e.scatter_(1, index, 0.0)  # the unlisted columns: their q sums to the student's tail
        c_tail = -S
        if tail == "bucket":
            if K < V:
                lp_tail, lq_tail = log1mexp(lt.logsumexp(-1)), e.sum(-1).log() - d[:, 0].log()
            else:
                lp_tail = lq_tail = torch.full_like(D, neg_inf)
            tail_term, tail_h, tail_g = point_terms(lp_tail, lq_tail, opts)
            D, S = D + tail_term, S + tail_h
            c_tail = _where_live(lq_tail > neg_inf, tail_g) - S
        row_loss += opts.soft_scale * D
        loss[r0:r1] = torch.where(defined, row_loss, nan)

        if rows is not None:
            # Unlisted column j: q_j (g_tail - S) = e_j (g_tail - S) / d; a finite factor keeps 0 * inf out.
            soft_grad_scale = opts.soft_scale / T
            row_factor = soft_grad_scale * c_tail.clamp(-big, big)[:, None] / d
            g = e.mul_(torch.where(defined[:, None], row_factor, nan))
            listed_q = lq.exp()
            listed = soft_grad_scale * (h - _where_live(listed_q > 0, listed_q * S[:, None]))
            g.scatter_(1, index, torch.where(defined[:, None], listed, nan))
            if label is not None and opts.hard_weight != 0:
                g.add_(ce_grad, alpha=opts.hard_weight)
            if label is not None:
                g.masked_fill_((label == opts.ignore_index)[:, None], 0.0)
            if g is not rows:
                rows.copy_(g)
        if label is not None:
            loss[r0:r1].masked_fill_(label == opts.ignore_index, 0.0)
    return loss, grad
