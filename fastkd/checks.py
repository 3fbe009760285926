"""Checks that read tensor values, kept apart from ``options`` (which never does).

Four kinds, all outside the hot path:
- labels on the CPU are range-checked for the hard CE on every call (host memory: no device sync);
  on a GPU an out-of-range label instead makes its row NaN, which ``check_finite=True`` reports.
- ``check_finite=True`` (a debug option: it synchronises with the device) scans every row that is
  not ignored and raises ``ValueError`` naming the argument and the first row that would come out
  NaN: a NaN or +inf logit, a row that is entirely -inf (after the temperature), or a label outside
  [0, V) when ``hard_weight > 0``.
- the top-k teacher's indices (``check_index_values``: distinct, in [0, V)) on the torch backend,
  or on the Triton path when asked (``validate_indices=True`` or ``FASTKD_DEBUG=1``): reading them
  synchronises with the device. Unchecked, ``without_repeated_indices`` makes a row that repeats an
  index NaN on the device instead (no synchronisation).
- the top-k teacher's log-probabilities (``check_topk_values``: every value and each row's
  log-sum-exp <= 0, within rounding: PRODUCER_ROUNDING) on CPU tensors, and anywhere under
  ``check_finite=True``.
Ignored rows are never read by the kernels, so they are never checked either.
"""
import os

import numpy as np
import torch

from .buffers import host_label_range
from .options import KDOptions, check_bool

CHECK_CHUNK_ELEMENTS = 2**24  # rows are scanned in chunks of about this many elements


def _leading_index(row, shape):
    """Flat row number -> index into the leading dims ``shape``, for the error message."""
    index = []
    for size in reversed(shape):
        index.append(row % size)
        row //= size
    return tuple(reversed(index))


def _describe_row(name, row, shape, reason):
    where = f"row {row}" if len(shape) <= 1 else f"row {row} (index {_leading_index(row, shape)})"
    return f"{name} {where} {reason}"


def check_label_range(labels, V, opts: KDOptions):
    """ValueError for a CPU label outside [0, V) that is not ignore_index, when the hard CE uses it."""
    if labels is None or opts.hard_weight == 0 or not labels.is_cpu or torch.compiler.is_compiling():
        return
    flat = labels if labels.dim() == 1 else labels.reshape(-1)
    label_range = host_label_range(flat)
    if label_range is None or (0 <= label_range[0] and label_range[1] < V):
        return
    bad = (flat.clamp(0, V - 1) != flat) & (flat != opts.ignore_index)  # outside [0, V), not ignored
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        reason = f"is {int(flat[row])}, outside [0, {V}) and not ignore_index={opts.ignore_index}"
        raise ValueError(_describe_row("labels", row, labels.shape, reason))


def _first_bad_row(x, keep, temperature):
    """(row, reason) of the first kept row of ``x`` ``[N, V]`` that has no finite softmax, or None."""
    rows = max(1, CHECK_CHUNK_ELEMENTS // max(1, x.shape[-1]))
    for r0 in range(0, x.shape[0], rows):
        s = x[r0:r0 + rows].detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32) / temperature
        reasons = (("contains NaN", torch.isnan(s).any(-1)),
                   ("contains +inf (after dividing by the temperature)", torch.isposinf(s).any(-1)),
                   ("is entirely -inf (after dividing by the temperature)", torch.isneginf(s).all(-1)))
        bad = torch.zeros(s.shape[0], dtype=torch.bool, device=s.device)
        for _, flags in reasons:
            bad |= flags
        bad &= keep[r0:r0 + rows]
        if bad.any():
            row = int(bad.nonzero()[0, 0])
            return r0 + row, next(reason for reason, flags in reasons if flags[row])
    return None


def check_finite_inputs(student, teachers, labels, opts: KDOptions):
    """ValueError naming the first kept row whose loss would be NaN (see the module docstring);
    ``teachers``: the tuple of teacher logits."""
    V = student.shape[-1]
    shape = student.shape[:-1]
    s = student.reshape(-1, V)
    if labels is None:
        keep = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    else:
        flat = labels.reshape(-1)
        keep = flat != opts.ignore_index
    found = []
    named = [("student_logits", s, opts.temperature)]
    named += [("teacher_logits" if len(teachers) == 1 else f"teacher_logits[{i}]", t.reshape(-1, V), opts.teacher_T)
              for i, t in enumerate(teachers)]
    for name, x, temperature in named:
        bad = _first_bad_row(x, keep, temperature)
        if bad is not None:
            found.append((bad[0], name, bad[1]))
    if labels is not None and opts.hard_weight > 0:
        out_of_range = keep & ((flat < 0) | (flat >= V))
        if out_of_range.any():
            row = int(out_of_range.nonzero()[0, 0])
            found.append((row, "labels", f"is {int(flat[row])}, outside [0, {V}) and not "
                                         f"ignore_index={opts.ignore_index}"))
    if found:
        row, name, reason = min(found, key=lambda f: f[0])
        raise ValueError("check_finite: " + _describe_row(name, row, shape, reason))


def check_values(student, teachers, labels, opts: KDOptions, check_finite):
    """All value checks of one ``kd_loss`` call (after ``options.check_kd_inputs``)."""
    check_bool("check_finite", check_finite)
    check_label_range(labels, student.shape[-1], opts)
    if check_finite:
        check_finite_inputs(student, teachers, labels, opts)


# How far above 0 a value or a row's log-sum-exp may be from the rounding of whatever computed the
# log-probabilities: ``t - logsumexp(t)`` in float32 (t = logits / T) rounds each by a few ulps of
# |t|, a scale the values do not show; this allows for |t| up to about 4096 (2 * 2**-23 * 4096).
# ``teacher_topk`` and ``log_softmax`` subtract the row's maximum first and stay far below it.
PRODUCER_ROUNDING = 2**-10


def _check_logprob_rows(logprobs, keep, shape, check_nan):
    """ValueError naming the first kept row of ``logprobs`` ``[N, k]`` (leading dims ``shape``) with
    a value or a log-sum-exp above 0, beyond the rounding of its dtype and PRODUCER_ROUNDING (or a
    NaN, with ``check_nan``)."""
    x = logprobs.detach()[keep].to(torch.float64 if logprobs.dtype == torch.float64 else torch.float32)
    if x.numel() == 0:
        return
    rows = keep.nonzero()[:, 0]
    # log-probabilities rounded to the dtype move each value, hence the log-sum-exp, by up to eps · |value|
    eps = torch.finfo(logprobs.dtype).eps
    weights = torch.softmax(x, -1).nan_to_num(0.0)
    spread = (weights * torch.where(x.isfinite(), x.abs(), 0.0)).sum(-1)
    tolerance = 2 * eps * (1 + spread) + PRODUCER_ROUNDING
    lse = torch.logsumexp(x, -1)
    reasons = [("holds a value above 0: not log-probabilities (probabilities, or shifted values?)",
                (x > tolerance[:, None]).any(-1)),
               ("has a log-sum-exp above 0 (its probabilities sum to more than 1): not log-probabilities",
                lse > tolerance)]
    if check_nan:
        reasons.insert(0, ("contains NaN", x.isnan().any(-1)))
    bad = torch.stack([flags for _, flags in reasons]).any(0)
    if bad.any():
        r = int(bad.nonzero()[0, 0])
        reason = next(reason for reason, flags in reasons if flags[r])
        raise ValueError(_describe_row("teacher_logprobs", int(rows[r]), shape, reason))


def check_topk_values(student, logprobs, labels, opts: KDOptions, check_finite):
    """All value checks of one ``topk_kd_loss`` call: those of ``check_values`` for the student and
    labels, and ``teacher_logprobs`` are log-probabilities (``_check_logprob_rows``) on CPU tensors
    and under ``check_finite``, on kept rows (ignored rows may hold anything)."""
    check_values(student, (), labels, opts, check_finite)
    if not (check_finite or logprobs.is_cpu) or torch.compiler.is_compiling():
        return
    k = logprobs.shape[-1]
    flat = logprobs.reshape(-1, k)
    keep = (torch.ones(flat.shape[0], dtype=torch.bool, device=flat.device) if labels is None
            else labels.reshape(-1) != opts.ignore_index)
    _check_logprob_rows(flat, keep, logprobs.shape[:-1], check_nan=check_finite)


def debug_enabled():
    return os.environ.get("FASTKD_DEBUG", "0") == "1"


def _sorted_rows(indices):
    """``indices`` ``[..., k]`` sorted along their last dim: CPU tensors by numpy, some twenty times
    faster than ``torch.sort`` there (50 against 990 µs for 32 x 1024 int32 on a 2-core Intel Xeon),
    others, and any while ``torch.compile`` traces, by ``torch.sort``."""
    if indices.is_cpu and not torch.compiler.is_compiling():
        return torch.from_numpy(np.sort(indices.numpy(), axis=-1))
    return indices.sort(-1).values


def check_index_values(indices, V, keep=None):
    """Raise ValueError unless every row of ``indices`` ``[N, k]`` (every row where ``keep``, when
    given: ignored rows are never read) holds distinct values in [0, V). Reads the values (a device
    synchronisation on GPU)."""
    rows = torch.arange(indices.shape[0], device=indices.device)
    if keep is not None:
        rows, indices = rows[keep], indices[keep]
    if indices.numel() == 0:
        return
    bad = (indices < 0) | (indices >= V)
    if bool(bad.any()):
        r = int(bad.any(-1).nonzero()[0, 0])
        raise ValueError(f"teacher_indices row {int(rows[r])} holds {int(indices[r][bad[r]][0])}, "
                         f"outside [0, V) = [0, {V})")
    ordered = _sorted_rows(indices)
    repeated = ordered[:, 1:] == ordered[:, :-1]
    if bool(repeated.any()):
        r = int(repeated.any(-1).nonzero()[0, 0])
        raise ValueError(f"teacher_indices row {int(rows[r])} lists index {int(ordered[r, 1:][repeated[r]][0])} "
                         "more than once; the k indices of a row must be distinct")


def without_repeated_indices(indices):
    """``indices`` ``[..., k]`` with every index of a row that lists a column twice set to -1, out
    of range, which makes that row NaN in both backends; computed on the device (a sort of the
    indices), no synchronisation. The unvalidated path's guard against a wrong value."""
    if indices.shape[-1] < 2:
        return indices
    ordered = _sorted_rows(indices)
    repeated = (ordered[..., 1:] == ordered[..., :-1]).any(-1, keepdim=True)
    return indices.masked_fill(repeated, -1)
