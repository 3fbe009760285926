"""Two tokenizers side by side: the columns they share (``VocabMap``) and the alignment of one
text's two tokenizations by byte offsets, with the probability merging of TRL's GOLD.

- ``VocabMap``: the teacher ids whose token string is also in the student's vocabulary, and the
  student id of each (GOLD's ``_initialize_vocabulary_mapping``: matched by the exact string).
- ``align_by_byte_offsets``: walk both ``[start, end)`` byte spans, advancing the side whose token
  ends earlier; a group closes where both sides end at the same byte. ``align_completion``: that
  for a completion the student generated, tokenized again by the teacher's tokenizer.
- ``merge_probabilities``: one row per group. A group of several tokens gets a base distribution
  times the probabilities of the tokens actually taken at its other positions (the chain rule):
  "observed" takes the first position's distribution, "bayesian" the last one's.
"""
from dataclasses import dataclass

import torch

MERGE_STRATEGIES = ("observed", "bayesian")
MERGE_FLOOR = 1e-8  # a token probability in a merged product is at least this (GOLD's eps)


@dataclass(frozen=True)
class VocabMap:
    """The columns two vocabularies share: ``teacher_ids[i]`` and ``student_ids[i]`` (int64, by
    increasing teacher id) are the same token string."""
    teacher_ids: torch.Tensor
    student_ids: torch.Tensor

    @classmethod
    def from_vocabs(cls, student_vocab, teacher_vocab):
        """From two ``{token string: id}`` dictionaries."""
        pairs = sorted((t_id, student_vocab[token]) for token, t_id in teacher_vocab.items() if token in student_vocab)
        teacher_ids = torch.tensor([t for t, _ in pairs], dtype=torch.long)
        student_ids = torch.tensor([s for _, s in pairs], dtype=torch.long)
        return cls(teacher_ids.reshape(-1), student_ids.reshape(-1))

    @classmethod
    def from_tokenizers(cls, student_tokenizer, teacher_tokenizer):
        """From two tokenizers with ``get_vocab()`` (Hugging Face ``transformers`` or ``tokenizers``);
        added tokens included."""
        return cls.from_vocabs(student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab())

    def __len__(self):
        return self.teacher_ids.numel()


def byte_offsets(text, char_offsets):
    """Character ``(start, end)`` offsets into ``text`` (what tokenizers return) as UTF-8 byte offsets."""
    starts = [0]
    for char in text:
        starts.append(starts[-1] + len(char.encode("utf-8")))
    return [(starts[a], starts[b]) for a, b in char_offsets]


def align_by_byte_offsets(student_offsets, teacher_offsets):
    """(student groups, teacher groups): lists of position lists, one pair per span of bytes where
    both tokenizations split alike; trailing tokens of either side form a last group (possibly empty
    on the other side). Offsets: ``(start, end)`` pairs (only the ends are read)."""
    s_groups, t_groups = [], []
    s = t = s_start = t_start = 0
    while s < len(student_offsets) and t < len(teacher_offsets):
        s_end, t_end = student_offsets[s][1], teacher_offsets[t][1]
        s += s_end <= t_end
        t += t_end <= s_end
        if s_end == t_end:
            s_groups.append(list(range(s_start, s)))
            t_groups.append(list(range(t_start, t)))
            s_start, t_start = s, t
    if s < len(student_offsets) or t < len(teacher_offsets):
        s_groups.append(list(range(s_start, len(student_offsets))))
        t_groups.append(list(range(t_start, len(teacher_offsets))))
    return s_groups, t_groups


def decoded_byte_ends(tokenizer, ids):
    """The UTF-8 byte end of each token of ``ids`` in their decoded text (``skip_special_tokens``):
    the length of the prefix decoded up to it. A token that ends inside a character (its prefix
    decodes to a trailing U+FFFD) ends where the token before it does; a special token is zero-width."""
    ends, end = [], 0
    for i in range(len(ids)):
        text = tokenizer.decode(ids[:i + 1], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if not text.endswith("\ufffd"):
            end = len(text.encode("utf-8"))
        ends.append((end, end))
    return ends


def align_completion(student_tokenizer, teacher_tokenizer, completion_ids, *, ends_with_eos=False):
    """``(teacher ids, student groups, teacher groups)`` of a completion given as student token ids:
    its text (decoded without special tokens) tokenized by ``teacher_tokenizer`` (no special tokens;
    then the teacher's EOS when ``ends_with_eos``, zero-width at the end, as GOLD), and the two
    tokenizations aligned by the byte ends of their decoded prefixes (``decoded_byte_ends``,
    ``align_by_byte_offsets``): exact to the byte where a token ends inside a character, which the
    character offsets of ``return_offsets_mapping`` are not. Hugging Face tokenizers."""
    completion_ids = list(completion_ids)
    text = student_tokenizer.decode(completion_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    teacher_ids = list(teacher_tokenizer(text, add_special_tokens=False)["input_ids"])
    if ends_with_eos and teacher_tokenizer.eos_token_id is not None:
        teacher_ids.append(teacher_tokenizer.eos_token_id)
    s_groups, t_groups = align_by_byte_offsets(decoded_byte_ends(student_tokenizer, completion_ids),
                                               decoded_byte_ends(teacher_tokenizer, teacher_ids))
    return teacher_ids, s_groups, t_groups


def merge_probabilities(probs, groups, token_ids, strategy="observed"):
    """``probs`` [L, V] (one row per position) as [len(groups), V]: a one-position group is its row;
    a longer one its base row ("observed": the first position's, "bayesian": the last one's) times
    the product of max(probs[i, token_ids[i]], MERGE_FLOOR) over its other positions i; an empty
    group is a row of zeros. Differentiable."""
    if strategy not in MERGE_STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(map(repr, MERGE_STRATEGIES))}")
    token_ids = torch.as_tensor(token_ids, dtype=torch.long, device=probs.device).reshape(-1)
    if token_ids.numel() != probs.shape[0]:
        raise ValueError(f"token_ids has {token_ids.numel()} entries for {probs.shape[0]} rows of probs")
    rows = []
    for group in groups:
        if not group:
            rows.append(torch.zeros_like(probs[0]))
            continue
        base, others = (group[-1], group[:-1]) if strategy == "bayesian" else (group[0], group[1:])
        factor = 1.0
        for i in others:
            factor = factor * probs[i, token_ids[i]].clamp_min(MERGE_FLOOR)
        rows.append(probs[base] * factor)
    return torch.stack(rows) if rows else probs.new_zeros(0, probs.shape[-1])
