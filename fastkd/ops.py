"""PyTorch custom operators around every fused call, so that ``torch.compile`` sees each as one
opaque op.

Dynamo cannot trace a Triton launch, the torch backend's loop over row chunks or the collectives
of the vocabulary-parallel loss, and need not: each call is a ``torch.library.custom_op``
("fastkd::...") with a fake (meta) implementation that gives only the output shapes. The autograd
Functions in ``fastkd.autograd`` call the Python wrappers below; the reduction stays plain torch
ops that inductor fuses, and the backward's scaling is an op of its own (``fastkd::take_grad``).

    fastkd::kd_forward               (student, teachers, labels?, grad_scale, scalars, ...) -> (row loss, grad)
                                     (or the gradient's token: "Held gradients" below)
    fastkd::kd_forward_inplace       the same, the gradient written into ``student`` (mutates it)
    fastkd::topk_kd_forward          the top-k loss, likewise (and its _inplace twin)
    fastkd::vocab_parallel_forward   one rank's vocabulary-parallel loss, collectives included
                                     (and its _inplace twin)
    fastkd::softmax_forward          tempered (log-)softmax with the Triton kernel
    fastkd::softmax_backward         its vector-Jacobian product
    fastkd::fused_linear_pass        the chunk loop of ``fastkd.fused_linear``
    fastkd::take_grad                a compiled backward: the held gradient times the upstream gradient

Held gradients. Under ``torch.compile`` the backward is a graph too, and a saved ``[N, V]`` gradient
would be one of its inputs: inductor turns ``grad * upstream`` into a pass over it, and an in-place
custom op on it into a copy (a graph does not mutate its inputs), whatever the upstream gradient.
So, compiled (``hold_grad=True``), the forward ops keep the gradient in ``_HELD`` and give the graph
a token (a one-element int64 CPU tensor); the backward's ``fastkd::take_grad`` returns it, scaled
in place by the backend's ``scale_rows`` (the upstream gradient read on the device: at 1 it does
nothing), as an output of its own. The gradient never appears in the graph, so no pass and no copy.
A token that dies unused (a forward whose backward never runs) releases its gradient.

Scalars. A Python float given to an op is a constant of the compiled graph: dynamo guards on its
value and recompiles when it changes. So the float options (temperatures, beta, skew, hard and
soft weights) travel as one float64 CPU tensor (``pack_scalars``) that the op reads on the host (a
CPU tensor: no device synchronisation). Dynamo still compiles its first call with those values as
constants and recompiles once when one changes (its automatic-dynamic rule, applied to every
Python scalar); every later value reuses that graph. ``torch.compile(dynamic=True)`` skips even the
one recompile. Strings, bools and ints (divergence, flags, ignore_index, backend) are ordinary op
arguments: changing one recompiles. ``pack_kd_options`` and ``unpack_kd_options`` are the one pair
that turns ``KDOptions`` into op arguments and back.

Outside ``torch.compile`` the wrappers below call the backend directly (``traced()`` is False): the
dispatcher's path through a custom op (packing the scalars, the op's schema, autograd and dynamo
wrappers) costs some 40 µs a call, most of a small call's time, and buys nothing without a
compiler. The ops and the direct call run the same backend function on the same arguments.

Autocast. The ops run with autocast off, so the inputs keep their dtypes and the statistics stay in
float32 (float64 for float64 inputs) whatever autocast region the caller is in.
"""
import contextlib
import itertools
import weakref
from typing import Optional

import torch
from torch import Tensor

from . import fused_linear
from .backends import implementation
from .buffers import accumulation_dtype
from .options import IDENTITY, KDOptions, LogitTransform, Reduction


def pack_scalars(*values):
    """The float options as a float64 CPU tensor, built so that dynamo does not specialise on them."""
    if torch.compiler.is_compiling():
        # ``torch.tensor([...])`` of symbolic floats would burn their values into the graph.
        return torch.stack([torch.ones((), dtype=torch.float64) * v for v in values])
    return torch.tensor(values, dtype=torch.float64)


def pack_kd_options(opts: KDOptions):
    """``opts`` as the arguments ``(scalars, divergence, t2_scale, ignore_index)`` of a custom op:
    the floats in one tensor (``pack_scalars``), the rest as op arguments of their own (changing
    one recompiles). ``unpack_kd_options`` is its inverse; nothing else knows the layout."""
    scalars = pack_scalars(opts.temperature, opts.teacher_T, opts.beta, opts.skew, opts.hard_weight,
                           opts.soft_weight, *opts.teacher_weights)
    return scalars, opts.divergence, opts.t2_scale, opts.ignore_index


def unpack_kd_options(scalars, divergence, t2_scale, ignore_index):
    """The ``KDOptions`` of one op call (already validated by the functional API)."""
    temperature, teacher_temperature, beta, skew, hard_weight, soft_weight, *teacher_weights = scalars.tolist()
    return KDOptions(temperature, divergence, beta, skew, hard_weight, soft_weight, t2_scale, ignore_index,
                     teacher_temperature, tuple(teacher_weights))


def traced():
    """Whether the call is being traced (``torch.compile``, ``torch.export``): then the wrappers go
    through the custom ops, else they call the backend directly."""
    return torch.compiler.is_compiling()


_NO_CONTEXT = contextlib.nullcontext()  # reusable: it holds nothing


def autocast_off(device):
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return _NO_CONTEXT


def _fake_row_loss(student, *teachers):
    dtypes = (t.dtype for t in teachers)
    return student.new_empty(student.shape[0], dtype=accumulation_dtype(student.dtype, *dtypes))


def _fake_grad(student, need_grad, hold_grad=False):
    if need_grad and hold_grad:
        return torch.empty(1, dtype=torch.int64)
    return torch.empty_like(student, memory_format=torch.contiguous_format) if need_grad else student.new_empty(0)


def _grad_output(student, grad, hold_grad):
    """The op's gradient output: an empty tensor (no gradient), the gradient, or its token (held)."""
    if grad is None:
        return student.new_empty(0)
    return _hold(grad) if hold_grad else grad


# ----------------------------------------------------------------------- held gradients (docstring)

_HELD = {}
_KEYS = itertools.count()


def _hold(grad):
    key = next(_KEYS)
    _HELD[key] = grad
    token = torch.tensor([key])  # host memory: take_grad reads it without a device synchronisation
    weakref.finalize(token, _HELD.pop, key, None)
    return token


@torch.library.custom_op("fastkd::take_grad", mutates_args=())
def _take_grad(token: Tensor, upstream: Tensor, rows: int, cols: int, dtype: torch.dtype, backend: str) -> Tensor:
    grad = _HELD.pop(int(token), None)
    if grad is None:
        raise RuntimeError("fastkd: this compiled loss's backward already ran; its gradient is scaled in place and "
                           "given away, so the graph cannot be run backward twice (retain_graph=True)")
    return implementation(backend).scale_rows(grad, upstream, out=grad)


@_take_grad.register_fake
def _(token, upstream, rows, cols, dtype, backend):
    return upstream.new_empty((rows, cols), dtype=dtype)


def take_grad(token, upstream, rows, cols, dtype, backend):
    """The ``[rows, cols]`` gradient a forward op held as ``token``, times ``upstream`` ([rows] or one
    value), in place."""
    return torch.ops.fastkd.take_grad(token, upstream, rows, cols, dtype, backend)


# ---------------------------------------------------------------------------------------------- dense


@torch.library.custom_op("fastkd::kd_forward", mutates_args=())
def _kd_forward(student: Tensor, teachers: list[Tensor], labels: Optional[Tensor], grad_scale: Tensor,
                scalars: Tensor, divergence: str, t2_scale: bool, ignore_index: int, backend: str,
                need_grad: bool, hold_grad: bool) -> tuple[Tensor, Tensor]:
    opts = unpack_kd_options(scalars, divergence, t2_scale, ignore_index)
    with autocast_off(student.device):
        row_loss, grad = implementation(backend).kd_forward(student, teachers, labels, grad_scale, opts,
                                                            need_grad=need_grad)
    return row_loss, _grad_output(student, grad, hold_grad)


@_kd_forward.register_fake
def _(student, teachers, labels, grad_scale, scalars, divergence, t2_scale, ignore_index, backend, need_grad,
      hold_grad):
    return _fake_row_loss(student, *teachers), _fake_grad(student, need_grad, hold_grad)


@torch.library.custom_op("fastkd::kd_forward_inplace", mutates_args=("student",))
def _kd_forward_inplace(student: Tensor, teachers: list[Tensor], labels: Optional[Tensor], grad_scale: Tensor,
                        scalars: Tensor, divergence: str, t2_scale: bool, ignore_index: int, backend: str) -> Tensor:
    opts = unpack_kd_options(scalars, divergence, t2_scale, ignore_index)
    with autocast_off(student.device):
        row_loss, _ = implementation(backend).kd_forward(student, teachers, labels, grad_scale, opts, inplace=True)
    return row_loss


@_kd_forward_inplace.register_fake
def _(student, teachers, labels, grad_scale, scalars, divergence, t2_scale, ignore_index, backend):
    return _fake_row_loss(student, *teachers)


def kd_forward(student, teachers, labels, grad_scale, opts: KDOptions, backend, *, inplace, need_grad,
               hold_grad=False):
    """Per-row loss ``[N]`` and the student gradient ``[N, V]`` (times ``grad_scale``; None unless
    ``need_grad``; ``student`` itself, overwritten, with ``inplace``; its token for ``take_grad``
    with ``hold_grad``) of ``[N, V]`` rows against the list of teachers (their mixture, with
    ``opts.teacher_weights``)."""
    if not traced():
        with autocast_off(student.device):
            row_loss, grad = implementation(backend).kd_forward(student, teachers, labels, grad_scale, opts,
                                                                inplace=inplace, need_grad=need_grad)
        return row_loss, student if inplace else grad
    options = pack_kd_options(opts)
    if inplace:
        return torch.ops.fastkd.kd_forward_inplace(student, teachers, labels, grad_scale, *options, backend), student
    row_loss, grad = torch.ops.fastkd.kd_forward(student, teachers, labels, grad_scale, *options, backend, need_grad,
                                                 hold_grad)
    return row_loss, grad if need_grad else None


# ---------------------------------------------------------------------------------------------- top-k


@torch.library.custom_op("fastkd::topk_kd_forward", mutates_args=())
def _topk_kd_forward(student: Tensor, logprobs: Tensor, indices: Tensor, labels: Optional[Tensor],
                     grad_scale: Tensor, scalars: Tensor, divergence: str, t2_scale: bool, ignore_index: int,
                     tail: str, backend: str, need_grad: bool, hold_grad: bool) -> tuple[Tensor, Tensor]:
    opts = unpack_kd_options(scalars, divergence, t2_scale, ignore_index)
    with autocast_off(student.device):
        row_loss, grad = implementation(backend).topk_kd_forward(student, logprobs, indices, labels, grad_scale,
                                                                 opts, tail, need_grad=need_grad)
    return row_loss, _grad_output(student, grad, hold_grad)


@_topk_kd_forward.register_fake
def _(student, logprobs, indices, labels, grad_scale, scalars, divergence, t2_scale, ignore_index, tail, backend,
      need_grad, hold_grad):
    return _fake_row_loss(student, logprobs), _fake_grad(student, need_grad, hold_grad)


@torch.library.custom_op("fastkd::topk_kd_forward_inplace", mutates_args=("student",))
def _topk_kd_forward_inplace(student: Tensor, logprobs: Tensor, indices: Tensor, labels: Optional[Tensor],
                             grad_scale: Tensor, scalars: Tensor, divergence: str, t2_scale: bool,
                             ignore_index: int, tail: str, backend: str) -> Tensor:
    opts = unpack_kd_options(scalars, divergence, t2_scale, ignore_index)
    with autocast_off(student.device):
        row_loss, _ = implementation(backend).topk_kd_forward(student, logprobs, indices, labels, grad_scale,
                                                              opts, tail, inplace=True)
    return row_loss


@_topk_kd_forward_inplace.register_fake
def _(student, logprobs, indices, labels, grad_scale, scalars, divergence, t2_scale, ignore_index, tail, backend):
    return _fake_row_loss(student, logprobs)


def topk_kd_forward(student, logprobs, indices, labels, grad_scale, opts: KDOptions, tail, backend, *, inplace,
                    need_grad, hold_grad=False):
    """``kd_forward`` of the top-k loss."""
    if not traced():
        with autocast_off(student.device):
            row_loss, grad = implementation(backend).topk_kd_forward(student, logprobs, indices, labels, grad_scale,
                                                                     opts, tail, inplace=inplace, need_grad=need_grad)
        return row_loss, student if inplace else grad
    options = pack_kd_options(opts)
    if inplace:
        return torch.ops.fastkd.topk_kd_forward_inplace(student, logprobs, indices, labels, grad_scale, *options,
                                                        tail, backend), student
    row_loss, grad = torch.ops.fastkd.topk_kd_forward(student, logprobs, indices, labels, grad_scale, *options,
                                                      tail, backend, need_grad, hold_grad)
    return row_loss, grad if need_grad else None


# -------------------------------------------------------------------------------- vocabulary-parallel


def _vocab_parallel(student, teacher, labels, scalars, divergence, t2_scale, ignore_index, reduction,
                    num_items, backend, group_name, vocab_start, inplace, need_grad, hold_grad=False):
    from .distributed import run_rank

    opts = unpack_kd_options(scalars, divergence, t2_scale, ignore_index)
    with autocast_off(student.device):
        row_loss, grad, norm = run_rank(student, teacher, labels, opts, Reduction(reduction, num_items), backend,
                                        group_name, vocab_start, inplace=inplace, need_grad=need_grad)
    return row_loss, _grad_output(student, grad, hold_grad), norm


@torch.library.custom_op("fastkd::vocab_parallel_forward", mutates_args=())
def _vocab_parallel_forward(student: Tensor, teacher: Tensor, labels: Optional[Tensor], scalars: Tensor,
                            divergence: str, t2_scale: bool, ignore_index: int, reduction: str,
                            num_items: Optional[Tensor], backend: str, group_name: str, vocab_start: int,
                            need_grad: bool, hold_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _vocab_parallel(student, teacher, labels, scalars, divergence, t2_scale, ignore_index, reduction,
                           num_items, backend, group_name, vocab_start, False, need_grad, hold_grad)


@_vocab_parallel_forward.register_fake
def _(student, teacher, labels, scalars, divergence, t2_scale, ignore_index, reduction, num_items, backend,
      group_name, vocab_start, need_grad, hold_grad):
    row_loss = _fake_row_loss(student, teacher)
    return row_loss, _fake_grad(student, need_grad, hold_grad), row_loss.new_empty(())


@torch.library.custom_op("fastkd::vocab_parallel_forward_inplace", mutates_args=("student",))
def _vocab_parallel_forward_inplace(student: Tensor, teacher: Tensor, labels: Optional[Tensor], scalars: Tensor,
                                    divergence: str, t2_scale: bool, ignore_index: int, reduction: str,
                                    num_items: Optional[Tensor], backend: str, group_name: str,
                                    vocab_start: int) -> tuple[Tensor, Tensor]:
    row_loss, _, norm = _vocab_parallel(student, teacher, labels, scalars, divergence, t2_scale, ignore_index,
                                        reduction, num_items, backend, group_name, vocab_start, True, True)
    return row_loss, norm


@_vocab_parallel_forward_inplace.register_fake
def _(student, teacher, labels, scalars, divergence, t2_scale, ignore_index, reduction, num_items, backend,
      group_name, vocab_start):
    row_loss = _fake_row_loss(student, teacher)
    return row_loss, row_loss.new_empty(())


def vocab_parallel_forward(student, teacher, labels, opts: KDOptions, reduction: Reduction, backend, group_name,
                           vocab_start, *, inplace, need_grad, hold_grad=False):
    """One rank's per-row loss ``[N]``, shard gradient ``[N, W]`` (or None) and the reduction's
    normaliser (0-d; 1 for "sum" and "none"), the collectives over the group ``group_name`` included."""
    if not traced():
        from .distributed import run_rank

        with autocast_off(student.device):
            row_loss, grad, norm = run_rank(student, teacher, labels, opts, reduction, backend, group_name,
                                            vocab_start, inplace=inplace, need_grad=need_grad)
        return row_loss, student if inplace else grad, norm
    items = reduction.num_items_in_batch
    if items is not None and not isinstance(items, torch.Tensor):
        items = torch.tensor(float(items), dtype=torch.float64)
    args = (student, teacher, labels, *pack_kd_options(opts), reduction.kind, items, backend, group_name,
            vocab_start)
    if inplace:
        row_loss, norm = torch.ops.fastkd.vocab_parallel_forward_inplace(*args)
        return row_loss, student, norm
    row_loss, grad, norm = torch.ops.fastkd.vocab_parallel_forward(*args, need_grad, hold_grad)
    return row_loss, grad if need_grad else None, norm


# ------------------------------------------------------------------------------------- fused linear


def _teacher_specs(t_hidden, t_weight, t_bias, t_logits):
    """The driver's teacher tuples from the op's lists (teacher logits, or hidden states and LM heads)."""
    if t_logits:
        return tuple(("logits", z) for z in t_logits)
    return tuple(("linear", h, w, b) for h, w, b in zip(t_hidden, t_weight, t_bias))


@torch.library.custom_op("fastkd::fused_linear_pass", mutates_args=())
def _fused_linear_pass(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], t_hidden: list[Tensor],
                       t_weight: list[Tensor], t_bias: list[Optional[Tensor]], t_logits: list[Tensor],
                       labels: Optional[Tensor], grad_scale: Tensor, row_scale: Optional[Tensor], scalars: Tensor,
                       divergence: str, t2_scale: bool, ignore_index: int, backend: str, chunk: int, want_hidden: bool,
                       want_weight: bool, want_bias: bool, student_scale: float, student_softcap: Optional[float],
                       teacher_scale: float, teacher_softcap: Optional[float],
                       want_entropy: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    opts = unpack_kd_options(scalars, divergence, t2_scale, ignore_index)
    transforms = LogitTransform(student_scale, student_softcap), LogitTransform(teacher_scale, teacher_softcap)
    with autocast_off(hidden.device):
        results = fused_linear.chunked_pass(hidden, weight, bias, _teacher_specs(t_hidden, t_weight, t_bias, t_logits),
                                            labels, grad_scale, opts, backend, chunk,
                                            want=(want_hidden, want_weight, want_bias), row_scale=row_scale,
                                            transforms=transforms, want_entropy=want_entropy)
    return tuple(hidden.new_empty(0) if r is None else r for r in results)


@_fused_linear_pass.register_fake
def _(hidden, weight, bias, t_hidden, t_weight, t_bias, t_logits, labels, grad_scale, row_scale, scalars, divergence,
      t2_scale, ignore_index, backend, chunk, want_hidden, want_weight, want_bias, student_scale, student_softcap,
      teacher_scale, teacher_softcap, want_entropy):
    acc = accumulation_dtype(weight.dtype)
    none = hidden.new_empty(0)
    return (_fake_row_loss(hidden, *(t_logits or t_hidden)),
            hidden.new_empty(hidden.shape) if want_hidden else none,
            weight.new_empty(weight.shape, dtype=acc) if want_weight else none,
            weight.new_empty(weight.shape[0], dtype=acc) if want_bias else none,
            hidden.new_empty(hidden.shape[0], dtype=acc) if want_entropy else none)


def fused_linear_pass(hidden, weight, bias, teachers, labels, grad_scale, opts, backend, chunk, *, want,
                      row_scale=None, transforms=(IDENTITY, IDENTITY), want_entropy=False):
    """``fastkd.fused_linear.chunked_pass`` through the ``fastkd::fused_linear_pass`` operator:
    same arguments and results."""
    if not traced():
        with autocast_off(hidden.device):
            return fused_linear.chunked_pass(hidden, weight, bias, teachers, labels, grad_scale, opts, backend, chunk,
                                             want=want, row_scale=row_scale, transforms=transforms,
                                             want_entropy=want_entropy)
    logits = [t[1] for t in teachers if t[0] == "logits"]
    linear = [t[1:] for t in teachers if t[0] == "linear"]
    row_loss, *grads, entropy = torch.ops.fastkd.fused_linear_pass(
        hidden, weight, bias, [h for h, _, _ in linear], [w for _, w, _ in linear], [b for _, _, b in linear], logits,
        labels, grad_scale, row_scale, *pack_kd_options(opts), backend, chunk, *want, *transforms[0],
        *transforms[1], want_entropy)
    return (row_loss, *(grad if wanted else None for grad, wanted in zip(grads, want)),
            entropy if want_entropy else None)


# ------------------------------------------------------------------------------ tempered (log-)softmax
# (Triton kernels only: the torch backend is plain, traceable torch ops.)


@torch.library.custom_op("fastkd::softmax_forward", mutates_args=())
def softmax_forward(x: Tensor, scalars: Tensor, log: bool) -> Tensor:
    """``backends.triton.softmax_forward`` on ``[N, V]`` rows; ``scalars`` holds the temperature."""
    (temperature,) = scalars.tolist()
    return implementation("triton").softmax_forward(x, temperature, log=log)


@softmax_forward.register_fake
def _(x, scalars, log):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastkd::softmax_backward", mutates_args=())
def softmax_backward(y: Tensor, dy: Tensor, scalars: Tensor, log: bool) -> Tensor:
    (temperature,) = scalars.tolist()
    return implementation("triton").softmax_backward(y, dy, temperature, log=log)


@softmax_backward.register_fake
def _(y, dy, scalars, log):
    return torch.empty_like(y, memory_format=torch.contiguous_format)
