"""Vocabulary-parallel fused linear + KD loss: the LM head sharded by vocabulary rows over a group.

Each rank of the vocab group holds rows [v0, v0 + W) of the student head (weight ``[W, H]``, bias
``[W]``), the same rows of the teacher's head (or columns of the teacher logits), and all the hidden
states ``[N, H]``. Chunk by chunk, as ``fastkd.fused_linear.chunked_pass`` runs the fused loss, each
rank projects its vocabulary slice, z = h W^T + b ``[chunk, W]`` in float32, and
``fastkd.distributed.run_rank`` turns the shards' row statistics into the loss of the full
vocabulary and this shard's logits gradient G (2 all-reduces per chunk for kl, 3 for the others,
20-36 bytes per row). G is folded at once into this rank's weight and bias
gradients (its own rows, no exchange) and into a partial hidden gradient G W; one all-reduce of the
``[N, H]`` hidden gradient per call sums the partials. No rank ever holds ``[N, V]`` logits or the
whole head: the memory is the fused linear loss's with V replaced by W.

Several teachers (lists of teacher heads or logits): each chunk's teacher logits become their
mixture's log p on this rank's columns (``fastkd.distributed.mixture_teacher``: 2 more all-reduces
of ``[chunk, teachers]`` per chunk, one more ``[chunk, W]`` block), then the chunk runs as with one.

The exchanges go chunk by chunk (2-3 all-reduces per chunk, the same bytes per row as one call of
``vocab_parallel_kd_loss`` on all rows): exchanging once per call would need every chunk's logits
twice, before and after the exchange, so each chunk would be projected twice (or the ``[N, W]``
logits kept). Larger chunks mean fewer, larger all-reduces.

``reduction="none"``, as in the fused loss, computes only the row losses in the forward and
recomputes the chunks (with their collectives) in the backward, once the per-row upstream gradient
is known. No custom operator wraps this call: it is not traceable by ``torch.compile``.
"""
import torch
import torch.distributed as dist  # importing it initialises nothing

from .buffers import accumulation_dtype
from .distributed import mixture_teacher, run_rank
from .fused_linear import chunked_pass
from .options import Reduction
from .reduction import normaliser, reduce


def _pass(hidden, weight, bias, teachers, labels, reduction, args, *, want, row_scale=None):
    """One chunked pass; ``reduction``'s normaliser divides every chunk's gradient (module docstring)."""
    opts, backend, chunk, transforms, group_name, vocab_start = args

    def chunk_loss(z, z_ts, label, need_grad):
        dtype = accumulation_dtype(z.dtype, *(t.dtype for t in z_ts))
        teacher, chunk_opts = mixture_teacher(z_ts, opts, dtype, group_name)
        row_loss, grad, _ = run_rank(z, teacher, label, chunk_opts, reduction, backend, group_name, vocab_start,
                                     inplace=need_grad, need_grad=need_grad)
        return row_loss, grad

    row_loss, grad_hidden, grad_weight, grad_bias, _ = chunked_pass(
        hidden, weight, bias, teachers, labels, None, opts, backend, chunk, want=want, row_scale=row_scale,
        transforms=transforms, chunk_loss=chunk_loss)
    if grad_hidden is not None:
        dist.all_reduce(grad_hidden, group=dist.distributed_c10d._resolve_process_group(group_name))
    return row_loss, grad_hidden, grad_weight, grad_bias


class VocabParallelLinearKDFunction(torch.autograd.Function):
    """``[N, H]`` hidden, this rank's ``[W, H]`` weight and ``[W]`` bias (or None), a tuple of
    teachers, each ``("logits", [N, W])`` or ``("linear", [N, Ht], [W, Ht], [W] or None)`` (several:
    their mixture, with ``opts.teacher_weights``), ``[N]`` global labels, ``V`` the full vocabulary;
    validated."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teachers, labels, opts, reduction, backend, chunk, out_shape, transforms,
                group_name, vocab_start, V):
        want = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and bias is not None)
        ctx.args = (opts, backend, chunk, transforms, group_name, vocab_start)
        ctx.reduction, ctx.want, ctx.dtypes = reduction, want, (hidden.dtype, weight.dtype)
        acc = accumulation_dtype(hidden.dtype, *(t[1].dtype for t in teachers))
        if reduction.kind == "none":
            row_loss, *_ = _pass(hidden, weight, bias, teachers, labels, Reduction("sum"), ctx.args,
                                 want=(False, False, False))
            if any(want):
                ctx.teacher_layout = [(t[0], len(t) - 1) for t in teachers]  # kind, tensors
                ctx.save_for_backward(hidden, weight, bias, labels, *(x for t in teachers for x in t[1:]))
            return row_loss.reshape(out_shape)
        norm = normaliser(reduction, labels, hidden.shape[0], V, opts.ignore_index, device=hidden.device, dtype=acc)
        # Each chunk's gradient divided by the whole call's normaliser: a "batchmean" over norm items.
        chunk_reduction = Reduction("sum") if norm is None else Reduction("batchmean", norm)
        row_loss, *grads = _pass(hidden, weight, bias, teachers, labels, chunk_reduction, ctx.args, want=want)
        if any(want):
            ctx.save_for_backward(*grads)
        return reduce(row_loss, norm, reduction, out_shape)

    @staticmethod
    def backward(ctx, grad_loss):
        hidden_dtype, weight_dtype = ctx.dtypes
        if ctx.reduction.kind == "none":
            hidden, weight, bias, labels, *flat = ctx.saved_tensors
            teachers = []
            for kind, count in ctx.teacher_layout:
                teachers.append((kind, *flat[:count]))
                flat = flat[count:]
            row_scale = grad_loss.reshape(-1).to(accumulation_dtype(hidden.dtype, *(t[1].dtype for t in teachers)))
            _, *grads = _pass(hidden, weight, bias, tuple(teachers), labels, Reduction("sum"), ctx.args,
                              want=ctx.want, row_scale=row_scale)
        else:
            scale = grad_loss.reshape(())  # the normaliser is applied already
            grads = [None if g is None else g * scale.to(g.dtype) for g in ctx.saved_tensors]
        grad_hidden, grad_weight, grad_bias = (None if g is None else g.to(dtype)
                                               for g, dtype in zip(grads, (hidden_dtype, weight_dtype, weight_dtype)))
        return (grad_hidden, grad_weight, grad_bias) + (None,) * 11
