"""Output buffers, cached constant operands and host reads of CPU labels, shared by the backends.

Every output the launchers and the torch backend allocate comes from ``empty``. With
``FASTKD_POISON_ALLOCATIONS=1`` in the environment (or ``POISON_ALLOCATIONS = True``, as the tests
set it) fresh buffers are filled with NaN (integers with their minimum), so a kernel that reads or
returns memory it never wrote shows up as a NaN instead of passing by luck.
"""
import functools
import os
import weakref

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


@functools.lru_cache(maxsize=64)
def _cached_constant(value, dtype, device, shape):
    tensor = _constant(value, dtype, device, shape)
    tensor.host_value = value  # known on the host without reading the tensor (constant_value)
    return tensor


def constant_value(x):
    """The number a cached ``constant`` holds (known on the host, no read), or None for any other tensor."""
    return getattr(x, "host_value", None)


def constant(value, *, dtype, device, shape=()):
    """``value`` (a number, or a tuple of them) as a tensor of ``shape`` (0-d by default), cached:
    never write into it. An op with a tensor operand costs a microsecond or two less host time than
    with a Python number, which a small call notices. A fresh tensor while ``torch.compile`` traces."""
    if torch.compiler.is_compiling():
        return _constant(value, dtype, device, shape)
    return _cached_constant(value, dtype, device if isinstance(device, torch.device) else torch.device(device), shape)


# The last host_label_range read: (weak reference to the labels tensor, its version, weak reference to
# its base tensor, the view's geometry, (low, high)). One call reads its labels' range at up to three
# places (the range check, the kept-row count, the small call's masks), most often through the same
# tensor; a weak reference cannot be confused with a later tensor at the same address, and the
# version counter (shared by a tensor and its views) sees writes.
_last_label_range = (None, None, None, None, None)


def host_label_range(labels):
    """(lowest, highest) label of CPU ``labels`` (read on the host: no synchronisation; not while
    ``torch.compile`` traces), or None when empty; an unchanged tensor (or view of the same base) is
    read once."""
    global _last_label_range
    tensor_ref, version, base_ref, last_key, value = _last_label_range
    if tensor_ref is not None and tensor_ref() is labels and version == labels._version:
        return value
    if labels.numel() == 0:
        return None
    base = labels if labels._base is None else labels._base
    key = (labels.storage_offset(), labels.shape, labels.stride(), labels._version)
    if not (base_ref is not None and base_ref() is base and last_key == key):
        value = tuple(int(x) for x in torch.aminmax(labels))
    _last_label_range = (weakref.ref(labels), labels._version, weakref.ref(base), key, value)
    return value
