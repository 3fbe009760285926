"""Which implementation runs a call: the fused Triton kernels or the pure-PyTorch backend."""
import functools
import importlib.util
import os

from .options import check_backend


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
    return tensor.is_cuda or (tensor.device.type == "cpu" and interpreter_enabled())


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
