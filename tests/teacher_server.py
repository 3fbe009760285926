"""A local teacher server for the tests: a tiny LlamaForCausalLM (random, seeded, built from a
config) behind ``http.server`` on 127.0.0.1, answering as vLLM's OpenAI-compatible server
(``/v1/completions`` with ``prompt_logprobs``, or ``logprobs`` + ``echo``) and as SGLang's
``/generate`` do, with the top-k of ``log_softmax`` of its logits. It can fail on purpose (HTTP
503 for the first n requests, or after n requests), hold requests after n unanswered, and records
the most requests it worked on at once.
"""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

VOCAB_SIZE = 251  # odd


def tiny_llama(seed=0):
    """A 2-layer Llama, random and seeded, its LM head scaled so that it is as peaked as a trained
    model (the top 8 tokens hold 75-99 % of the mass)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    return model


def token_string(i):
    """The test vocabulary's token strings (the answers' ``tokens`` without --return-tokens-as-token-ids)."""
    return f"<t{i}>"


class TeacherServer:
    """``with TeacherServer(model) as server: server.url`` serves until the block ends."""

    def __init__(self, model, *, token_ids=True, delay=0.0, masked=()):
        self.model, self.token_ids, self.delay, self.masked = model, token_ids, delay, list(masked)
        self.fail_first = 0        # answer 503 to the first n requests
        self.fail_after = None     # answer 503 to every request after the first n
        self.hold_after = None     # hold every request after the first n until ``release`` is set
        self.release = threading.Event()
        self.requests = 0
        self.in_flight = self.max_in_flight = 0
        self._lock, self._model_lock = threading.Lock(), threading.Lock()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}"

    def __enter__(self):
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self._http.shutdown()
        self._http.server_close()
        self._thread.join()

    def logits(self, ids):
        """The model's logits for ``ids`` (``masked`` columns at -inf): [len(ids), V]."""
        with self._model_lock, torch.no_grad():
            logits = self.model(torch.tensor([ids])).logits[0]
        logits[:, self.masked] = float("-inf")
        return logits

    def logprobs(self, ids):
        return torch.log_softmax(self.logits(ids).float(), -1)

    def _token(self, i):
        return f"token_id:{i}" if self.token_ids else token_string(i)

    def answer(self, route, body):
        if route == "/generate":
            return self._sglang(body)
        if route != "/v1/completions":
            return 404, {"error": f"no route {route}"}
        if "prompt_logprobs" in body:
            return self._vllm(body)
        return self._openai(body)

    def _top(self, lp, k, token=None):
        """(id, logprob) of the k largest of ``lp``, then ``token``'s (the token beside the top-k)."""
        values, indices = lp.topk(k)
        return list(zip(indices.tolist(), values.tolist())) + ([] if token is None else [(token, lp[token].item())])

    def _vllm(self, body):
        ids, k = body["prompt"], body["prompt_logprobs"]
        lp = self.logprobs(ids)
        table = [None]
        for i in range(1, len(ids)):
            row = lp[i - 1]
            rank = lambda j: int((row > row[j]).sum()) + 1  # noqa: E731
            table.append({str(j): {"logprob": v, "rank": rank(j), "decoded_token": token_string(j)}
                          for j, v in self._top(row, k, ids[i])})
        choice = {"index": 0, "text": token_string(int(lp[-1].argmax())), "logprobs": None,
                  "finish_reason": "length", "prompt_logprobs": table}
        return 200, {"id": "cmpl-test", "object": "text_completion", "model": "tiny", "choices": [choice],
                     "usage": {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}}

    def _openai(self, body):
        ids, k = body["prompt"], body["logprobs"]
        lp = self.logprobs(ids)
        sampled = int(lp[-1].argmax())
        tokens = ids + [sampled]
        top = [None] + [{self._token(j): v for j, v in self._top(lp[i - 1], k, tokens[i])}
                        for i in range(1, len(tokens))]
        logprobs = {"tokens": [self._token(t) for t in tokens],
                    "token_logprobs": [None] + [lp[i - 1, tokens[i]].item() for i in range(1, len(tokens))],
                    "top_logprobs": top, "text_offset": list(range(len(tokens)))}
        choice = {"index": 0, "text": "".join(map(token_string, tokens)), "logprobs": logprobs,
                  "finish_reason": "length"}
        return 200, {"id": "cmpl-test", "object": "text_completion", "model": "tiny", "choices": [choice],
                     "usage": {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(tokens)}}

    def _sglang(self, body):
        ids, k = body["input_ids"], body["top_logprobs_num"]
        if not body.get("return_logprob") or body.get("logprob_start_len") != 0:
            return 400, {"error": "ask with return_logprob and logprob_start_len=0"}
        lp = self.logprobs(ids)
        meta = {"id": "sglang-test", "prompt_tokens": len(ids), "completion_tokens": 0, "finish_reason": None,
                "input_token_logprobs": [[None, ids[0], None]] + [[lp[i - 1, ids[i]].item(), ids[i], None]
                                                                  for i in range(1, len(ids))],
                "input_top_logprobs": [None] + [[[v, j, None] for j, v in self._top(lp[i - 1], k)]
                                                for i in range(1, len(ids))],
                "output_token_logprobs": [], "output_top_logprobs": []}
        return 200, {"text": "", "meta_info": meta}

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                with server._lock:
                    server.requests += 1
                    n = server.requests
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                    time.sleep(server.delay)
                    if server.hold_after is not None and n > server.hold_after:
                        server.release.wait()
                    failing = n <= server.fail_first or (server.fail_after is not None and n > server.fail_after)
                    status, answer = (503, {"error": "overloaded"}) if failing else server.answer(self.path, body)
                    data = json.dumps(answer).encode()
                finally:  # before the answer leaves: the client may send its next request at once
                    with server._lock:
                        server.in_flight -= 1
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # a client killed while its request was held

        return Handler

