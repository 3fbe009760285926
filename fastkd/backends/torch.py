"""The pure-PyTorch backend: every launcher of ``fastkd.backends.triton``, same name, signature and
results, on any device.

Each works through the rows in chunks of about CHUNK_BYTES per ``[rows, V]`` buffer of the
accumulation dtype. The buffers of a chunk (ten at most, ``Workspace``) are allocated once per
call and reused by every chunk, and the ops run in place in them, so the extra memory of forward +
backward is the ``[N, V]`` gradient plus a few chunks per thread, whatever N is. Losses and
gradients come from the closed forms of ``torch_divergences`` (the mirror of the kernels' table),
never from autograd; the gradient is computed in the forward, times ``grad_scale``. Rows with no
distribution (no finite log-sum-exp of s or of a teacher's t) or, with the hard CE, a label
outside [0, V) are NaN, loss and whole gradient row; ignored rows are 0.

Threads. On the CPU the chunks go to worker threads whose torch ops each run on one thread
(``for_each_chunk``, ``fastkd.backends.workers``), each with its own buffers.

CHUNK_BYTES: each op costs some microseconds of Python and dispatch besides its pass, and the
workers pay those holding the interpreter lock, so chunks are as large as the caches allow (the
measurements behind the sizes: docs/benchmarks.md, "Sizes of the torch backend"). The buffers stay
a few percent of the gradient. On a GPU chunks are GPU_CHUNK_FACTOR times larger.

Small calls. A call of one chunk and at most SMALL_ELEMENTS elements (a classifier's
distillation, a few rows) runs on the calling thread in fresh tensors, by fused ops
(``_small_kd_forward``): there each op costs its microseconds of Python and dispatch, not a pass
over memory, so the fewest ops win: the constants of a call's options are looked up once
(``_small_constants``); every side's log-probabilities by log_softmax (``_small_distributions``;
short rows take the softmax's steps as separate ops, the probabilities from the same exp, and up to
STACK_ELEMENTS stack the student, the teacher and the hard CE's student at T = 1 into one), then
one teacher's kl by the table's kl written out (about ten ops for value and gradient), the other
divergences by the table itself; the hard CE by one gather, its gradient by one add and one
scatter at the same label column; CPU labels, read on the host once (``buffers.host_label_range``),
that are all in [0, V) and none ignore_index need no row masks; a cached ``grad_scale``
(``buffers.constant``, its value known on the host) is folded into the gradient's other factors; a
mixture of teachers runs the chunk's code once.
"""
import functools
import math
import threading
from typing import NamedTuple, Optional

import torch

from ..buffers import accumulation_dtype, constant, constant_value, empty, gradient_buffer, host_label_range
from ..options import KDOptions, as_teachers
from . import VOCAB_PARALLEL_ROW, VOCAB_PARALLEL_STATS
from . import torch_divergences as div
from . import workers

# Of one [rows, V] buffer of float32 (float64 buffers hold as many rows, twice the bytes).
CHUNK_BYTES = 2 * 2**20
# Chunks on a GPU are this many times larger (8 MiB, the size before the CPU's was measured): there
# every op is a kernel launch, and the CPU's cache sizes do not apply. Not measured on a GPU.
GPU_CHUNK_FACTOR = 4


# Small calls (module docstring): one chunk of at most this many elements (N * V), where the fused
# ops measured faster than the chunk loop (docs/benchmarks.md, "Sizes of the torch backend").
SMALL_ELEMENTS = 2**18


def chunks(N, V, chunk_bytes=None, device=None):
    """Row ranges ``(r0, r1)`` of about ``chunk_bytes`` of float32 ``[rows, V]`` each (by default
    CHUNK_BYTES, times GPU_CHUNK_FACTOR off the CPU)."""
    if chunk_bytes is None:
        on_cpu = device is None or (device if isinstance(device, torch.device) else torch.device(device)).type == "cpu"
        chunk_bytes = CHUNK_BYTES * (1 if on_cpu else GPU_CHUNK_FACTOR)
    step = max(1, chunk_bytes // (4 * max(V, 1)))
    return [(r0, min(N, r0 + step)) for r0 in range(0, N, step)]


class Workspace:
    """The ``[rows, V]`` buffers of one chunk loop (of one worker), reused by every chunk. ``take()``
    hands out a free one (allocated on first use, so a loop holds only as many as its divergence
    needs at once), ``give_back`` frees it again, and ``next_chunk(rows)`` frees all, viewed at
    that chunk's rows. Fresh megabytes for every op would cost page faults and cache misses."""

    def __init__(self, ranges, V, dtype, device):
        self.shape = (max((r1 - r0 for r0, r1 in ranges), default=0), V)
        self.dtype, self.device = dtype, device
        self.buffers, self.free, self.rows = [], [], 0
        self.index = {}  # data_ptr of a buffer -> its position in buffers
        self.views = {}  # position -> the buffer's view at self.rows

    def next_chunk(self, rows):
        if rows != self.rows:
            self.rows, self.views = rows, {}
        self.free = list(range(len(self.buffers)))

    def take(self):
        if not self.free:
            buffer = empty(self.shape, dtype=self.dtype, device=self.device)
            self.index[buffer.data_ptr()] = len(self.buffers)
            self.buffers.append(buffer)
            self.free.append(len(self.buffers) - 1)
        i = self.free.pop()
        if i not in self.views:
            self.views[i] = self.buffers[i][: self.rows]
        return self.views[i]

    def give_back(self, *views):
        self.free.extend(self.index[view.data_ptr()] for view in views)


class FreshBuffers:
    """A stand-in for ``Workspace`` that allocates every buffer like ``template`` (small tensors)."""

    def __init__(self, template):
        self.template, self.dtype = template, template.dtype

    def take(self):
        return torch.empty_like(self.template)

    def give_back(self, *views):
        pass


# ----------------------------------------------------------------------------------- the chunk loop


def for_each_chunk(ranges, V, dtype, device, body):
    """``body(r0, r1, work)`` for every row range of ``ranges``, with ``work`` a Workspace of ``dtype``
    viewed at its rows. Where ``fastkd.backends.workers`` serves (the CPU, torch built with
    OpenMP, more than one intra-op thread) and there is more than one chunk, the chunks go, one at
    a time as each finishes the last, to its workers, each with its own Workspace; elsewhere the
    calling thread runs them in order. ``body`` writes disjoint rows of its outputs, so the
    results are the same either way."""
    count = workers.count(device)
    if count == 1 or len(ranges) <= 1:
        work = Workspace(ranges, V, dtype, device)
        for r0, r1 in ranges:
            work.next_chunk(r1 - r0)
            body(r0, r1, work)
        return
    todo, lock = iter(ranges), threading.Lock()

    def worker():
        work = Workspace(ranges, V, dtype, device)
        while True:
            with lock:
                rows = next(todo, None)
            if rows is None:
                return
            work.next_chunk(rows[1] - rows[0])
            body(*rows, work)

    workers.run(worker, min(count, len(ranges)))


# --------------------------------------------------------------------------------------- helpers


def _scaled(x, temperature, out):
    """``x / temperature`` in ``out``'s dtype (the accumulation dtype), into ``out``."""
    if x.dtype == out.dtype:
        return torch.div(x, temperature, out=out)
    return out.copy_(x).div_(temperature)


def _label_column(index):
    """Labels ``[rows]`` in [0, V) as the int64 column ``[rows, 1]`` that gather and scatter take
    (``long()`` only where they are not int64: it would cost a dispatch)."""
    return (index if index.dtype == torch.int64 else index.long()).unsqueeze(1)


def _hard_ce(log_q, labels, need_grad):
    """Cross-entropy per row ``[rows]`` from the student's log-probabilities at T = 1, ``log_q``,
    its gradient q - one-hot (written over ``log_q``; None without ``need_grad``), and whether each
    label is in [0, V) (a row with another label computes on a stand-in column; the caller makes it
    NaN)."""
    index = labels.clamp(0, log_q.shape[-1] - 1)
    in_range = index == labels
    column = _label_column(index)
    ce = log_q.gather(1, column).neg_()[:, 0]
    return ce, _sub_one_hot(log_q.exp_(), column, 1.0) if need_grad else None, in_range


def _sub_one_hot(g, column, weight):
    """``g`` ``[rows, V]`` minus ``weight`` at each row's label (``column``, ``_label_column``), in
    place: the cross-entropy gradient's one-hot part."""
    return g.scatter_(1, column, -weight, reduce="add")


def _labels_all_kept(labels, V, ignore_index):
    """True when the CPU ``labels`` (read on the host: no synchronisation) all lie in [0, V) and
    none can be ``ignore_index``: then a small call needs no row masks. False elsewhere."""
    if not labels.is_cpu or labels.numel() == 0 or torch.compiler.is_compiling():
        return False
    low, high = host_label_range(labels)
    return 0 <= low and high < V and not low <= ignore_index <= high


def _zero_rows(g, rows):
    """``g[rows] = 0`` for a bool mask ``rows``: on a GPU by masked_fill_; on the CPU, where
    masked_fill_ costs some thirty passes of a copy, by index_fill_ at the mask's nonzero rows (host
    memory: no synchronisation)."""
    if g.is_cpu:
        g.index_fill_(0, rows.nonzero()[:, 0], 0.0)
    else:
        g.masked_fill_(rows[:, None], 0.0)


def _grad_out(grad, r0, r1, work):
    """Where a chunk's gradient is computed: in place in ``grad`` when it has the accumulation dtype."""
    return grad[r0:r1] if grad.dtype == work.dtype else work.take()


def _finish_rows(loss, grad, r0, r1, row_loss, g, defined, labels, ignore_index):
    """Write one chunk's row losses (NaN where undefined) and gradient rows (already NaN there), 0
    where ignored; ``g`` is ``grad[r0:r1]`` itself (``_grad_out``) or a tensor to copy into it."""
    row_loss = torch.where(defined, row_loss, float("nan"))
    if labels is not None:
        ignored = labels[r0:r1] == ignore_index
        row_loss = torch.where(ignored, 0.0, row_loss)
        if g is not None:
            _zero_rows(g, ignored)
    loss[r0:r1] = row_loss
    if g is not None and g.data_ptr() != grad[r0:r1].data_ptr():  # not computed in place
        grad[r0:r1] = g


def _row_factor(scale, defined):
    """``scale`` ``[1]`` per row ``[rows, 1]``, NaN for the undefined rows."""
    return torch.where(defined[:, None], scale, float("nan"))


# ---------------------------------------------------------------------------------------------- dense


def _one_teacher_elements(s, t, opts, work):
    """The chunk's Elements of one teacher (s and t change in place: see fold_row_statistics), the
    rows with both distributions, and the row scalars (A1, A2) where the first pass gives them
    (kl, reverse_kl: from the cross term), else None."""
    x = div.Elements(opts, work, s_minus_t=lambda: torch.sub(s, t, out=work.take()))
    m_s, d_s, m_t, d_t, cross = div.fold_row_statistics(s, t, x, opts)
    x.shift = div.log_ratio_shift(d_s, d_t)
    defined = torch.isfinite(m_s + d_s.log())[:, 0] & torch.isfinite(m_t + d_t.log())[:, 0]
    scalars = div.cross_term_scalars(cross, d_s, d_t, x.shift, opts) if opts.has_cross_term else None
    return x, defined, scalars


# torch's CPU log_softmax runs a row shorter than its vector width (16 floats with AVX-512) element
# by element, several times slower than the same steps as separate ops (docs/benchmarks.md, "Sizes
# of the torch backend"): for such rows, past a few, a small call takes its steps as separate ops.
SHORT_ROW = 16
FEW_ROWS = 32


# Small calls of short rows and at most this many elements (N * V) stack their sides for one
# log-softmax: there an op's dispatch (a microsecond or two) costs more than the stack's copy; at
# N = 4096, V = 10 the copy cost some 5 %. Longer rows take torch's log_softmax per side, which
# measured faster than the stack (4 x 8: 6.9 us against 8.5 us).
STACK_ELEMENTS = 2**12


def _short_rows(x):
    """Whether ``x`` ``[N, V]`` has many short CPU rows (SHORT_ROW, FEW_ROWS)."""
    N, V = x.shape
    return V < SHORT_ROW and N > FEW_ROWS and x.is_cpu


class _SmallConstants(NamedTuple):
    """The cached operands of a small call (``_small_constants``): tensors of the accumulation dtype."""
    # The sides: the student, the teacher, and with the hard CE at T != 1 the student at T = 1.
    side_temperatures: tuple  # per side a 0-d tensor, None at 1
    stacked_temperatures: Optional[torch.Tensor]  # [sides, 1, 1], None when every side is at 1
    soft_scale: Optional[torch.Tensor]  # 0-d, None at 1
    soft_grad_factor: torch.Tensor  # 0-d: soft_grad_scale times the folded grad_scale
    hard_grad_factor: float  # hard_weight times the folded grad_scale


@functools.lru_cache(maxsize=64)
def _small_constants(opts, dtype, device, has_ce, folded_scale):
    """A small call's constants (``_SmallConstants``), looked up once per call; ``folded_scale``: the
    grad_scale folded into the gradient's factors (its host value, or 1 when it is not known)."""
    temperatures = (opts.temperature, opts.teacher_T) + ((1.0,) if has_ce and opts.temperature != 1 else ())

    def operand(value, shape=()):
        return None if value == 1 else constant(value, dtype=dtype, device=device, shape=shape)

    stacked = any(T != 1 for T in temperatures)
    return _SmallConstants(tuple(map(operand, temperatures)),
                           constant(temperatures, dtype=dtype, device=device, shape=(-1, 1, 1)) if stacked else None,
                           operand(opts.soft_scale),
                           constant(opts.soft_grad_scale * folded_scale, dtype=dtype, device=device),
                           opts.hard_weight * folded_scale)


def _softmax_steps(z):
    """(log_softmax(z), softmax(z)) over the last dim as separate ops, ``z`` (fresh) overwritten by
    the first. A row with a NaN or +inf, or entirely -inf, is all NaN, as in torch's."""
    z.sub_(z.amax(-1, keepdim=True))
    e = z.exp()
    d = e.sum(-1, keepdim=True)
    return z.sub_(d.log()), e.div_(d)


def _small_distributions(sides, c, acc):
    """(log-probabilities, probabilities or None) of each side of a small call (``c``: its
    ``_SmallConstants``), ``[N, V]`` in ``acc``, fresh. Short rows (``_short_rows``) take their
    softmax as separate ops (``_softmax_steps``), the sides stacked up to STACK_ELEMENTS; other
    rows take torch's log_softmax per side."""
    short = _short_rows(sides[0])
    if short and sides[0].numel() <= STACK_ELEMENTS:
        z = torch.stack(sides)
        z = z if z.dtype == acc else z.to(acc)
        logs, probs = _softmax_steps(z if c.stacked_temperatures is None else z.div_(c.stacked_temperatures))
        return logs.unbind(0), probs.unbind(0)
    logs, probs = [], []
    for x, T in zip(sides, c.side_temperatures):
        x = x if x.dtype == acc else x.to(acc)
        if short:
            log_p, p = _softmax_steps(x.clone() if T is None else torch.div(x, T))
            logs.append(log_p)
            probs.append(p)
        else:
            logs.append(torch.log_softmax(x if T is None else torch.div(x, T), -1))
    return logs, probs or None


def _small_kd_forward(student, teacher, labels, grad_scale, opts, acc, inplace, need_grad):
    """``kd_forward`` of a small call with one teacher: the whole ``[N, V]`` at once by fused ops in
    fresh tensors (module docstring: Small calls), on the log-probabilities ls, lt; with ``inplace``
    the gradient is written into ``student`` last, after every read of it."""
    V = student.shape[-1]
    has_ce = labels is not None and opts.hard_weight != 0
    host_scale = constant_value(grad_scale)
    c = _small_constants(opts, acc, student.device, has_ce, 1.0 if host_scale is None else host_scale)
    logs, probs = _small_distributions((student, teacher, student)[:len(c.side_temperatures)], c, acc)
    ls, lt = logs[0], logs[1]
    log_q = logs[2] if len(logs) == 3 else ls  # the student at T = 1 (read by the hard CE only)
    q, p = (ls.exp(), lt.exp()) if probs is None else probs[:2]
    # The rows that have both distributions (a row without has NaN log-probabilities) and a label,
    # where the formulas do not keep a row's NaNs by themselves (the table's masked products clear them).
    defined = None
    if opts.divergence == "kl":
        # The table's kl written out: dD/ds = q - p, NaN exactly in the rows without both
        # distributions; D = sum p (lt - ls) without the NaNs of 0 * inf (p = 0), plus 0 times
        # q - p, which makes those rows NaN again (fewer ops than torch.where or a mask).
        dD = torch.sub(q, p)
        D = torch.sub(lt, ls).mul_(p).nansum(-1).add_(dD[:, 0], alpha=0)
    else:
        defined = ~torch.isnan(ls[:, 0] + lt[:, 0])
        fresh = FreshBuffers(ls)
        x = div.Elements(opts, fresh, ls=ls, lt=lt, q=q, p=p, s_minus_t=lambda: ls - lt)
        a1, a2 = div.element_terms(x, opts, fresh.take(), fresh.take())
        A1, A2 = a1.sum(-1, keepdim=True), a2.sum(-1, keepdim=True)
        D = div.divergence_value(A1, A2, opts)[:, 0]
        dD = div.divergence_grad(x, A1, A2, opts, fresh.take()) if need_grad else None
    row_loss = D if c.soft_scale is None else D.mul_(c.soft_scale)
    # Labels read on the host (CPU) that are all kept and in range need no row masks.
    masked = labels is not None and not _labels_all_kept(labels, V, opts.ignore_index)
    column = _label_column(labels.clamp(0, V - 1) if masked else labels) if has_ce else None
    if has_ce and not masked:
        row_loss = row_loss.sub_(log_q.gather(1, column).view(-1), alpha=opts.hard_weight)
    elif has_ce:
        ce, _, in_range = _hard_ce(log_q, labels, False)
        row_loss = row_loss.add_(ce, alpha=opts.hard_weight)
        defined = in_range if defined is None else defined & in_range
    if defined is not None:
        row_loss = torch.where(defined, row_loss, float("nan"))
    ignored = labels == opts.ignore_index if masked else None
    if ignored is not None:
        row_loss.masked_fill_(ignored, 0.0)
    if not need_grad:
        return row_loss, None
    # The gradient: (soft_grad_scale dD + hard_weight (q - onehot)) * grad_scale, the last factor
    # folded into the others where it is a cached constant (its value known on the host).
    g = dD.mul_(c.soft_grad_factor)
    if has_ce:
        q1 = q if log_q is ls else (log_q.exp() if probs is None else probs[2])
        _sub_one_hot(g.add_(q1, alpha=c.hard_grad_factor), column, c.hard_grad_factor)
    if host_scale is None or defined is not None:
        scale = constant(1.0, dtype=acc, device=g.device) if host_scale is not None else grad_scale.to(acc)
        g.mul_(scale if defined is None else _row_factor(scale, defined))
    if ignored is not None:
        _zero_rows(g, ignored)
    if inplace:
        return row_loss, student.copy_(g)
    return row_loss, g if g.dtype == student.dtype else g.to(student.dtype)


def _mixture_elements(s, teachers, r0, r1, opts, work):
    """The chunk's Elements for a mixture of teachers (lt of the mixture, p = exp(lt),
    s_minus_t = ls - lt, shift 0, as the kernel) and the rows with every teacher's distribution."""
    m_s = s.amax(-1, keepdim=True)
    e_s = torch.sub(s, div.finite(m_s), out=work.take()).exp_()
    d_s = e_s.sum(-1, keepdim=True)
    ls = s.sub_(m_s).sub_(d_s.log())
    lts, defined = [], torch.isfinite(m_s + d_s.log())[:, 0]
    for teacher in teachers:
        t = _scaled(teacher[r0:r1], opts.teacher_T, work.take())
        lts.append(torch.log_softmax(t, -1, out=work.take()))  # (t - max) - log d, as the kernel (log_prob)
        work.give_back(t)
        defined = defined & ~torch.isnan(lts[-1][:, 0])  # a row without a distribution is all NaN
    lt = div.mixture_log_prob(lts, opts.log_teacher_weights, work)
    x = div.Elements(opts, work, torch.zeros_like(m_s), ls=ls, lt=lt, q=lambda: e_s.mul_(d_s.reciprocal()),
                     s_minus_t=lambda: torch.sub(ls, lt, out=work.take()))
    return x, defined, None


def kd_forward(student, teachers, labels, grad_scale, opts: KDOptions, *, inplace=False, need_grad=True,
               chunk_bytes=None):
    """Per-row loss ``[N]`` and student gradient ``[N, V]``, as ``fastkd.backends.triton.kd_forward``."""
    teachers = as_teachers(teachers)
    N, V = student.shape
    acc = accumulation_dtype(student.dtype, *[t.dtype for t in teachers])
    # A call within SMALL_ELEMENTS is one chunk of the default size.
    one_chunk_call = chunk_bytes is None and 0 < N * V <= SMALL_ELEMENTS
    ranges = [(0, N)] if one_chunk_call else chunks(N, V, chunk_bytes, student.device)
    small = len(ranges) == 1 and N * V <= SMALL_ELEMENTS
    if small and len(teachers) == 1:
        return _small_kd_forward(student, teachers[0], labels, grad_scale, opts, acc, inplace, need_grad)
    grad = gradient_buffer(student, inplace, need_grad)
    loss = empty(N, dtype=acc, device=student.device)
    soft_grad_scale = grad_scale.to(acc) * opts.soft_grad_scale
    has_ce = labels is not None and opts.hard_weight != 0

    def one_chunk(r0, r1, work):
        ce = None
        if has_ce:  # read before the gradient, which may overwrite the student (inplace)
            log_q = torch.log_softmax(student[r0:r1].to(acc), -1, out=work.take())
            ce, ce_grad, in_range = _hard_ce(log_q, labels[r0:r1], grad is not None)
        s = _scaled(student[r0:r1], opts.temperature, work.take())
        if len(teachers) == 1:
            t = _scaled(teachers[0][r0:r1], opts.teacher_T, work.take())
            x, defined, scalars = _one_teacher_elements(s, t, opts, work)
        else:
            x, defined, scalars = _mixture_elements(s, teachers, r0, r1, opts, work)
        if scalars is not None:
            A1, A2 = scalars
        else:
            a1, a2 = div.element_terms(x, opts, work.take(), work.take())
            A1, A2 = a1.sum(-1, keepdim=True), a2.sum(-1, keepdim=True)
            work.give_back(a1, a2)
        row_loss = opts.soft_scale * div.divergence_value(A1, A2, opts)[:, 0]
        if ce is not None:
            row_loss = row_loss + opts.hard_weight * ce
            defined = defined & in_range
        g = None
        if grad is not None:
            g = div.divergence_grad(x, A1, A2, opts, _grad_out(grad, r0, r1, work),
                                    scale=_row_factor(soft_grad_scale, defined))
            if ce is not None:
                g.add_(ce_grad.mul_(grad_scale.to(acc) * opts.hard_weight))
        _finish_rows(loss, grad, r0, r1, row_loss, g, defined, labels, opts.ignore_index)

    if small:  # a mixture of teachers: one chunk, on this thread, in fresh tensors
        one_chunk(0, N, FreshBuffers(empty((N, V), dtype=acc, device=student.device)))
    else:
        for_each_chunk(ranges, V, acc, student.device, one_chunk)
    return loss, grad


def scale_rows(grad, scale, *, out=None):
    """``grad * scale`` row by row (``scale``: one value per row, or one value, any shape);
    ``out=grad`` scales in place, and a large gradient is left as it is for a scale of 1 held in
    host memory (reading it there is free; for a small one the read costs more than the multiply)."""
    # A 0-d factor of the gradient's dtype needs no view (one of another dtype would not promote).
    factor = scale if scale.dim() == 0 and scale.dtype == grad.dtype else scale.reshape(-1, 1)
    if out is grad:
        if grad.numel() > SMALL_ELEMENTS and factor.numel() == 1 and factor.is_cpu and float(factor) == 1:
            return grad
        return grad.mul_(factor)
    return (grad * factor).to(grad.dtype)


# -------------------------------------------------------------------------------------------- softmax


def softmax(x, temperature, dim, *, log):
    """Tempered (log-)softmax with float32 statistics, differentiated by autograd."""
    acc = accumulation_dtype(x.dtype)
    fn = torch.log_softmax if log else torch.softmax
    return fn(x.to(acc) / temperature, dim=dim).to(x.dtype)


# ---------------------------------------------------------------------------------------------- top-k


def teacher_topk(logits, k, temperature, *, chunk_bytes=None):
    """As ``fastkd.backends.triton.teacher_topk``, with ``torch.topk`` (whose order among equal
    values is not specified): (t - m) - log sum exp(t - m), t = logits / T and m its row maximum,
    the first of the top-k values (the kernel's formula, kernels/topk.py); the sum in place in the
    chunk's buffer, three passes (``logsumexp`` would find the maximum again)."""
    N, V = logits.shape
    acc = accumulation_dtype(logits.dtype)
    logprobs = empty((N, k), dtype=acc, device=logits.device)
    indices = empty((N, k), dtype=torch.int32, device=logits.device)

    def one_chunk(r0, r1, work):
        t = _scaled(logits[r0:r1], temperature, work.take())
        values, columns = t.topk(k, dim=-1, largest=True, sorted=True)
        m = values[:, :1]
        logprobs[r0:r1] = (values - m) - t.sub_(m).exp_().sum(-1, keepdim=True).log_()
        indices[r0:r1] = columns

    for_each_chunk(chunks(N, V, chunk_bytes, logits.device), V, acc, logits.device, one_chunk)
    return logprobs, indices


def uld_topk_gradient(student, z_max, log_d, coef, temperature, *, out=None, chunk_bytes=None):
    """As ``fastkd.backends.triton.uld_topk_gradient``: each chunk's exp(s - m) * (coef / d),
    m = z_max / T as s = z / T is scaled (never exp(s - lse), which rounds at |lse|; four passes,
    as that took), computed in the gradient's own rows where it has the accumulation dtype."""
    N, V = student.shape
    out = empty((N, V), dtype=student.dtype, device=student.device) if out is None else out
    m, factor = z_max / temperature, coef * torch.exp(-log_d)

    def one_chunk(r0, r1, work):
        g = _grad_out(out, r0, r1, work)
        _scaled(student[r0:r1], temperature, g).sub_(m[r0:r1, None]).exp_().mul_(factor[r0:r1, None])
        _zero_rows(g, coef[r0:r1] == 0)
        if g.data_ptr() != out[r0:r1].data_ptr():
            out[r0:r1] = g

    for_each_chunk(chunks(N, V, chunk_bytes, student.device), V, log_d.dtype, student.device, one_chunk)
    return out


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, -inf for x >= 0 (the teacher's tail mass when x = lse(lt))."""
    value = torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
    return torch.where(x >= 0, torch.full_like(x, float("-inf")), value)


def _point_terms(lp, lq, opts):
    """(term_b, h_b, g_b) per point, as the top-k kernel's point_terms."""
    work = FreshBuffers(lq)
    points = div.Elements(opts, work, ls=lq, lt=lp, s_minus_t=lq - lp)
    a1, a2 = div.element_terms(points, opts, work.take(), work.take())
    h, g = div.point_grad(lp, lq, opts)
    return div.divergence_value(a1, a2, opts), h, g


# A top-k chunk costs some sixty small ops on its rows' k listed columns (about 0.2 ms on a CPU,
# whatever V), beside its few passes over [rows, V], which it takes in the gradient's own rows (a
# float32 student without the hard CE needs no workspace buffer): its chunks are this many times
# larger on the CPU (the measurements: docs/benchmarks.md, "Sizes of the torch backend").
TOPK_CHUNK_FACTOR = 8


def topk_kd_forward(student, teacher_logprobs, teacher_indices, labels, grad_scale, opts: KDOptions, tail, *,
                    inplace=False, need_grad=True, chunk_bytes=None):
    """Per-row loss ``[N]`` and student gradient ``[N, V]``, as
    ``fastkd.backends.triton.topk_kd_forward``. The student's tail bucket is summed directly over
    the unlisted columns (their q, the listed ones zeroed by a scatter), where the kernel, which
    never builds such a row, uses the cancellation-free formula of its docstring. A row with an
    index outside [0, V) is NaN; repeated indices must not occur (the caller sees to it).

    A chunk works in one ``[rows, V]`` buffer, the gradient's own rows where it has the
    accumulation dtype (no workspace buffer then): s, then e = e^(s - m), then e at the unlisted
    columns (d is that sum plus the listed e, read off the gathered s), then the gradient, scaled
    once by a per-row factor. Six passes over V: the scaled copy, max, subtraction, exp, sum and
    scale; everything else works on the k listed columns."""
    N, V = student.shape
    K = teacher_logprobs.shape[1]
    acc = accumulation_dtype(student.dtype, teacher_logprobs.dtype)
    loss = empty(N, dtype=acc, device=student.device)
    grad = gradient_buffer(student, inplace, need_grad)
    T, neg_inf = opts.temperature, float("-inf")
    big = torch.finfo(acc).max
    has_ce = labels is not None and opts.hard_weight != 0

    def one_chunk(r0, r1, work):
        index = teacher_indices[r0:r1].long()
        # Rows with an index outside [0, V) (NaN, as in the kernel) and ignored rows (which may
        # hold anything) compute on valid stand-in indices.
        defined = ((index >= 0) & (index < V)).all(-1)
        index = torch.where(defined[:, None], index, torch.arange(K, device=index.device).expand_as(index))
        lt = teacher_logprobs[r0:r1].to(acc)
        row_loss = torch.zeros(r1 - r0, dtype=acc, device=student.device)
        ce_grad = None
        if has_ce:  # read before the gradient, which may overwrite the student (inplace)
            log_q = torch.log_softmax(student[r0:r1].to(acc), -1, out=work.take())
            ce, ce_grad, in_range = _hard_ce(log_q, labels[r0:r1], grad is not None)
            defined = defined & in_range
            row_loss += opts.hard_weight * ce

        # One [rows, V] buffer, the gradient's rows where it has the accumulation dtype: s, then
        # e = e^(s - m), then e at the unlisted columns only, then the gradient.
        e = _scaled(student[r0:r1], T, work.take() if grad is None else _grad_out(grad, r0, r1, work))
        s_listed = e.gather(1, index)
        m = div.finite(e.amax(-1, keepdim=True))
        e.sub_(m).exp_()
        e.scatter_(1, index, 0.0)
        d_tail = e.sum(-1, keepdim=True)  # the unlisted columns' part of d = sum e^(s - m)
        d = d_tail + (s_listed - m).exp().sum(-1, keepdim=True)
        log_d = d.log()
        defined = defined & torch.isfinite(m + log_d)[:, 0]
        lq = (s_listed - m).sub_(log_d)  # not s - (m + log d), which rounds at |m| (row_stats.log_prob)
        lp = torch.log_softmax(lt, -1) if tail == "renormalize" else lt
        term, h, _ = _point_terms(lp, lq, opts)
        D, S = term.sum(-1), h.sum(-1)
        c_tail = -S
        if tail == "bucket":
            if K < V:
                lp_tail, lq_tail = log1mexp(lt.logsumexp(-1)), (d_tail.log() - d.log())[:, 0]
            else:
                lp_tail = lq_tail = torch.full_like(D, neg_inf)
            tail_term, tail_h, tail_g = _point_terms(lp_tail, lq_tail, opts)
            D, S = D + tail_term, S + tail_h
            c_tail = torch.where(lq_tail > neg_inf, tail_g, torch.zeros_like(tail_g)) - S
        row_loss += opts.soft_scale * D

        g = None
        if grad is not None:
            # Per row [rows, 1], NaN for the undefined rows, folded into one scaling of the chunk.
            scale = _row_factor(grad_scale.to(acc), defined)
            soft_grad_scale = scale * opts.soft_grad_scale
            # Unlisted column j: q_j (g_tail - S) = e_j (g_tail - S) / d; a finite factor keeps 0 * inf out.
            g = e.mul_(soft_grad_scale * c_tail.clamp(-big, big)[:, None] / d)
            listed_q = lq.exp()
            g.scatter_(1, index, soft_grad_scale * (h - torch.where(listed_q > 0, listed_q * S[:, None], 0.0)))
            if ce_grad is not None:
                g.addcmul_(ce_grad, scale, value=opts.hard_weight)
        _finish_rows(loss, grad, r0, r1, row_loss, g, defined, labels, opts.ignore_index)

    if chunk_bytes is None and student.is_cpu:
        chunk_bytes = TOPK_CHUNK_FACTOR * CHUNK_BYTES
    for_each_chunk(chunks(N, V, chunk_bytes, student.device), V, acc, student.device, one_chunk)
    return loss, grad


# ----------------------------------------------------------------------- vocabulary-parallel shards

_STATS = {name: i for i, name in enumerate(VOCAB_PARALLEL_STATS)}
_ROW = {name: i for i, name in enumerate(VOCAB_PARALLEL_ROW)}


def _for_each_shard_chunk(student, teacher, labels, opts, body):
    """``body(rows, s, t, kept, work)`` for each chunk of rows: a slice, s and t in buffers of the
    Workspace ``work``, and the rows' kept mask ``[rows]``."""
    N, W = student.shape

    def one_chunk(r0, r1, work):
        rows = slice(r0, r1)
        kept = (torch.ones(r1 - r0, dtype=torch.bool, device=student.device) if labels is None
                else labels[rows] != opts.ignore_index)
        s = _scaled(student[rows], opts.temperature, work.take())
        body(rows, s, _scaled(teacher[rows], opts.teacher_T, work.take()), kept, work)

    ranges = chunks(N, W, device=student.device)
    for_each_chunk(ranges, W, accumulation_dtype(student.dtype, teacher.dtype), student.device, one_chunk)


def _shard_elements(s, t, m_s, d_s, m_t, d_t, opts, work):
    """The chunk's Elements from the row's maxima and sums of exps, as the kernels: s and t centred
    on the maxima (in place), ls = (s - m_s) - log d_s and lt likewise (never s - lse(s), which
    rounds at |m_s|), q = exp(ls), p = exp(lt), s_minus_t = (s - m_s) - (t - m_t) with the shift
    log(d_s / d_t)."""
    s, t = s.sub_(m_s), t.sub_(m_t)
    return div.Elements(opts, work, div.log_ratio_shift(d_s, d_t),
                        ls=lambda: torch.sub(s, d_s.log(), out=work.take()),
                        lt=lambda: torch.sub(t, d_t.log(), out=work.take()),
                        s_minus_t=lambda: torch.sub(s, t, out=work.take()))


def partial_stats(student, teacher, labels, opts: KDOptions, vocab_start):
    """The shard's per-row statistics, as ``fastkd.backends.triton.partial_stats``."""
    N, W = student.shape
    stats = empty((N, len(VOCAB_PARALLEL_STATS)), dtype=accumulation_dtype(student.dtype, teacher.dtype),
                  device=student.device)
    if W == 0:  # a rank with no columns: every row's statistics neutral (maxima -inf, sums 0), as the kernel's
        stats.zero_()[:, : _STATS["d_s"]] = float("-inf")
        return stats

    def body(rows, s, t, kept, work):
        x = div.Elements(opts, work, s_minus_t=lambda: torch.sub(s, t, out=work.take()))
        m_s, d_s, m_t, d_t, cross = (v[:, 0] for v in div.fold_row_statistics(s, t, x, opts))
        zero = torch.zeros_like(m_s)
        m_z, d_z, z_y = torch.full_like(m_s, float("-inf")), zero, zero
        if opts.hard_weight != 0:
            z = student[rows].to(s.dtype)
            m_z = z.amax(-1)
            d_z = (z - div.finite(m_z)[:, None]).exp().sum(-1)
            local = labels[rows].long() - vocab_start
            owned = (local >= 0) & (local < W)
            z_y = torch.where(owned, z.gather(1, local.clamp(0, W - 1)[:, None])[:, 0], 0.0)
        columns = torch.stack([m_s, m_t, m_z, d_s, d_t, d_z, cross, z_y], 1)
        neutral = torch.zeros_like(columns[:1])
        neutral[:, : _STATS["d_s"]] = float("-inf")  # the maxima; the sums stay 0
        stats[rows] = torch.where(kept[:, None], columns, neutral)

    _for_each_shard_chunk(student, teacher, labels, opts, body)
    return stats


def _row_values(row, *names):
    return [row[:, _ROW[name], None] for name in names]


def row_scalars(student, teacher, labels, row, opts: KDOptions):
    """The shard's part of A1, A2 ``[N, 2]``, as ``fastkd.backends.triton.row_scalars``."""
    scalars = empty((student.shape[0], 2), dtype=row.dtype, device=student.device)

    def body(rows, s, t, kept, work):
        x = _shard_elements(s, t, *_row_values(row[rows], "m_s", "d_s", "m_t", "d_t"), opts, work)
        a1, a2 = div.element_terms(x, opts, work.take(), work.take())
        scalars[rows] = torch.where(kept[:, None], torch.stack([a1.sum(-1), a2.sum(-1)], 1), 0.0)

    _for_each_shard_chunk(student, teacher, labels, opts, body)
    return scalars


def shard_finish(student, teacher, labels, row, grad_scale, opts: KDOptions, vocab_start, *, inplace=False,
                 need_grad=True):
    """The row losses and the shard's gradient, as ``fastkd.backends.triton.shard_finish``."""
    N, W = student.shape
    loss = empty(N, dtype=row.dtype, device=student.device)
    grad = gradient_buffer(student, inplace, need_grad)
    soft_grad_scale = grad_scale.to(row.dtype) * opts.soft_grad_scale

    def body(rows, s, t, kept, work):
        r = row[rows]
        m_s, d_s, m_t, d_t, m_z, d_z, nan_row, A1, A2 = _row_values(
            r, "m_s", "d_s", "m_t", "d_t", "m_z", "d_z", "nan_row", "A1", "A2")
        # A1, A2 are exchanged where the gradient or the loss reads them (distributed.forward_steps); the
        # loss of kl and reverse_kl comes from their cross term, centred on the maxima (no cancellation).
        value_scalars = A1, A2
        if opts.has_cross_term:
            (cross,) = _row_values(r, "cross")
            value_scalars = div.cross_term_scalars(cross, d_s, d_t, div.log_ratio_shift(d_s, d_t), opts)
        row_loss = opts.soft_scale * div.divergence_value(*value_scalars, opts) + nan_row
        if opts.hard_weight != 0:
            row_loss = row_loss + opts.hard_weight * ((m_z - _row_values(r, "z_y")[0]) + d_z.log())  # -log q(y)
        loss[rows] = torch.where(kept, row_loss[:, 0], 0.0)
        if grad is None:
            return
        ce_grad = None
        if opts.hard_weight != 0:  # read before the gradient, which may overwrite the student (inplace)
            local = labels[rows].long() - vocab_start
            owned = ((local >= 0) & (local < W)).to(s.dtype)
            # softmax(z) - onehot(y) as (e^(z - m_z) - d_z onehot(y)) / d_z, the division folded into the
            # factor below: no pass for log d_z (never z - lse(z), which rounds at |lse|)
            ce_grad = torch.sub(student[rows].to(s.dtype), m_z, out=work.take()).exp_()
            if W:  # a rank with no columns owns no label
                ce_grad.scatter_add_(1, local.clamp(0, W - 1)[:, None], -owned[:, None] * d_z)
        x = _shard_elements(s, t, m_s, d_s, m_t, d_t, opts, work)
        g = div.divergence_grad(x, A1, A2, opts, _grad_out(grad, rows.start, rows.stop, work),
                                scale=soft_grad_scale + nan_row)
        if ce_grad is not None:
            g.add_(ce_grad.mul_(grad_scale.to(s.dtype) * opts.hard_weight / d_z))
        _zero_rows(g, ~kept)
        if g.data_ptr() != grad[rows].data_ptr():  # not computed in place
            grad[rows] = g

    _for_each_shard_chunk(student, teacher, labels, opts, body)
    return loss, grad
