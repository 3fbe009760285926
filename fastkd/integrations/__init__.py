"""Drop-ins for training stacks; each submodule imports its framework lazily, on first use.

- ``fastkd.integrations.transformers``: ``DistillationTrainer``, a Hugging Face ``Trainer`` that
  distils a teacher into the student with ``fastkd.fused_linear_kd_loss`` (``pip install -e ".[hf]"``).
- ``fastkd.integrations.trl``: ``generalized_jsd_loss``, TRL's ``GKDTrainer.generalized_jsd_loss``
  on the fused kernels (needs neither trl nor transformers).
"""
