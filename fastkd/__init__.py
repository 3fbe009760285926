"""fastkd: fused Triton kernels for knowledge-distillation losses, with a pure-PyTorch reference.

    import fastkd
    loss = fastkd.kd_loss(student_logits, teacher_logits, temperature=2.0)

``import fastkd`` needs neither triton nor a GPU, and imports nothing heavy, torch included: the
public names below are imported on first use (so ``fastkd --help`` answers at once); kernels are
compiled on first use.
"""
import importlib

from ._kernels_package import register_kernels_package

register_kernels_package()

__version__ = "0.1.0"

# Each public name and the submodule that defines it.
_PUBLIC = {
    "kd_loss": "functional", "softmax": "functional", "log_softmax": "functional",
    "fused_linear_kd_loss": "functional", "teacher_topk": "functional", "topk_kd_loss": "functional",
    "vocab_parallel_kd_loss": "functional",
    "KDLoss": "modules", "FusedLinearKDLoss": "modules", "TopKKDLoss": "modules",
    "TeacherCache": "teacher_cache", "TeacherCacheWriter": "teacher_cache", "TeacherCacheError": "teacher_cache",
    "TopK": "topk_values", "vocab_shard_layout": "distributed",
    "uld_loss": "uld", "hybrid_uld_loss": "uld", "fused_linear_uld_loss": "uld", "VocabMap": "vocab_map",
}
__all__ = ["kd_loss", "KDLoss", "softmax", "log_softmax", "reference", "config", "__version__",
           "fused_linear_kd_loss", "FusedLinearKDLoss",
           "teacher_topk", "topk_kd_loss", "TopKKDLoss", "TeacherCache", "TeacherCacheWriter",
           "TeacherCacheError", "TopK", "vocab_parallel_kd_loss", "vocab_shard_layout", "serving", "uld_loss",
           "hybrid_uld_loss", "fused_linear_uld_loss", "VocabMap"]


def __getattr__(name):
    """A public name, or a submodule (``fastkd.reference``, ``fastkd.backends``), imported on first use."""
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    elif not name.startswith("__"):
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
