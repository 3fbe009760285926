"""The one reduction of every loss: how per-row losses become the loss, and the gradient's factor.

    reduction     loss                                   normaliser
    "batchmean"   sum of row losses / normaliser          kept rows (not ignore_index; all N
                                                          without labels), or num_items_in_batch
    "mean"        sum / normaliser                        the same times V
    "sum"         sum of row losses                       none (1)
    "none"        the row losses, shape of the leading dims

A normaliser of 0 counts as 1 (no kept row: the loss is 0, not NaN). The normaliser is computed
before the kernels run: on the host where it needs no device tensor (N rows without labels, a
``num_items_in_batch`` number, or a count of CPU labels, whose memory the host reads), else on
the device (a count of the labels, never read on the host); the kernels multiply the gradient
they write by its inverse, ``grad_scale``; so the saved gradient is already that of the reduced
loss and the backward only multiplies it by the upstream gradient (a no-op for 1). ``"none"``
has one upstream gradient per row, known only in the backward: its gradient is saved unscaled
(``grad_scale`` 1) and scaled row by row there.
"""
import torch

from .buffers import constant, host_label_range
from .options import Reduction


def _in_host_memory(labels):
    """CPU labels outside ``torch.compile``'s tracing: the host reads them without a synchronisation."""
    return labels.is_cpu and not torch.compiler.is_compiling()


def _host_kept_count(labels, ignore_index):
    """How many CPU ``labels`` are not ``ignore_index`` (all of them when it is outside their range)."""
    label_range = host_label_range(labels)
    if label_range is None or not label_range[0] <= ignore_index <= label_range[1]:
        return labels.numel()
    return int(labels.ne(ignore_index).sum())


def normaliser(reduction: Reduction, labels, N, V, ignore_index, *, device, dtype, host=False):
    """What the summed row losses are divided by, or None for "sum" and "none": a 0-d tensor (on
    ``device``, in ``dtype``), or with ``host=True`` a Python number where no device tensor decides
    it (no labels, CPU labels, or a ``num_items_in_batch`` number). ``labels``: ``[N]`` or None;
    ``V`` an int or a 0-d tensor."""
    if reduction.kind in ("sum", "none"):
        return None
    items = reduction.num_items_in_batch
    if isinstance(items, torch.Tensor):
        count = items.to(device=device, dtype=dtype)  # a CPU 0-d tensor is copied as a fill: no sync
        count = torch.where(count == 0, torch.ones_like(count), count)
    elif items is None and labels is not None and not (host and _in_host_memory(labels)):
        count = labels.ne(ignore_index).sum(dtype=dtype).clamp_(min=1)  # a count: 0 becomes 1
    else:  # a number: of items, of the kept CPU labels (read on the host: no synchronisation), or N
        if items is not None:
            count = float(items)
        else:
            count = N if labels is None else _host_kept_count(labels, ignore_index)
        count = count if count != 0 else 1
        if not host:
            count = torch.full((), count, dtype=dtype, device=device)
    return count * V if reduction.kind == "mean" else count


def grad_scale(norm, *, device, dtype):
    """The gradient's factor ``[1]`` for the kernels: 1 / ``norm`` (a tensor or a number), or 1
    without a normaliser (a cached tensor for a number: never write into it)."""
    if not isinstance(norm, torch.Tensor):
        return constant(1.0 if norm is None else 1 / norm, dtype=dtype, device=device, shape=(1,))
    return norm.reciprocal().reshape(1)


def reduce(row_loss, norm, reduction: Reduction, leading_shape):
    """The loss from the per-row losses ``[N]`` and the normaliser of ``normaliser``."""
    if reduction.kind == "none":
        return row_loss.reshape(leading_shape)
    total = row_loss.sum()
    if norm is None:
        return total
    if not isinstance(norm, torch.Tensor):
        norm = constant(norm, dtype=total.dtype, device=total.device)
    return total.div_(norm)
