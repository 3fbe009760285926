"""TRL's losses on fastkd's fused kernels (``trl_losses``, which says what each replaces and TRL's
beta convention), and TRL's ``DistillationTrainer`` on them (``trl_trainer``, imported with trl on
first use). One import changes a TRL user's code:

    from fastkd.integrations.trl import DistillationConfig, DistillationTrainer   # was: from trl import ...
"""
from .trl_losses import (chunked_divergence_loss, elementwise_generalized_jsd, fused_divergence_loss,
                         generalized_jsd_loss, server_forward_kl_loss, server_top_1_loss)

__all__ = ["chunked_divergence_loss", "elementwise_generalized_jsd", "fused_divergence_loss", "generalized_jsd_loss",
           "server_forward_kl_loss", "server_top_1_loss", "DistillationConfig", "DistillationTrainer"]


def __getattr__(name):
    """``DistillationTrainer`` and ``DistillationConfig``, imported (with trl) on first use."""
    if name in ("DistillationTrainer", "DistillationConfig"):
        from . import trl_trainer
        return getattr(trl_trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
