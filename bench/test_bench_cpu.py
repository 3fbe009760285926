"""CPU benchmarks of the torch backend through the harness's providers (pytest-benchmark: time, with
the peak extra RSS of the one peak-memory helper in extra_info), and the torch backend's memory bound.

CI runs this file with ``--benchmark-disable`` (each benchmark runs once and its result is checked
against the eager idiom); to measure: ``python -m pytest bench/test_bench_cpu.py --benchmark-only``.
The full comparison against torch eager, torch.compile and Liger is ``fastkd bench``.
"""
import pytest
import torch

import fastkd.fused_linear
import fastkd.backends.torch
from fastkd.bench.cases import Case
from fastkd.bench.providers import PROVIDERS
from fastkd.bench.runner import make_inputs, mode_call, peak_extra_memory, summary
from fastkd.divergences import DIVERGENCES

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """On a shared 2-core CI machine, tiny multithreaded ops mostly wait for preempted threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CASES = [Case("kd_loss", d, "fp32", 256, 4096, "fwd+bwd") for d in DIVERGENCES] + [
    Case("softmax", "", "fp32", 256, 4096, "fwd+bwd"),
    Case("log_softmax", "", "fp32", 256, 4096, "fwd+bwd"),
    Case("topk_kd_loss", "kl", "fp32", 32, 16384, "fwd+bwd", k=128),
    Case("teacher_topk", "", "fp32", 32, 16384, "fwd", k=128),
    Case("fused_linear_kd", "kl", "fp32", 256, 4096, "fwd+bwd", h=256),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name.replace(" ", "-"))
def test_bench_torch_backend(benchmark, case):
    inputs = make_inputs(case, CPU)
    call = mode_call(case, PROVIDERS["fastkd-torch"].make(case), inputs)
    call()  # first calls allocate torch's lazily built state
    benchmark.extra_info["peak_rss_bytes"] = peak_extra_memory(call, CPU)
    result = benchmark(call)
    for grad in result if case.mode != "fwd" else ():
        assert torch.isfinite(grad).all()
    value = summary(case, PROVIDERS["fastkd-torch"].make(case)(*inputs.args))
    expected = summary(case, PROVIDERS["torch-eager"].make(case)(*inputs.args))
    torch.testing.assert_close(torch.as_tensor(value), torch.as_tensor(expected), rtol=1e-4, atol=1e-6)


def test_torch_backend_memory_is_one_gradient_plus_a_bounded_chunk(monkeypatch):
    """Forward + backward holds one [N, V] gradient plus a chunk of temporaries whose size is set by
    CHUNK_BYTES, not by N; the eager idiom holds several [N, V] tensors."""
    chunk_bytes = 2 * 2**20
    monkeypatch.setattr(fastkd.backends.torch, "CHUNK_BYTES", chunk_bytes)
    case = Case("kd_loss", "kl", "fp32", 1024, 16000, "fwd+bwd")  # 32 chunks
    inputs = make_inputs(case, CPU)
    grad_bytes = case.n * case.v * 4
    peaks = {}
    for name in ("fastkd-torch", "torch-eager"):
        call = mode_call(case, PROVIDERS[name].make(case), inputs)
        call()  # first calls allocate torch's lazily built state
        peaks[name] = peak_extra_memory(call, CPU)
    allocator_slack = 32 * 2**20  # RSS moves with the heap's state by up to ~20 MiB
    assert grad_bytes * 0.95 <= peaks["fastkd-torch"] <= grad_bytes + 12 * chunk_bytes + allocator_slack, peaks
    assert peaks["torch-eager"] >= 3 * grad_bytes * 0.95, peaks  # the measure sees temporaries


def test_fused_linear_memory_never_holds_the_logits():
    """fused_linear_kd holds the hidden and weight gradients and a few [chunk, V] blocks; the unfused
    path materialises [N, V] logits for student and teacher."""
    case = Case("fused_linear_kd", "kl", "fp32", 2048, 16000, "fwd+bwd", h=64)
    inputs = make_inputs(case, CPU)
    chunk = fastkd.fused_linear.default_chunk_size(case.v, case.h)
    peaks = {}
    for name in ("fastkd-torch", "fastkd-unfused"):
        call = mode_call(case, PROVIDERS[name].make(case), inputs)
        call()
        peaks[name] = peak_extra_memory(call, CPU)
    logits_bytes = case.n * case.v * 4
    bound = 2 * (case.n + case.v) * case.h * 4 + 4 * chunk * case.v * 4 + 32 * 2**20
    assert peaks["fastkd-torch"] <= bound < logits_bytes, peaks
    assert peaks["fastkd-unfused"] >= 2 * logits_bytes * 0.95, peaks
