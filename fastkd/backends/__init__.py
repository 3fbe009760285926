"""The two backends and which one runs a call.

``fastkd.backends.triton`` launches the Triton kernels; ``fastkd.backends.torch`` is its pure-PyTorch
peer, with the same functions, signatures and results, running on any device. Neither is imported
here: ``import fastkd`` needs neither triton nor a GPU.

Shared conventions: inputs are 2-D ``[N, V]`` with a unit column stride (any row stride; ``rows``
makes that view), labels 1-D ``[N]`` of any stride; every output comes from ``fastkd.buffers.empty``.
"""
import functools
import importlib.util
import math
import os

from ..options import check_backend


@functools.lru_cache(maxsize=None)
def _find_triton():
    try:
        return importlib.util.find_spec("triton") is not None
    except ImportError:
        return False


def triton_installed():
    return _find_triton()


# What torch.compiler.assume_constant_result does (torch.compile takes the answer as a constant,
# untraced), without importing torch._dynamo at ``import fastkd``.
triton_installed._dynamo_marked_constant = True


def interpreter_enabled():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_can_run(tensor):
    """Triton runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``."""
    if not triton_installed():
        return False
    return tensor.is_cuda or (tensor.is_cpu and interpreter_enabled())


def resolve_backend(backend, tensor):
    """``"triton"`` or ``"torch"`` for ``backend`` on ``tensor``'s device.

    ``"auto"`` picks Triton for CUDA tensors when triton is installed and torch otherwise; the
    interpreter is a test tool, so CPU tensors get Triton only when asked for by name.
    """
    check_backend(backend)
    if backend == "auto":
        return "triton" if tensor.is_cuda and triton_installed() else "torch"
    if backend == "triton" and not triton_can_run(tensor):
        why = "triton is not installed" if not triton_installed() else (
            f"tensors are on {tensor.device}; Triton needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")
        raise RuntimeError(f"backend='triton' cannot run here: {why}; use backend='torch' or 'auto'")
    return backend


def rows(x):
    """``x`` as ``[N, V]`` with a unit column stride, without a copy where a view exists."""
    if x.dim() == 2 and x.stride(-1) == 1:
        return x
    x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # not -1: ambiguous for a last dim of 0
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def flat_labels(labels):
    """Labels ``[...]`` as ``[N]`` (a view where one exists, any stride), or None."""
    return labels if labels is None or labels.dim() == 1 else labels.reshape(-1)


@functools.lru_cache(maxsize=None)
def implementation(backend):
    """The module of ``backend`` ("triton" or "torch"), imported on first use (looked up once: the
    host path of a small call asks twice)."""
    if backend == "triton":
        from . import triton as module
    else:
        from . import torch as module
    return module


# Columns of the vocabulary-parallel per-row tables (kernels/vocab_parallel.py defines the same
# order as constexprs; a test checks it). STATS: one shard's statistics of a row (maxima, sums of
# exps against them, cross term, target logit). ROW: the same columns after the exchanges (the
# row's maxima, 0 for one entirely -inf, and its sums against them, ...), then the row scalars and
# nan_row: 0, or NaN for a row whose loss is NaN.
VOCAB_PARALLEL_STATS = ("m_s", "m_t", "m_z", "d_s", "d_t", "d_z", "cross", "z_y")
VOCAB_PARALLEL_ROW = VOCAB_PARALLEL_STATS + ("A1", "A2", "nan_row")
