"""Hugging Face Transformers: ``DistillationTrainer``, a ``Trainer`` that distils a teacher into the
student causal LM with ``fastkd.fused_linear_kd_loss``, so neither model's ``[tokens, V]`` logits
are ever built.

    from fastkd.integrations.transformers import DistillationTrainer
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=training_args,
                                  train_dataset=dataset, temperature=2.0, hard_weight=0.5)
    trainer.train()

Needs ``pip install -e ".[hf]"`` (transformers, accelerate); importing this module imports
transformers, ``import fastkd`` does not.

Per micro-batch (``inputs`` holds ``input_ids``, ``attention_mask``, ``labels``, ... as for the
Trainer's own causal-LM loss):
  - the student's and the teacher's final hidden states ``[B, S, H]`` (the inputs of their LM heads,
    ``get_output_embeddings()``); the teacher runs in eval mode under ``torch.no_grad``;
  - the labels are shifted as the model's own loss shifts them (position i predicts label i + 1;
    a ``shift_labels`` entry, as padding-free collators provide, is used as it is), and tokens
    labelled -100 (padding, prompts) count for nothing;
  - ``loss = fused_linear_kd_loss(h_student, W_student, h_teacher, W_teacher, labels=...,
    **kd_options, **logit_transforms)``: hard_weight * CE + soft_weight * T**2 * D(teacher || student),
    D the chosen divergence (options as ``fastkd.kd_loss``), on the logits each model's own forward
    returns (below);
  - gradient accumulation: the trainer declares its loss to take ``num_items_in_batch``
    (``model_accepts_loss_kwargs``, whatever the model's forward accepts), so the Trainer counts the
    kept labels of all the micro-batches of one optimiser step and passes that count; the loss is
    the sum over this micro-batch's kept tokens divided by it, normalised in the forward, so the
    step's gradient is that of the whole batch and the Trainer does not divide the loss: its
    backward starts from an upstream gradient of 1, which the loss's backward costs nothing. Where
    no count comes (a Trainer that cannot count), the loss is the micro-batch mean and the Trainer
    divides by the accumulation steps.

Logits as the models return them. Some causal LMs post-process their LM head's output: Gemma 2/3
(``final_logit_softcapping``: a tanh softcap), Cohere (``logit_scale``: a product), Granite
(``logits_scaling``: a division). For the classes in ``KNOWN_LOGIT_TRANSFORMS`` the transform is
read from the model's (text) config and passed to ``fused_linear_kd_loss`` (``student_logit_scale``,
``student_softcap``, ``teacher_logit_scale``, ``teacher_softcap``; an explicit value given to the
trainer wins). Whatever the model, the first batch is checked: each model runs its own forward once
more (eval mode, no grad, the head on the last CHECK_POSITIONS positions through ``logits_to_keep``)
while a hook catches its final hidden states, and the fused path's logits of those rows
(``fastkd.fused_linear.linear_logits``) must match the forward's to LOGITS_RTOL[dtype] times the
largest logit; otherwise a ``ValueError`` says by how much they differ and what to do: pass the
transform, or ``fused=False``, which computes the loss with ``fastkd.kd_loss`` on the models' own
``forward().logits`` (exact for any model, but ``[tokens, V]`` logits in memory).

Models whose forward is wrapped (DistributedDataParallel, ...) are run through the wrapper, with
the model's own head kept to one position (``logits_to_keep=1`` where the model takes it) and the
backbone's output caught by a forward hook; unwrapped models run their backbone (``base_model``)
alone. Both models need the same vocabulary. Evaluation returns the loss (no logits: there are
none to return).

A sparse teacher instead (offline distillation, e.g. from a ``fastkd.TeacherCache``): a batch whose
``teacher_topk`` entry is a ``fastkd.TopK`` ``[B, S, k]``, the top k of the teacher's next-token
distribution at each input position (as ``teacher_topk`` gives it from the teacher's logits), is
distilled with ``fastkd.topk_kd_loss`` on the student's own ``forward().logits``, shifted as the
labels are; no teacher runs, and ``teacher_model`` may be None. The TopK's temperature is checked
as ``topk_kd_loss`` checks it (declare another with ``teacher_temperature``). The data collator
builds the TopK; the Trainer moves it to the device with its temperature.
"""
import inspect

import torch
import transformers

from ..functional import fused_linear_kd_loss, kd_loss, topk_kd_loss
from ..fused_linear import linear_logits
from ..options import check_logit_transform, make_options
from ..topk_values import TopK

KD_OPTION_DEFAULTS = dict(temperature=1.0, teacher_temperature=None, divergence="kl", beta=0.5, skew=0.1,
                          hard_weight=0.0, soft_weight=1.0, t2_scale=True)
SIDES = ("student", "teacher")
TOPK_COLUMN = "teacher_topk"  # a batch's sparse teacher, a fastkd.TopK (module docstring)


def _softcap(config):
    return 1.0, config.final_logit_softcapping


def _times_logit_scale(config):
    return config.logit_scale, None


def _over_logits_scaling(config):
    return 1.0 / config.logits_scaling, None


# What these classes' forward does to the LM head's output z (transformers 5.x source), as
# (logit_scale, softcap) read from the text config: Gemma's ``z = c tanh(z / c)`` with c =
# final_logit_softcapping (None: no softcap), Cohere's ``z * logit_scale``, Granite's
# ``z / logits_scaling``. (Gemma3ForConditionalGeneration applies no softcap: it is not listed.)
KNOWN_LOGIT_TRANSFORMS = {
    **dict.fromkeys(("Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3nForCausalLM", "VaultGemmaForCausalLM"),
                    _softcap),
    **dict.fromkeys(("CohereForCausalLM", "Cohere2ForCausalLM", "Cohere2MoeForCausalLM"), _times_logit_scale),
    **dict.fromkeys(("GraniteForCausalLM", "GraniteMoeForCausalLM", "GraniteMoeSharedForCausalLM",
                     "GraniteMoeHybridForCausalLM"), _over_logits_scaling),
}

CHECK_POSITIONS = 4
# Largest |fused logits - the model's logits| allowed, relative to the largest |logit| compared, by
# the dtype of the model's logits: a few roundings of that dtype (its matmul, the transform's ops).
LOGITS_RTOL = {torch.float64: 1e-6, torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def known_logit_transform(model):
    """``(logit_scale, softcap)`` that ``model``'s forward applies to its LM head's output, read from
    its config for the classes of ``KNOWN_LOGIT_TRANSFORMS`` (the first of its class's bases that
    is listed), ``(1.0, None)`` for any other model (the first-batch check then has the last word)."""
    for cls in type(model).__mro__:
        read = KNOWN_LOGIT_TRANSFORMS.get(cls.__name__)
        if read is not None:
            config = model.config
            config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
            return read(config)
    return 1.0, None


def _accepts(fn, name):
    return name in inspect.signature(fn).parameters


def _no_cache(model):
    return {"use_cache": False} if _accepts(model.forward, "use_cache") else {}


def final_hidden_states(model, core, inputs):
    """The final hidden states ``[B, S, H]`` of causal LM ``core`` (``model`` is ``core`` or a
    wrapper around it) on ``inputs``: what its LM head would multiply."""
    backbone = core.base_model
    if backbone is core:
        raise TypeError(f"{type(core).__name__} has no separate backbone (base_model is the model itself); "
                        "DistillationTrainer needs a causal LM with an LM head (get_output_embeddings())")
    inputs = {**inputs, **_no_cache(backbone)}
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


def check_fused_logits(model, core, inputs, side, logit_scale, softcap):
    """Raise ``ValueError`` unless the fused path's logits for ``core`` (``model`` is ``core`` or a
    wrapper around it), transform ``(logit_scale, softcap)`` applied, match its own forward's
    logits on the last CHECK_POSITIONS positions of ``inputs`` (module docstring)."""
    backbone, head = core.base_model, core.get_output_embeddings()
    extra = {"logits_to_keep": CHECK_POSITIONS} if _accepts(core.forward, "logits_to_keep") else {}
    extra.update(_no_cache(core))
    caught = []
    handle = backbone.register_forward_hook(lambda module, args, output: caught.append(output[0]))
    modes = [(module, module.training) for module in core.modules()]
    try:
        core.eval()
        with torch.no_grad():
            output = model(**inputs, **extra)
    finally:
        handle.remove()
        for module, training in modes:
            module.training = training
    logits = output.logits if hasattr(output, "logits") else output[0]
    positions = min(CHECK_POSITIONS, logits.shape[-2])
    expected = logits[..., -positions:, :].to(head.weight.device)
    hidden = caught[-1][..., -positions:, :].to(head.weight.device)
    fused = linear_logits(hidden, head.weight, head.bias, logit_scale=logit_scale, softcap=softcap)
    both_nan = fused.isnan() & expected.isnan()
    error = torch.where(both_nan, 0.0, (fused - expected.to(fused.dtype)).abs()).nan_to_num(nan=float("inf")).max()
    largest = expected.to(fused.dtype).abs().nan_to_num(nan=0.0, posinf=0.0).max().clamp_min(1e-30)
    tolerance = LOGITS_RTOL.get(expected.dtype, 3e-2) * largest
    if error > tolerance:  # one host sync, on the first batch only
        raise ValueError(
            f"DistillationTrainer: the {side}'s logits ({type(core).__name__}) differ from what the fused loss "
            f"computes from its final hidden states and LM head (hidden @ weight.T + bias, then "
            f"{side}_logit_scale={logit_scale}, {side}_softcap={softcap}): up to {error.item():.4g} apart, the "
            f"largest logit being {largest.item():.4g} (tolerance {tolerance.item():.3g}). Its forward transforms "
            f"the LM head's output in a way the trainer does not know. If that is a scale s and/or a tanh softcap "
            f"c (logits = c * tanh(s * z / c)), pass {side}_logit_scale=s and/or {side}_softcap=c to "
            f"DistillationTrainer; otherwise pass fused=False to compute the loss with fastkd.kd_loss on the "
            f"models' own logits (exact, but it holds [tokens, V] logits).")


class DistillationTrainer(transformers.Trainer):
    """``transformers.Trainer`` whose loss distils ``teacher_model`` into ``model`` (module docstring).

    Keyword options (besides the Trainer's): ``teacher_model`` (None only when every batch carries
    ``teacher_topk``, a ``fastkd.TopK``: module docstring), and those of
    ``fastkd.kd_loss``: ``temperature``, ``teacher_temperature``, ``divergence``, ``beta``, ``skew``, ``hard_weight``
    (weight of the cross-entropy with the labels), ``soft_weight``, ``t2_scale``; plus
    ``chunk_size`` and ``backend`` of ``fastkd.fused_linear_kd_loss``, and its logit transforms
    ``student_logit_scale``, ``student_softcap``, ``teacher_logit_scale``, ``teacher_softcap``:
    ``"auto"`` (default) reads them from the model's config (``known_logit_transform``), a value
    (None for no softcap) is used as given. Either way the first batch checks them against the
    models' own logits. ``fused=False`` computes the loss with ``fastkd.kd_loss`` on the models' own
    ``forward().logits`` instead (any model, ``[tokens, V]`` memory; no transform options then).
    """

    def __init__(self, *args, teacher_model=None, chunk_size=None, backend="auto", fused=True,
                 student_logit_scale="auto", student_softcap="auto", teacher_logit_scale="auto",
                 teacher_softcap="auto", **kwargs):
        kd_options = {name: kwargs.pop(name, default) for name, default in KD_OPTION_DEFAULTS.items()}
        make_options(**kd_options)  # a bad option fails here, not at the first step
        if not isinstance(fused, bool):
            raise TypeError(f"fused must be a bool, got {type(fused).__name__}")
        given = dict(student_logit_scale=student_logit_scale, student_softcap=student_softcap,
                     teacher_logit_scale=teacher_logit_scale, teacher_softcap=teacher_softcap)
        if not fused and any(value != "auto" for value in given.values()):
            raise ValueError("student_logit_scale, student_softcap, teacher_logit_scale and teacher_softcap "
                             "apply to the fused path only; with fused=False the models' own logits are used")
        super().__init__(*args, **kwargs)
        # Our loss takes num_items_in_batch whatever the model's forward takes: the Trainer then
        # counts it and, given a count, does not divide the loss by the accumulation steps.
        self.model_accepts_loss_kwargs = True
        if teacher_model is not None and not isinstance(teacher_model, torch.nn.Module):
            raise TypeError(f"teacher_model must be a torch.nn.Module (or None, with teacher_topk in every batch), "
                            f"got {type(teacher_model).__name__}")
        self.kd_options = dict(kd_options, backend=backend)
        self.chunk_size, self.fused = chunk_size, fused
        self.logit_transforms = {}
        for side, module in zip(SIDES, (self.accelerator.unwrap_model(self.model), teacher_model)):
            if module is None:
                continue
            scale, softcap = known_logit_transform(module)
            scale = scale if given[f"{side}_logit_scale"] == "auto" else given[f"{side}_logit_scale"]
            softcap = softcap if given[f"{side}_softcap"] == "auto" else given[f"{side}_softcap"]
            self.logit_transforms[side] = tuple(check_logit_transform(side, scale, softcap))
        self.logits_checked = not fused or teacher_model is None
        if teacher_model is not None:
            teacher_model.eval()
            teacher_model.requires_grad_(False)
            if getattr(teacher_model, "hf_device_map", None) is None:
                teacher_model.to(self.args.device)
        self.teacher_model = teacher_model

    def _prepare_input(self, data):
        if isinstance(data, TopK):  # a tuple the Trainer would rebuild from its parts, losing the temperature
            return data.to(self.args.device)
        return super()._prepare_input(data)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "labels" not in inputs and "shift_labels" not in inputs:
            raise ValueError("DistillationTrainer needs `labels` in each batch (-100 on the tokens to ignore), "
                             "as the Trainer's causal-LM loss does; e.g. DataCollatorForLanguageModeling(mlm=False)")
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels", TOPK_COLUMN)}
        core = self.accelerator.unwrap_model(model)
        topk = inputs.get(TOPK_COLUMN)
        if topk is not None and not isinstance(topk, TopK):
            raise TypeError(f"the batch's {TOPK_COLUMN} must be a fastkd.TopK, got {type(topk).__name__}")
        if topk is None and self.teacher_model is None:
            raise ValueError(f"DistillationTrainer without a teacher_model needs {TOPK_COLUMN} (a fastkd.TopK) in "
                             "each batch")
        if topk is not None:
            return self._topk_loss(model, core, model_inputs, inputs, topk, return_outputs, num_items_in_batch)
        self.teacher_model.eval()
        if not self.logits_checked:
            for side, (wrapped, module) in zip(SIDES, ((model, core), (self.teacher_model, self.teacher_model))):
                check_fused_logits(wrapped, module, model_inputs, side, *self.logit_transforms[side])
            self.logits_checked = True
        if self.fused:
            student = final_hidden_states(model, core, model_inputs)
            with torch.no_grad():
                teacher = final_hidden_states(self.teacher_model, self.teacher_model, model_inputs)
        else:
            student = model(**model_inputs, **_no_cache(core)).logits
            with torch.no_grad():
                teacher = self.teacher_model(**model_inputs, **_no_cache(self.teacher_model)).logits

        labels = inputs.get("shift_labels")
        if labels is None:  # position i predicts token i + 1
            labels = inputs["labels"][:, 1:]
            student, teacher = student[:, :-1], teacher[:, :-1]
        labels, teacher = labels.to(student.device), teacher.to(student.device)
        if self.fused:
            student_head = core.get_output_embeddings()
            teacher_head = self.teacher_model.get_output_embeddings()
            student_scale, student_softcap = self.logit_transforms["student"]
            teacher_scale, teacher_softcap = self.logit_transforms["teacher"]
            loss = fused_linear_kd_loss(
                student, student_head.weight, teacher, teacher_head.weight.to(student.device),
                student_bias=student_head.bias,
                teacher_bias=None if teacher_head.bias is None else teacher_head.bias.to(student.device),
                labels=labels, num_items_in_batch=num_items_in_batch, chunk_size=self.chunk_size,
                student_logit_scale=student_scale, student_softcap=student_softcap,
                teacher_logit_scale=teacher_scale, teacher_softcap=teacher_softcap, **self.kd_options)
        else:
            loss = kd_loss(student, teacher, labels=labels, num_items_in_batch=num_items_in_batch, **self.kd_options)
        return self._finish(loss, return_outputs, num_items_in_batch)

    def _topk_loss(self, model, core, model_inputs, inputs, topk, return_outputs, num_items_in_batch):
        """The loss against the batch's sparse teacher ``topk`` (module docstring)."""
        student = model(**model_inputs, **_no_cache(core)).logits
        labels = inputs.get("shift_labels")
        if labels is None:  # position i predicts token i + 1
            labels = inputs["labels"][:, 1:]
            student, topk = student[:, :-1], topk.rows((slice(None), slice(None, -1)))
        loss = topk_kd_loss(student, topk.to(student.device), labels=labels.to(student.device),
                            num_items_in_batch=num_items_in_batch, **self.kd_options)
        return self._finish(loss, return_outputs, num_items_in_batch)

    def _finish(self, loss, return_outputs, num_items_in_batch):
        if num_items_in_batch is not None and getattr(self.args, "average_tokens_across_devices", False):
            # num_items_in_batch counts the tokens of every process, and DDP averages the gradients
            # over processes: scale back up, as the Trainer does for its own loss.
            tp_size = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            loss = loss * (self.accelerator.num_processes // tp_size if self.args.n_gpu <= 1 else self.args.n_gpu)
        return (loss, {"loss": loss}) if return_outputs else loss
