"""autograd Functions: the KD loss (gradient computed in the forward) and tempered (log-)softmax.

No kernel code here: each Function calls the launchers in ``fastkd.launch`` or their pure-PyTorch
peers in ``fastkd.torch_backend``, picked by the ``backend`` string the functional API resolved.
"""
import torch

from . import launch, torch_backend


def _rows(x):
    """``x`` as ``[N, V]`` with a unit column stride, without a copy where a view exists."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _graph_is_kept():
    """True when the running backward was asked to retain the graph (it may run again)."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep_graph is None else keep_graph()


def _impl(backend):
    return launch if backend == "triton" else torch_backend


class KDLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, labels, opts, backend, inplace):
        V = student.shape[-1]
        s2, t2 = _rows(student), _rows(teacher)
        labels1 = None if labels is None else labels.reshape(-1)
        need_grad = ctx.needs_input_grad[0]
        row_loss, grad = _impl(backend).kd_forward(
            s2, t2, labels1, opts, inplace=inplace and need_grad, need_grad=need_grad)

        if opts.reduction == "none":
            loss, denominator = row_loss.reshape(student.shape[:-1]), None
        else:
            if opts.reduction == "sum":
                denominator = None
            elif labels1 is None:
                denominator = s2.shape[0] * (V if opts.reduction == "mean" else 1) or 1
            else:
                kept = (labels1 != opts.ignore_index).sum().clamp_min(1)
                denominator = kept * V if opts.reduction == "mean" else kept
            loss = row_loss.sum() if denominator is None else row_loss.sum() / denominator
        if need_grad:
            ctx.save_for_backward(grad)
        ctx.denominator, ctx.backend, ctx.shape = denominator, backend, student.shape
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        scale = grad_loss.reshape(-1).to(torch.float64 if grad.dtype == torch.float64 else torch.float32)
        if ctx.denominator is not None:
            scale = scale / ctx.denominator
        # The saved gradient is ours: scale it in place unless this graph may be run backward again.
        out = None if _graph_is_kept() else grad
        grad_student = _impl(ctx.backend).scale_rows(grad, scale, out=out)
        return grad_student.view(ctx.shape), None, None, None, None, None


class SoftmaxFunction(torch.autograd.Function):
    """Tempered softmax (``log=False``) or log-softmax (``log=True``) along ``dim`` with the kernels."""

    @staticmethod
    def forward(ctx, x, temperature, log, dim):
        x_last = x.movedim(dim, -1)
        y2 = launch.softmax_forward(_rows(x_last), temperature, log=log)
        ctx.save_for_backward(y2)
        ctx.temperature, ctx.log, ctx.dim, ctx.shape = temperature, log, dim, x_last.shape
        return y2.view(ctx.shape).movedim(-1, dim).contiguous()

    @staticmethod
    def backward(ctx, dy):
        (y2,) = ctx.saved_tensors
        dx2 = launch.softmax_backward(y2, _rows(dy.movedim(ctx.dim, -1)), ctx.temperature, log=ctx.log)
        return dx2.view(ctx.shape).movedim(-1, ctx.dim).contiguous(), None, None, None
