"""fastkd's DistillationTrainer with a teacher of another tokenizer, end to end on the CPU: two tiny
Llama-like models and two byte-level BPE tokenizers trained here (no download)."""
import pytest
import torch

pytest.importorskip("trl", reason="trl is not installed (pip install trl)")
import tokenizers  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402

import fastkd  # noqa: E402
from fastkd.integrations.trl import DistillationConfig, DistillationTrainer  # noqa: E402
from fastkd.vocab_map import align_by_byte_offsets, align_completion, merge_probabilities  # noqa: E402

CORPUS = ["the quick brown fox jumps over the lazy dog", "distillation across tokenizers needs an alignment",
          "a teacher and a student split words differently", "naïve café déjà vu: bytes, not characters"] * 4
PROMPTS = ["the quick brown", "a teacher and", "distillation across", "naïve café"] * 2


def _tokenizer(vocab_size):
    """A byte-level BPE tokenizer trained on CORPUS (GPT-2's scheme: any text round-trips)."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.post_processor = tokenizers.processors.ByteLevel(trim_offsets=False)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
                                             show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                padding_side="left")


def _llama(tokenizer, hidden, seed):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))


@pytest.fixture(scope="module")
def tokenizers_pair():
    student, teacher = _tokenizer(300), _tokenizer(420)
    assert len(student) != len(teacher) and student.tokenize(CORPUS[1]) != teacher.tokenize(CORPUS[1])
    return student, teacher


def _ends(tokenizer, ids):
    """Byte ends of each token: its decoded prefix's length, not counting a trailing incomplete character."""
    ends = []
    for i in range(len(ids)):
        text = tokenizer.decode(ids[:i + 1], skip_special_tokens=True)
        ends.append((0, len(text.rstrip("\ufffd").encode())))
    return ends


def _trainer(tmp_path, tokenizers_pair, **options):
    student_tok, teacher_tok = tokenizers_pair
    args = DistillationConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3,
                              max_completion_length=6, learning_rate=1e-2, report_to=[], logging_steps=1,
                              use_cpu=True, seed=0, save_strategy="no", temperature=1.0, **options)
    return DistillationTrainer(model=_llama(student_tok, 16, 0), teacher_model=_llama(teacher_tok, 24, 1), args=args,
                               train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=student_tok,
                               teacher_tokenizer=teacher_tok)


def test_align_completion_closes_groups_where_both_tokenizations_end(tokenizers_pair):
    student, teacher = tokenizers_pair
    text = "the student jumps over a naïve teacher"
    ids = student(text, add_special_tokens=False)["input_ids"] + [student.eos_token_id]
    teacher_ids, s_groups, t_groups = align_completion(student, teacher, ids, ends_with_eos=True)
    assert teacher.decode(teacher_ids, skip_special_tokens=True) == text and teacher_ids[-1] == teacher.eos_token_id
    assert s_groups[-1] == [len(ids) - 1] and t_groups[-1] == [len(teacher_ids) - 1]  # the two EOS, paired
    assert [i for g in s_groups for i in g] == list(range(len(ids)))
    assert [i for g in t_groups for i in g] == list(range(len(teacher_ids)))
    assert any(len(g) > 1 for g in s_groups + t_groups)  # the two split some words differently
    for sg, tg in zip(s_groups[:-1], t_groups[:-1]):  # each pair covers the same bytes
        assert student.decode([ids[i] for i in sg]) == teacher.decode([teacher_ids[i] for i in tg])


@pytest.mark.parametrize("options", [dict(), dict(uld_use_hybrid_loss=True, beta=0.5),
                                     dict(uld_token_merge_strategy="bayesian", uld_top_k=8)])
def test_a_micro_batch_equals_gold_pipeline_computed_directly(tmp_path, tokenizers_pair, options):
    """The trainer's loss on one generated batch against GOLD's pipeline written out here: logits of
    both models (causal shift by hand), byte-offset alignment, merged probabilities of every group,
    one ``hybrid_uld_loss(probabilities=True)`` (ULD alone: an empty map), averaged over the pairs.
    With ``uld_top_k`` the one-to-one rows take the top-K form, the lower end of the exact loss's bracket."""
    trainer = _trainer(tmp_path, tokenizers_pair, **options)
    student_tok, teacher_tok = tokenizers_pair
    examples = [{"prompt": p} for p in PROMPTS[:2]]
    batch = trainer._generate_and_score_completions(examples)
    loss, entropy, count = trainer._compute_loss(trainer.model, batch, None)
    assert torch.isfinite(loss) and loss.requires_grad and count == batch["completion_mask"].sum()

    strategy = options.get("uld_token_merge_strategy", "observed")
    vmap = fastkd.VocabMap.from_tokenizers(student_tok, teacher_tok) if options.get("uld_use_hybrid_loss") else \
        fastkd.VocabMap(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    merged_q, merged_p = [], []
    for example, ids, mask in zip(examples, batch["completion_ids"], batch["completion_mask"]):
        ids = ids[mask.bool()].tolist()
        text = student_tok.decode(ids, skip_special_tokens=True)
        prompt = student_tok(example["prompt"])["input_ids"]
        t_prompt = teacher_tok(example["prompt"])["input_ids"]
        t_ids = teacher_tok(text, add_special_tokens=False)["input_ids"]
        t_ids += [teacher_tok.eos_token_id] if ids and ids[-1] == student_tok.eos_token_id else []
        s_groups, t_groups = align_by_byte_offsets(_ends(student_tok, ids), _ends(teacher_tok, t_ids))
        with torch.no_grad():
            q = torch.softmax(trainer.model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1].float(), -1)
            p = torch.softmax(trainer.teacher_model(torch.tensor([t_prompt + t_ids])).logits[0, len(t_prompt) - 1:-1],
                              -1)
        pairs = [(sg, tg) for sg, tg in zip(s_groups, t_groups) if sg and tg]
        merged_q.append(merge_probabilities(q, [sg for sg, _ in pairs], ids, strategy))
        merged_p.append(merge_probabilities(p, [tg for _, tg in pairs], t_ids, strategy))
    q, p = torch.cat(merged_q), torch.cat(merged_p)
    want = fastkd.hybrid_uld_loss(q, p, vmap, probabilities=True, beta=options.get("beta", 0.5))
    if "uld_top_k" in options:
        assert 0 < loss.detach() <= want + 1e-6  # W_K <= W on the top-K rows (the bound: tests/test_uld.py)
    else:
        torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6)


def test_training_steps_run_and_update_the_student(tmp_path, tokenizers_pair):
    trainer = _trainer(tmp_path, tokenizers_pair, uld_use_hybrid_loss=True)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_bad_options_are_named(tmp_path, tokenizers_pair):
    with pytest.raises(ValueError, match="uld_token_merge_strategy"):
        _trainer(tmp_path, tokenizers_pair, uld_token_merge_strategy="mean")
    with pytest.raises(ValueError, match="uld_top_k"):
        _trainer(tmp_path, tokenizers_pair, uld_top_k=0)
    student_tok, teacher_tok = tokenizers_pair
    with pytest.raises(ValueError, match="only teacher"):
        DistillationTrainer(model=_llama(student_tok, 16, 0), teacher_model=[_llama(teacher_tok, 24, 1)] * 2,
                            args=DistillationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True),
                            train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=student_tok,
                            teacher_tokenizer=teacher_tok)
