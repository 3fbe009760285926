"""Parsers from a served teacher's answer (vLLM, SGLang, the OpenAI completions and chat forms) to
fastkd's top-k: ``TopK(logprobs [n, k] float32, indices [n, k] int32, temperature)``.

Alignment. A prompt of L tokens has L - 1 log-probability positions: position i (1 <= i < L) is the
teacher's distribution of token i given tokens 0..i-1, and token 0 has none (every server answers
None there). ``read_topk`` returns them in order as rows 0..L-2, which lines up with a causal LM's
logits ``logits[:, :-1]`` (the row that predicts token i is row i - 1): what
``teacher_topk(teacher(ids).logits[0, :-1], k)`` returns for the same model.

Per position, the entries the server lists (its top-k, plus the prompt or sampled token that vLLM and
SGLang add beside them) are merged by token id (an id listed twice with the same value counts once;
with different values it is an error), sorted by log-probability descending (ties: lower id first)
and cut to the k largest. ``None``, ``-inf`` and the OpenAI servers' ``-9999.0`` ("below the top
20") are probability 0. A position with fewer than k entries (a string-keyed answer whose token
strings collided, a server that listed fewer) is padded with log-probability ``-inf`` at the lowest
ids it does not list: a padded point asserts p = 0 there (see docs/topk.md for what that costs each
tail). Anything malformed (a missing position, an id outside [0, vocab_size), a value above 0 or a
position whose probabilities sum above 1: logits rather than log-probabilities) is a ValueError
naming the request and the position.
"""
import itertools
import math
import re
from collections.abc import Mapping, Sequence

import torch

from ..options import check_int, check_k, check_temperature
from ..topk_values import TopK

FORMATS = ("vllm", "sglang", "openai")
_TOKEN_ID = re.compile(r"token_id:(-?\d+)\Z")  # vLLM's --return-tokens-as-token-ids strings
_FLOOR = -9999.0  # what OpenAI-compatible servers send for "very unlikely" (JSON has no -inf)
_MASS_SLACK = 1e-3  # listed probabilities may sum this far above 1 (float rounding of the server)


class _Where:
    """Names the request and position of an error."""

    def __init__(self, request):
        self.request = request

    def error(self, message, position=None):
        at = "" if position is None else f", position {position}"
        return ValueError(f"teacher answer of request {self.request!r}{at}: {message}")


def _logprob(value, where, position):
    """A log-probability from the wire: float, or -inf for None / -inf / the -9999 floor."""
    if value is None:
        return -math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise where.error(f"log-probability {value!r} is not a number", position)
    value = float(value)
    if math.isnan(value):
        raise where.error("log-probability is NaN", position)
    if value > 1e-4:
        raise where.error(f"log-probability {value} > 0: these are logits, not log-probabilities (a server "
                          "with logprobs_mode raw_logits / processed_logits?)", position)
    return -math.inf if value <= _FLOOR else min(value, 0.0)


def _token_id(token, vocab, where, position):
    """An id from an int, a "token_id:N" string, or a token string looked up in ``vocab``."""
    if isinstance(token, bool):
        raise where.error(f"token {token!r} is not a token id", position)
    if isinstance(token, int):
        return token
    if isinstance(token, str):
        match = _TOKEN_ID.match(token)
        if match:
            return int(match.group(1))
        if vocab is None:
            raise where.error(f"token {token!r} is a string: pass vocab= (token string -> id, e.g. "
                              "tokenizer.get_vocab()) or start vLLM with --return-tokens-as-token-ids", position)
        if token not in vocab:
            raise where.error(f"token {token!r} is not in vocab", position)
        return int(vocab[token])
    raise where.error(f"token {token!r} is neither an id nor a string", position)


def _position(entries, k, vocab_size, vocab, where, position):
    """One position: ``entries`` (token, logprob) pairs -> k (logprob, id) pairs, descending."""
    merged = {}
    for token, value in entries:
        i = _token_id(token, vocab, where, position)
        if i < 0 or (vocab_size is not None and i >= vocab_size):
            raise where.error(f"token id {i} is outside [0, vocab_size) = [0, {vocab_size})", position)
        lp = _logprob(value, where, position)
        if i in merged and not math.isclose(merged[i], lp, rel_tol=1e-6, abs_tol=1e-6):
            raise where.error(f"token id {i} is listed twice, with log-probabilities {merged[i]} and {lp} "
                              "(token strings that map to one id? use token ids)", position)
        merged[i] = max(merged.get(i, -math.inf), lp)
    if sum(math.exp(lp) for lp in merged.values()) > 1 + _MASS_SLACK:
        raise where.error("the listed probabilities sum above 1: not log-probabilities of one distribution "
                          "(logits, or a wrong temperature?)", position)
    ranked = sorted(merged.items(), key=lambda item: (-item[1], item[0]))[:k]
    pad = (i for i in itertools.count() if i not in merged)
    ranked += [(next(pad), -math.inf) for _ in range(k - len(ranked))]
    return [lp for _, lp in ranked], [i for i, _ in ranked]


# --------------------------------------------------------------------- one extractor per format
# Each returns (positions, echoed prompt ids or None, the first position's number); positions is a
# list of lists of (token, logprob) pairs, None where the server gives no distribution (None or empty).

def _prompt(positions, where):
    """The prompt positions after token 0, which must have no distribution."""
    if not isinstance(positions, list) or not positions or positions[0] is not None:
        raise where.error("the first prompt token must have no distribution (None): is the answer the whole "
                          "prompt's (logprob_start_len=0, echo=True)?", 0)
    return positions[1:]


def _get(obj, key, where, what):
    if not isinstance(obj, Mapping) or key not in obj:
        raise where.error(f"no {key!r} in {what}: {_short(obj)}")
    return obj[key]


def _short(obj):
    text = repr(obj)
    return text if len(text) <= 200 else text[:200] + "..."


def _choice(response, choice, where):
    choices = _get(response, "choices", where, "the answer")
    if not isinstance(choices, Sequence) or not 0 <= choice < len(choices):
        raise where.error(f"choice {choice} is not in the answer's {len(choices)} choices")
    return choices[choice]


def _answer_id(response):
    """The request id an answer carries (vLLM's request_id, the OpenAI id, SGLang's meta_info.id)."""
    if isinstance(response, Sequence) and not isinstance(response, (str, bytes)) and response:
        response = response[0]
    if not isinstance(response, Mapping):
        return getattr(response, "request_id", None)
    return response.get("id", (response.get("meta_info") or {}).get("id"))


def _vllm_entry(value):
    """A vLLM Logprob: the dataclass (offline) or its JSON object."""
    if isinstance(value, Mapping):
        return value.get("logprob")
    return getattr(value, "logprob", value)


def _vllm_id(token, where):
    """A vLLM prompt_logprobs key: an int (offline), or its decimal string (a JSON object key)."""
    if isinstance(token, str) and token.isdigit():
        return int(token)
    if isinstance(token, int) and not isinstance(token, bool):
        return token
    raise where.error(f"prompt_logprobs key {token!r} is not a token id")


def _vllm(response, choice, where):
    """vLLM's ``prompt_logprobs``: list[None | {token id: Logprob}], from a RequestOutput, or from
    the OpenAI-compatible server's completions (per choice) or chat completions (top level)."""
    if hasattr(response, "prompt_logprobs") and not isinstance(response, Mapping):
        table, echoed = response.prompt_logprobs, getattr(response, "prompt_token_ids", None)
    else:
        table = response.get("prompt_logprobs") if isinstance(response, Mapping) else None
        if table is None:
            picked = _choice(response, choice, where)
            table = _get(picked, "prompt_logprobs", where, f"choice {choice}")
        echoed = None
    if table is None:
        raise where.error("prompt_logprobs is null: ask with prompt_logprobs=k")
    # position 0 is None ({} in vLLM's FlatLogprobs)
    positions = [None if not p else [(_vllm_id(token, where), _vllm_entry(value)) for token, value in p.items()]
                 for p in table]
    return _prompt(positions, where), None if echoed is None else list(echoed), 1


def _sglang(response, choice, where):
    """SGLang's /generate: meta_info.input_top_logprobs, list[None | [[logprob, id, text], ...]],
    and meta_info.input_token_logprobs, [[logprob, id, text], ...] (the prompt's own ids)."""
    if isinstance(response, Sequence) and not isinstance(response, (str, bytes)):
        if not 0 <= choice < len(response):
            raise where.error(f"choice {choice} is not in the batch's {len(response)} answers")
        response = response[choice]
    meta = _get(response, "meta_info", where, "the answer")
    top = _get(meta, "input_top_logprobs", where, "meta_info (ask with return_logprob, top_logprobs_num, "
                                                   "logprob_start_len=0)")
    tokens = meta.get("input_token_logprobs")
    # SGLang echoes ids >= its vocab_size - 1 as 0 (to detokenize them): 0 checks nothing
    echoed = None if tokens is None else [t[1] or None for t in tokens]
    positions = [None if not p else [(entry[1], entry[0]) for entry in p] for p in top]
    return _prompt(positions, where), echoed, 1


def _openai(response, choice, where):
    """The OpenAI forms: completions ``logprobs`` {tokens, token_logprobs, top_logprobs: [None |
    {token: logprob}]} (echo=True gives the prompt's; ``usage.prompt_tokens`` cuts off the
    completion), or chat ``logprobs.content``: [{token, logprob, top_logprobs: [{token, logprob}]}]
    (the generated tokens: there is no prompt position)."""
    logprobs = _get(_choice(response, choice, where), "logprobs", where, f"choice {choice}")
    if isinstance(logprobs, Mapping) and "content" in logprobs:
        content = logprobs["content"] or []
        positions = [[(e.get("token"), e.get("logprob")) for e in (c.get("top_logprobs") or [])]
                     + [(c.get("token"), c.get("logprob"))] for c in content]
        return positions, None, 0
    top = _get(logprobs, "top_logprobs", where, "logprobs (ask with logprobs=k, echo=True)")
    tokens = logprobs.get("tokens")
    usage = response.get("usage") or {}
    if usage.get("prompt_tokens") is not None:
        top, tokens = top[:usage["prompt_tokens"]], None if tokens is None else tokens[:usage["prompt_tokens"]]
    positions = [None if not p else list(p.items()) for p in top]
    return _prompt(positions, where), tokens, 1


_EXTRACT = {"vllm": _vllm, "sglang": _sglang, "openai": _openai}


def read_topk(response, format, k, *, vocab_size=None, temperature=1.0, tokens=None, vocab=None, choice=0,
              request=None):
    """The teacher's top-k at each prompt position of ``response``, as ``fastkd.TopK``.

    ``response``: a parsed JSON answer (dict, or SGLang's list for a batch) or vLLM's offline
    ``RequestOutput``. ``format``: ``"vllm"`` (``prompt_logprobs``: offline, or the server's
    completions / chat completions asked with ``prompt_logprobs=k``), ``"sglang"`` (/generate with
    ``return_logprob``, ``logprob_start_len=0``, ``top_logprobs_num=k``) or ``"openai"``
    (completions ``logprobs=k, echo=True``; chat ``logprobs.content``: the generated positions).
    ``k``: entries kept per position. ``vocab_size``: when given, ids must lie in [0, vocab_size).
    ``temperature``: the temperature the server's log-probabilities carry, recorded on the result
    so that ``topk_kd_loss`` refuses a mismatch: 1.0 for raw log-probabilities (vLLM's default
    ``logprobs_mode=raw_logprobs``) and for any answer to a request at temperature 1.0; the
    request's temperature for log-probabilities a server processed with it (vLLM's
    ``processed_logprobs``). ``tokens``: the prompt ids sent; when given, the answer must have
    ``len(tokens) - 1`` positions and echo these ids (where it echoes ids). ``vocab``: token string
    -> id, for answers keyed by token strings. ``choice``: which choice (or batch entry).
    ``request``: a name for error messages (default: the answer's id).

    Returns ``TopK(logprobs [n, k] float32 (descending), indices [n, k] int32, temperature)``; its
    log-probabilities carry the temperature as ``teacher_topk``'s do. Token 0 (no distribution) is
    dropped: row i is the distribution of token i + 1.
    """
    if format not in _EXTRACT:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    k = check_int("k", k, minimum=1) if vocab_size is None else check_k(k, check_int("vocab_size", vocab_size, 1))
    choice = check_int("choice", choice, minimum=0)
    temperature = check_temperature(temperature)
    where = _Where(_answer_id(response) if request is None else request)
    try:
        positions, echoed, first = _EXTRACT[format](response, choice, where)
    except (AttributeError, IndexError, KeyError, TypeError) as e:
        raise where.error(f"malformed {format} answer ({type(e).__name__}: {e}): {_short(response)}") from None
    if tokens is not None:
        if first == 0:
            raise ValueError("tokens= checks prompt positions; the chat form has none (its positions are generated)")
        _check_alignment([int(t) for t in tokens], positions, echoed, where)
    lps, ids = [], []
    for position, entries in enumerate(positions, start=first):
        if entries is None:
            raise where.error("no distribution at this position", position)
        lp, idx = _position(entries, k, vocab_size, vocab, where, position)
        lps.append(lp)
        ids.append(idx)
    logprobs = torch.tensor(lps, dtype=torch.float32).reshape(len(lps), k)
    indices = torch.tensor(ids, dtype=torch.int32).reshape(len(ids), k)
    return TopK(logprobs, indices, temperature)


def _check_alignment(tokens, positions, echoed, where):
    """The answer covers exactly ``tokens`` (L - 1 positions) and echoes them where it echoes ids."""
    if len(positions) != len(tokens) - 1:
        raise where.error(f"{len(positions) + 1} prompt positions for a prompt of {len(tokens)} tokens: a shifted "
                          "or truncated answer")
    if echoed is None:
        return
    for position, (sent, got) in enumerate(zip(tokens, echoed)):
        if isinstance(got, str) and not _TOKEN_ID.match(got):
            return  # decoded text: not an id to compare
        if got is None:
            continue
        got_id = _token_id(got, None, where, position)
        if got_id != sent:
            raise where.error(f"the answer's prompt token is {got_id}, the request's {sent}", position)
