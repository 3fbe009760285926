"""fastkd: fused Triton kernels for knowledge-distillation losses, with a pure-PyTorch reference.

    import fastkd
    loss = fastkd.kd_loss(student_logits, teacher_logits, temperature=2.0)

``import fastkd`` needs neither triton nor a GPU: kernels are compiled on first use.
"""
from ._kernels_package import register_kernels_package

register_kernels_package()
from . import reference
from .distributed import vocab_shard_layout
from .functional import (fused_linear_kd_loss, kd_loss, log_softmax, softmax, teacher_topk, topk_kd_loss,
                         vocab_parallel_kd_loss)
from .modules import FusedLinearKDLoss, KDLoss, TopKKDLoss
from .teacher_cache import TeacherCache, TeacherCacheError, TeacherCacheWriter
from .topk_values import TopK
from . import serving

__version__ = "0.1.0"
__all__ = ["kd_loss", "KDLoss", "softmax", "log_softmax", "reference", "__version__",
           "fused_linear_kd_loss", "FusedLinearKDLoss",
           "teacher_topk", "topk_kd_loss", "TopKKDLoss", "TeacherCache", "TeacherCacheWriter",
           "TeacherCacheError", "TopK", "vocab_parallel_kd_loss", "vocab_shard_layout"]
