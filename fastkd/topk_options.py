"""Argument checking of the top-k API (``teacher_topk``, ``topk_kd_loss``).

``check_*`` look at shapes, dtypes, devices and Python scalars only, like ``fastkd.options``.
``check_index_values`` reads the indices themselves: it synchronises with the device, so it runs
on the torch backend, or on the Triton path only when asked (``validate_indices=True`` or the
environment variable ``FASTKD_DEBUG=1``).
"""
import numbers
import os

import torch

from .options import check_logits

TAILS = ("bucket", "renormalize", "ignore")
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tail(tail):
    if tail not in TAILS:
        raise ValueError(f"unknown tail {tail!r}; expected one of {', '.join(map(repr, TAILS))}")
    return tail


def check_k(k, V):
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= V:
        raise ValueError(f"k must be in [1, V] = [1, {V}], got {k}")
    return int(k)


def debug_enabled():
    return os.environ.get("FASTKD_DEBUG", "0") == "1"


def check_topk_inputs(student, logprobs, indices):
    """Check a student ``[..., V]`` against a top-k teacher ``logprobs``/``indices`` ``[..., k]``."""
    check_logits("student_logits", student)
    check_logits("teacher_logprobs", logprobs)
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"teacher_indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"teacher_indices must be int32 or int64, got {indices.dtype}")
    if logprobs.shape != indices.shape:
        raise ValueError(f"teacher_logprobs shape {tuple(logprobs.shape)} and teacher_indices shape "
                         f"{tuple(indices.shape)} differ")
    if logprobs.shape[:-1] != student.shape[:-1]:
        raise ValueError(f"teacher_logprobs shape {tuple(logprobs.shape)} does not match the leading dims "
                         f"{tuple(student.shape[:-1])} of student_logits")
    for name, t in (("teacher_logprobs", logprobs), ("teacher_indices", indices)):
        if t.device != student.device:
            raise ValueError(f"{name} is on {t.device} and student_logits on {student.device}")
    if logprobs.requires_grad:
        raise ValueError("teacher_logprobs requires grad; the teacher is a constant: pass teacher_logprobs.detach()")
    V = student.shape[-1]
    if V == 0:
        raise ValueError("student_logits has an empty vocabulary dimension (V = 0)")
    k = logprobs.shape[-1]
    if not 1 <= k <= V:
        raise ValueError(f"teacher_logprobs lists k={k} tokens; k must be in [1, V] = [1, {V}]")


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
    ordered = indices.sort(-1).values
    repeated = ordered[:, 1:] == ordered[:, :-1]
    if bool(repeated.any()):
        r = int(repeated.any(-1).nonzero()[0, 0])
        raise ValueError(f"teacher_indices row {int(rows[r])} lists index {int(ordered[r, 1:][repeated[r]][0])} "
                         "more than once; the k indices of a row must be distinct")


def without_repeated_indices(indices):
    """``indices`` ``[..., k]`` with every index of a row that lists a column twice set to -1, out
    of range, which makes that row NaN in both implementations; computed on the device (a sort of
    the indices), no synchronisation. The unvalidated path's guard against a wrong value."""
    if indices.shape[-1] < 2:
        return indices
    ordered = indices.sort(-1).values
    repeated = (ordered[..., 1:] == ordered[..., :-1]).any(-1, keepdim=True)
    return indices.masked_fill(repeated, -1)

