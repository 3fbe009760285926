"""Fill a ``TeacherCache`` from a served teacher: send each sequence's token ids to a vLLM,
OpenAI-compatible or SGLang endpoint, read the top-k of every prompt position (``read_topk``) and
append them in dataset order.

Requests run ``concurrency`` at a time (a thread pool; answers are written in order, so the cache
does not depend on which answer came first). A failed request (connection error, timeout, HTTP 429
or 5xx) is retried ``retries`` times, waiting ``backoff * 2**attempt`` seconds (at most 60); any
other HTTP error, or a malformed answer, stops at once. The cache is written with
``TeacherCacheWriter.resume``: each finished shard is recorded on disk, so a run that stops (an
error, Ctrl-C, a killed process) is continued by calling ``fill_cache`` again with the same
arguments: it keeps the finished shards, asks again from the first token they do not hold, and
leaves the same bytes as a run that never stopped. The dataset's token ids are hashed into the
cache's metadata, so a resume on other data is refused.
"""
import hashlib
import http.client
import json
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..options import check_int, check_k
from ..teacher_cache import INDEX_FILE, TeacherCache, TeacherCacheWriter
from .formats import FORMATS, read_topk

RETRIED_STATUS = (408, 429, 500, 502, 503, 504)
_MAX_WAIT = 60.0


class ServingError(RuntimeError):
    """The teacher server did not answer a request, after its retries."""


def request_body(format, ids, k, *, temperature=1.0, model=None):
    """The endpoint path and JSON body that ask for the top-k of every prompt position of ``ids``."""
    if format == "sglang":
        return "/generate", {"input_ids": ids, "return_logprob": True, "logprob_start_len": 0,
                             "top_logprobs_num": k,
                             "sampling_params": {"max_new_tokens": 0, "temperature": temperature}}
    ask = {"vllm": {"prompt_logprobs": k}, "openai": {"logprobs": k, "echo": True}}[format]
    body = {"prompt": ids, "max_tokens": 1, "temperature": temperature, **ask}
    return "/v1/completions", body if model is None else {"model": model, **body}


def _post(url, body, *, timeout, retries, backoff, api_key, name):
    """POST ``body`` as JSON, retrying transient failures; the parsed JSON answer."""
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=timeout) as answer:
                text = answer.read()
            try:
                return json.loads(text)
            except ValueError:
                raise ValueError(f"{name}: {url} answered with invalid JSON: {text[:200]!r}") from None
        except urllib.error.HTTPError as e:
            if e.code not in RETRIED_STATUS:
                detail = e.read()[:500].decode(errors="replace")
                raise ServingError(f"{name}: {url} answered HTTP {e.code}: {detail}") from None
            failure = f"HTTP {e.code}"
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
            failure = f"{type(e).__name__}: {e}"
        if attempt < retries:
            time.sleep(min(backoff * 2**attempt, _MAX_WAIT))
    raise ServingError(f"{name}: {url} failed {retries + 1} times, last with {failure}")


class _Progress:
    """tqdm when installed, else one line on stderr every ``every`` seconds."""

    def __init__(self, total, done, enabled, every=5.0):
        self.total, self.done, self.enabled, self.every = total, done, enabled, every
        self.bar, self.last = None, time.monotonic()
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=done, unit="tok", desc="teacher top-k")
            except ImportError:
                pass

    def update(self, n):
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and (time.monotonic() - self.last >= self.every or self.done == self.total):
            self.last = time.monotonic()
            print(f"fastkd.serving: {self.done}/{self.total} tokens ({100 * self.done / max(self.total, 1):.0f}%)",
                  file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _dataset(sequences, vocab_size):
    """The sequences as lists of ints, checked, and a SHA-256 of them all (the resume guard)."""
    digest, lists = hashlib.sha256(), []
    for i, seq in enumerate(sequences):
        ids = np.asarray(seq.tolist() if isinstance(seq, torch.Tensor) else seq)
        if ids.ndim != 1 or len(ids) == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"sequences[{i}] must be a non-empty 1-D sequence of token ids, got {ids.dtype} "
                             f"{ids.shape}")
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise ValueError(f"sequences[{i}] holds a token id outside [0, vocab_size) = [0, {vocab_size})")
        digest.update(np.int64(len(ids)).tobytes() + ids.astype("<i8").tobytes())
        lists.append(ids.tolist())
    return lists, digest.hexdigest()


def fill_cache(path, sequences, *, url, format, k, vocab_size, temperature=1.0, model=None, vocab=None,
               concurrency=8, retries=5, backoff=1.0, timeout=300.0, api_key=None, dtype=torch.float16,
               tokens_per_shard=2**20, progress=True):
    """Ask the teacher at ``url`` for the top-k of every position of ``sequences`` and write them to
    a ``TeacherCache`` at ``path``; returns the opened cache. Resumes an interrupted run.

    ``sequences``: token-id sequences (lists, 1-D tensors or arrays), each of L tokens giving L - 1
    cache rows, in order: row i of a sequence is the teacher's distribution of token i + 1, the row
    that a causal student's ``logits[:, :-1]`` predicts it from. ``url``: the server, e.g.
    ``"http://127.0.0.1:8000"`` (``/v1/completions`` for ``format="vllm"`` / ``"openai"``,
    ``/generate`` for ``"sglang"`` is appended). ``k``, ``vocab_size``, ``temperature``, ``vocab``:
    as in ``read_topk`` (``temperature``: what the server's log-probabilities carry, also sent as
    the request's sampling temperature). ``model``: the served model's name, when the server needs
    it. ``concurrency``: requests in flight. ``retries``, ``backoff``, ``timeout`` (seconds):
    per request. ``dtype``, ``tokens_per_shard``: the cache's. ``progress``: a progress bar.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    vocab_size = check_int("vocab_size", vocab_size, minimum=1)
    k = check_k(k, vocab_size)
    concurrency, retries = check_int("concurrency", concurrency, minimum=1), check_int("retries", retries, minimum=0)
    sequences, digest = _dataset(sequences, vocab_size)
    metadata = {"serving": {"format": format, "model": model, "dataset_sha256": digest}}
    options = dict(k=k, vocab_size=vocab_size, temperature=temperature, dtype=dtype,
                   tokens_per_shard=tokens_per_shard, metadata=metadata)
    if Path(path, INDEX_FILE).is_file():  # a finished run: the same one, or an error
        cache = TeacherCache(path)
        name = lambda d: str(d).removeprefix("torch.")  # noqa: E731
        if (cache.k, cache.vocab_size, cache.temperature, name(cache.dtype), cache.metadata) != \
                (k, vocab_size, float(temperature), name(dtype), metadata):
            raise FileExistsError(f"{path} already holds a teacher cache of other data, options or server")
        return cache
    endpoint = url.rstrip("/")
    with TeacherCacheWriter.resume(Path(path), **options) as writer:
        skip = writer.written_tokens  # rows already in finished shards
        bar = _Progress(sum(len(s) - 1 for s in sequences), skip, progress)

        def fetch(i):
            route, body = request_body(format, sequences[i], k, temperature=temperature, model=model)
            answer = _post(endpoint + route, body, timeout=timeout, retries=retries, backoff=backoff,
                           api_key=api_key, name=f"sequence {i}")
            return read_topk(answer, format, k, vocab_size=vocab_size, temperature=temperature,
                             tokens=sequences[i], vocab=vocab, request=f"sequence {i}")

        start = 0
        while start < len(sequences) and skip >= len(sequences[start]) - 1:
            skip -= len(sequences[start]) - 1
            start += 1
        with ThreadPoolExecutor(concurrency) as pool:
            pending = deque()
            try:
                for i in range(start, len(sequences) + 1):
                    if i < len(sequences) and len(sequences[i]) > 1:
                        pending.append(pool.submit(fetch, i))
                    while pending and (len(pending) > 2 * concurrency or i == len(sequences)):
                        logprobs, indices = pending.popleft().result()
                        # the first sequence may be partly in the kept shards
                        writer.append(logprobs[skip:], indices[skip:])
                        bar.update(len(logprobs) - skip)
                        skip = 0
            except BaseException:
                for future in pending:
                    future.cancel()
                raise
            finally:
                bar.close()
    return TeacherCache(path)
