"""Drop-ins for training stacks; each submodule imports its framework lazily, on first use.

- ``fastkd.integrations.transformers``: ``DistillationTrainer``, a Hugging Face ``Trainer`` that
  distils a teacher into the student with ``fastkd.fused_linear_kd_loss`` (``pip install -e ".[hf]"``).
- ``fastkd.integrations.trl``: TRL's losses on fastkd (``generalized_jsd_loss`` for GKD,
  ``chunked_divergence_loss`` for ``trl.DistillationTrainer``, the server distillation's sparse
  losses; none needs trl) and ``DistillationTrainer`` / ``DistillationConfig``, TRL's trainer on
  them (``fastkd.integrations.trl_trainer``, imports trl on first use).
"""
