"""autograd Function of the top-k KD loss: gradient computed in the forward, as ``KDLossFunction``.

The reduction and the backward (scale the saved gradient, in place unless the graph is kept) are
``KDLossFunction``'s, shared through ``fastkd.autograd``.
"""
import torch

from . import launch_topk, torch_topk
from .autograd import _rows, reduce_and_save, scaled_student_grad


class TopKKDLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher_logprobs, teacher_indices, labels, opts, tail, backend, inplace,
                num_items_in_batch=None):
        s2 = _rows(student.detach())
        lp2, idx2 = _rows(teacher_logprobs), _rows(teacher_indices)
        labels1 = None if labels is None else labels.reshape(-1)
        need_grad = ctx.needs_input_grad[0]
        impl = launch_topk if backend == "triton" else torch_topk
        row_loss, grad = impl.topk_kd_forward(
            s2, lp2, idx2, labels1, opts, tail, inplace=inplace and need_grad, need_grad=need_grad)
        return reduce_and_save(ctx, row_loss, grad, labels1, opts, backend, student.shape, num_items_in_batch)

    @staticmethod
    def backward(ctx, grad_loss):
        return (scaled_student_grad(ctx, grad_loss),) + (None,) * 8
