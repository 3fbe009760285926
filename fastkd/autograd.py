"""autograd Functions: the KD loss (gradient computed in the forward) and tempered (log-)softmax.

No kernel code here: each Function calls the launchers in ``fastkd.launch`` or their pure-PyTorch
peers in ``fastkd.torch_backend``, picked by the ``backend`` string the functional API resolved,
through the custom operators of ``fastkd.ops`` (opaque to ``torch.compile``). The reduction and the
backward's scaling are plain torch ops.

Memory: the backward scales the saved gradient in place unless the graph is retained. Under
``torch.compile`` the backward is traced ahead of time, so it is written out of place, and inductor
reuses the saved gradient's buffer for the result (the backward graph owns it: a donated buffer),
which keeps the same single ``[N, V]`` buffer; torch then refuses ``retain_graph=True`` for that
graph unless ``torch._functorch.config.donated_buffer`` is turned off.
"""
import torch

from . import launch, ops, torch_backend


def _rows(x):
    """``x`` as ``[N, V]`` with a unit column stride, without a copy where a view exists."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _graph_is_kept():
    """True when the running backward was asked to retain the graph (it may run again), and while
    ``torch.compile`` traces a backward ahead of time (so callers take their out-of-place path)."""
    if torch.compiler.is_compiling():
        return True
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep_graph is None else keep_graph()


def _impl(backend):
    return launch if backend == "triton" else torch_backend


def items_normaliser(num_items_in_batch, device):
    """``num_items_in_batch`` as a divisor: 0 counts as 1 (no kept row: the loss is 0, not NaN).
    A tensor stays on its device (a CPU one acts as a scalar); nothing is read on the host."""
    if not isinstance(num_items_in_batch, torch.Tensor):
        return num_items_in_batch or 1
    items = num_items_in_batch
    if items.device != device and items.device.type != "cpu":
        items = items.to(device)
    return torch.where(items == 0, torch.ones_like(items), items)


def reduce_and_save(ctx, row_loss, grad, labels1, opts, backend, shape, num_items_in_batch=None):
    """The reduced loss from the per-row loss (SPEC.md), keeping on ``ctx`` what
    ``scaled_student_grad`` needs. Shared by every loss whose gradient is computed in the forward.
    ``num_items_in_batch`` (validated: an int or a 0-d tensor) replaces the kept-row count."""
    V = shape[-1]
    if opts.reduction == "none":
        loss, denominator = row_loss.reshape(shape[:-1]), None
    else:
        if opts.reduction == "sum":
            denominator = None
        elif num_items_in_batch is not None:
            items = items_normaliser(num_items_in_batch, row_loss.device)
            denominator = items * V if opts.reduction == "mean" else items
        elif labels1 is None:
            denominator = row_loss.shape[0] * (V if opts.reduction == "mean" else 1) or 1
        else:
            kept = (labels1 != opts.ignore_index).sum().clamp_min(1)
            denominator = kept * V if opts.reduction == "mean" else kept
        loss = row_loss.sum() if denominator is None else row_loss.sum() / denominator
    if grad is not None:
        ctx.save_for_backward(grad)
    ctx.denominator, ctx.backend, ctx.shape = denominator, backend, shape
    return loss


def scaled_student_grad(ctx, grad_loss):
    """The saved student gradient times the upstream gradient over the reduction's denominator."""
    (grad,) = ctx.saved_tensors
    scale = grad_loss.reshape(-1).to(torch.float64 if grad.dtype == torch.float64 else torch.float32)
    if ctx.denominator is not None:
        scale = scale / ctx.denominator
    if torch.compiler.is_compiling():  # traced: plain torch ops (see the module docstring)
        return torch_backend.scale_rows(grad, scale).view(ctx.shape)
    # The saved gradient is ours: scale it in place unless this graph may be run backward again.
    out = None if _graph_is_kept() else grad
    return _impl(ctx.backend).scale_rows(grad, scale, out=out).view(ctx.shape)


class KDLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, labels, opts, backend, inplace, num_items_in_batch=None):
        # Detached, so that an in-place gradient is a plain write into storage, not an autograd op.
        s2, t2 = _rows(student.detach()), _rows(teacher)
        labels1 = None if labels is None else labels.reshape(-1)
        need_grad = ctx.needs_input_grad[0]
        scalars = ops.pack_kd_scalars(opts)
        static = (opts.divergence, opts.t2_scale, opts.ignore_index, backend)
        if inplace and need_grad:
            row_loss = torch.ops.fastkd.kd_forward_inplace(s2, t2, labels1, scalars, *static)
            grad = s2
        else:
            row_loss, grad = torch.ops.fastkd.kd_forward(s2, t2, labels1, scalars, *static, need_grad)
            grad = grad if need_grad else None
        return reduce_and_save(ctx, row_loss, grad, labels1, opts, backend, student.shape, num_items_in_batch)

    @staticmethod
    def backward(ctx, grad_loss):
        return scaled_student_grad(ctx, grad_loss), None, None, None, None, None, None


class SoftmaxFunction(torch.autograd.Function):
    """Tempered softmax (``log=False``) or log-softmax (``log=True``) along ``dim`` with the kernels."""

    @staticmethod
    def forward(ctx, x, temperature, log, dim):
        x_last = x.movedim(dim, -1)
        scalars = ops.pack_scalars(temperature)
        y2 = torch.ops.fastkd.softmax_forward(_rows(x_last), scalars, log)
        ctx.save_for_backward(y2, scalars)
        ctx.log, ctx.dim, ctx.shape = log, dim, x_last.shape
        return y2.view(ctx.shape).movedim(-1, dim).contiguous()

    @staticmethod
    def backward(ctx, dy):
        y2, scalars = ctx.saved_tensors
        dx2 = torch.ops.fastkd.softmax_backward(y2, _rows(dy.movedim(ctx.dim, -1)), scalars, ctx.log)
        return dx2.view(ctx.shape).movedim(-1, ctx.dim).contiguous(), None, None, None
