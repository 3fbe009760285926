"""Pure-PyTorch peer of ``fastkd.launch_vocab_parallel``: the same three shard functions, chunked
over rows like ``fastkd.torch_backend`` so the temporaries stay bounded whatever N is.

The math is the docstring of ``kernels/vocab_parallel.py`` written with whole-row tensor ops.
"""
import torch

from . import torch_backend
from .buffers import accumulation_dtype, empty, gradient_buffer
from .launch_vocab_parallel import ROW, STATS
from .options import KDOptions

_LSE_S, _LSE_T, _LSE_Z, _, _A1, _A2, _NAN_ROW = range(len(ROW))


def _zero_where_not(live, x):
    return torch.where(live, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _chunks(student, teacher, labels, opts):
    """(rows slice, z, s, t in the accumulation dtype, kept mask [rows]) for each chunk of rows."""
    N, W = student.shape
    acc = accumulation_dtype(student.dtype, teacher.dtype)
    step = torch_backend.chunk_rows(W, torch_backend.CHUNK_BYTES)
    for r0 in range(0, N, step):
        rows = slice(r0, min(N, r0 + step))
        z = student[rows].to(acc)
        t = teacher[rows].to(acc) / opts.temperature
        kept = (torch.ones(z.shape[0], dtype=torch.bool, device=z.device) if labels is None
                else labels[rows] != opts.ignore_index)
        yield rows, z, z / opts.temperature, t, kept


def _max_and_sum_exp(x):
    m = x.amax(-1)
    e = (x - torch.where(m == float("-inf"), 0.0, m)[:, None]).exp()
    return m, e


def partial_stats(student, teacher, labels, opts: KDOptions, vocab_start):
    """The shard's per-row STATS ``[N, 8]``, as ``fastkd.launch_vocab_parallel.partial_stats``."""
    N, W = student.shape
    acc = accumulation_dtype(student.dtype, teacher.dtype)
    stats = empty((N, len(STATS)), dtype=acc, device=student.device)
    for rows, z, s, t, kept in _chunks(student, teacher, labels, opts):
        m_s, e_s = _max_and_sum_exp(s)
        m_t, e_t = _max_and_sum_exp(t)
        zero = torch.zeros_like(m_s)
        cross = zero
        if opts.divergence == "kl":
            cross = _zero_where_not(e_t > 0, e_t * (t - s)).sum(-1)
        if opts.divergence == "reverse_kl":
            cross = _zero_where_not(e_s > 0, e_s * (s - t)).sum(-1)
        m_z, d_z, z_y = torch.full_like(m_s, float("-inf")), zero, zero
        if opts.hard_weight != 0:
            m_z, e_z = _max_and_sum_exp(z)
            d_z = e_z.sum(-1)
            local = labels[rows].long() - vocab_start
            owned = (local >= 0) & (local < W)
            z_y = _zero_where_not(owned, z.gather(1, local.clamp(0, W - 1)[:, None])[:, 0])
        columns = torch.stack([m_s, m_t, m_z, e_s.sum(-1), e_t.sum(-1), d_z, cross, z_y], 1)
        neutral = torch.zeros_like(columns[:1])
        neutral[:, :3] = float("-inf")  # the maxima; the sums stay 0
        stats[rows] = torch.where(kept[:, None], columns, neutral)
    return stats


def _row_scalar_terms(ls, lt, opts):
    """Per-element terms of A1, A2 (``kernels/vocab_parallel.row_scalar_terms``)."""
    q, p = ls.exp(), lt.exp()
    if opts.divergence == "tvd":
        return (p - q).abs(), q * torch.sign(p - q)
    mix, log_wp, log_wq = opts.mixture_weights()
    lm = torch.logaddexp(lt + log_wp, ls + log_wq)
    if opts.divergence == "jsd":
        return _zero_where_not(p > 0, p * (lt - lm)), _zero_where_not(q > 0, q * (ls - lm))
    if opts.divergence == "skew_kl":
        return _zero_where_not(p > 0, p * (lt - lm)), torch_backend.skew_kl_ratio(ls, lt, lm, p, mix)
    return _zero_where_not(q > 0, q * (ls - lm)), _zero_where_not(q > 0, (log_wq + 2 * ls - lm).exp())


def _divergence_grad(s, t, row, opts):
    """dD/ds per element (``kernels/vocab_parallel.divergence_grad``) given the rows' lse's, A1, A2."""
    ls, lt = _log_probs(s, t, row)
    q, p = ls.exp(), lt.exp()
    A1, A2 = row[:, _A1, None], row[:, _A2, None]
    name = opts.divergence
    if name == "kl":
        return q - p
    if name == "reverse_kl":
        return _zero_where_not(q > 0, q * ((s - t) - A1))
    if name == "tvd":
        return 0.5 * q * (A2 - torch.sign(p - q))
    mix, log_wp, log_wq = opts.mixture_weights()
    lm = torch.logaddexp(lt + log_wp, ls + log_wq)
    if name == "jsd":
        return (1 - mix) * _zero_where_not(q > 0, q * (ls - lm - A2))
    if name == "skew_kl":
        return (1 - mix) * (q * A2 - torch_backend.skew_kl_ratio(ls, lt, lm, p, mix))
    # a q / M as exp(log a + ls - lm): 0 at a = 0, not 0 * inf.
    return _zero_where_not(q > 0, q * (ls - lm - (log_wq + ls - lm).exp() - (A1 - A2)))


def _log_probs(s, t, row):
    return s - row[:, _LSE_S, None], t - row[:, _LSE_T, None]


def row_scalars(student, teacher, labels, row, opts: KDOptions):
    """The shard's part of A1, A2 ``[N, 2]``, as ``fastkd.launch_vocab_parallel.row_scalars``."""
    scalars = empty((student.shape[0], 2), dtype=row.dtype, device=student.device)
    for rows, z, s, t, kept in _chunks(student, teacher, labels, opts):
        a1, a2 = _row_scalar_terms(*_log_probs(s, t, row[rows]), opts)
        scalars[rows] = _zero_where_not(kept[:, None], torch.stack([a1.sum(-1), a2.sum(-1)], 1))
    return scalars


def shard_gradient(student, teacher, labels, row, opts: KDOptions, vocab_start, *, inplace=False):
    """The shard's gradient ``[N, W]``, as ``fastkd.launch_vocab_parallel.shard_gradient``."""
    W = student.shape[1]
    grad = gradient_buffer(student, inplace, True)
    for rows, z, s, t, kept in _chunks(student, teacher, labels, opts):
        r = row[rows]
        g = _divergence_grad(s, t, r, opts) * (opts.soft_scale / opts.temperature) + r[:, _NAN_ROW, None]
        if opts.hard_weight != 0:
            local = labels[rows].long() - vocab_start
            owned = ((local >= 0) & (local < W)).to(g.dtype)
            ce_grad = (z - r[:, _LSE_Z, None]).exp()
            ce_grad.scatter_add_(1, local.clamp(0, W - 1)[:, None], -owned[:, None])
            g = g + opts.hard_weight * ce_grad
        grad[rows] = _zero_where_not(kept[:, None], g)
    return grad
