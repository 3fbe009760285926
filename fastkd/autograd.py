"""autograd Functions: the KD losses (gradient computed in the forward) and tempered (log-)softmax.

No kernel code here: each Function calls the custom operators of ``fastkd.ops`` (opaque to
``torch.compile``), which run the backend the functional API resolved. Every loss reduces through
``fastkd.reduction`` (one normaliser, applied to the gradient inside the kernels), and every
backward is ``scaled_student_grad``: the saved gradient times the upstream gradient, in place
unless the graph is retained (a kernel that returns at once for an upstream gradient of 1).

Under ``torch.compile`` the forward op holds the gradient and the graph saves a token instead
(``fastkd.ops``, "Held gradients"); the backward's ``fastkd::take_grad`` scales it in place with
the same kernel, so inductor emits no pass over ``[N, V]`` and an upstream gradient of 1 costs
nothing. Such a graph runs backward once: a second backward of it raises a RuntimeError. With
``inplace=True`` the gradient is the student's storage, which the graph owns: there the backward is
``grad * upstream``, one pass that inductor writes over it.

Every backward is wrapped by ``once_differentiable``: the gradients come from the forward's kernels,
not from differentiable torch ops, so a backward asked to build a graph (``create_graph=True``)
raises at that call instead of returning a gradient that silently has none.
"""
import functools

import torch

from . import ops
from .backends import flat_labels, implementation, rows
from .buffers import accumulation_dtype
from .reduction import grad_scale, normaliser, reduce


def once_differentiable(backward):
    """Wrap a Function's ``backward`` to raise a clear RuntimeError under ``create_graph=True``.

    Autograd runs a backward with grad mode on exactly when the caller asked for a graph of the
    gradient (double backward: a gradient penalty, a Hessian-vector product). Under ``torch.compile``
    the backward is traced ahead of time, where this check cannot see the later call; there torch
    raises its own "does not currently support double backward" when the gradient's graph is used."""
    @functools.wraps(backward)
    def checked(ctx, *grads):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise RuntimeError(
                "fastkd's losses and fused softmax are differentiable once: their gradient comes from the forward's "
                "kernels, so a backward with create_graph=True (double backward, a gradient penalty, a "
                "Hessian-vector product) is not supported; use fastkd.reference (plain PyTorch) for higher derivatives")
        return backward(ctx, *grads)
    return checked


def graph_is_kept():
    """True when the running backward was asked to retain the graph (it may run again), and while
    ``torch.compile`` traces a backward ahead of time (so callers take their out-of-place path)."""
    if torch.compiler.is_compiling():
        return True
    return True if _KEEP_GRAPH is None else _KEEP_GRAPH()


_KEEP_GRAPH = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)  # absent: assume kept


def _normalise(student_rows, teacher_dtype, labels1, opts, reduction):
    """(normaliser or None, the kernels' grad_scale [1]) of the student's rows ``[N, V]``."""
    acc = accumulation_dtype(student_rows.dtype, teacher_dtype)
    N, V = student_rows.shape
    device = student_rows.device
    norm = normaliser(reduction, labels1, N, V, opts.ignore_index, device=device, dtype=acc, host=True)
    return norm, grad_scale(norm, device=device, dtype=acc)


def _student_rows(student, inplace):
    """The student as ``[N, V]`` rows for the forward op; with ``inplace`` detached, so that the
    gradient written into its storage, which the op returns, is a tensor of its own, not the leaf."""
    return rows(student.detach() if inplace else student)


def _hold_grad(inplace):
    """Whether the forward op holds the gradient for ``fastkd::take_grad`` (module docstring)."""
    return torch.compiler.is_compiling() and not inplace


def _save_and_reduce(ctx, row_loss, grad, norm, reduction, student, backend, held):
    if grad is not None:
        ctx.save_for_backward(grad)
    ctx.backend, ctx.shape, ctx.dtype, ctx.held = backend, student.shape, student.dtype, held
    return reduce(row_loss, norm, reduction, student.shape[:-1])


def scaled_student_grad(ctx, grad_loss):
    """The saved student gradient (already divided by the normaliser) times the upstream gradient."""
    (grad,) = ctx.saved_tensors
    if ctx.held:  # compiled: grad is the token of the gradient the forward op holds
        V = ctx.shape[-1]
        upstream = grad_loss.reshape(-1)
        return ops.take_grad(grad, upstream, ctx.shape.numel() // V, V, ctx.dtype, ctx.backend).view(ctx.shape)
    if torch.compiler.is_compiling():  # compiled with inplace=True: plain torch ops (module docstring)
        return (grad * grad_loss.reshape(-1, 1)).to(grad.dtype).view(ctx.shape)
    # The saved gradient is ours: scale it in place unless this graph may be run backward again.
    out = None if graph_is_kept() else grad
    grad = implementation(ctx.backend).scale_rows(grad, grad_loss, out=out)
    return grad if grad.shape == ctx.shape else grad.view(ctx.shape)


class StudentGradFunction(torch.autograd.Function):
    """A loss whose student gradient comes from its forward: the backward is ``scaled_student_grad``
    for the student (the first input), nothing for the others."""

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        return (scaled_student_grad(ctx, grad_loss),) + (None,) * (len(ctx.needs_input_grad) - 1)


class KDLossFunction(StudentGradFunction):
    @staticmethod
    def forward(ctx, student, teachers, labels, opts, reduction, backend, inplace):
        s2, t2 = _student_rows(student, inplace), [rows(t) for t in teachers]
        labels1 = flat_labels(labels)
        need_grad = ctx.needs_input_grad[0]
        norm, scale = _normalise(s2, accumulation_dtype(*[t.dtype for t in teachers]), labels1, opts, reduction)
        held = need_grad and _hold_grad(inplace)
        row_loss, grad = ops.kd_forward(s2, t2, labels1, scale, opts, backend, inplace=inplace and need_grad,
                                        need_grad=need_grad, hold_grad=held)
        return _save_and_reduce(ctx, row_loss, grad, norm, reduction, student, backend, held)


class TopKKDLossFunction(StudentGradFunction):
    @staticmethod
    def forward(ctx, student, teacher_logprobs, teacher_indices, labels, opts, tail, reduction, backend, inplace):
        s2 = _student_rows(student, inplace)
        lp2, idx2 = rows(teacher_logprobs), rows(teacher_indices)
        labels1 = flat_labels(labels)
        need_grad = ctx.needs_input_grad[0]
        norm, scale = _normalise(s2, teacher_logprobs.dtype, labels1, opts, reduction)
        held = need_grad and _hold_grad(inplace)
        row_loss, grad = ops.topk_kd_forward(s2, lp2, idx2, labels1, scale, opts, tail, backend,
                                             inplace=inplace and need_grad, need_grad=need_grad, hold_grad=held)
        return _save_and_reduce(ctx, row_loss, grad, norm, reduction, student, backend, held)


class VocabParallelKDLossFunction(StudentGradFunction):
    @staticmethod
    def forward(ctx, student, teacher, labels, opts, reduction, backend, inplace, group_name, vocab_start):
        s2, t2 = _student_rows(student, inplace), rows(teacher)
        need_grad = ctx.needs_input_grad[0]
        held = need_grad and _hold_grad(inplace)
        row_loss, grad, norm = ops.vocab_parallel_forward(
            s2, t2, flat_labels(labels), opts, reduction, backend, group_name, vocab_start,
            inplace=inplace and need_grad, need_grad=need_grad, hold_grad=held)
        norm = None if reduction.kind in ("sum", "none") else norm
        return _save_and_reduce(ctx, row_loss, grad, norm, reduction, student, backend, held)


def _scaled(grad, scale, dtype, in_place, backend):
    """``grad * scale`` in ``dtype``, overwriting ``grad`` when allowed and the dtype matches (with
    the backend's ``scale_rows``: nothing to do for a scale of 1)."""
    if grad is None:
        return None
    if in_place and grad.dtype == dtype:
        rows2 = grad.view(-1, grad.shape[-1])
        return implementation(backend).scale_rows(rows2, scale.reshape(1), out=rows2).view(grad.shape)
    return (grad * scale).to(dtype)


def _entropy_output(ctx, entropy, out_shape, hidden):
    """The row entropies in ``out_shape`` (an empty tensor when not asked for), non-differentiable."""
    entropy = hidden.new_empty(0) if entropy is None else entropy.reshape(out_shape)
    ctx.mark_non_differentiable(entropy)
    return entropy


class FusedLinearKDFunction(torch.autograd.Function):
    """The fused linear + KD loss (``fastkd.fused_linear``): ``[N, H]`` hidden, ``[V, H]`` weight,
    ``teachers`` a tuple of ``("logits", [N, V])`` or ``("linear", [N, Ht], [V, Ht], [V] or None)``,
    ``[N]`` labels; validated. Returns the loss and the student's row entropies (``out_shape``, no
    gradient; empty unless ``want_entropy``)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teachers, labels, opts, reduction, backend, chunk, out_shape, transforms,
                want_entropy):
        want = tuple(ctx.needs_input_grad[:3])
        want = (want[0], want[1], want[2] and bias is not None)
        N, V = hidden.shape[0], weight.shape[0]
        ctx.opts, ctx.reduction, ctx.backend, ctx.chunk, ctx.want = opts, reduction, backend, chunk, want
        ctx.transforms = transforms
        ctx.dtypes = (hidden.dtype, weight.dtype)

        acc = accumulation_dtype(hidden.dtype, *(t[1].dtype for t in teachers))
        if reduction.kind == "none":
            row_loss, *_, entropy = ops.fused_linear_pass(hidden, weight, bias, teachers, labels,
                                                          grad_scale(None, device=hidden.device, dtype=acc), opts,
                                                          backend, chunk, want=(False, False, False),
                                                          transforms=transforms, want_entropy=want_entropy)
            if any(want):  # the backward recomputes the chunks: keep the inputs, teachers flattened
                ctx.teacher_kinds = [t[0] for t in teachers]
                ctx.save_for_backward(hidden, weight, bias, labels, *(x for t in teachers for x in t[1:]))
            return row_loss.reshape(out_shape), _entropy_output(ctx, entropy, out_shape, hidden)

        norm = normaliser(reduction, labels, N, V, opts.ignore_index, device=hidden.device, dtype=acc)
        row_loss, *grads, entropy = ops.fused_linear_pass(hidden, weight, bias, teachers, labels,
                                                          grad_scale(norm, device=hidden.device, dtype=acc), opts,
                                                          backend, chunk, want=want, transforms=transforms,
                                                          want_entropy=want_entropy)
        if any(want):
            ctx.save_for_backward(*grads)
        return reduce(row_loss, norm, reduction, out_shape), _entropy_output(ctx, entropy, out_shape, hidden)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_entropy):
        opts, want = ctx.opts, ctx.want
        hidden_dtype, weight_dtype = ctx.dtypes
        acc = accumulation_dtype(weight_dtype)
        if ctx.reduction.kind == "none":
            hidden, weight, bias, labels, *flat = ctx.saved_tensors
            teachers, at = [], 0
            for kind in ctx.teacher_kinds:
                width = 1 if kind == "logits" else 3
                teachers.append((kind, *flat[at:at + width]))
                at += width
            row_scale = grad_loss.reshape(-1).to(accumulation_dtype(hidden.dtype, *(t[1].dtype for t in teachers)))
            _, grad_hidden, grad_weight, grad_bias, _ = ops.fused_linear_pass(
                hidden, weight, bias, tuple(teachers), labels,
                grad_scale(None, device=hidden.device, dtype=row_scale.dtype), opts, ctx.backend, ctx.chunk,
                want=want, row_scale=row_scale, transforms=ctx.transforms)
            grad_weight = None if grad_weight is None else grad_weight.to(weight_dtype)
            grad_bias = None if grad_bias is None else grad_bias.to(weight_dtype)
        else:
            grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
            scale = grad_loss.reshape(()).to(acc)  # the normaliser is applied already
            # The saved gradients are ours: scale them in place unless the graph may run backward again.
            in_place = not graph_is_kept()
            grad_hidden = _scaled(grad_hidden, scale, hidden_dtype, in_place, ctx.backend)
            grad_weight = _scaled(grad_weight, scale, weight_dtype, in_place, ctx.backend)
            grad_bias = _scaled(grad_bias, scale, weight_dtype, in_place, ctx.backend)
        return (grad_hidden, grad_weight, grad_bias) + (None,) * 9


class SoftmaxFunction(torch.autograd.Function):
    """Tempered softmax (``log=False``) or log-softmax (``log=True``) along ``dim`` with the kernels."""

    @staticmethod
    def forward(ctx, x, temperature, log, dim):
        x_last = x.movedim(dim, -1)
        scalars = ops.pack_scalars(temperature)
        y2 = torch.ops.fastkd.softmax_forward(rows(x_last), scalars, log)
        ctx.save_for_backward(y2, scalars)
        ctx.log, ctx.dim, ctx.shape = log, dim, x_last.shape
        return y2.view(ctx.shape).movedim(-1, dim).contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        y2, scalars = ctx.saved_tensors
        dx2 = torch.ops.fastkd.softmax_backward(y2, rows(dy.movedim(ctx.dim, -1)), scalars, ctx.log)
        return dx2.view(ctx.shape).movedim(-1, ctx.dim).contiguous(), None, None, None
