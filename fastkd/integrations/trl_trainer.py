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

A teacher with another tokenizer (GOLD's cross-tokenizer distillation, ``trl.experimental.gold``):
pass ``teacher_tokenizer=`` to the trainer or set ``teacher_tokenizer_name_or_path``.
Each generated completion is then decoded, tokenized again by the teacher's tokenizer and the two
tokenizations aligned by byte offsets where the batch is made (``_generate_and_score_completions``,
the collation step of this trainer: ``fastkd.vocab_map.align_completion``), and the loss is
``fastkd.uld.aligned_uld_loss`` averaged over the aligned rows: ULD (``uld_top_k``: its top-K form),
or with ``uld_use_hybrid_loss`` GOLD's hybrid loss over ``VocabMap.from_tokenizers`` (``divergence``
/ ``beta`` on the matched ids, ``uld_hybrid_matched_weight`` / ``uld_hybrid_unmatched_weight``);
groups of several tokens merged by ``uld_token_merge_strategy``; ``hard_weight`` adds the student's
CE, ``soft_weight`` scales the distillation term. One teacher; the student's logits are built
(``[B, C, V_s]``), the teacher's too; ``num_items_in_batch`` is not used (rows are aligned groups).
"""
from dataclasses import dataclass, field

import torch
import trl
from trl.data_utils import apply_chat_template, is_conversational
from trl.models import prepare_deepspeed
from trl.trainer.utils import create_model_from_path, get_config_model_id, pad

from ..uld import aligned_uld_loss
from ..vocab_map import VocabMap, align_completion
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
    # A teacher with another tokenizer (the names of trl.experimental.gold's GOLDConfig where it has them)
    teacher_tokenizer_name_or_path: str | None = field(default=None, metadata={
        "help": "the teacher's tokenizer, when it is not the student's (cross-tokenizer distillation)"})
    uld_top_k: int | None = field(default=None, metadata={"help": "top-K ULD on one-to-one rows (None: exact)"})
    uld_use_hybrid_loss: bool = field(default=False, metadata={
        "help": "GOLD's hybrid: the divergence on ids both vocabularies share, ULD on the rest"})
    uld_hybrid_matched_weight: float | None = field(default=None, metadata={"help": "None: the matched fraction"})
    uld_hybrid_unmatched_weight: float | None = field(default=None, metadata={"help": "None: 1 - matched weight"})
    uld_token_merge_strategy: str = field(default="observed", metadata={"help": "observed or bayesian"})

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
    ``teacher_model``: one teacher (a model or a name, as TRL's) or a list of them.
    ``teacher_tokenizer``: the teacher's tokenizer where it differs from the student's (or
    ``args.teacher_tokenizer_name_or_path``)."""

    def __init__(self, model, teacher_model=None, args=None, teacher_tokenizer=None, **kwargs):
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
        if teacher_tokenizer is None and args.teacher_tokenizer_name_or_path is not None:
            from transformers import AutoTokenizer
            teacher_tokenizer = AutoTokenizer.from_pretrained(args.teacher_tokenizer_name_or_path)
        self.teacher_tokenizer = teacher_tokenizer
        if teacher_tokenizer is None:
            super().__init__(model, teachers[0], args, **kwargs)
            self.teacher_models = [self.teacher_model] + [self._prepare_teacher(t) for t in teachers[1:]]
            return
        # Another tokenizer: TRL's trainer refuses a teacher of another vocab_size, so it gets none.
        if len(teachers) > 1:
            raise ValueError("a teacher with another tokenizer (teacher_tokenizer) must be the only teacher")
        if args.uld_top_k is not None and (isinstance(args.uld_top_k, bool) or not isinstance(args.uld_top_k, int)
                                           or args.uld_top_k < 1):
            raise ValueError(f"uld_top_k must be None (exact ULD) or a positive int, got {args.uld_top_k!r}")
        if args.uld_token_merge_strategy not in ("observed", "bayesian"):
            raise ValueError(f"uld_token_merge_strategy must be 'observed' or 'bayesian', got "
                             f"{args.uld_token_merge_strategy!r}")
        teacher = teachers[0]
        if isinstance(teacher, str):
            teacher = create_model_from_path(teacher, **(args.teacher_model_init_kwargs or {}))
        super().__init__(model, None, args, **kwargs)
        self.teacher_model = self._prepare_teacher(teacher, same_vocab=False)
        self.teacher_models = [self.teacher_model]
        self.vocab_map = VocabMap.from_tokenizers(self.processing_class, teacher_tokenizer) \
            if args.uld_use_hybrid_loss else None

    def _prepare_teacher(self, teacher, same_vocab=True):
        """An extra teacher checked and prepared as TRL prepares its ``teacher_model``."""
        vocab = self.model.config.get_text_config().vocab_size
        if same_vocab and teacher.config.get_text_config().vocab_size != vocab:
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

    # ------------------------------------------------------------------------------ another tokenizer
    def _generate_and_score_completions(self, inputs):
        """TRL's batch, and with a teacher tokenizer the teacher's tokens of each prompt and completion
        and their alignment groups (``teacher_prompt_ids`` / ``_mask``, left-padded;
        ``teacher_completion_ids`` / ``_mask``, right-padded; ``uld_groups``: a list, one pair per sample)."""
        batch = super()._generate_and_score_completions(inputs)
        if self.teacher_tokenizer is None:
            return batch
        tok, device = self.teacher_tokenizer, batch["completion_ids"].device
        prompt_ids, completion_ids, groups = [], [], []
        eos = set(self.eos_token_ids)
        for example, ids, mask in zip(inputs, batch["completion_ids"].tolist(), batch["completion_mask"].tolist()):
            prompt = example["prompt"]
            if is_conversational(example):
                prompt = apply_chat_template({"prompt": prompt}, tok, **self.chat_template_kwargs)["prompt"]
                prompt_ids.append(tok(prompt, add_special_tokens=False)["input_ids"])
            else:
                prompt_ids.append(tok(prompt)["input_ids"])
            ids = [i for i, m in zip(ids, mask) if m]
            teacher_ids, s_groups, t_groups = align_completion(self.processing_class, tok, ids,
                                                               ends_with_eos=bool(ids) and ids[-1] in eos)
            completion_ids.append(teacher_ids)
            groups.append((s_groups, t_groups))
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        for name, sequences, side in (("prompt", prompt_ids, "left"), ("completion", completion_ids, "right")):
            tensors = [torch.tensor(x, dtype=torch.long) for x in sequences]
            batch[f"teacher_{name}_ids"] = pad(tensors, padding_value=pad_id, padding_side=side).to(device)
            batch[f"teacher_{name}_mask"] = pad([torch.ones_like(x) for x in tensors], padding_value=0,
                                                padding_side=side).to(device)
        batch["uld_groups"] = groups
        return batch

    def _logits(self, model, input_ids, attention_mask, logits_to_keep):
        """The last ``logits_to_keep`` rows of logits of ``model`` (one per completion token), with
        its logit transforms."""
        hidden = self._get_last_hidden_state(model, input_ids, attention_mask, logits_to_keep)
        logits = model.get_output_embeddings()(hidden)
        scale, softcap = logit_transform(model.config)
        logits = logits * scale if scale != 1 else logits
        return logits if softcap is None else torch.tanh(logits / softcap) * softcap

    def _cross_tokenizer_loss(self, student, inputs):
        args = self.args
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        s_logits = self._logits(student, torch.cat([inputs["prompt_ids"], completion_ids], 1),
                                torch.cat([inputs["prompt_mask"], completion_mask], 1), completion_ids.size(1))
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        teacher.eval()
        t_completion = inputs["teacher_completion_ids"]
        with torch.no_grad():
            t_logits = self._logits(teacher, torch.cat([inputs["teacher_prompt_ids"], t_completion], 1),
                                    torch.cat([inputs["teacher_prompt_mask"], inputs["teacher_completion_mask"]], 1),
                                    t_completion.size(1))
        options = args.kd_options()
        total, rows = aligned_uld_loss(
            s_logits, t_logits.to(s_logits.device), completion_ids, t_completion.to(s_logits.device),
            inputs["uld_groups"], self.vocab_map, k=args.uld_top_k, temperature=args.temperature,
            teacher_temperature=args.teacher_temperature, merge_strategy=args.uld_token_merge_strategy,
            divergence=options["divergence"], beta=args.beta, skew=args.skew,
            matched_weight=args.uld_hybrid_matched_weight, unmatched_weight=args.uld_hybrid_unmatched_weight)
        loss = args.soft_weight * total / max(rows, 1)
        valid = completion_mask.bool()
        if args.hard_weight != 0:
            loss = loss + args.hard_weight * torch.nn.functional.cross_entropy(s_logits[valid], completion_ids[valid])
        with torch.no_grad():
            log_q = torch.log_softmax(s_logits[valid].float(), -1)
            entropy_sum = -(log_q.exp() * log_q).sum()
        return loss, entropy_sum, valid.sum()

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        if self.teacher_tokenizer is not None:
            return self._cross_tokenizer_loss(unwrapped_student, inputs)
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
