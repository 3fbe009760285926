"""The pure-PyTorch backend: every launcher of ``fastkd.backends.triton``, same name, signature and
results, on any device.

Each works through the rows in chunks of about CHUNK_BYTES per ``[rows, V]`` float32 temporary, so
the extra memory of forward + backward is the ``[N, V]`` gradient plus a few chunks, whatever N is.
Losses and gradients come from the closed forms of ``torch_divergences`` (the mirror of the
kernels' table), never from autograd; the gradient is computed in the forward, times
``grad_scale``. Rows with no distribution (no finite log-sum-exp of s or t) or, with the hard CE, a
label outside [0, V) are NaN, loss and whole gradient row; ignored rows are 0.
"""
import math

import torch

from ..buffers import accumulation_dtype, empty, gradient_buffer
from ..options import KDOptions
from . import VOCAB_PARALLEL_ROW, VOCAB_PARALLEL_STATS, teacher_tuple
from . import torch_divergences as div

# Of one float32 [rows, V] temporary. Each op of a chunk is a pass over its temporaries, which stay
# in the CPU's caches at this size; measured on 2 cores (kl and jsd, N = 2048, V = 32000, fp32
# fwd+bwd), 0.5-1 MiB chunks ran 1.6 times faster than 8 MiB ones, 0.25 MiB slower again (the
# per-op cost of Python and dispatch).
CHUNK_BYTES = 2**20


def chunks(N, V, chunk_bytes=None):
    """Row ranges ``(r0, r1)`` of about ``chunk_bytes`` of float32 ``[rows, V]`` each."""
    step = max(1, (chunk_bytes or CHUNK_BYTES) // (4 * max(V, 1)))
    return [(r0, min(N, r0 + step)) for r0 in range(0, N, step)]


def _hard_ce(z, labels, need_grad):
    """Cross-entropy at T = 1 per row ``[rows]``, its gradient (or None), and whether each label is
    in [0, V)."""
    in_range = (labels >= 0) & (labels < z.shape[-1])
    safe = torch.where(in_range, labels, 0).long()[:, None]
    lse = z.logsumexp(-1, keepdim=True)
    grad = (z - lse).exp_().scatter_add_(1, safe, -in_range[:, None].to(z.dtype)) if need_grad else None
    return lse[:, 0] - z.gather(1, safe)[:, 0], grad, in_range


def _finish_rows(loss, grad, r0, r1, row_loss, g, defined, labels, ignore_index):
    """Write one chunk's row losses and gradient rows: NaN where undefined, 0 where ignored."""
    nan = float("nan")
    row_loss = torch.where(defined, row_loss, nan)
    if g is not None:
        g = g.masked_fill_(~defined[:, None], nan)
    if labels is not None:
        kept = labels[r0:r1] != ignore_index
        row_loss = torch.where(kept, row_loss, 0.0)
        if g is not None:
            g = g.masked_fill_(~kept[:, None], 0.0)
    loss[r0:r1] = row_loss
    if g is not None:
        grad[r0:r1] = g


# ---------------------------------------------------------------------------------------------- dense


def _mixture_log_probs(student_stats, teachers, r0, r1, acc, opts):
    """ls, lt, s_minus_t, shift and the rows with every teacher's distribution, for a mixture of
    teachers (s_minus_t = ls - lt, shift 0, as the kernel)."""
    m_s, d_s, ls = student_stats
    lts, defined = [], torch.isfinite(m_s + d_s.log())[:, 0]
    for teacher in teachers:
        t = teacher[r0:r1].to(acc) / opts.teacher_T
        lt = t.log_softmax(-1)
        defined = defined & torch.isfinite(t.logsumexp(-1))
        lts.append(lt)
    lt = div.mixture_log_prob(lts, opts.log_teacher_weights())
    return ls, lt, ls - lt, torch.zeros_like(m_s), defined


def kd_forward(student, teachers, labels, grad_scale, opts: KDOptions, *, inplace=False, need_grad=True,
               chunk_bytes=None):
    """Per-row loss ``[N]`` and student gradient ``[N, V]``, as ``fastkd.backends.triton.kd_forward``."""
    teachers = teacher_tuple(teachers)
    N, V = student.shape
    acc = accumulation_dtype(student.dtype, *(t.dtype for t in teachers))
    loss = empty(N, dtype=acc, device=student.device)
    grad = gradient_buffer(student, inplace, need_grad)
    for r0, r1 in chunks(N, V, chunk_bytes):
        z = student[r0:r1].to(acc)
        s = z / opts.temperature
        if len(teachers) > 1:
            m_s = s.amax(-1, keepdim=True)
            d_s = (s - div.finite(m_s)).exp().sum(-1, keepdim=True)
            ls, lt, s_minus_t, shift, defined = _mixture_log_probs((m_s, d_s, (s - m_s) - d_s.log()), teachers,
                                                                   r0, r1, acc, opts)
        else:
            t = teachers[0][r0:r1].to(acc) / opts.teacher_T
            m_s, d_s, m_t, d_t, cross = div.fold_row_statistics(s, t, opts)
            ls, lt = (s - m_s) - d_s.log(), (t - m_t) - d_t.log()
            shift = div.log_ratio_shift(m_s, d_s, m_t, d_t)
            s_minus_t = s - t
            defined = torch.isfinite(m_s + d_s.log())[:, 0] & torch.isfinite(m_t + d_t.log())[:, 0]
        if opts.has_cross_term:
            A1, A2 = div.cross_term_scalars(cross, d_s, d_t, shift, opts)
        else:
            a1, a2 = div.element_terms(ls, lt, s_minus_t, shift, opts)
            A1, A2 = a1.sum(-1, keepdim=True), a2.sum(-1, keepdim=True)
        row_loss = opts.soft_scale * div.divergence_value(A1, A2, opts)[:, 0]
        g = None
        if grad is not None:
            g = div.divergence_grad(ls, lt, s_minus_t, shift, A1, A2, opts).mul_(opts.soft_scale / opts.temperature)
        if labels is not None and opts.hard_weight != 0:
            ce, ce_grad, in_range = _hard_ce(z, labels[r0:r1], g is not None)
            row_loss = row_loss + opts.hard_weight * ce
            defined = defined & in_range
            if g is not None:
                g.add_(ce_grad, alpha=opts.hard_weight)
        if g is not None:
            g.mul_(grad_scale)
        _finish_rows(loss, grad, r0, r1, row_loss, g, defined, labels, opts.ignore_index)
    return loss, grad


def scale_rows(grad, scale, *, out=None):
    """``grad * scale[:, None]``; ``out=grad`` scales in place, and nothing is done for a scale of 1
    held in host memory (reading it there is free)."""
    if out is grad and scale.numel() == 1 and scale.device.type == "cpu" and float(scale) == 1:
        return grad
    scale = scale.reshape(-1, 1)
    return grad.mul_(scale) if out is grad else (grad * scale).to(grad.dtype)


# -------------------------------------------------------------------------------------------- softmax


def softmax(x, temperature, dim, *, log):
    """Tempered (log-)softmax with float32 statistics, differentiated by autograd."""
    acc = accumulation_dtype(x.dtype)
    fn = torch.log_softmax if log else torch.softmax
    return fn(x.to(acc) / temperature, dim=dim).to(x.dtype)


# ---------------------------------------------------------------------------------------------- top-k


def teacher_topk(logits, k, temperature, *, chunk_bytes=None):
    """As ``fastkd.backends.triton.teacher_topk``, with ``torch.topk`` (whose order among equal
    values is not specified) and ``torch.logsumexp``."""
    N, V = logits.shape
    acc = accumulation_dtype(logits.dtype)
    logprobs = empty((N, k), dtype=acc, device=logits.device)
    indices = empty((N, k), dtype=torch.int32, device=logits.device)
    for r0, r1 in chunks(N, V, chunk_bytes):
        t = logits[r0:r1].to(acc) / temperature
        values, columns = t.topk(k, dim=-1, largest=True, sorted=True)
        logprobs[r0:r1] = values - t.logsumexp(-1, keepdim=True)
        indices[r0:r1] = columns
    return logprobs, indices


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, -inf for x >= 0 (the teacher's tail mass when x = lse(lt))."""
    value = torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
    return torch.where(x >= 0, torch.full_like(x, float("-inf")), value)


def _point_terms(lp, lq, opts):
    """(term_b, h_b, g_b) per point, as the top-k kernel's point_terms."""
    a1, a2 = div.element_terms(lq, lp, lq - lp, 0.0, opts)
    h, g = div.point_grad(lp, lq, opts)
    return div.divergence_value(a1, a2, opts), h, g


def topk_kd_forward(student, teacher_logprobs, teacher_indices, labels, grad_scale, opts: KDOptions, tail, *,
                    inplace=False, need_grad=True, chunk_bytes=None):
    """Per-row loss ``[N]`` and student gradient ``[N, V]``, as
    ``fastkd.backends.triton.topk_kd_forward``. The student's tail bucket is summed directly over
    the unlisted columns (their q, the listed ones zeroed by a scatter), where the kernel, which
    never builds such a row, uses the cancellation-free formula of its docstring. A row with an
    index outside [0, V) is NaN; repeated indices must not occur (the caller sees to it)."""
    N, V = student.shape
    K = teacher_logprobs.shape[1]
    acc = accumulation_dtype(student.dtype, teacher_logprobs.dtype)
    loss = empty(N, dtype=acc, device=student.device)
    grad = gradient_buffer(student, inplace, need_grad)
    T, neg_inf = opts.temperature, float("-inf")
    big = torch.finfo(acc).max
    for r0, r1 in chunks(N, V, chunk_bytes):
        z = student[r0:r1].to(acc)
        index = teacher_indices[r0:r1].long()
        # Rows with an index outside [0, V) (NaN, as in the kernel) and ignored rows (which may
        # hold anything) compute on valid stand-in indices.
        defined = ((index >= 0) & (index < V)).all(-1)
        index = torch.where(defined[:, None], index, torch.arange(K, device=index.device).expand_as(index))
        lt = teacher_logprobs[r0:r1].to(acc)
        row_loss = torch.zeros(r1 - r0, dtype=acc, device=student.device)
        ce_grad = None
        if labels is not None and opts.hard_weight != 0:
            ce, ce_grad, in_range = _hard_ce(z, labels[r0:r1], grad is not None)
            defined = defined & in_range
            row_loss += opts.hard_weight * ce

        s = z / T
        s_listed = s.gather(1, index)
        m = div.finite(s.amax(-1, keepdim=True))
        e = (s - m).exp()  # becomes e at the unlisted columns, then the gradient
        d = e.sum(-1, keepdim=True)
        lse_s = m + d.log()
        defined = defined & torch.isfinite(lse_s[:, 0])
        lq = s_listed - lse_s
        lp = lt - lt.logsumexp(-1, keepdim=True) if tail == "renormalize" else lt
        term, h, _ = _point_terms(lp, lq, opts)
        D, S = term.sum(-1), h.sum(-1)
        e.scatter_(1, index, 0.0)  # the unlisted columns: their q sums to the student's tail
        c_tail = -S
        if tail == "bucket":
            if K < V:
                lp_tail, lq_tail = log1mexp(lt.logsumexp(-1)), e.sum(-1).log() - d[:, 0].log()
            else:
                lp_tail = lq_tail = torch.full_like(D, neg_inf)
            tail_term, tail_h, tail_g = _point_terms(lp_tail, lq_tail, opts)
            D, S = D + tail_term, S + tail_h
            c_tail = torch.where(lq_tail > neg_inf, tail_g, torch.zeros_like(tail_g)) - S
        row_loss += opts.soft_scale * D

        g = None
        if grad is not None:
            # Unlisted column j: q_j (g_tail - S) = e_j (g_tail - S) / d; a finite factor keeps 0 * inf out.
            soft_grad_scale = opts.soft_scale / T
            g = e.mul_(soft_grad_scale * c_tail.clamp(-big, big)[:, None] / d)
            listed_q = lq.exp()
            listed = soft_grad_scale * (h - torch.where(listed_q > 0, listed_q * S[:, None], 0.0))
            g.scatter_(1, index, listed)
            if ce_grad is not None:
                g.add_(ce_grad, alpha=opts.hard_weight)
            g.mul_(grad_scale)
        _finish_rows(loss, grad, r0, r1, row_loss, g, defined, labels, opts.ignore_index)
    return loss, grad


# ----------------------------------------------------------------------- vocabulary-parallel shards

_STATS = {name: i for i, name in enumerate(VOCAB_PARALLEL_STATS)}
_ROW = {name: i for i, name in enumerate(VOCAB_PARALLEL_ROW)}


def _shard_chunks(student, teacher, labels, opts):
    """(rows slice, z, s, t in the accumulation dtype, kept mask [rows]) for each chunk of rows."""
    N, W = student.shape
    acc = accumulation_dtype(student.dtype, teacher.dtype)
    for r0, r1 in chunks(N, W):
        rows = slice(r0, r1)
        z = student[rows].to(acc)
        kept = (torch.ones(r1 - r0, dtype=torch.bool, device=z.device) if labels is None
                else labels[rows] != opts.ignore_index)
        yield rows, z, z / opts.temperature, teacher[rows].to(acc) / opts.teacher_T, kept


def partial_stats(student, teacher, labels, opts: KDOptions, vocab_start):
    """The shard's per-row statistics, as ``fastkd.backends.triton.partial_stats``."""
    N, W = student.shape
    stats = empty((N, len(VOCAB_PARALLEL_STATS)), dtype=accumulation_dtype(student.dtype, teacher.dtype),
                  device=student.device)
    for rows, z, s, t, kept in _shard_chunks(student, teacher, labels, opts):
        m_s, d_s, m_t, d_t, cross = (x[:, 0] for x in div.fold_row_statistics(s, t, opts))
        zero = torch.zeros_like(m_s)
        m_z, d_z, z_y = torch.full_like(m_s, float("-inf")), zero, zero
        if opts.hard_weight != 0:
            m_z = z.amax(-1)
            d_z = (z - div.finite(m_z)[:, None]).exp().sum(-1)
            local = labels[rows].long() - vocab_start
            owned = (local >= 0) & (local < W)
            z_y = torch.where(owned, z.gather(1, local.clamp(0, W - 1)[:, None])[:, 0], 0.0)
        columns = torch.stack([m_s, m_t, m_z, d_s, d_t, d_z, cross, z_y], 1)
        neutral = torch.zeros_like(columns[:1])
        neutral[:, : _STATS["d_s"]] = float("-inf")  # the maxima; the sums stay 0
        stats[rows] = torch.where(kept[:, None], columns, neutral)
    return stats


def _row_values(row, *names):
    return [row[:, _ROW[name], None] for name in names]


def row_scalars(student, teacher, labels, row, opts: KDOptions):
    """The shard's part of A1, A2 ``[N, 2]``, as ``fastkd.backends.triton.row_scalars``."""
    scalars = empty((student.shape[0], 2), dtype=row.dtype, device=student.device)
    for rows, z, s, t, kept in _shard_chunks(student, teacher, labels, opts):
        lse_s, lse_t, shift = _row_values(row[rows], "lse_s", "lse_t", "shift")
        a1, a2 = div.element_terms(s - lse_s, t - lse_t, s - t, shift, opts)
        scalars[rows] = torch.where(kept[:, None], torch.stack([a1.sum(-1), a2.sum(-1)], 1), 0.0)
    return scalars


def shard_finish(student, teacher, labels, row, grad_scale, opts: KDOptions, vocab_start, *, inplace=False,
                 need_grad=True):
    """The row losses and the shard's gradient, as ``fastkd.backends.triton.shard_finish``."""
    N, W = student.shape
    loss = empty(N, dtype=row.dtype, device=student.device)
    grad = gradient_buffer(student, inplace, need_grad)
    for rows, z, s, t, kept in _shard_chunks(student, teacher, labels, opts):
        r = row[rows]
        lse_s, lse_t, lse_z, shift, nan_row, A1, A2 = _row_values(
            r, "lse_s", "lse_t", "lse_z", "shift", "nan_row", "A1", "A2")
        if opts.has_cross_term:
            A1, A2 = div.cross_term_scalars(*_row_values(r, "cross", "d_s", "d_t"), shift, opts)
        row_loss = opts.soft_scale * div.divergence_value(A1, A2, opts) + nan_row
        if opts.hard_weight != 0:
            row_loss = row_loss + opts.hard_weight * (lse_z - _row_values(r, "z_y")[0])
        loss[rows] = torch.where(kept, row_loss[:, 0], 0.0)
        if grad is None:
            continue
        g = div.divergence_grad(s - lse_s, t - lse_t, s - t, shift, A1, A2, opts)
        g = g * (opts.soft_scale / opts.temperature) + nan_row
        if opts.hard_weight != 0:
            local = labels[rows].long() - vocab_start
            owned = ((local >= 0) & (local < W)).to(g.dtype)
            ce_grad = (z - lse_z).exp()
            ce_grad.scatter_add_(1, local.clamp(0, W - 1)[:, None], -owned[:, None])
            g = g + opts.hard_weight * ce_grad
        grad[rows] = torch.where(kept[:, None], g * grad_scale, 0.0)
    return loss, grad
