"""Output buffers and cached constant operands, shared by the backends.

Every output the launchers and the torch backend allocate comes from ``empty``. With
``FASTKD_POISON_ALLOCATIONS=1`` in the environment (or ``POISON_ALLOCATIONS = True``, as the tests
set it) fresh buffers are filled with NaN (integers with their minimum), so a kernel that reads or
returns memory it never wrote shows up as a NaN instead of passing by luck.
"""
import functools
import os

import torch

POISON_ALLOCATIONS = os.environ.get("FASTKD_POISON_ALLOCATIONS", "0") == "1"


def accumulation_dtype(*dtypes):
    """float64 when any input is float64 (so gradcheck can run through the kernels), else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def empty(shape, *, dtype, device):
    """``torch.empty``, poisoned when ``POISON_ALLOCATIONS`` is on (a debug switch: it costs a fill)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON_ALLOCATIONS:
        out.fill_(float("nan") if out.is_floating_point() else torch.iinfo(dtype).min)
    return out


def gradient_buffer(student, inplace, need_grad):
    """Where the student gradient goes: nowhere, the student's own storage, or a fresh tensor."""
    if not need_grad:
        return None
    return student if inplace else empty(student.shape, dtype=student.dtype, device=student.device)


def _constant(value, dtype, device, shape):
    return torch.tensor(value, dtype=dtype, device=device).reshape(shape)


_cached_constant = functools.lru_cache(maxsize=64)(_constant)


def constant(value, *, dtype, device, shape=()):
    """``value`` (a number, or a tuple of them) as a tensor of ``shape`` (0-d by default), cached:
    never write into it. An op with a tensor operand costs a microsecond or two less host time than
    with a Python number, which a small call notices. A fresh tensor while ``torch.compile`` traces."""
    if torch.compiler.is_compiling():
        return _constant(value, dtype, device, shape)
    return _cached_constant(value, dtype, torch.device(device), shape)
