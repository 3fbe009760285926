"""Vocabulary-parallel KD loss over ``torch.distributed``: the LM head sharded by vocabulary.

Each rank of the vocab group holds columns [c0, c0 + W) of the student and teacher logits (V = the
sum of the ranks' W). ``vocab_parallel_kd_loss`` returns on every rank the loss ``fastkd.kd_loss``
gives on the concatenated logits, and backpropagates into the rank's own shard, without gathering
the logits. Importing this module initialises nothing; the call needs an initialised process group.

How (notation of ``kernels/vocab_parallel.py``): each rank computes per-row partial statistics of
its shard in one pass (maxima m and sums of exps against them, plus a cross term for kl / reverse
kl and the target logit z_y when it owns the label), then the ranks all-reduce a few floats per
row; after that each rank computes its shard's gradient locally. Collectives, per call:

    divergence                      all-reduces   floats per row (MAX + SUM [+ SUM])   bytes per row
    kl                              2             2 (m_s, m_t) + 3 (d_s, d_t, cross)    20
    reverse kl                      3             2 (m_s, m_t) + 3 (d_s, d_t, cross)    28
                                                  + 2 (A1, A2; need the global sums)
    the others (the JSD family,     3             2 (m_s, m_t) + 2 (d_s, d_t)           24
      tvd)                                        + 2 (A1, A2)
    hard CE (hard_weight > 0)       +0            + 2 in the first SUM (d_z, z_y)       +8

Floats are float32 (float64 for float64 input); a row costs a few floats whatever V and P are, and
the number of collectives per call is fixed (2 or 3, whatever N is). The maximum of z needs no
exchange (max z = T max s). V and the layout check (below) ride along as 3 floats per call. The
loss of kl and reverse kl comes from the cross term: D = cross / d_t + log(d_s / d_t) (kl) or
cross / d_s - log(d_s / d_t) (reverse kl), with the cross term centred on the row's maxima (terms
of the size of the row's spread: no cancellation at large logits). kl's gradient, q - p, needs only
the row's maxima and sums of exps (log-probabilities are taken as (s - m_s) - log d_s, never as
s - lse(s), which rounds at the scale of |m_s|). Every other gradient reads A1, A2
(``KDOptions.grad_reads_row_scalars``): sums over the whole row of terms that depend on both
global distributions, so they can only be summed after the second exchange; hence the third
all-reduce. reverse kl takes it too: its gradient at a one-hot q (|logits| ~ 1e4) is exact only
from A1, A2 whose terms round as the gradient's own; from the cross term it would need that term
centred on the teacher's logit at the student's argmax, which one rank holds, and erred by ~1e4
eps there.

Bytes per row, per rank, against an all-gather of the logits (P = 8 ranks, V = 128256, bf16):
    all-gather of student + teacher   receives 7/8 * V * (2 + 2) B = 449 kB, then holds 513 kB
    this module (ring all-reduce moves 2 (P - 1) / P of the payload per rank):
        kl                            35 B   (49 B with the hard CE)
        the JSD family, tvd           42 B   (56 B with the hard CE)
        reverse_kl                    49 B   (63 B with the hard CE)
that is 7,100 to 12,800 times fewer bytes, and no [N, V] buffer. (One all-gather of every rank's
(m, d) pairs would save the MAX round trip at P times the bytes; all-reduces keep it independent
of P.) The kernels read the shards in their own dtype: no float32 copy of a shard is made.

Shard layout: ``vocab_start`` defaults to ``rank * W`` (equal shards); give it for unequal shards.
V, which "mean" divides by, is the sum of the ranks' W, carried in the first SUM all-reduce (no
extra collective). The shards must tile [0, V): the MAX all-reduce also carries max(c0 + W) and
max(-c0), and a layout with max(c0 + W) != V or min(c0) != 0 (for example unequal widths without
``vocab_start``) makes every kept row's loss and gradient NaN rather than wrong, checked on the
device without a host sync. That check cannot see an overlap that exactly cancels a gap;
``vocab_shard_layout`` checks a layout exactly, once, at set-up.

Degenerate rows are NaN exactly as in ``kd_loss``: a kept row whose student or teacher logits (over
all V) have no finite log-sum-exp (entirely -inf, or a NaN or +inf in any shard), or, with the hard
CE, whose label is outside [0, V), gets a NaN loss and a NaN gradient row on every rank (CPU labels
outside [0, V) raise ValueError instead, after the exchange gives V). A shard whose part of a row is
entirely -inf is fine. Ignored rows are never read.

Several teachers (``fastkd.kd_loss`` on DTensor logits, ``fastkd.vocab_parallel_linear``):
``mixture_steps`` turns each rank's teacher shards into its columns of the mixture's log p, with 2
all-reduces of the teachers' row log-sum-exps (``[N, teachers]`` floats each: 8 B per row and
teacher in float32), and the loss above runs on that one teacher at T_t = 1. That is 4 all-reduces
for kl, 5 for the others, and one ``[N, W]`` buffer more (the log p, float32 for
float32 or bf16 shards); ``check_finite_shards`` is ``check_finite`` over the whole rows.

Every rank of the group must pass the same rows and the same ``labels`` (global vocabulary ids); the
loss is per rank, so data parallelism (DDP, FSDP) over other ranks composes: pass the vocab-parallel
group as ``group``. The backward is local (no collective): it scales the gradient computed in the
forward by the upstream gradient / normaliser, as ``fastkd.autograd.KDLossFunction`` does. The input
gradient of a column-parallel LM head is still the model's to all-reduce over the vocab group.
"""

import dataclasses

import torch
import torch.distributed as dist  # importing it initialises nothing

from .backends import VOCAB_PARALLEL_ROW, VOCAB_PARALLEL_STATS, implementation
from .backends.torch import FreshBuffers, chunks
from .backends.torch_divergences import mixture_log_prob, recentre_cross
from .buffers import empty
from .checks import CHECK_CHUNK_ELEMENTS, check_finite_inputs, check_label_range
from .options import KDOptions, Reduction, check_int
from .reduction import grad_scale, normaliser

STATS = {name: i for i, name in enumerate(VOCAB_PARALLEL_STATS)}
ROW = {name: i for i, name in enumerate(VOCAB_PARALLEL_ROW)}


def _finite(m):
    """A finite stand-in for a maximum that is -inf (all of a row's entries are -inf)."""
    return torch.where(m == float("-inf"), torch.zeros((), dtype=m.dtype, device=m.device), m)


def _rescaled(stats, sum_column, max_column, global_max):
    """A shard's sum of exps taken against its own maximum, rescaled to the global maximum."""
    return stats[:, STATS[sum_column]] * torch.exp(stats[:, STATS[max_column]] - _finite(global_max))


def forward_steps(student, teacher, labels, opts: KDOptions, backend, vocab_start, *, reduction=Reduction("sum"),
                  need_grad=True, inplace=False):
    """One rank's forward, as a generator that yields ``(tensor, "max" | "sum")`` for each in-place
    all-reduce over the vocab group and returns ``(row_loss [N], shard gradient or None, V,
    normaliser)``, the gradient already divided by the normaliser of ``reduction``.

    ``run_rank`` drives it with ``torch.distributed``; the tests drive several in one process."""
    impl = implementation(backend)
    N, W = student.shape
    has_ce = opts.hard_weight != 0
    stats = impl.partial_stats(student, teacher, labels, opts, vocab_start)

    # Exchange 1, MAX: the row maxima of s and t, and the layout check values (end, -start).
    maxima = empty(2 * N + 2, dtype=stats.dtype, device=stats.device)
    maxima[: 2 * N].view(N, 2).copy_(stats[:, STATS["m_s"]: STATS["m_t"] + 1])  # adjacent: a slice
    maxima[2 * N] = vocab_start + W
    maxima[2 * N + 1] = -vocab_start
    yield maxima, "max"
    max_s, max_t = maxima[: 2 * N].view(N, 2).unbind(1)

    # Exchange 2, SUM: the sums of exps rescaled to the global maxima (and this shard's W).
    columns = {"d_s": _rescaled(stats, "d_s", "m_s", max_s), "d_t": _rescaled(stats, "d_t", "m_t", max_t)}
    if opts.has_cross_term:
        weight = stats[:, STATS["d_t" if opts.cross_term_side == "teacher" else "d_s"]]
        columns["cross"] = recentre_cross(stats[:, STATS["cross"]], weight, stats[:, STATS["m_s"]], max_s,
                                          stats[:, STATS["m_t"]], max_t, opts)
    if has_ce:
        columns["d_z"] = _rescaled(stats, "d_z", "m_z", opts.temperature * max_s)  # max z = T_s max s
        columns["z_y"] = stats[:, STATS["z_y"]]
    k = len(columns)
    sums = empty(N * k + 1, dtype=stats.dtype, device=stats.device)
    sums[: N * k].view(N, k).copy_(torch.stack(list(columns.values()), 1))
    sums[N * k] = W
    yield sums, "sum"
    summed = dict(zip(columns, sums[: N * k].view(N, k).unbind(1)))
    V = sums[N * k]

    # The row's maxima (the centres every sum of exps was rescaled to) and its sums: the kernels take
    # log-probabilities as (s - m_s) - log d_s, never s - lse(s) (which rounds at the scale of |m_s|).
    row = stats.new_zeros(N, len(ROW))
    row[:, ROW["m_s"]], row[:, ROW["m_t"]] = _finite(max_s), _finite(max_t)
    for name in ("d_s", "d_t", "d_z", "cross", "z_y"):
        if name in summed:
            row[:, ROW[name]] = summed[name]
    # NaN rows, as kd_loss: no student or teacher distribution, a label outside [0, V), a bad layout.
    defined = torch.isfinite(max_s + summed["d_s"].log()) & torch.isfinite(max_t + summed["d_t"].log())
    defined &= (maxima[2 * N] == V) & (maxima[2 * N + 1] == 0)
    if has_ce:
        row[:, ROW["m_z"]] = _finite(opts.temperature * max_s)
        defined &= (labels >= 0) & (labels < V)
    row[:, ROW["nan_row"]] = torch.where(defined, 0.0, float("nan"))

    if opts.grad_reads_row_scalars or not opts.has_cross_term:
        # Exchange 3, SUM: the row scalars A1, A2 (the gradient's, or the loss's without a cross term),
        # which need the global lse's.
        scalars = impl.row_scalars(student, teacher, labels, row, opts)
        yield scalars, "sum"
        row[:, ROW["A1"]], row[:, ROW["A2"]] = scalars[:, 0], scalars[:, 1]

    norm = normaliser(reduction, labels, N, V, opts.ignore_index, device=row.device, dtype=row.dtype)
    row_loss, grad = impl.shard_finish(student, teacher, labels, row,
                                       grad_scale(norm, device=row.device, dtype=row.dtype), opts, vocab_start,
                                       inplace=inplace, need_grad=need_grad)
    return row_loss, grad, V, torch.ones((), dtype=row.dtype, device=row.device) if norm is None else norm


_OPS = {"max": "MAX", "sum": "SUM"}


def _drive(steps, group_name):
    """Run a generator of ``(tensor, "max" | "sum")`` exchanges (``forward_steps``, ``mixture_steps``)
    with in-place ``torch.distributed.all_reduce`` over the group named ``group_name``; its result."""
    group = dist.distributed_c10d._resolve_process_group(group_name)
    try:
        tensor, op = next(steps)
        while True:
            dist.all_reduce(tensor, op=getattr(dist.ReduceOp, _OPS[op]), group=group)
            tensor, op = steps.send(None)
    except StopIteration as done:
        return done.value


def mixture_steps(teachers, opts: KDOptions, dtype):
    """log p ``[N, W]`` (``dtype``) on this rank's columns of the teachers' mixture
    p = sum_i w_i softmax(t_i / T_t) over the whole vocabulary (``opts.teacher_T``,
    ``opts.teacher_weights``), as a generator of exchanges like ``forward_steps``.

    The k teachers' row statistics over all V take two all-reduces of ``[N, k]``: MAX of the
    shards' maxima m_i, then SUM of their sums of exps d_i against it. Then, column by column,
    log p = logsumexp_i(log w_i + (t_i / T_t - m_i) - log d_i), as ``kd_loss`` forms it
    (``mixture_log_prob``), row chunk by row chunk: the result is the one ``[N, W]`` buffer, the rest chunk-sized. A row
    where some teacher has no finite log-sum-exp (as ``kd_loss``: NaN, +inf, or entirely -inf over
    all V) is NaN on every rank, so that ``forward_steps`` makes its loss and gradient NaN."""
    N, W = teachers[0].shape
    device = teachers[0].device
    ranges = chunks(N, W, device=device)
    maxima = empty((N, len(teachers)), dtype=dtype, device=device)
    for i, t in enumerate(teachers):
        for r0, r1 in ranges:
            # max(t) / T is max(t / T): division by T > 0 and rounding keep the order (one pass, not two)
            maxima[r0:r1, i] = t[r0:r1].amax(-1).to(dtype) / opts.teacher_T if W else float("-inf")
    yield maxima, "max"
    centres = _finite(maxima)
    sums = torch.zeros_like(maxima)
    for i, t in enumerate(teachers):
        for r0, r1 in ranges:
            sums[r0:r1, i] = (t[r0:r1].to(dtype) / opts.teacher_T).sub_(centres[r0:r1, i: i + 1]).exp_().sum(-1)
    yield sums, "sum"
    log_sums = sums.log()
    out = empty((N, W), dtype=dtype, device=device)
    for r0, r1 in ranges:
        lts = [out[r0:r1]] + [empty((r1 - r0, W), dtype=dtype, device=device) for _ in teachers[1:]]
        for i, (lt, t) in enumerate(zip(lts, teachers)):
            lt.copy_(t[r0:r1]).div_(opts.teacher_T).sub_(centres[r0:r1, i: i + 1]).sub_(log_sums[r0:r1, i: i + 1])
        mixture_log_prob(lts, opts.log_teacher_weights, FreshBuffers(lts[0]))  # into lts[0], out's rows
    return out.masked_fill_(~torch.isfinite(maxima + log_sums).all(-1, keepdim=True), float("nan"))


def mixture_teacher(teachers, opts: KDOptions, dtype, group_name):
    """``(teacher, opts)`` for ``forward_steps`` from this rank's shards ``[..., W]`` of one teacher
    or several: one as it is; several as their mixture's log p ``[..., W]`` (``mixture_steps``, 2
    all-reduces), a teacher at T_t = 1 whose softmax is the mixture."""
    if len(teachers) == 1:
        return teachers[0], opts
    shape = teachers[0].shape
    flat = [t.reshape(-1, shape[-1]) for t in teachers]  # a view wherever one exists
    log_p = _drive(mixture_steps(flat, opts, dtype), group_name).view(shape)
    return log_p, dataclasses.replace(opts, teacher_temperature=1.0, teacher_weights=(1.0,))


def run_rank(student, teacher, labels, opts: KDOptions, reduction: Reduction, backend, group_name, vocab_start, *,
             inplace, need_grad):
    """``forward_steps`` driven with ``torch.distributed.all_reduce`` over the group named
    ``group_name``: ``(row_loss, shard gradient or None, normaliser)``. CPU labels outside [0, V)
    raise ValueError, as in ``kd_loss`` (reading V there is no device synchronisation)."""
    steps = forward_steps(student, teacher, labels, opts, backend, vocab_start, reduction=reduction,
                          need_grad=need_grad, inplace=inplace)
    row_loss, grad, V, norm = _drive(steps, group_name)
    if labels is not None and labels.device.type == "cpu":
        check_label_range(labels, int(V), opts)
    return row_loss, grad, norm


def check_finite_shards(student, teachers, labels, opts: KDOptions, V, group):
    """``kd_loss``'s ``check_finite=True`` on logits sharded by vocabulary over ``group`` (a debug
    check that synchronises, as it does on one process): the same ValueError as on the whole
    ``[..., V]`` logits, raised on every rank of ``group``.

    Each rank classes each row of each argument on its own columns, after the temperature: 3 holds
    a NaN, 2 a +inf, 1 a finite value, 0 entirely -inf. One MAX all-reduce of these ``[N, 1 + k]``
    int32 codes classes the whole rows, which ``check_finite_inputs`` reads as one-column logits
    (NaN, +inf, 0, -inf). Labels outside [0, V) (hard CE) are checked against the global ``V``."""
    W = student.shape[-1]
    named = [(student, opts.temperature)] + [(t, opts.teacher_T) for t in teachers]
    N = student.shape[:-1].numel()
    codes = torch.zeros(N, len(named), dtype=torch.int32, device=student.device)
    step = max(1, CHECK_CHUNK_ELEMENTS // max(1, W))
    for j, (x, temperature) in enumerate(named):
        x = x.detach().reshape(N, W)
        for r0 in range(0, N, step):
            s = x[r0:r0 + step].to(torch.float64 if x.dtype == torch.float64 else torch.float32) / temperature
            codes[r0:r0 + step, j] = torch.where(s.isnan().any(-1), 3, torch.where(
                s.isposinf().any(-1), 2, (~s.isneginf()).any(-1).to(torch.int32)))
    if N:
        dist.all_reduce(codes, op=dist.ReduceOp.MAX, group=group)
    if labels is not None:
        check_label_range(labels.cpu(), V, opts)
    values = torch.tensor([float("-inf"), 0.0, float("inf"), float("nan")], device=student.device)
    rows = [values[c].reshape(*student.shape[:-1], 1) for c in codes.unbind(1)]
    check_finite_inputs(rows[0], rows[1:], labels, dataclasses.replace(opts, hard_weight=0.0))


def check_group(group):
    """(rank, world size) of this process in ``group`` (None: the default group), with clear errors."""
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build")
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call torch.distributed.init_process_group "
                           "first (or use fastkd.kd_loss on unsharded logits)")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of group")
    return rank, dist.get_world_size(group)


def check_vocab_start(vocab_start):
    return None if vocab_start is None else check_int("vocab_start", vocab_start, minimum=0)


def group_name(group):
    """The name under which the custom operator finds ``group`` again (None: the default group)."""
    return (group if group is not None else dist.group.WORLD).group_name


def vocab_shard_layout(width, vocab_start=None, *, group=None):
    """Every rank's ``(vocab_start, width)`` in rank order, after checking that they tile [0, V).

    A set-up check (it gathers Python ints, so it synchronises): raises ``ValueError`` naming the
    ranks whose shards overlap or leave a gap. Call it on every rank of ``group``."""
    width = check_int("width", width, minimum=1)
    vocab_start = check_vocab_start(vocab_start)
    rank, size = check_group(group)
    mine = (rank * width if vocab_start is None else vocab_start, width)
    layout = [None] * size
    dist.all_gather_object(layout, mine, group=group)
    order = sorted(range(size), key=lambda r: layout[r][0])
    end = 0
    for r in order:
        start, w = layout[r]
        if start != end:
            what = "overlaps the shard before it" if start < end else f"leaves columns [{end}, {start}) uncovered"
            raise ValueError(f"rank {r}'s shard [{start}, {start + w}) {what}; layout {layout}")
        end = start + w
    return layout

