"""fastkd.integrations.trl.DistillationTrainer against trl.DistillationTrainer, end to end on the CPU
with tiny models and a word-level tokenizer built here (no download)."""
import copy

import pytest
import torch

pytest.importorskip("trl", reason="trl is not installed (pip install trl)")
import tokenizers  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402

from fastkd import reference  # noqa: E402
from fastkd.integrations.trl import DistillationConfig, DistillationTrainer  # noqa: E402

V, P, C = 48, 4, 5  # vocabulary, prompt and completion lengths


def _tokenizer():
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, V)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>")


def _llama(hidden, seed, **config):
    torch.manual_seed(seed)
    config = dict(dict(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2), **config)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))


DATASET = Dataset.from_dict({"prompt": [" ".join(f"w{(7 * i + j) % (V - 3) + 3}" for j in range(P)) for i in range(8)]})


def _pair(tmp_path, student, teachers, **options):
    """TRL's trainer and ours on copies of the same models and options."""
    common = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, max_completion_length=C,
                  report_to=[], logging_steps=1, use_cpu=True, seed=0, save_strategy="no", **options)
    theirs = trl.DistillationTrainer(model=copy.deepcopy(student), teacher_model=copy.deepcopy(teachers[0]),
                                     args=trl.DistillationConfig(**common), train_dataset=DATASET,
                                     processing_class=_tokenizer())
    ours = DistillationTrainer(model=copy.deepcopy(student), teacher_model=copy.deepcopy(teachers),
                               args=DistillationConfig(**common), train_dataset=DATASET,
                               processing_class=_tokenizer())
    return theirs, ours


def _batch():
    g = torch.Generator().manual_seed(1)
    completion_mask = torch.ones(2, C, dtype=torch.long)
    completion_mask[1, 3:] = 0
    return dict(prompt_ids=torch.randint(3, V, (2, P), generator=g), prompt_mask=torch.ones(2, P, dtype=torch.long),
                completion_ids=torch.randint(3, V, (2, C), generator=g), completion_mask=completion_mask)


def _loss_and_grads(trainer, inputs, num_items):
    model = trainer.model
    model.zero_grad()
    loss, entropy, count = trainer._compute_loss(model, inputs, num_items)
    loss.backward()
    return (loss.detach(), entropy, count), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("beta,temperature,num_items", [(0.0, 1.0, None), (0.5, 2.0, torch.tensor(6.0)),
                                                        (1.0, 0.7, None)])
@pytest.mark.parametrize("config", [{}, dict(final_logit_softcapping=5.0, logit_scale=0.8)])
def test_a_micro_batch_has_trls_loss_entropy_and_gradients(tmp_path, beta, temperature, num_items, config):
    """The logit transforms are read from the configs (set on both models), as TRL reads them."""
    theirs, ours = _pair(tmp_path, _llama(16, 0, **config), [_llama(24, 1, **config)], beta=beta,
                         temperature=temperature)
    (loss, entropy, count), grads = _loss_and_grads(ours, _batch(), num_items)
    (t_loss, t_entropy, t_count), t_grads = _loss_and_grads(theirs, _batch(), num_items)
    assert count.equal(t_count) and not entropy.requires_grad
    torch.testing.assert_close(loss, t_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(entropy, t_entropy, rtol=1e-5, atol=1e-5)
    for g, t_g in zip(grads, t_grads):
        torch.testing.assert_close(g, t_g, rtol=1e-4, atol=1e-5 * t_g.abs().max().item())


def test_training_steps_match_trls(tmp_path):
    """Two optimiser steps of on-policy training (generation included): the same logged losses and
    entropies, and the same weights after (plain SGD: Adam's g / sqrt(g^2) would blow float32
    roundings of the near-zero gradients up to a full step)."""
    theirs, ours = _pair(tmp_path, _llama(16, 0), [_llama(24, 1)], beta=0.5, optim="sgd", learning_rate=1.0)
    logs = []
    for trainer in (theirs, ours):
        transformers.set_seed(0)
        trainer.train()
        logs.append([(h["loss"], h["entropy"]) for h in trainer.state.log_history if "loss" in h])
    assert len(logs[0]) == 2
    torch.testing.assert_close(torch.tensor(logs[1]), torch.tensor(logs[0]), rtol=1e-4, atol=1e-7)
    for p, t_p in zip(ours.model.parameters(), theirs.model.parameters()):
        torch.testing.assert_close(p, t_p, rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(p, q) for p, q in zip(ours.model.parameters(), _llama(16, 0).parameters()))


def test_several_teachers_with_fastkd_options(tmp_path):
    """Two teachers mixed 0.7 / 0.3, a skew KL at its own teacher temperature and a hard CE on the
    completion tokens: the float64 reference on the models' own logits."""
    student, teachers = _llama(16, 0), [_llama(24, 1), _llama(8, 2)]
    options = dict(divergence="skew_kl", skew=0.2, temperature=2.0, teacher_temperature=1.5, hard_weight=0.3,
                   teacher_weights=[0.7, 0.3])
    trainer = DistillationTrainer(model=student, teacher_model=teachers, train_dataset=DATASET,
                                  processing_class=_tokenizer(),
                                  args=DistillationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                                                          per_device_train_batch_size=2, **options))
    inputs = _batch()
    loss, _, count = trainer._compute_loss(trainer.model, inputs, None)

    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    valid = inputs["completion_mask"] != 0

    def completion_logits(model):  # position i predicts completion token i
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits[:, P - 1:-1][valid].double()

    expected = reference.kd_loss(completion_logits(trainer.model), [completion_logits(t) for t in teachers],
                                 labels=inputs["completion_ids"][valid], t2_scale=False, **options)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    assert count == valid.sum()


def test_bad_arguments_are_named(tmp_path):
    student, teacher = _llama(16, 0), _llama(24, 1)
    kw = dict(train_dataset=DATASET, processing_class=_tokenizer())
    args = lambda **o: DistillationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True,  # noqa: E731
                                          per_device_train_batch_size=2, **o)
    with pytest.raises(ValueError, match="teacher_weights"):
        DistillationTrainer(model=student, teacher_model=[teacher, teacher], args=args(teacher_weights=[1.0]), **kw)
    with pytest.raises(TypeError, match=r"teacher_model\[1\]"):
        DistillationTrainer(model=student, teacher_model=[teacher, "some/model"], args=args(), **kw)
    with pytest.raises(TypeError, match="DistillationConfig"):
        DistillationTrainer(model=student, teacher_model=teacher, **kw,
                            args=trl.DistillationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True))
    with pytest.raises(ValueError, match="vocab_size"):
        DistillationTrainer(model=student, teacher_model=[teacher, _llama(8, 2, vocab_size=V + 1)], args=args(), **kw)
