"""A served teacher: ``read_topk`` on recorded answers of each format (written from the vLLM, SGLang
and OpenAI documentation) and on a local server running a tiny Llama, whose top-k must equal
``teacher_topk`` of the same model's logits; ``fill_cache`` with bounded concurrency, retries, and
a resume after an interruption that leaves the same bytes as a run that never stopped."""
import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import fastkd
from fastkd import TeacherCache, TeacherCacheError
from fastkd.serving import ServingError, fill_cache, read_topk, request_body
from helpers import assert_close_to_oracle
from teacher_server import VOCAB_SIZE, TeacherServer, tiny_llama, token_string

FIXTURES = Path(__file__).parent / "fixtures" / "serving"
INF = float("inf")
ECHO_VOCAB = {"Hello": 9707, " world": 1879, "!": 0, " How": 2585, ",": 11, " there": 1052, ".": 13, " I": 358}


def fixture(name):
    return json.loads((FIXTURES / f"{name}.json").read_text())


def f32(rows):
    return torch.tensor(rows, dtype=torch.float32)


# name, format, read_topk options, expected log-probabilities, expected ids
RECORDED = [
    ("vllm_completions", "vllm", dict(k=2, vocab_size=151936, tokens=[1, 15, 7, 42]),
     [[-0.5108, -1.204], [-0.3567, -2.3026], [-0.1054, -2.9957]], [[15, 3], [9, 11], [42, 8]]),
    # k = 3: position 1 lists 2 tokens (padded with -inf at id 0), position 2 adds the prompt token
    ("vllm_completions", "vllm", dict(k=3, vocab_size=151936),
     [[-0.5108, -1.204, -INF], [-0.3567, -2.3026, -3.2189], [-0.1054, -2.9957, -INF]],
     [[15, 3, 0], [9, 11, 7], [42, 8, 0]]),
    ("openai_completions_echo", "openai", dict(k=2, vocab_size=151936, vocab=ECHO_VOCAB),
     [[-0.9163, -1.6094], [-0.6931, -1.204]], [[11, 1052], [0, 13]]),
    # vLLM's --return-tokens-as-token-ids; -9999.0 ("below the top 20") is p = 0
    ("openai_completions_token_ids", "openai", dict(k=3, vocab_size=151936, tokens=[9707, 1879, 0]),
     [[-0.9163, -1.6094, -2.3026], [-0.6931, -1.204, -INF]], [[11, 1052, 1879], [0, 13, 151643]]),
    ("openai_chat", "openai", dict(k=2), [[-0.0513, -3.0513], [-0.2231, -1.6094]],
     [[59604, 785], [13, 0]]),
    # a tie (position 3) lists the lower id first
    ("sglang_generate", "sglang", dict(k=2, vocab_size=128256, tokens=[128000, 791, 6864, 315]),
     [[-1.8971, -2.1203], [-2.3026, -2.9957], [-0.6931, -0.6931]], [[40, 791], [1176, 1888], [315, 3363]]),
]


@pytest.mark.parametrize("name, format, options, logprobs, ids", RECORDED)
def test_recorded_answers(name, format, options, logprobs, ids):
    topk = read_topk(fixture(name), format, **options)
    assert isinstance(topk, fastkd.TopK) and topk.temperature == 1.0
    assert topk.logprobs.dtype == torch.float32 and topk.indices.dtype == torch.int32
    assert topk.logprobs.equal(f32(logprobs)), topk.logprobs
    assert topk.indices.tolist() == ids


def test_vllm_request_output_offline():
    """The offline ``RequestOutput``: ``prompt_logprobs`` of ``Logprob`` objects keyed by int ids;
    a -inf and a None entry are p = 0; the prompt token (rank 7) beside the top 2 is cut."""
    lp = lambda value, rank: SimpleNamespace(logprob=value, rank=rank, decoded_token="x")  # noqa: E731
    out = SimpleNamespace(request_id="0", prompt_token_ids=[5, 2, 9], prompt_logprobs=[
        None, {2: lp(-0.1, 1), 4: lp(-INF, 2)}, {1: lp(-0.7, 1), 3: lp(-0.9, 2), 9: lp(-4.0, 7), 6: lp(None, 3)}])
    topk = read_topk(out, "vllm", 2, vocab_size=10, tokens=[5, 2, 9])
    assert topk.logprobs.equal(f32([[-0.1, -INF], [-0.7, -0.9]]))
    assert topk.indices.tolist() == [[2, 4], [1, 3]]
    with pytest.raises(ValueError, match=r"request '0', position 1: the answer's prompt token is 2, the request's 3"):
        read_topk(out, "vllm", 2, vocab_size=10, tokens=[5, 3, 9])


def test_padding_is_neutral_for_the_renormalised_tail():
    """A position padded to k (-inf at an unlisted id) gives the renormalised KL of its listed tokens."""
    answer = fixture("vllm_completions")
    padded, listed = read_topk(answer, "vllm", 3, vocab_size=50), read_topk(answer, "vllm", 2, vocab_size=50)
    student = torch.randn(3, 50)
    loss = lambda t: fastkd.topk_kd_loss(student, *t, tail="renormalize", reduction="none")  # noqa: E731
    torch.testing.assert_close(loss(padded)[0], loss(listed)[0])


def test_an_id_listed_twice():
    answer = fixture("sglang_generate")
    answer["meta_info"]["input_top_logprobs"][2].append([-2.3026, 1176, " first"])  # the same value: one entry
    assert read_topk(answer, "sglang", 2, vocab_size=128256).indices[1].tolist() == [1176, 1888]
    answer["meta_info"]["input_top_logprobs"][2].append([-0.5, 1176, " first"])
    with pytest.raises(ValueError, match=r"request '8d2f.*', position 2: token id 1176 is listed twice"):
        read_topk(answer, "sglang", 2, vocab_size=128256)


def _vllm(edit):
    answer = fixture("vllm_completions")
    edit(answer["choices"][0]["prompt_logprobs"])
    return answer


MALFORMED = [  # (format, answer, read_topk options, the error's words)
    ("vllm", _vllm(lambda t: t.__setitem__(0, {"1": {"logprob": -0.1}})), {}, r"position 0: the first prompt token"),
    ("vllm", _vllm(lambda t: t.__setitem__(2, None)), {}, r"position 2: no distribution"),
    ("vllm", _vllm(lambda t: t[1].__setitem__("999999", {"logprob": -5.0})), {}, r"position 1: token id 999999 is out"),
    ("vllm", _vllm(lambda t: t[3]["42"].__setitem__("logprob", 1.5)), {}, r"position 3: .* > 0: these are logits"),
    ("vllm", _vllm(lambda t: t[3]["8"].__setitem__("logprob", -0.01)), {}, r"position 3: .* sum above 1"),
    ("vllm", _vllm(lambda t: t[2]["9"].__setitem__("logprob", float("nan"))), {}, r"position 2: .* is NaN"),
    ("vllm", _vllm(lambda t: t[2]["9"].__setitem__("logprob", "high")), {}, r"position 2: .* is not a number"),
    ("vllm", _vllm(lambda t: t[1].__setitem__("a", {"logprob": -5.0})), {}, r"key 'a' is not a token id"),
    ("vllm", _vllm(lambda t: t.pop()), {"tokens": [1, 15, 7, 42]}, r"3 prompt positions for a prompt of 4 tokens"),
    ("vllm", _vllm(lambda t: t.insert(1, t[1])), {"tokens": [1, 15, 7, 42]}, r"5 prompt positions for a prompt of 4"),
    ("vllm", _vllm(lambda t: t.clear()), {}, r"position 0: the first prompt token"),
    ("vllm", {"choices": [{"text": ""}]}, {}, r"no 'prompt_logprobs' in choice 0"),
    ("vllm", {"choices": [{"prompt_logprobs": [None, [1, 2]]}]}, {}, r"malformed vllm answer \(AttributeError"),
    ("openai", fixture("openai_completions_echo"), {}, r"position 1: token ',' is a string: pass vocab="),
    ("sglang", fixture("sglang_generate"), {"tokens": [128000, 791, 6000, 315]},
     r"position 2: the answer's prompt token is 6864, the request's 6000"),
    ("sglang", {"meta_info": {"input_top_logprobs": [None, [[-0.1]]]}}, {}, r"malformed sglang answer \(IndexError"),
]


@pytest.mark.parametrize("format, answer, options, words", MALFORMED)
def test_malformed_answers_name_the_request_and_the_position(format, answer, options, words):
    with pytest.raises(ValueError) as error:
        read_topk(answer, format, 2, vocab_size=151936, request="req-7", **options)
    assert re.search(words, str(error.value)) and "request 'req-7'" in str(error.value), str(error.value)


@pytest.mark.parametrize("options, words", [
    (dict(format="vllm2"), "format must be one of"), (dict(k=0), "k must be in"), (dict(k=True), "k must be an int"),
    (dict(k=2.0), "k must be an int"), (dict(vocab_size=1), r"k must be in \[1, V\] = \[1, 1\]"),
    (dict(vocab_size=None, k=0), "k must be >= 1"), (dict(temperature=0.0), "temperature"),
    (dict(choice=-1), "choice must be >= 0"), (dict(choice=3), "choice 3 is not in the answer's 1 choices"),
])
def test_bad_arguments(options, words):
    call = dict(response=fixture("vllm_completions"), format="vllm", k=2, vocab_size=151936)
    with pytest.raises((ValueError, TypeError), match=words):
        read_topk(**{**call, **options})


def test_tokens_cannot_check_the_chat_form():
    with pytest.raises(ValueError, match="the chat form has none"):
        read_topk(fixture("openai_chat"), "openai", 2, vocab_size=151936, tokens=[1, 2])


def test_the_temperature_is_recorded_and_checked():
    """Processed log-probabilities (vLLM's logprobs_mode=processed_logprobs) at T = 2."""
    topk = read_topk(fixture("vllm_completions"), "vllm", 2, vocab_size=50, temperature=2.0)
    assert topk.temperature == 2.0
    student = torch.randn(3, 50)
    with pytest.raises(ValueError, match="teacher_temperature=2.0"):
        fastkd.topk_kd_loss(student, topk, temperature=1.0)
    assert torch.isfinite(fastkd.topk_kd_loss(student, topk, temperature=1.0, teacher_temperature=2.0))


def test_one_token_prompt_gives_no_rows_and_tokens_may_be_a_view():
    topk = read_topk({"choices": [{"prompt_logprobs": [None]}]}, "vllm", 4, vocab_size=8, tokens=[3])
    assert topk.logprobs.shape == (0, 4) and topk.indices.shape == (0, 4)
    tokens = torch.tensor([[1, 0], [15, 0], [7, 0], [42, 0]])[:, 0]  # a non-contiguous view
    assert read_topk(fixture("vllm_completions"), "vllm", 2, vocab_size=151936, tokens=tokens).logprobs.shape == (3, 2)


# ------------------------------------------------------------------------------- a real server

@pytest.fixture(scope="module")
def model():
    pytest.importorskip("transformers")
    return tiny_llama()


@pytest.fixture
def server(model):
    with TeacherServer(model) as s:
        yield s


def expected_topk(server, ids, k):
    """The server's logits for ``ids[:-1]`` and their ``teacher_topk``, ties listed lower id first
    (as ``read_topk`` lists them; ``torch.topk`` leaves their order open)."""
    logits = server.logits(ids)[:-1]
    lp, idx = fastkd.teacher_topk(logits, k)
    by_id = idx.sort(dim=-1, stable=True).indices
    lp, idx = lp.gather(-1, by_id), idx.gather(-1, by_id)
    by_value = lp.sort(dim=-1, descending=True, stable=True).indices
    return logits, (lp.gather(-1, by_value), idx.gather(-1, by_value))


def post(url, route, body):
    request = urllib.request.Request(url + route, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


@pytest.mark.parametrize("format, token_ids, dtype", [
    ("vllm", True, torch.float32), ("openai", True, torch.float32), ("openai", False, torch.float32),
    ("sglang", True, torch.float32), ("vllm", True, torch.bfloat16)])
def test_server_top_k_equals_teacher_topk(model, format, token_ids, dtype):
    ids, k = [7, 201, 33, 33, 0, 250, 18, 90, 4], 5
    with TeacherServer(copy.deepcopy(model).to(dtype), token_ids=token_ids) as server:
        answer = post(server.url, *request_body(format, ids, k))
        logits, (want_lp, want_idx) = expected_topk(server, ids, k)
    vocab = None if token_ids else {token_string(i): i for i in range(VOCAB_SIZE)}
    topk = read_topk(answer, format, k, vocab_size=VOCAB_SIZE, tokens=ids, vocab=vocab)
    assert topk.indices.equal(want_idx)
    oracle = torch.log_softmax(logits.double(), -1).gather(-1, want_idx.long())
    assert_close_to_oracle(topk.logprobs, oracle, want_lp, dtype=torch.float32)


def test_masked_vocabulary(model):
    """-inf columns (a masked vocabulary): k above the unmasked count lists -inf entries."""
    ids, k = [3, 9, 27, 81], 6
    with TeacherServer(model, masked=range(4, VOCAB_SIZE)) as server:
        answer = post(server.url, *request_body("sglang", ids, k))  # JSON -Infinity for -inf
        want_lp, want_idx = expected_topk(server, ids, k)[1]
    topk = read_topk(answer, "sglang", k, vocab_size=VOCAB_SIZE, tokens=ids)
    torch.testing.assert_close(topk.logprobs, want_lp)
    assert topk.indices[:, :4].equal(want_idx[:, :4]) and topk.logprobs[:, 4:].eq(-INF).all()


def sequences_for_test():
    g = torch.Generator().manual_seed(1)
    lengths = [5, 1, 9, 3, 7, 2, 8, 6, 4, 9, 5, 3]
    return [torch.randint(0, VOCAB_SIZE, (n,), generator=g).tolist() for n in lengths]


FILL = dict(format="sglang", k=4, vocab_size=VOCAB_SIZE, tokens_per_shard=7, progress=False, backoff=0.01)


def test_fill_cache_holds_teacher_topk_with_bounded_concurrency(model, tmp_path, capsys, monkeypatch):
    seqs = sequences_for_test()
    padded = torch.zeros(len(seqs), 2, 9, dtype=torch.long)  # rows of a non-contiguous [B, 9] view
    views = []
    for i, s in enumerate(seqs):
        padded[i, 0, :len(s)] = torch.tensor(s)
        views.append(padded[i, 0, :len(s)])
    monkeypatch.setitem(sys.modules, "tqdm", None)  # the progress line without tqdm
    with TeacherServer(model, delay=0.03) as server:
        cache = fill_cache(tmp_path / "c", views, url=server.url, concurrency=3, **{**FILL, "progress": True})
        want = [expected_topk(server, s, 4)[1] for s in seqs if len(s) > 1]
    assert 2 <= server.max_in_flight <= 3, server.max_in_flight
    assert server.requests == sum(len(s) > 1 for s in seqs)
    assert "fastkd.serving: 50/50 tokens (100%)" in capsys.readouterr().err
    lp, idx = cache[:]
    assert len(cache) == sum(len(s) - 1 for s in seqs) and cache.temperature == 1.0
    assert idx.equal(torch.cat([w[1] for w in want]))
    torch.testing.assert_close(lp, torch.cat([w[0] for w in want]).half(), rtol=2**-10, atol=2**-12)


def test_training_from_the_cache_lines_up_with_the_student(model, tmp_path):
    """With k = V the cache holds whole distributions: the teacher's own ``logits[:, :-1]`` as the
    student give a KL of ~0 (float16 storage), the rows shifted by one a large one."""
    seqs = [s for s in sequences_for_test() if len(s) > 2][:4]
    with TeacherServer(model) as server:
        cache = fill_cache(tmp_path / "c", seqs, url=server.url, **{**FILL, "k": VOCAB_SIZE})
        student = torch.cat([server.logits(s)[:-1] for s in seqs])
    logprobs, indices = cache[:]
    assert fastkd.topk_kd_loss(student, logprobs, indices) < 1e-4
    assert fastkd.topk_kd_loss(student.roll(1, 0), logprobs, indices) > 1.0


def test_one_token_sequences_need_no_request(server, tmp_path):
    cache = fill_cache(tmp_path / "c", [[5], torch.tensor([7])], url=server.url, **FILL)
    assert len(cache) == 0 and server.requests == 0 and cache[:][0].shape == (0, 4)
    with pytest.raises(ValueError, match=r"sequences\[1\] holds a token id outside \[0, vocab_size\)"):
        fill_cache(tmp_path / "d", [[5, 6], [7, VOCAB_SIZE]], url=server.url, **FILL)
    with pytest.raises(ValueError, match=r"sequences\[0\] must be a non-empty 1-D sequence"):
        fill_cache(tmp_path / "d", [[]], url=server.url, **FILL)


def files(path):
    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir())}


@pytest.fixture(scope="module")
def uninterrupted(model, tmp_path_factory):
    """The cache of a run that never stopped, as {file name: bytes}."""
    path = tmp_path_factory.mktemp("uninterrupted") / "c"
    with TeacherServer(model) as server:
        fill_cache(path, sequences_for_test(), url=server.url, **FILL)
    return files(path)


def test_retried_requests_and_a_server_that_stays_down(server, uninterrupted, tmp_path):
    server.fail_first = 3
    fill_cache(tmp_path / "c", sequences_for_test(), url=server.url, concurrency=1, retries=3, **FILL)
    assert files(tmp_path / "c") == uninterrupted
    requests = server.requests
    with pytest.raises(ServingError, match=r"sequence 0: .*/nope/generate answered HTTP 404"):
        fill_cache(tmp_path / "d", sequences_for_test()[:1], url=server.url + "/nope", **FILL)
    assert server.requests == requests + 1  # a 404 is not retried


def test_interrupted_run_resumes_byte_for_byte(server, uninterrupted, tmp_path):
    path, seqs = tmp_path / "c", sequences_for_test()
    server.fail_after = 6
    with pytest.raises(ServingError, match="failed 2 times, last with HTTP 503"):
        fill_cache(path, seqs, url=server.url, concurrency=2, retries=1, **FILL)
    assert (path / "progress.json").is_file() and not (path / "index.json").exists()
    with pytest.raises(TeacherCacheError, match="never closed"):
        TeacherCache(path)
    kept = sum(s["tokens"] for s in json.loads((path / "progress.json").read_text())["shards"])
    assert kept >= 7
    other = [s[::-1] for s in seqs]
    with pytest.raises(TeacherCacheError, match="resume with the same options"):
        fill_cache(path, other, url=server.url, **FILL)
    server.fail_after, server.requests = None, 0
    fill_cache(path, seqs, url=server.url, **FILL)
    assert files(path) == uninterrupted
    assert server.requests < sum(len(s) > 1 for s in seqs)  # the kept shards were not asked again
    server.requests = 0
    assert len(fill_cache(path, seqs, url=server.url, **FILL)) == len(TeacherCache(path))  # complete: no request
    assert server.requests == 0
    with pytest.raises(FileExistsError, match="other data"):
        fill_cache(path, other, url=server.url, **FILL)


def test_killed_client_resumes_byte_for_byte(model, uninterrupted, tmp_path):
    """A client process killed with SIGKILL while a request is in flight, then run again."""
    path = tmp_path / "c"
    root = Path(__file__).resolve().parents[1]
    script = ("import sys, json; sys.path.insert(0, sys.argv[1]); from fastkd.serving import fill_cache; "
              "fill_cache(sys.argv[2], json.loads(sys.argv[3]), url=sys.argv[4], concurrency=1, "
              "**json.loads(sys.argv[5]))")
    with TeacherServer(model) as server:
        server.hold_after = 6  # the client waits on its 7th request until it is killed
        client = subprocess.Popen([sys.executable, "-c", script, str(root), str(path),
                                   json.dumps(sequences_for_test()), server.url, json.dumps(FILL)])
        try:
            deadline = time.monotonic() + 120
            while server.requests <= 6:
                assert client.poll() is None and time.monotonic() < deadline, "the client stopped early"
                time.sleep(0.01)
        finally:
            os.kill(client.pid, signal.SIGKILL)
            client.wait()
        assert (path / "progress.json").is_file() and not (path / "index.json").exists()
        server.hold_after = None
        server.release.set()
        fill_cache(path, sequences_for_test(), url=server.url, **FILL)
    assert files(path) == uninterrupted


def test_sglang_echoes_its_last_ids_as_0():
    """SGLang echoes prompt ids >= its vocab_size - 1 as 0: such a 0 is not a mismatch."""
    answer = fixture("sglang_generate")
    answer["meta_info"]["input_token_logprobs"][3][1] = 0
    assert read_topk(answer, "sglang", 2, tokens=[128000, 791, 6864, 315]).indices.shape == (3, 2)
