"""bench/bench_fused_linear.py: its providers compute the same loss, the CPU run writes its rows,
and the GPU run's plumbing works (on a CUDA stand-in here; the numbers come from a real GPU)."""
import csv
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("bench_fused_linear.py")
spec = importlib.util.spec_from_file_location("bench_fused_linear", SCRIPT)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("divergence", ["kl", "jsd"])
def test_fused_and_unfused_providers_agree(divergence):
    inputs = bench._make_inputs(40, 16, 300, torch.float64)
    values = {p: bench._step(bench.make_loss(p, divergence, 16, "torch"), inputs) for p in ("unfused", "fused")}
    torch.testing.assert_close(values["fused"], values["unfused"], rtol=1e-10, atol=0)
    assert bench.make_loss("liger", "kl", 16, "torch") is None  # Liger fuses jsd only


def test_cpu_run_writes_every_metric(tmp_path, monkeypatch):
    out = tmp_path / "fl.csv"
    monkeypatch.setattr(sys, "argv", ["bench_fused_linear.py"])
    bench.main(bench.parse_args(["--N", "64", "--H", "16", "--V", "300", "--repeats", "1", "--csv", str(out)]))
    rows = _rows(out)
    assert {(r["provider"], r["metric"]) for r in rows} == {
        (p, m) for p in ("unfused", "fused")
        for m in ("extra_rss", "extra_rss_exact_malloc", "peak_rss", "time_min", "time_median", "cpu_time_min")}
    assert all(float(r["value"]) > 0 and r["device"] == "cpu" for r in rows)
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["torch"] == torch.__version__ and info["date"] and info["commit"]


class FakeEvent:
    def __init__(self, enable_timing):
        self.t = None

    def record(self):
        import time
        self.t = time.perf_counter()

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


def test_gpu_run_plumbing_on_a_cuda_stand_in(tmp_path, monkeypatch):
    """cuda_main end to end with torch.cuda's memory, event and device calls answered on the CPU."""
    fake = types.SimpleNamespace(synchronize=lambda: None, empty_cache=lambda: None, memory_allocated=lambda: 0,
                                 reset_peak_memory_stats=lambda: None, max_memory_allocated=lambda: 3 * 2**20,
                                 get_device_name=lambda: "stand-in", Event=FakeEvent,
                                 OutOfMemoryError=torch.cuda.OutOfMemoryError)
    monkeypatch.setattr(torch, "cuda", fake)
    args = bench.parse_args(["--device", "cuda", "--N", "32", "--V", "100", "--H", "8", "--dtype", "float32",
                             "--repeats", "2", "--csv", str(tmp_path / "x.csv")])
    assert args.divergences == ["kl", "jsd"] and args.N == [32]
    rows = []
    bench.cuda_main(args, rows.append, device="cpu")
    providers = {(r["divergence"], r["provider"]) for r in rows}
    assert {("kl", "unfused"), ("kl", "fused"), ("jsd", "unfused"), ("jsd", "fused")} <= providers
    loss = {(r["divergence"], r["provider"]): float(r["value"]) for r in rows if r["metric"] == "loss"}
    for divergence in ("kl", "jsd"):
        assert loss[divergence, "fused"] == pytest.approx(loss[divergence, "unfused"], rel=1e-5)
    assert all(float(r["value"]) > 0 for r in rows if r["metric"] in ("time_min", "matmul_tflops"))


def test_defaults_are_the_issue_shapes():
    gpu = bench.parse_args(["--device", "cuda"])
    assert (gpu.N, gpu.H, gpu.V, gpu.dtype) == ([8192, 16384], 4096, [128256, 262144], "bfloat16")
    cpu = bench.parse_args([])
    assert (cpu.N, cpu.H, cpu.V, cpu.dtype) == ([4096], 1024, [32000], "float32")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_liger_fused_linear_jsd_matches_fused_jsd():
    pytest.importorskip("liger_kernel")
    inputs = bench._make_inputs(256, 64, 4096, torch.float32, device="cuda")
    fused = bench._step(bench.make_loss("fused", "jsd", 64, "auto"), inputs)
    liger = bench._step(bench.make_loss("liger", "jsd", 64, "auto"), inputs)
    torch.testing.assert_close(liger, fused, rtol=1e-4, atol=1e-6)
