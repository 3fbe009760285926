"""Hugging Face Transformers: ``DistillationTrainer``, a ``Trainer`` that distils a teacher into the
student causal LM with ``fastkd.fused_linear_kd_loss``, so neither model's ``[tokens, V]`` logits
are ever built.

    from fastkd.integrations.transformers import DistillationTrainer
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=training_args,
                                  train_dataset=dataset, temperature=2.0, hard_weight=0.5)
    trainer.train()

Needs ``pip install fastkd[hf]`` (transformers, accelerate); importing this module imports
transformers, ``import fastkd`` does not.

Per micro-batch (``inputs`` holds ``input_ids``, ``attention_mask``, ``labels``, ... as for the
Trainer's own causal-LM loss):
  - the student's and the teacher's final hidden states ``[B, S, H]`` (the inputs of their LM heads,
    ``get_output_embeddings()``); the teacher runs in eval mode under ``torch.no_grad``;
  - the labels are shifted as the model's own loss shifts them (position i predicts label i + 1;
    a ``shift_labels`` entry, as padding-free collators provide, is used as it is), and tokens
    labelled -100 (padding, prompts) count for nothing;
  - ``loss = fused_linear_kd_loss(h_student, W_student, h_teacher, W_teacher, labels=...,
    **kd_options)``: hard_weight * CE + soft_weight * T**2 * D(teacher || student), D the chosen
    divergence (options as ``fastkd.kd_loss``);
  - gradient accumulation: when the Trainer passes ``num_items_in_batch`` (recent versions count
    the kept labels of all the micro-batches of one optimiser step), the loss is the sum over this
    micro-batch's kept tokens divided by it, so the step's gradient is that of the whole batch;
    otherwise it is the micro-batch mean and the Trainer divides by the accumulation steps.

Models whose forward is wrapped (DistributedDataParallel, ...) are run through the wrapper, with
the model's own head kept to one position (``logits_to_keep=1`` where the model takes it) and the
backbone's output caught by a forward hook; unwrapped models run their backbone (``base_model``)
alone. Both models need the same vocabulary. Evaluation returns the loss (no logits: there are
none to return).
"""
import inspect

import torch
import transformers

from ..fused_linear import fused_linear_kd_loss
from ..options import make_options

KD_OPTION_DEFAULTS = dict(temperature=1.0, divergence="kl", beta=0.5, skew=0.1, hard_weight=0.0,
                          soft_weight=1.0, t2_scale=True)


def _accepts(fn, name):
    return name in inspect.signature(fn).parameters


def final_hidden_states(model, core, inputs):
    """The final hidden states ``[B, S, H]`` of causal LM ``core`` (``model`` is ``core`` or a
    wrapper around it) on ``inputs``: what its LM head would multiply."""
    backbone = core.base_model
    if backbone is core:
        raise TypeError(f"{type(core).__name__} has no separate backbone (base_model is the model itself); "
                        "DistillationTrainer needs a causal LM with an LM head (get_output_embeddings())")
    if _accepts(backbone.forward, "use_cache"):
        inputs = {**inputs, "use_cache": False}
    if model is core:
        return backbone(**inputs)[0]
    caught = []
    handle = backbone.register_forward_hook(lambda module, args, output: caught.append(output[0]))
    try:
        head_inputs = {"logits_to_keep": 1} if _accepts(core.forward, "logits_to_keep") else {}
        model(**inputs, **head_inputs)
    finally:
        handle.remove()
    return caught[-1]


class DistillationTrainer(transformers.Trainer):
    """``transformers.Trainer`` whose loss distils ``teacher_model`` into ``model`` (module docstring).

    Keyword options (besides the Trainer's): ``teacher_model`` (required), and those of
    ``fastkd.kd_loss``: ``temperature``, ``divergence``, ``beta``, ``skew``, ``hard_weight``
    (weight of the cross-entropy with the labels), ``soft_weight``, ``t2_scale``; plus
    ``chunk_size`` and ``backend`` of ``fastkd.fused_linear_kd_loss``.
    """

    def __init__(self, *args, teacher_model, chunk_size=None, backend="auto", **kwargs):
        kd_options = {name: kwargs.pop(name, default) for name, default in KD_OPTION_DEFAULTS.items()}
        make_options(**kd_options)  # a bad option fails here, not at the first step
        super().__init__(*args, **kwargs)
        if not isinstance(teacher_model, torch.nn.Module):
            raise TypeError(f"teacher_model must be a torch.nn.Module, got {type(teacher_model).__name__}")
        self.kd_options = dict(kd_options, chunk_size=chunk_size, backend=backend)
        teacher_model.eval()
        teacher_model.requires_grad_(False)
        if getattr(teacher_model, "hf_device_map", None) is None:
            teacher_model.to(self.args.device)
        self.teacher_model = teacher_model

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "labels" not in inputs and "shift_labels" not in inputs:
            raise ValueError("DistillationTrainer needs `labels` in each batch (-100 on the tokens to ignore), "
                             "as the Trainer's causal-LM loss does; e.g. DataCollatorForLanguageModeling(mlm=False)")
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
        core = self.accelerator.unwrap_model(model)
        student_hidden = final_hidden_states(model, core, model_inputs)
        self.teacher_model.eval()
        with torch.no_grad():
            teacher_hidden = final_hidden_states(self.teacher_model, self.teacher_model, model_inputs)

        labels = inputs.get("shift_labels")
        if labels is None:  # position i predicts token i + 1
            labels = inputs["labels"][:, 1:]
            student_hidden, teacher_hidden = student_hidden[:, :-1], teacher_hidden[:, :-1]
        student_head = core.get_output_embeddings()
        teacher_head = self.teacher_model.get_output_embeddings()
        teacher_hidden = teacher_hidden.to(student_hidden.device)
        loss = fused_linear_kd_loss(
            student_hidden, student_head.weight, teacher_hidden, teacher_head.weight.to(student_hidden.device),
            student_bias=student_head.bias,
            teacher_bias=None if teacher_head.bias is None else teacher_head.bias.to(student_hidden.device),
            labels=labels.to(student_hidden.device), num_items_in_batch=num_items_in_batch, **self.kd_options)

        if num_items_in_batch is not None and getattr(self.args, "average_tokens_across_devices", False):
            # num_items_in_batch counts the tokens of every process, and DDP averages the gradients
            # over processes: scale back up, as the Trainer does for its own loss.
            tp_size = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            loss = loss * (self.accelerator.num_processes // tp_size if self.args.n_gpu <= 1 else self.args.n_gpu)
        return (loss, {"loss": loss}) if return_outputs else loss
