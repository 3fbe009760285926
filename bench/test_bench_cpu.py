"""CPU benchmarks of the torch backend (pytest-benchmark: time, with the peak RSS in extra_info),
the memory claim of the torch backend, and smoke tests of the ``fastkd bench`` suite.

CI runs this file with ``--benchmark-disable`` (each benchmark runs once); to measure:
``python -m pytest bench/test_bench_cpu.py --benchmark-only``. The full comparison against torch
eager, torch.compile and Liger is ``fastkd bench``.
"""
import csv
import json
import math
import runpy
import sys

import pytest
import torch

import fastkd
import fastkd.backends.torch
from fastkd.bench.cases import BETA, PRESETS, SKEW, TEMPERATURE, Case, select_cases
from fastkd.bench.min_bytes import min_bytes
from fastkd.bench.providers import PROVIDERS, T2_SCALE, eager_kd_loss, eager_softmax
from fastkd.bench.runner import peak_extra_memory
from fastkd.cli import main as cli_main
from fastkd.options import DIVERGENCES

CPU = torch.device("cpu")
REQUIRED_COLUMNS = ("op", "provider", "mode", "dtype", "n", "v", "ms_p50", "ms_p20", "ms_p80", "gbps",
                    "frac_of_copy_bw", "peak_mem_bytes", "device", "torch", "triton", "commit", "date")


@pytest.fixture(autouse=True)
def one_thread():
    """On a shared 2-core CI machine, tiny multithreaded ops mostly wait for preempted threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _kd_inputs(n, v, dtype=torch.float32):
    return torch.randn(n, v, dtype=dtype, requires_grad=True), torch.randn(n, v, dtype=dtype)


# ------------------------------------------------------------------ pytest-benchmark: the torch backend
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_bench_kd_loss_torch_backend(benchmark, divergence):
    s, t = _kd_inputs(256, 4096)
    forward = PROVIDERS["fastkd-torch"].make(Case("kd_loss", divergence, "fp32", 256, 4096, "fwd+bwd"))

    def fwd_bwd():
        loss = forward(s, t)
        return loss, torch.autograd.grad(loss, s)[0]

    fwd_bwd()  # first calls allocate torch's lazily built state
    benchmark.extra_info["peak_rss_bytes"] = peak_extra_memory(fwd_bwd, CPU)
    loss, grad = benchmark(fwd_bwd)
    expected = eager_kd_loss(divergence)(s, t)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_bench_softmax_torch_backend(benchmark, op):
    x = torch.randn(256, 4096, requires_grad=True)
    dy = torch.randn(256, 4096)
    forward = PROVIDERS["fastkd-torch"].make(Case(op, "", "fp32", 256, 4096, "fwd+bwd"))

    def fwd_bwd():
        y = forward(x)
        return y, torch.autograd.grad(y, x, dy)[0]

    fwd_bwd()
    benchmark.extra_info["peak_rss_bytes"] = peak_extra_memory(fwd_bwd, CPU)
    y, dx = benchmark(fwd_bwd)
    torch.testing.assert_close(y, eager_softmax(op)(x))
    assert torch.isfinite(dx).all()


# ------------------------------------------------------------------ the torch backend's memory claim
def test_torch_backend_memory_is_one_gradient_plus_a_bounded_chunk(monkeypatch):
    """Issue 2 item 5: forward + backward holds one [N, V] gradient plus a chunk of temporaries
    whose size is set by CHUNK_BYTES, not by N; the eager idiom holds several [N, V] tensors."""
    chunk_bytes = 2 * 2**20
    monkeypatch.setattr(fastkd.backends.torch, "CHUNK_BYTES", chunk_bytes)
    n, v = 1024, 16000  # 32 chunks
    s, t = _kd_inputs(n, v)
    grad_bytes = s.numel() * s.element_size()
    case = Case("kd_loss", "kl", "fp32", n, v, "fwd+bwd")
    peaks = {}
    for name in ("fastkd-torch", "torch-eager"):
        forward = PROVIDERS[name].make(case)
        torch.autograd.grad(forward(s, t), s)  # first calls allocate torch's lazily built state
        peaks[name] = peak_extra_memory(lambda: torch.autograd.grad(forward(s, t), s), CPU)
    allocator_slack = 32 * 2**20  # RSS moves with the heap's state by up to ~20 MiB
    assert grad_bytes * 0.95 <= peaks["fastkd-torch"] <= grad_bytes + 12 * chunk_bytes + allocator_slack, peaks
    assert peaks["torch-eager"] >= 3 * grad_bytes * 0.95, peaks  # the measure sees temporaries


# ------------------------------------------------------------------ the suite's parts
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_eager_idioms_compute_the_divergence_fastkd_computes(divergence):
    """Every provider of a case computes the same number: the eager idioms against the reference."""
    s, t = (x.double() for x in _kd_inputs(8, 37))
    expected = fastkd.reference.kd_loss(s, t, temperature=TEMPERATURE, divergence=divergence, beta=BETA,
                                        skew=SKEW, t2_scale=T2_SCALE[divergence])
    torch.testing.assert_close(eager_kd_loss(divergence)(s, t), expected)


def test_min_bytes_is_the_single_read_floor():
    n, v = 8192, 128256
    assert min_bytes(Case("kd_loss", "kl", "bf16", n, v, "fwd+bwd")) == 6 * n * v  # issue 5: 6.30 GB
    assert min_bytes(Case("kd_loss", "kl", "fp32", n, v, "fwd+bwd")) == 12 * n * v
    assert min_bytes(Case("softmax", "", "bf16", n, v, "fwd")) == 4 * n * v
    assert min_bytes(Case("softmax", "", "bf16", n, v, "bwd")) == 6 * n * v


def test_options_replace_a_field_in_every_grid_of_the_preset():
    cases = select_cases("cpu", v=[1000], n=[8])
    assert {(c.n, c.v) for c in cases} == {(8, 1000)}
    assert len(cases) == len(set(cases)) == len(DIVERGENCES) + 2  # duplicates dropped
    assert select_cases("cpu")[0] == Case("kd_loss", "kl", "fp32", 4096, 32000, "fwd+bwd")
    headline = select_cases("headline")
    assert {c.dtype for c in headline} == {"bf16"} and {c.n for c in headline} == {8192}
    with pytest.raises(ValueError, match="dtypes"):
        select_cases("cpu", dtypes=["fp8"])
    assert set(PRESETS) >= {"cpu", "headline", "full", "smoke"}


def test_bad_options_exit_with_status_2(capsys):
    assert cli_main(["bench", "--dtypes", "fp8", "--list"]) == 2
    assert cli_main(["bench", "--providers", "nope", "--list"]) == 2
    assert "nope" in capsys.readouterr().err


def test_fastkd_bench_writes_the_csv_table_and_plots(tmp_path, capsys):
    status = cli_main(["bench", "--preset", "smoke", "--quick", "--out", str(tmp_path),
                       "--providers", "torch-eager", "fastkd-torch"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "speed-up" in printed and "fastkd-torch" in printed

    (csv_path,) = tmp_path.glob("*.csv")
    with open(csv_path) as f:
        reader = csv.DictReader(f)
        assert set(REQUIRED_COLUMNS) <= set(reader.fieldnames)
        rows = list(reader)
    copy_rows = [r for r in rows if r["op"] == "copy"]
    assert len(copy_rows) == 1 and float(copy_rows[0]["gbps"]) > 0
    measured = [r for r in rows if r["op"] != "copy"]
    smoke_cases = select_cases("smoke")
    assert len(measured) == 2 * len(smoke_cases)
    for r in measured:
        assert r["note"] == "", r
        p20, p50, p80 = (float(r[k]) for k in ("ms_p20", "ms_p50", "ms_p80"))
        assert 0 < p20 <= p50 <= p80 < math.inf
        assert 0 < float(r["gbps"]) < math.inf and 0 < float(r["frac_of_copy_bw"]) < math.inf
        assert 0 <= float(r["peak_mem_bytes"]) < math.inf
        assert float(r["diff_vs_eager"]) < 1e-4
        assert all(r[k] for k in ("device", "torch", "triton", "commit", "date"))

    (json_path,) = tmp_path.glob("*.json")
    info = json.loads(json_path.read_text())
    assert info["device"] == rows[0]["device"] and info["copy_gbps"] > 0
    assert csv_path.stem == json_path.stem and json_path.stem.endswith(info["date"][:10])
    try:
        import matplotlib  # noqa: F401  (optional)
    except ImportError:
        assert "plots skipped" in printed
    else:
        assert list(tmp_path.glob("*.png")), "the smoke preset has a V sweep to plot"


def test_python_dash_m_fastkd_bench_lists_the_default_cases(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["python -m fastkd.bench", "--list", "--device", "cpu"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("fastkd.bench", run_name="__main__")
    assert exit_.value.code == 0
    assert "kd_loss/kl fp32 fwd+bwd N=4096 V=32000" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="liger_kernel needs a CUDA device")
@pytest.mark.parametrize("case", [Case("kd_loss", "kl", "fp32", 64, 4096, "fwd+bwd"),
                                  Case("kd_loss", "jsd", "fp32", 64, 4096, "fwd+bwd")], ids=["kl", "jsd"])
def test_liger_provider_computes_the_same_loss(case):
    pytest.importorskip("liger_kernel")
    s, t = (x.detach().cuda() for x in _kd_inputs(case.n, case.v))
    liger = PROVIDERS["liger"].make(case)
    torch.testing.assert_close(liger(s, t), eager_kd_loss(case.divergence)(s, t), rtol=1e-4, atol=1e-5)
