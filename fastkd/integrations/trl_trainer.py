"""``trl.DistillationTrainer`` on fastkd's fused linear loss: change one import.

    from fastkd.integrations.trl import DistillationConfig, DistillationTrainer   # was: from trl import ...
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=DistillationConfig(...),
                                  train_dataset=dataset, processing_class=tokenizer)

Everything TRL's trainer does (on-policy generation, logging, its ``beta``,
``temperature``, logit transforms read from the configs, FSDP2 heads) stays; the loss of each
micro-batch is ``fastkd.integrations.trl.fused_divergence_loss`` instead of TRL's chunked
divergence: with TRL's options alone the same loss, gradients and logged entropy. ``DistillationConfig``
adds (defaults: TRL's behaviour):

- ``divergence``: None (TRL's ``beta`` convention) or any fastkd divergence (with
  its ``beta`` or ``skew``: ``fastkd.divergences``);
- ``teacher_temperature``: the teacher's own temperature (None: ``temperature``);
- ``hard_weight`` / ``soft_weight``: loss = hard_weight CE(student, completion tokens) +
  soft_weight D, CE at T = 1 over the same positions; ``t2_scale`` (False, as TRL);
- ``teacher_weights``: with several teachers (``teacher_model=[a, b, ...]``, instantiated models;
  the first may be a name, as in TRL) the teacher is their mixture, weighted by these (default:
  equal); each teacher's hidden states and LM head go in, never its logits. All teachers share
  the student's vocabulary and one logit transform;
- ``chunk_size``, ``fastkd_backend``: ``fused_linear_kd_loss``'s ``chunk_size`` and ``backend``.
"""
from dataclasses import dataclass, field

import torch
import trl
from trl.models import prepare_deepspeed
from trl.trainer.utils import get_config_model_id

from .trl_losses import fused_divergence_loss

MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                   "token_type_ids", "mm_token_type_ids", "image_position_ids")


@dataclass
class DistillationConfig(trl.DistillationConfig):
    """``trl.DistillationConfig`` with fastkd's options (module docstring)."""

    divergence: str | None = field(default=None, metadata={"help": "None: TRL's beta convention; else a fastkd "
                                                                   "divergence (kl, reverse_kl, jsd, skew_kl, ...)"})
    skew: float = field(default=0.1, metadata={"help": "the skew divergences' alpha"})
    teacher_temperature: float | None = field(default=None, metadata={"help": "None: temperature"})
    hard_weight: float = field(default=0.0, metadata={"help": "weight of the CE on the completion tokens"})
    soft_weight: float = field(default=1.0, metadata={"help": "weight of the divergence"})
    t2_scale: bool = field(default=False, metadata={"help": "multiply the divergence by temperature**2"})
    teacher_weights: list[float] | None = field(default=None, metadata={"help": "mixture weights of the teachers"})
    chunk_size: int | None = field(default=None, metadata={"help": "rows per chunk of the fused loss"})
    fastkd_backend: str = field(default="auto", metadata={"help": "fastkd backend: auto, triton or torch"})

    def kd_options(self):
        """The keyword options of ``fused_divergence_loss``."""
        if self.divergence is None:
            divergence = "kl" if self.beta == 0 else "reverse_kl" if self.beta == 1 else "jsd"
        else:
            divergence = self.divergence
        return dict(divergence=divergence, beta=self.beta, skew=self.skew, temperature=self.temperature,
                    teacher_temperature=self.teacher_temperature, hard_weight=self.hard_weight,
                    soft_weight=self.soft_weight, t2_scale=self.t2_scale, teacher_weights=self.teacher_weights,
                    chunk_size=self.chunk_size, backend=self.fastkd_backend)


def logit_transform(config):
    """``(logit_scale, softcap)`` of a model's text config, read as ``trl.DistillationTrainer``
    reads them: ``logit_scale``, else ``output_multiplier``, else ``lm_head_multiplier``, else
    ``1 / logits_scaling`` (times it for HyperCLOVA X), else 1; ``final_logit_softcapping``."""
    config = config.get_text_config()
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        scale = getattr(config, name, None) if scale is None else scale
    scaling = getattr(config, "logits_scaling", None)
    if scale is None and scaling is not None:
        scale = scaling if config.model_type == "hyperclovax" else 1 / scaling
    return 1.0 if scale is None else scale, getattr(config, "final_logit_softcapping", None)


class DistillationTrainer(trl.DistillationTrainer):
    """``trl.DistillationTrainer`` whose loss is fastkd's fused linear loss (module docstring).
    ``teacher_model``: one teacher (a model or a name, as TRL's) or a list of them."""

    def __init__(self, model, teacher_model=None, args=None, **kwargs):
        teachers = list(teacher_model) if isinstance(teacher_model, (list, tuple)) else [teacher_model]
        if args is None:  # TRL's default, with fastkd's options
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = DistillationConfig(f"{name.split('/')[-1]}-Distillation")
        if not isinstance(args, DistillationConfig):
            raise TypeError(f"args must be a fastkd.integrations.trl.DistillationConfig, got {type(args).__name__}")
        for i, teacher in enumerate(teachers[1:], 1):
            if not isinstance(teacher, torch.nn.Module):
                raise TypeError(f"teacher_model[{i}] must be an instantiated model (only the first teacher may be a "
                                f"name), got {type(teacher).__name__}")
        if args.teacher_weights is not None and len(args.teacher_weights) != len(teachers):
            raise ValueError(f"teacher_weights has {len(args.teacher_weights)} weights for {len(teachers)} teachers")
        super().__init__(model, teachers[0], args, **kwargs)
        self.teacher_models = [self.teacher_model] + [self._prepare_teacher(t) for t in teachers[1:]]

    def _prepare_teacher(self, teacher):
        """An extra teacher checked and prepared as TRL prepares its ``teacher_model``."""
        vocab = self.model.config.get_text_config().vocab_size
        if teacher.config.get_text_config().vocab_size != vocab:
            raise ValueError(f"every teacher needs the student's vocab_size {vocab}, got "
                             f"{teacher.config.get_text_config().vocab_size}")
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(teacher, self.accelerator)
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    def _teacher_hidden_states(self, teacher, input_ids, attention_mask, logits_to_keep, multimodal_inputs):
        teacher.eval()
        unwrapped = self.accelerator.unwrap_model(teacher)
        with torch.no_grad():
            hidden = self._forward_redirection(teacher, unwrapped, self._get_last_hidden_state, unwrapped, input_ids,
                                               attention_mask, logits_to_keep, **multimodal_inputs)
        head = unwrapped.get_output_embeddings()
        return (hidden.to(head.weight.device), head.weight, head.bias), logit_transform(unwrapped.config)

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        # TRL's _compute_loss with fastkd's loss: the same inputs, hidden states, heads and transforms.
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        loss_mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        logits_to_keep = completion_ids.size(1)
        multimodal_inputs = {k: inputs[k] for k in MULTIMODAL_KEYS if k in inputs}

        student_hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, logits_to_keep,
                                                     **multimodal_inputs)
        student_head = unwrapped_student.get_output_embeddings()
        teachers, transforms = zip(*(self._teacher_hidden_states(t, input_ids, attention_mask, logits_to_keep,
                                                                 multimodal_inputs) for t in self.teacher_models))
        if any(w.device != student_head.weight.device for _, w, _ in teachers):
            raise ValueError(f"every teacher's lm_head must be on the student's lm_head's device "
                             f"({student_head.weight.device}): place them so in their device_map")
        if len(set(transforms)) > 1:
            raise ValueError(f"the teachers' logit transforms (logit_scale, final_logit_softcapping) differ: "
                             f"{transforms}; fastkd applies one to all teachers")
        device = student_head.weight.device
        student_scale, student_softcap = logit_transform(unwrapped_student.config)
        teacher_scale, teacher_softcap = transforms[0]
        loss, entropy_sum, n_valid = fused_divergence_loss(
            student_hidden.to(device), student_head.weight, list(teachers), loss_mask.to(device),
            num_items_in_batch=num_items_in_batch, student_lm_head_bias=student_head.bias,
            student_logit_scale=student_scale, student_final_logit_softcapping=student_softcap,
            teacher_logit_scale=teacher_scale, teacher_final_logit_softcapping=teacher_softcap,
            completion_ids=completion_ids.to(device), **self.args.kd_options())
        return loss, entropy_sum.detach(), n_valid
