"""PyTorch custom operators around the backends' fused calls, so that ``torch.compile`` sees each
call as one opaque op.

Dynamo cannot trace a Triton launch or the torch backend's loop over row chunks, and need not:
each call is a ``torch.library.custom_op`` ("fastkd::...") with a fake (meta) implementation that
gives only the output shapes. The autograd Functions in ``fastkd.autograd`` call these ops; the
reduction and the backward's scaling stay plain torch ops that inductor fuses (and, for a saved
gradient that the backward graph owns, runs in place: inductor's donated buffers).

    fastkd::kd_forward          (student, teacher, labels?, scalars, ...) -> (row loss [N], grad [N, V])
    fastkd::kd_forward_inplace  the same, the gradient written into ``student`` (mutates it)
    fastkd::softmax_forward     tempered (log-)softmax with the Triton kernel
    fastkd::softmax_backward    its vector-Jacobian product
    fastkd::fused_linear_pass   the chunk loop of ``fastkd.fused_linear`` (registered there)

Scalars. A Python float given to an op is a constant of the compiled graph: dynamo guards on its
value and recompiles when it changes. So the float options (temperature, beta, skew, hard and soft
weights) travel as one float64 CPU tensor (``pack_scalars``) that the op reads on the host (a CPU
tensor: no device synchronisation). Dynamo still compiles its first call with those values as
constants and recompiles once when one changes (its automatic-dynamic rule, applied to every
Python scalar); every later value reuses that graph. ``torch.compile(dynamic=True)`` skips even the
one recompile. Strings, bools and ints (divergence, flags, ignore_index, backend) are ordinary op
arguments: changing one recompiles.

Autocast. The ops run with autocast off, so the inputs keep their dtypes and the statistics stay in
float32 (float64 for float64 inputs) whatever autocast region the caller is in.
"""
import contextlib
from typing import Optional

import torch
from torch import Tensor

from . import launch, torch_backend
from .buffers import accumulation_dtype
from .options import KDOptions


def _impl(backend):
    return launch if backend == "triton" else torch_backend


def pack_scalars(*values):
    """The float options as a float64 CPU tensor, built so that dynamo does not specialise on them."""
    if torch.compiler.is_compiling():
        # ``torch.tensor([...])`` of symbolic floats would burn their values into the graph.
        return torch.stack([torch.ones((), dtype=torch.float64) * v for v in values])
    return torch.tensor(values, dtype=torch.float64)


def pack_kd_scalars(opts: KDOptions):
    return pack_scalars(opts.temperature, opts.beta, opts.skew, opts.hard_weight, opts.soft_weight)


def unpack_kd_options(scalars, divergence, t2_scale, ignore_index):
    """The ``KDOptions`` of one op call (already validated by the functional API)."""
    temperature, beta, skew, hard_weight, soft_weight = scalars.tolist()
    return KDOptions(temperature, divergence, beta, skew, hard_weight, soft_weight, t2_scale, "sum", ignore_index)


def autocast_off(device):
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _fake_row_loss(student, teacher):
    return student.new_empty(student.shape[0], dtype=accumulation_dtype(student.dtype, teacher.dtype))


# ---------------------------------------------------------------------------------------------
# KD loss forward (per-row loss and student gradient)


@torch.library.custom_op("fastkd::kd_forward", mutates_args=())
def kd_forward(student: Tensor, teacher: Tensor, labels: Optional[Tensor], scalars: Tensor, divergence: str,
               t2_scale: bool, ignore_index: int, backend: str, need_grad: bool) -> tuple[Tensor, Tensor]:
    """``backend``'s ``kd_forward`` on ``[N, V]`` rows; the gradient is ``[0]`` unless ``need_grad``."""
    opts = unpack_kd_options(scalars, divergence, t2_scale, ignore_index)
    with autocast_off(student.device):
        row_loss, grad = _impl(backend).kd_forward(student, teacher, labels, opts, need_grad=need_grad)
    return row_loss, student.new_empty(0) if grad is None else grad


@kd_forward.register_fake
def _(student, teacher, labels, scalars, divergence, t2_scale, ignore_index, backend, need_grad):
    grad = torch.empty_like(student, memory_format=torch.contiguous_format) if need_grad else student.new_empty(0)
    return _fake_row_loss(student, teacher), grad


@torch.library.custom_op("fastkd::kd_forward_inplace", mutates_args=("student",))
def kd_forward_inplace(student: Tensor, teacher: Tensor, labels: Optional[Tensor], scalars: Tensor,
                       divergence: str, t2_scale: bool, ignore_index: int, backend: str) -> Tensor:
    """``kd_forward`` writing the student gradient over ``student``; returns the per-row loss."""
    opts = unpack_kd_options(scalars, divergence, t2_scale, ignore_index)
    with autocast_off(student.device):
        row_loss, _ = _impl(backend).kd_forward(student, teacher, labels, opts, inplace=True, need_grad=True)
    return row_loss


@kd_forward_inplace.register_fake
def _(student, teacher, labels, scalars, divergence, t2_scale, ignore_index, backend):
    return _fake_row_loss(student, teacher)


# ---------------------------------------------------------------------------------------------
# Tempered (log-)softmax with the Triton kernels (the torch backend is plain, traceable torch ops)


@torch.library.custom_op("fastkd::softmax_forward", mutates_args=())
def softmax_forward(x: Tensor, scalars: Tensor, log: bool) -> Tensor:
    """``launch.softmax_forward`` on ``[N, V]`` rows; ``scalars`` holds the temperature."""
    (temperature,) = scalars.tolist()
    return launch.softmax_forward(x, temperature, log=log)


@softmax_forward.register_fake
def _(x, scalars, log):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastkd::softmax_backward", mutates_args=())
def softmax_backward(y: Tensor, dy: Tensor, scalars: Tensor, log: bool) -> Tensor:
    (temperature,) = scalars.tolist()
    return launch.softmax_backward(y, dy, temperature, log=log)


@softmax_backward.register_fake
def _(y, dy, scalars, log):
    return torch.empty_like(y, memory_format=torch.contiguous_format)
