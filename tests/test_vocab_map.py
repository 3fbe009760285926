"""VocabMap, byte-offset alignment, probability merging and the hybrid loss, on two tokenizers
trained here with the ``tokenizers`` library (no download), against TRL's GOLD ULDLoss."""
from types import SimpleNamespace

import pytest
import torch

import fastkd
from fastkd.vocab_map import align_by_byte_offsets, byte_offsets, merge_probabilities
from helpers import logits

tokenizers = pytest.importorskip("tokenizers")

CORPUS = ["the quick brown fox jumps over the lazy dog", "distillation across tokenizers needs an alignment",
          "a teacher and a student split words differently", "naïve café déjà vu: bytes, not characters"] * 4
TEXT = "the student jumps over a naïve teacher"


def _tokenizer(vocab_size, prefix=""):
    """A BPE tokenizer trained on CORPUS; ``prefix`` marks the pieces that continue a word (as "##"),
    so two tokenizers share some strings and not others (BPE's default: none)."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]", continuing_subword_prefix=prefix))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[UNK]"], show_progress=False,
                                             continuing_subword_prefix=prefix)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def pair():
    student, teacher = _tokenizer(60), _tokenizer(140, prefix="##")
    s_enc, t_enc = student.encode(TEXT), teacher.encode(TEXT)
    assert len(s_enc.ids) != len(t_enc.ids)  # the two split the text differently
    return student, teacher, s_enc, t_enc


def test_vocab_map_matches_by_string(pair):
    student, teacher, _, _ = pair
    vmap = fastkd.VocabMap.from_tokenizers(student, teacher)
    s_vocab, t_vocab = student.get_vocab(), teacher.get_vocab()
    t_by_id = {i: token for token, i in t_vocab.items()}
    assert 0 < len(vmap) < len(t_vocab)
    assert vmap.teacher_ids.tolist() == sorted(vmap.teacher_ids.tolist())
    for t_id, s_id in zip(vmap.teacher_ids.tolist(), vmap.student_ids.tolist()):
        assert s_vocab[t_by_id[t_id]] == s_id
    assert len(vmap) == len(set(s_vocab) & set(t_vocab))


def test_alignment_closes_groups_on_shared_byte_boundaries(pair):
    _, _, s_enc, t_enc = pair
    s_off, t_off = byte_offsets(TEXT, s_enc.offsets), byte_offsets(TEXT, t_enc.offsets)
    assert s_off[-1][1] == len(TEXT.encode("utf-8"))  # "ï" is two bytes: offsets are bytes, not characters
    s_groups, t_groups = align_by_byte_offsets(s_off, t_off)
    assert sum(s_groups, []) == list(range(len(s_off))) and sum(t_groups, []) == list(range(len(t_off)))
    for sg, tg in zip(s_groups, t_groups):
        assert s_off[sg[-1]][1] == t_off[tg[-1]][1]
    assert any(len(sg) != len(tg) for sg, tg in zip(s_groups, t_groups))


def test_merge_multiplies_the_probabilities_of_the_taken_tokens():
    probs = torch.softmax(logits(3, 5, dtype=torch.float64), -1)
    ids = [1, 4, 2]
    merged = merge_probabilities(probs, [[0, 1, 2]], ids)
    torch.testing.assert_close(merged[0], probs[0] * probs[1, 4] * probs[2, 2])
    bayes = merge_probabilities(probs, [[0, 1], [2], []], ids, strategy="bayesian")
    zeros = torch.zeros(5, dtype=probs.dtype)
    torch.testing.assert_close(bayes, torch.stack([probs[1] * probs[0, 1], probs[2], zeros]))
    with pytest.raises(ValueError, match="strategy"):
        merge_probabilities(probs, [[0]], ids, strategy="mean")


@pytest.mark.parametrize("beta, divergence", [(0.5, "jsd"), (0.0, "kl"), (1.0, "reverse_kl")])
@pytest.mark.parametrize("strategy", ["observed", "bayesian"])
def test_hybrid_and_aligned_uld_equal_gold(pair, beta, divergence, strategy):
    """GOLD's ULDLoss with byte offsets (``use_extended_uld=True``) on one sample: align, merge,
    hybrid; against fastkd's three steps, value and gradient (teacher V_t wider than its vocabulary)."""
    gold = pytest.importorskip("trl.experimental.gold.gold_trainer")
    student, teacher, s_enc, t_enc = pair
    V_s, V_t = student.get_vocab_size(), teacher.get_vocab_size() + 3
    config = SimpleNamespace(uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.5,
                             uld_teacher_temperature=1.0, uld_skip_student_eos=False, uld_skip_teacher_eos=False,
                             use_extended_uld=True, uld_token_merge_strategy=strategy, uld_use_hybrid_loss=True,
                             beta=beta)
    loss_fn = gold.ULDLoss(config, student_tokenizer=student, teacher_tokenizer=teacher)
    s_off, t_off = byte_offsets(TEXT, s_enc.offsets), byte_offsets(TEXT, t_enc.offsets)
    # One sample: a prompt row, then the answer; "bayesian" reads the logits one row earlier.
    L_s, L_t = len(s_off) + 1, len(t_off) + 1
    s_ids, t_ids = torch.tensor([[0] + s_enc.ids]), torch.tensor([[0] + t_enc.ids])
    s_labels, t_labels = s_ids.clone(), t_ids.clone()
    s_labels[0, 0] = t_labels[0, 0] = -100
    s_offsets = torch.tensor([[(0, 0)] + s_off]); t_offsets = torch.tensor([[(0, 0)] + t_off])
    s_logits, t_logits = logits(1, L_s, V_s, dtype=torch.float64), logits(1, L_t, V_t, dtype=torch.float64)

    s_logits.requires_grad_()
    want = loss_fn(s_logits, t_logits, s_labels, t_labels, s_ids, t_ids, s_offsets, t_offsets)
    (want_grad,) = torch.autograd.grad(want, s_logits)

    rows = slice(0, L_s - 1) if strategy == "bayesian" else slice(1, L_s)
    t_rows = slice(0, L_t - 1) if strategy == "bayesian" else slice(1, L_t)
    q = fastkd.softmax(s_logits[0, rows], temperature=1.5)
    p = fastkd.softmax(t_logits[0, t_rows], temperature=1.0)
    s_groups, t_groups = align_by_byte_offsets(s_off, t_off)
    q = merge_probabilities(q, s_groups, s_enc.ids, strategy)
    p = merge_probabilities(p, t_groups, t_enc.ids, strategy)
    got = fastkd.hybrid_uld_loss(q, p, fastkd.VocabMap.from_tokenizers(student, teacher), probabilities=True,
                                 divergence=divergence, beta=0.5 if divergence != "jsd" else beta)
    (grad,) = torch.autograd.grad(got, s_logits)
    torch.testing.assert_close(got, want.reshape(()), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-14)


def test_hybrid_with_an_empty_map_is_uld_and_checks_ids():
    s, t = logits(2, 4, 11, dtype=torch.float64), logits(2, 4, 9, dtype=torch.float64)
    empty = fastkd.VocabMap.from_vocabs({"a": 0}, {"b": 0})
    torch.testing.assert_close(fastkd.hybrid_uld_loss(s, t, empty, temperature=2.0),
                               fastkd.uld_loss(s, t, temperature=2.0), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="vocab_map"):
        fastkd.hybrid_uld_loss(s, t, fastkd.VocabMap.from_vocabs({"a": 20}, {"a": 0}))
    with pytest.raises(ValueError, match="matched_weight"):
        fastkd.hybrid_uld_loss(s, t, empty, matched_weight=-1.0)
