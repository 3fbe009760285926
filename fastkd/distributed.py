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
    kl, reverse_kl                  2             2 (m_s, m_t) + 3 (d_s, d_t, cross)    20
    jsd, skew_kl, skew_reverse_kl,  3             2 (m_s, m_t) + 2 (d_s, d_t)           24
    tvd                                           + 2 (A1, A2; need the global lse's)
    hard CE (hard_weight > 0)       +0            + 2 in the first SUM (d_z, z_y)       +8

Floats are float32 (float64 for float64 input); a row costs a few floats whatever V and P are, and
the number of collectives per call is fixed (2 or 3, whatever N is). The maximum of z needs no
exchange (max z = T max s). V and the layout check (below) ride along as 3 floats per call. kl and
reverse kl need nothing more: D = cross / d_t - (lse_t - lse_s) (kl) or E - (lse_s - lse_t) with
E = cross / d_s (reverse kl), and their gradients need only lse_s, lse_t and E. The JSD family and
tvd need A1, A2: sums over the whole row of terms that depend on both global lse's, so they can
only be summed after the second exchange; hence the third all-reduce.

Bytes per row, per rank, against an all-gather of the logits (P = 8 ranks, V = 128256, bf16):
    all-gather of student + teacher   receives 7/8 * V * (2 + 2) B = 449 kB, then holds 513 kB
    this module (ring all-reduce moves 2 (P - 1) / P of the payload per rank):
        kl, reverse_kl                35 B   (49 B with the hard CE)
        jsd, skew_kl, skew_rkl, tvd   42 B   (56 B with the hard CE)
that is 8,000 to 12,800 times fewer bytes, and no [N, V] buffer. (One all-gather of every rank's
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

Every rank of the group must pass the same rows and the same ``labels`` (global vocabulary ids); the
loss is per rank, so data parallelism (DDP, FSDP) over other ranks composes: pass the vocab-parallel
group as ``group``. The backward is local (no collective): it scales the gradient computed in the
forward by the upstream gradient / normaliser, as ``fastkd.autograd.KDLossFunction`` does. The input
gradient of a column-parallel LM head is still the model's to all-reduce over the vocab group.
"""
import numbers

import torch
import torch.distributed as dist  # importing it initialises nothing

from . import launch_vocab_parallel, torch_vocab_parallel
from .autograd import _rows, scaled_student_grad
from .backends import resolve_backend
from .buffers import empty
from .checks import check_label_range
from .launch_vocab_parallel import ROW, STATS
from .options import check_kd_inputs, make_options

__all__ = ["vocab_parallel_kd_loss", "vocab_shard_layout"]

M_S, M_T, M_Z, D_S, D_T, D_Z, CROSS, Z_Y = range(len(STATS))
LSE_S, LSE_T, LSE_Z, DIV, A1, A2, NAN_ROW = range(len(ROW))
ROW_SCALAR_DIVERGENCES = ("jsd", "skew_kl", "skew_reverse_kl", "tvd")


def _finite(m):
    """A finite stand-in for a maximum that is -inf (all of a row's entries are -inf)."""
    return torch.where(m == float("-inf"), torch.zeros((), dtype=m.dtype, device=m.device), m)


def _rescaled(stats, sum_column, max_column, global_max):
    """A shard's sum of exps taken against its own maximum, rescaled to the global maximum."""
    return stats[:, sum_column] * torch.exp(stats[:, max_column] - _finite(global_max))


def forward_steps(student, teacher, labels, opts, backend, vocab_start, *, need_grad=True, inplace=False):
    """One rank's forward, as a generator that yields ``(tensor, "max" | "sum")`` for each in-place
    all-reduce over the vocab group and returns ``(row_loss [N], shard gradient or None, V)``.

    ``_run`` drives it with ``torch.distributed``; the tests drive several in one process."""
    impl = launch_vocab_parallel if backend == "triton" else torch_vocab_parallel
    N, W = student.shape
    T = opts.temperature
    has_ce = opts.hard_weight != 0
    stats = impl.partial_stats(student, teacher, labels, opts, vocab_start)

    # Exchange 1, MAX: the row maxima of s and t, and the layout check values (end, -start).
    maxima = empty(2 * N + 2, dtype=stats.dtype, device=stats.device)
    maxima[: 2 * N].view(N, 2).copy_(stats[:, M_S: M_T + 1])  # adjacent columns: a slice, no index tensor
    maxima[2 * N] = vocab_start + W
    maxima[2 * N + 1] = -vocab_start
    yield maxima, "max"
    max_s, max_t = maxima[: 2 * N].view(N, 2).unbind(1)

    # Exchange 2, SUM: the sums of exps rescaled to the global maxima (and this shard's W).
    columns = [_rescaled(stats, D_S, M_S, max_s), _rescaled(stats, D_T, M_T, max_t)]
    if opts.divergence == "kl":
        columns.append(_rescaled(stats, CROSS, M_T, max_t))
    if opts.divergence == "reverse_kl":
        columns.append(_rescaled(stats, CROSS, M_S, max_s))
    if has_ce:
        columns += [_rescaled(stats, D_Z, M_Z, T * max_s), stats[:, Z_Y]]
    k = len(columns)
    sums = empty(N * k + 1, dtype=stats.dtype, device=stats.device)
    sums[: N * k].view(N, k).copy_(torch.stack(columns, 1))
    sums[N * k] = W
    yield sums, "sum"
    summed, V = sums[: N * k].view(N, k), sums[N * k]

    row = stats.new_zeros(N, len(ROW))
    lse_s = row[:, LSE_S] = max_s + summed[:, 0].log()
    lse_t = row[:, LSE_T] = max_t + summed[:, 1].log()
    if opts.divergence == "kl":
        row[:, DIV] = summed[:, 2] / summed[:, 1] - (lse_t - lse_s)
    if opts.divergence == "reverse_kl":
        row[:, A1] = summed[:, 2] / summed[:, 0]  # E = sum q (s - t), which its gradient uses
        row[:, DIV] = row[:, A1] - (lse_s - lse_t)
    # NaN rows, as kd_loss: no student or teacher distribution, a label outside [0, V), a bad layout.
    defined = torch.isfinite(lse_s) & torch.isfinite(lse_t) & (maxima[2 * N] == V) & (maxima[2 * N + 1] == 0)
    if has_ce:
        row[:, LSE_Z] = T * max_s + summed[:, k - 2].log()
        defined &= (labels >= 0) & (labels < V)
    row[:, NAN_ROW] = torch.where(defined, 0.0, float("nan"))

    if opts.divergence in ROW_SCALAR_DIVERGENCES:
        # Exchange 3, SUM: the row scalars A1, A2, which need the global lse's.
        scalars = impl.row_scalars(student, teacher, labels, row, opts)
        yield scalars, "sum"
        row[:, A1], row[:, A2] = scalars[:, 0], scalars[:, 1]
        mix = opts.mixture_weights()[0]
        if opts.divergence == "jsd":
            row[:, DIV] = mix * scalars[:, 0] + (1.0 - mix) * scalars[:, 1]
        elif opts.divergence == "tvd":
            row[:, DIV] = 0.5 * scalars[:, 0]
        else:
            row[:, DIV] = scalars[:, 0]

    row_loss = opts.soft_scale * row[:, DIV] + row[:, NAN_ROW]
    if has_ce:
        row_loss = row_loss + opts.hard_weight * (row[:, LSE_Z] - summed[:, k - 1])
    if labels is not None:
        row_loss = torch.where(labels != opts.ignore_index, row_loss, 0.0)
    grad = impl.shard_gradient(student, teacher, labels, row, opts, vocab_start, inplace=inplace) if need_grad else None
    return row_loss, grad, V


_OPS = {"max": "MAX", "sum": "SUM"}


def _run(steps, group):
    """Drive ``forward_steps`` with ``torch.distributed.all_reduce`` over ``group``."""
    try:
        tensor, op = next(steps)
        while True:
            dist.all_reduce(tensor, op=getattr(dist.ReduceOp, _OPS[op]), group=group)
            tensor, op = steps.send(None)
    except StopIteration as done:
        return done.value


def _reduce(row_loss, labels, opts, V, leading_shape):
    """(loss, denominator of the gradient or None) for ``opts.reduction``, as ``kd_loss``."""
    if opts.reduction == "none":
        return row_loss.reshape(leading_shape), None
    if opts.reduction == "sum":
        return row_loss.sum(), None
    rows = row_loss.new_full((), row_loss.shape[0]) if labels is None else (labels != opts.ignore_index).sum()
    denominator = rows.clamp_min(1) * (V if opts.reduction == "mean" else 1)
    return row_loss.sum() / denominator, denominator


class VocabParallelKDLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, labels, opts, backend, inplace, group, vocab_start):
        # Detached, so that an in-place gradient is a plain write into storage, not an autograd op.
        s2, t2 = _rows(student.detach()), _rows(teacher)
        labels1 = None if labels is None else labels.reshape(-1)
        need_grad = ctx.needs_input_grad[0]
        steps = forward_steps(s2, t2, labels1, opts, backend, vocab_start,
                              need_grad=need_grad, inplace=inplace and need_grad)
        row_loss, grad, V = _run(steps, group)
        if labels1 is not None and labels1.device.type == "cpu":
            check_label_range(labels1, int(V), opts)  # as kd_loss: CPU labels raise (no device sync)
        loss, denominator = _reduce(row_loss, labels1, opts, V, student.shape[:-1])
        if need_grad:
            ctx.save_for_backward(grad)
        ctx.denominator, ctx.backend, ctx.shape = denominator, backend, student.shape
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return scaled_student_grad(ctx, grad_loss), None, None, None, None, None, None, None


def _check_group(group):
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build")
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call torch.distributed.init_process_group "
                           "first (or use fastkd.kd_loss on unsharded logits)")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of group")
    return rank, dist.get_world_size(group)


def _check_vocab_start(vocab_start):
    if vocab_start is None:
        return None
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, numbers.Integral):
        raise TypeError(f"vocab_start must be an int or None, got {type(vocab_start).__name__}")
    if vocab_start < 0:
        raise ValueError(f"vocab_start must be >= 0, got {vocab_start}")
    return int(vocab_start)


def vocab_parallel_kd_loss(student_shard, teacher_shard, *, group=None, vocab_start=None, labels=None,
                           temperature=1.0, divergence="kl", beta=0.5, skew=0.1, ignore_index=-100,
                           hard_weight=0.0, soft_weight=1.0, t2_scale=True, reduction="batchmean",
                           inplace=False, backend="auto"):
    """``fastkd.kd_loss`` of the logits sharded by vocabulary over the ranks of ``group``.

    ``student_shard``, ``teacher_shard``: ``[..., W]``, this rank's columns [vocab_start,
    vocab_start + W) of the ``[..., V]`` logits; the same rows on every rank. ``vocab_start``
    defaults to ``rank * W`` (rank within ``group``, equal widths); pass it when the widths differ.
    ``labels``: ``[...]`` global vocabulary ids, the same on every rank (the rank that owns a label
    supplies its logit to the hard CE). ``group``: the vocab-parallel process group (None: the
    default group). Every other option is ``kd_loss``'s, with the same meaning; "mean" divides by
    the full V (the sum of the widths).

    Returns the same loss on every rank; its backward gives each rank the gradient of its own shard
    (in the shard's dtype, in its storage with ``inplace=True``). Collectives: 2 all-reduces for
    kl / reverse_kl, 3 for the other divergences; see the module docstring for the bytes.
    """
    opts = make_options(temperature=temperature, divergence=divergence, beta=beta, skew=skew,
                        ignore_index=ignore_index, hard_weight=hard_weight, soft_weight=soft_weight,
                        t2_scale=t2_scale, reduction=reduction)
    check_kd_inputs(student_shard, teacher_shard, labels, opts)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    vocab_start = _check_vocab_start(vocab_start)
    backend = resolve_backend(backend, student_shard)
    rank, _ = _check_group(group)
    if vocab_start is None:
        vocab_start = rank * student_shard.shape[-1]
    return VocabParallelKDLossFunction.apply(student_shard, teacher_shard, labels, opts, backend, inplace,
                                             group, vocab_start)


def vocab_shard_layout(width, vocab_start=None, *, group=None):
    """Every rank's ``(vocab_start, width)`` in rank order, after checking that they tile [0, V).

    A set-up check (it gathers Python ints, so it synchronises): raises ``ValueError`` naming the
    ranks whose shards overlap or leave a gap. Call it on every rank of ``group``."""
    if isinstance(width, bool) or not isinstance(width, numbers.Integral) or width < 1:
        raise ValueError(f"width must be a positive int, got {width!r}")
    vocab_start = _check_vocab_start(vocab_start)
    rank, size = _check_group(group)
    mine = (rank * int(width) if vocab_start is None else vocab_start, int(width))
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
