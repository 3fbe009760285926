"""DistillationTrainer: two Trainer steps on tiny random Llamas equal the same steps done by hand
with full logits and the plain-PyTorch loss (loss values, the gradient-accumulation count, the
updated weights), and the student's LM head runs only in the first batch's check, on a few
positions (no [tokens, V] logits are built). Models that transform their logits (Gemma 2, Cohere,
Granite; an unknown transform) get the loss of their own logits, or an error."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason='transformers is not installed (pip install -e ".[hf]")')
pytest.importorskip("accelerate", reason='accelerate is not installed (pip install -e ".[hf]")')

import fastkd  # noqa: E402
from fastkd import reference  # noqa: E402
from fastkd.integrations.transformers import DistillationTrainer  # noqa: E402

V, SEQ = 64, 9
KD = dict(temperature=2.0, hard_weight=0.5, soft_weight=1.0, divergence="kl")
LR = 0.5


def _llama(hidden, layers, seed):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(config)


def _dataset(n=8):
    rows = []
    for i in range(n):
        ids = torch.randint(3, V, (SEQ,))
        mask = torch.ones(SEQ, dtype=torch.long)
        mask[SEQ - (i % 3):] = 0  # right padding of 0, 1 or 2 tokens
        labels = torch.where(mask.bool(), ids, -100)
        labels[: i % 2] = -100  # and an ignored prompt token
        rows.append(dict(input_ids=torch.where(mask.bool(), ids, 0), attention_mask=mask, labels=labels))
    return rows


class RecordingTrainer(DistillationTrainer):
    """Keeps each micro-batch, the count the Trainer passed, and the loss it got back."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = out[0] if return_outputs else out
        self.calls.append(({k: v.clone() for k, v in inputs.items()}, num_items_in_batch, loss.detach().clone()))
        return out


def _manual_micro_batch_loss(student, teacher, batch, num_items):
    """Full logits and the float32 reference loss, shifted and masked by hand."""
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    s = student(**inputs).logits[:, :-1]
    with torch.no_grad():
        t = teacher(**inputs).logits[:, :-1]
    return reference.kd_loss(s, t, labels=batch["labels"][:, 1:], reduction="sum", **KD) / num_items


def test_two_steps_equal_the_manual_computation(tmp_path):
    student, teacher = _llama(16, 1, seed=1), _llama(32, 2, seed=2)
    initial_student = copy.deepcopy(student)
    initial_head = student.lm_head.weight.detach().clone()
    head_calls = []
    student.get_output_embeddings().register_forward_hook(lambda m, args, out: head_calls.append(args[0].shape))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=LR, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True)
    trainer = RecordingTrainer(model=student, teacher_model=teacher, args=args, train_dataset=_dataset(),
                               data_collator=transformers.default_data_collator, **KD)
    trainer.train()
    # the student's head ran once, in the first batch's check of its logits, on 4 positions per row;
    # its [tokens, V] logits were never built
    assert head_calls == [torch.Size([2, 4, 16])]
    assert len(trainer.calls) == 4  # 2 steps x 2 micro-batches

    manual = initial_student
    optimizer = torch.optim.SGD(manual.parameters(), lr=LR)
    for step in range(2):
        micro = trainer.calls[2 * step: 2 * step + 2]
        count = sum(int((batch["labels"][:, 1:] != -100).sum()) for batch, _, _ in micro)
        for batch, num_items, loss in micro:
            assert int(num_items) == count  # the whole step's kept (shifted) labels
            expected = _manual_micro_batch_loss(manual, teacher, batch, count)
            torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
            expected.backward()
        optimizer.step()
        optimizer.zero_grad()
    for (name, trained), hand in zip(student.named_parameters(), manual.parameters()):
        torch.testing.assert_close(trained, hand, rtol=1e-4, atol=1e-6, msg=name)
    assert not torch.equal(student.lm_head.weight, initial_head)  # it did train

    # evaluation: one batch of 8, normalised by its own kept-label count
    trainer.calls.clear()
    metrics = trainer.evaluate(_dataset())
    (batch, num_items, loss), = trainer.calls
    with torch.no_grad():
        expected = _manual_micro_batch_loss(student, teacher, batch, int((batch["labels"][:, 1:] != -100).sum()))
    torch.testing.assert_close(torch.tensor(metrics["eval_loss"]), expected, rtol=1e-4, atol=1e-5)


class UpstreamTrainer(DistillationTrainer):
    """Keeps the gradient each micro-batch's loss receives from the Trainer's backward."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss.register_hook(self.upstream.append)
        return loss


@pytest.mark.parametrize("fused", [True, False])
def test_accumulated_steps_equal_whole_batches_with_an_upstream_gradient_of_1(tmp_path, fused):
    """Two steps of 2 micro-batches of 2 equal two steps of batches of 4 (losses logged, weights),
    for a student whose forward takes no loss kwargs (so the Trainer would not count the labels by
    itself); the Trainer does not divide the loss, so every backward starts from exactly 1."""
    runs = []
    for batch, accumulation in ((4, 1), (2, 2)):
        student, teacher = _llama(16, 1, seed=1), _llama(32, 2, seed=2)
        student.accepts_loss_kwargs = False
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation, learning_rate=LR, optim="sgd", lr_scheduler_type="constant",
            weight_decay=0.0, max_grad_norm=0.0, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
            seed=0, disable_tqdm=True, train_sampling_strategy="sequential")
        trainer = UpstreamTrainer(model=student, teacher_model=teacher, args=args, train_dataset=_dataset(),
                                  data_collator=transformers.default_data_collator, fused=fused, **KD)
        trainer.upstream = []
        trainer.train()
        assert len(trainer.upstream) == 2 * accumulation and all(g.item() == 1.0 for g in trainer.upstream)
        runs.append(([entry["loss"] for entry in trainer.state.log_history if "loss" in entry], student))
    (whole_losses, whole), (accumulated_losses, accumulated) = runs
    torch.testing.assert_close(torch.tensor(accumulated_losses), torch.tensor(whole_losses), rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(whole.named_parameters(), accumulated.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)


def test_bad_options_fail_at_construction(tmp_path):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="temperature"):
        DistillationTrainer(model=_llama(16, 1, 0), teacher_model=_llama(16, 1, 1), args=args, temperature=0.0)
    with pytest.raises(TypeError, match="teacher_model"):
        DistillationTrainer(model=_llama(16, 1, 0), teacher_model="gpt2", args=args)


def test_a_wrapped_model_runs_through_its_wrapper_with_the_head_on_one_position():
    """DDP and friends must see the forward; the hook catches the backbone's output on the way."""
    from fastkd.integrations.transformers import final_hidden_states

    class Wrapper(torch.nn.Module):  # stands in for DistributedDataParallel
        def __init__(self, module):
            super().__init__()
            self.module, self.calls = module, 0

        def forward(self, **kwargs):
            self.calls += 1
            return self.module(**kwargs)

    model = _llama(16, 1, seed=3)
    head_inputs = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: head_inputs.append(args[0].shape))
    batch = transformers.default_data_collator(_dataset(2))
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    wrapper = Wrapper(model)
    hidden = final_hidden_states(wrapper, model, inputs)
    assert wrapper.calls == 1 and head_inputs == [torch.Size([2, 1, 16])]
    torch.testing.assert_close(hidden, model.base_model(**inputs).last_hidden_state)
    assert hidden.requires_grad


# --- models that post-process their logits -------------------------------------------------------

# Tiny random models (no download) of the families whose forward transforms the LM head's output,
# with the student's and the teacher's transforms different; Llama has none.
FAMILIES = {
    "gemma2": (transformers.Gemma2ForCausalLM, transformers.Gemma2Config, "final_logit_softcapping", 3.0, 5.0),
    "cohere": (transformers.CohereForCausalLM, transformers.CohereConfig, "logit_scale", 0.25, 0.5),
    "granite": (transformers.GraniteForCausalLM, transformers.GraniteConfig, "logits_scaling", 4.0, 2.0),
    "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig, None, None, None),
}
HEAD_GAIN = 40.0  # random heads give logits of ~0.1; ~5 makes every transform matter


def _tiny(family, role, dtype=torch.float32, model_class=None):
    cls, config_cls, option, student_value, teacher_value = FAMILIES[family]
    hidden, layers, seed = (32, 1, 1) if role == "student" else (64, 2, 2)
    torch.manual_seed(seed)
    extra = {} if option is None else {option: student_value if role == "student" else teacher_value}
    if family == "gemma2":
        extra["head_dim"] = 16
    config = config_cls(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, **extra)
    model = (model_class or cls)(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(HEAD_GAIN)
    return model.to(dtype)


def _trainer(tmp_path, student, teacher, **options):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    return DistillationTrainer(model=student, teacher_model=teacher, args=args, **KD, **options)


def _own_logits_loss(student, teacher, batch):
    """The documented loss from the models' own forward().logits (the models' dtype, float32 loss)."""
    return _manual_micro_batch_loss(student, teacher, batch, int((batch["labels"][:, 1:] != -100).sum()))


@pytest.mark.parametrize("family", FAMILIES)
def test_trainer_loss_is_the_loss_of_the_models_own_logits(tmp_path, family):
    """Gemma 2's softcap, Cohere's logit_scale and Granite's logits_scaling, read from each model's
    config: the loss and the student's gradients are those of the models' own logits."""
    student, teacher = _tiny(family, "student"), _tiny(family, "teacher")
    trainer = _trainer(tmp_path, student, teacher)
    batch = transformers.default_data_collator(_dataset(4))
    loss = trainer.compute_loss(trainer.model, batch)
    grads = torch.autograd.grad(loss, list(student.parameters()))
    expected = _own_logits_loss(student, teacher, batch)
    expected_grads = torch.autograd.grad(expected, list(student.parameters()))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    if family != "llama":  # the transforms change the loss a lot: no transform would be far off
        plain = _trainer(tmp_path, student, teacher, student_logit_scale=1.0, student_softcap=None,
                         teacher_logit_scale=1.0, teacher_softcap=None)
        with pytest.raises(ValueError, match="logits .* differ"):
            plain.compute_loss(plain.model, batch)


def test_bf16_gemma2_passes_the_check_and_matches_its_own_logits(tmp_path):
    """The first-batch check's tolerance holds bf16 models' own rounding (bf16 matmul and tanh)."""
    student, teacher = _tiny("gemma2", "student", torch.bfloat16), _tiny("gemma2", "teacher", torch.bfloat16)
    trainer = _trainer(tmp_path, student, teacher)
    batch = transformers.default_data_collator(_dataset(4))
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        expected = _own_logits_loss(student, teacher, batch)
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=1e-3)


def _scaled_llama(kind):
    """A Llama whose forward transforms its logits in a way the trainer cannot know."""
    class Unknown(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = 0.5 * out.logits if kind == "scale" else 2.0 * torch.tanh(out.logits / 2.0)
            return out
    return Unknown


@pytest.mark.parametrize("kind", ["scale", "softcap"])
@pytest.mark.parametrize("side", ["student", "teacher"])
def test_an_unknown_logit_transform_raises_unless_given_or_not_fused(tmp_path, kind, side):
    roles = {"student": None, "teacher": None}
    roles[side] = _scaled_llama(kind)
    student = _tiny("llama", "student", model_class=roles["student"])
    teacher = _tiny("llama", "teacher", model_class=roles["teacher"])
    batch = transformers.default_data_collator(_dataset(4))
    trainer = _trainer(tmp_path, student, teacher)
    with pytest.raises(ValueError, match=rf"the {side}'s logits .* differ .* pass {side}_logit_scale=s and/or "
                                         rf"{side}_softcap=c .* fused=False"):
        trainer.compute_loss(trainer.model, batch)

    expected = _own_logits_loss(student, teacher, batch)
    transform = {f"{side}_logit_scale": 0.5} if kind == "scale" else {f"{side}_softcap": 2.0}
    for options in (transform, dict(fused=False)):
        trainer = _trainer(tmp_path, student, teacher, **options)
        torch.testing.assert_close(trainer.compute_loss(trainer.model, batch), expected, rtol=1e-5, atol=1e-6)


def test_logit_transform_options_are_checked(tmp_path):
    student, teacher = _tiny("llama", "student"), _tiny("llama", "teacher")
    with pytest.raises(ValueError, match="teacher_softcap must be finite and > 0"):
        _trainer(tmp_path, student, teacher, teacher_softcap=0.0)
    with pytest.raises(ValueError, match="fused=False"):
        _trainer(tmp_path, student, teacher, fused=False, student_logit_scale=2.0)
    with pytest.raises(TypeError, match="fused must be a bool"):
        _trainer(tmp_path, student, teacher, fused="no")


def test_teacher_temperature_reaches_the_loss(tmp_path):
    student, teacher = _llama(16, 1, seed=1), _llama(32, 2, seed=2)
    trainer = _trainer(tmp_path, student, teacher, teacher_temperature=0.7)
    batch = transformers.default_data_collator(_dataset(4))
    loss = trainer.compute_loss(trainer.model, batch)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        s, t = student(**inputs).logits[:, :-1], teacher(**inputs).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    expected = reference.kd_loss(s, t, labels=labels, reduction="sum", teacher_temperature=0.7, **KD)
    expected = expected / int((labels != -100).sum())
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(loss.detach(), _own_logits_loss(student, teacher, batch).detach(), rtol=1e-3)


def _topk_collator(teacher, k, temperature):
    """default_data_collator plus the batch's sparse teacher: a fastkd.TopK [B, S, k] of the
    teacher's logits (as a collator reading a fastkd.TeacherCache would give it)."""
    def collate(rows):
        batch = transformers.default_data_collator(rows)
        with torch.no_grad():
            logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        batch["teacher_topk"] = fastkd.teacher_topk(logits, k, temperature=temperature)
        return batch
    return collate


def test_a_sparse_teacher_in_the_batch_needs_no_teacher_model(tmp_path):
    """A batch's teacher_topk (a fastkd.TopK) is distilled with topk_kd_loss on the student's own
    logits, shifted as the labels are; its temperature is checked; the Trainer moves it and keeps it."""
    student, teacher = _llama(16, 1, seed=1), _llama(32, 2, seed=2)
    collate = _topk_collator(teacher, 8, temperature=KD["temperature"])
    trainer = _trainer(tmp_path, student, None)
    batch = collate(_dataset(4))
    loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    lp, idx = batch["teacher_topk"]
    labels = batch["labels"][:, 1:]
    expected = reference.topk_kd_loss(s, lp[:, :-1], idx[:, :-1], labels=labels, reduction="sum", **KD)
    torch.testing.assert_close(loss.detach(), expected / int((labels != -100).sum()), rtol=1e-5, atol=1e-6)

    at_another = _topk_collator(teacher, 8, temperature=1.0)(_dataset(4))
    with pytest.raises(ValueError, match=r"taken at temperature 1.0 .*pass teacher_temperature=1.0"):
        trainer.compute_loss(trainer.model, at_another)
    with pytest.raises(ValueError, match="needs teacher_topk"):
        trainer.compute_loss(trainer.model, transformers.default_data_collator(_dataset(4)))

    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2,
                                          report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trained = DistillationTrainer(model=student, args=args, train_dataset=_dataset(2), data_collator=collate, **KD)
    before = student.lm_head.weight.detach().clone()
    trained.train()
    assert not torch.equal(before, student.lm_head.weight)
