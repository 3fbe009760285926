"""fastkd: fused Triton kernels for knowledge-distillation losses, with a pure-PyTorch reference.

    import fastkd
    loss = fastkd.kd_loss(student_logits, teacher_logits, temperature=2.0)

``import fastkd`` needs neither triton nor a GPU: kernels are compiled on first use.
"""
from . import reference
from .functional import kd_loss, log_softmax, softmax
from .modules import KDLoss

__version__ = "0.1.0"
__all__ = ["kd_loss", "KDLoss", "softmax", "log_softmax", "reference", "__version__"]
