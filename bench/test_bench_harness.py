"""The ``fastkd bench`` harness does not rot: its table of cases, its minimum bytes, its providers
(same numbers as the eager idioms, a legend line for exactly the cases each implements), the checks
of the Triton kernel variants, the GPU code path on a CPU stand-in, and an in-process smoke run
that writes the CSV, JSON, tables, summary and plots. Seconds on a CPU."""
import csv
import json
import re
import math
import runpy
import subprocess
import sys
import time
import types

import pytest
import torch

import fastkd
import fastkd.backends.triton
import fastkd.config
from fastkd.bench import command, runner
from fastkd.bench.cases import (BETA, KERNEL_VARIANTS, OPS, PRESETS, SKEW, TEMPERATURE, Case, Grid,
                                select_cases)
from fastkd.bench.min_bytes import min_bytes, min_flops
from fastkd.bench.providers import (PROVIDERS, Provider, eager_kd_loss, t2_scale,
                                    eager_teacher_topk, eager_topk_kd_loss, select_providers)
from fastkd.bench.report import compile_comparisons, summary_markdown
from fastkd.cli import main as cli_main
from fastkd.divergences import DIVERGENCES

CPU = torch.device("cpu")
REQUIRED_COLUMNS = ("op", "provider", "mode", "dtype", "n", "v", "k", "h", "ms_p50", "ms_p20", "ms_p80", "rounds",
                    "speedup_p50", "speedup_min", "speedup_max", "gbps", "frac_of_copy_bw", "tflops",
                    "peak_mem_bytes", "diff_vs_eager", "check", "note", "device", "torch", "triton", "commit", "date")


# ----------------------------------------------------------------------------------------- cases
def test_presets_name_valid_cases_and_put_the_headline_first():
    for name in PRESETS:
        cases = select_cases(name)
        assert cases, name
        for case in cases:
            assert case.op in OPS and case.k <= case.v and (case.k > 0) == ("topk" in case.op), case
            assert (case.h > 0) == (case.op == "fused_linear_kd"), case
    assert select_cases("cpu")[0] == Case("kd_loss", "kl", "fp32", 4096, 32000, "fwd+bwd")
    assert select_cases("headline")[0] == Case("kd_loss", "kl", "bf16", 8192, 128256, "fwd+bwd")
    fused = select_cases("fused-linear")
    assert {(c.n, c.v, c.h, c.dtype, c.divergence) for c in fused} == {
        (n, v, 4096, "bf16", d) for n in (8192, 16384) for v in (128256, 262144) for d in ("kl", "jsd")}
    assert {"teacher_topk", "topk_kd_loss"} <= {c.op for c in select_cases("cpu")}


def test_options_replace_a_field_in_every_grid_of_the_preset():
    cases = select_cases("cpu", v=[1000], n=[8], ops=["kd_loss"], modes=["fwd+bwd"])
    assert {(c.n, c.v) for c in cases} == {(8, 1000)}
    assert len(cases) == len(set(cases)) == len(DIVERGENCES)  # duplicates dropped
    assert cases[0].providers == ("torch-eager", "fastkd-torch", "torch-compile")  # the first grid's kept
    assert [c.k for c in select_cases("cpu", ops=["teacher_topk"], k=[5])] == [5]
    assert select_cases(["smoke", "cpu"])[0] == select_cases("smoke")[0]
    with pytest.raises(ValueError, match="dtypes"):
        select_cases("cpu", dtypes=["fp8"])
    with pytest.raises(ValueError, match="preset"):
        select_cases("nope")
    assert list(Grid(ops=("teacher_topk",), modes=("fwd+bwd",)).cases()) == []  # the teacher has no gradient


def test_min_bytes_and_flops():
    n, v = 8192, 128256
    assert min_bytes(Case("kd_loss", "kl", "bf16", n, v, "fwd+bwd")) == 6 * n * v  # read both once, write grad
    assert min_bytes(Case("kd_loss", "kl", "fp32", n, v, "fwd+bwd")) == 12 * n * v
    assert min_bytes(Case("softmax", "", "bf16", n, v, "fwd")) == 4 * n * v
    assert min_bytes(Case("softmax", "", "bf16", n, v, "bwd")) == 6 * n * v
    assert min_bytes(Case("topk_kd_loss", "kl", "bf16", n, v, "fwd+bwd", k=64)) == 4 * n * v + 8 * 64 * n
    assert min_bytes(Case("teacher_topk", "", "bf16", n, v, "fwd", k=64)) == 2 * n * v + 8 * 64 * n
    fused = Case("fused_linear_kd", "kl", "bf16", n, v, "fwd+bwd", h=4096)
    assert min_bytes(fused) == 3 * 2 * (n + v) * 4096
    assert min_flops(fused) == 8 * n * v * 4096 and min_flops(Case("kd_loss", "kl", "bf16", n, v, "fwd")) == 0


# ----------------------------------------------------------------------------------------- providers
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_eager_idioms_compute_the_divergence_fastkd_computes(divergence):
    s, t = torch.randn(8, 37, dtype=torch.float64), torch.randn(8, 37, dtype=torch.float64)
    expected = fastkd.reference.kd_loss(s, t, temperature=TEMPERATURE, divergence=divergence, beta=BETA,
                                        skew=SKEW, t2_scale=t2_scale(divergence))
    torch.testing.assert_close(eager_kd_loss(divergence)(s, t), expected)


def test_eager_topk_and_fused_linear_idioms_compute_what_fastkd_computes():
    s, t = torch.randn(6, 50, dtype=torch.float64) * 3, torch.randn(6, 50, dtype=torch.float64) * 3
    logprobs, indices = fastkd.teacher_topk(t, 7, temperature=TEMPERATURE, backend="torch")
    eager_logprobs, eager_indices = eager_teacher_topk(7)(t)
    torch.testing.assert_close(eager_logprobs.double(), logprobs, rtol=1e-5, atol=1e-6)  # eager: float32
    assert torch.equal(eager_indices.sort(-1).values, indices.sort(-1).values)
    torch.testing.assert_close(eager_topk_kd_loss(s, logprobs, indices).double(),
                               fastkd.topk_kd_loss(s, logprobs, indices, temperature=TEMPERATURE, backend="torch"),
                               rtol=1e-5, atol=1e-6)
    case = Case("fused_linear_kd", "jsd", "fp32", 6, 50, "fwd+bwd", h=5)
    h, W, th, Wt = (torch.randn(*shape, dtype=torch.float64) for shape in ((6, 5), (50, 5), (6, 5), (50, 5)))
    expected = fastkd.reference.kd_loss(h @ W.T, th @ Wt.T, temperature=TEMPERATURE, divergence="jsd", beta=BETA,
                                        t2_scale=False)
    for name in ("torch-eager", "fastkd-torch", "fastkd-unfused"):
        torch.testing.assert_close(PROVIDERS[name].make(case)(h, W, th, Wt), expected)


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_the_trl_provider_computes_what_fastkd_computes(divergence):
    pytest.importorskip("trl", reason="trl is not installed (pip install trl)")
    case = Case("fused_linear_kd", divergence, "fp32", 6, 50, "fwd+bwd", h=5)
    h, W, th, Wt = (torch.randn(*shape) for shape in ((6, 5), (50, 5), (6, 5), (50, 5)))
    torch.testing.assert_close(PROVIDERS["trl"].make(case)(h, W, th, Wt),
                               PROVIDERS["fastkd-torch"].make(case)(h, W, th, Wt), rtol=1e-5, atol=1e-6)


def _every_preset_case():
    return list(dict.fromkeys(c for name in PRESETS for c in select_cases(name)))


@pytest.mark.parametrize("name", [n for n in PROVIDERS if n != "liger"])
def test_each_provider_describes_exactly_the_cases_it_implements(name):
    provider = PROVIDERS[name]
    for case in _every_preset_case():
        assert (provider.make(case) is None) == (provider.describe(case) is None), (name, case)
    headline = Case("kd_loss", "kl", "fp32", 8, 8, "fwd+bwd")
    # The others run the headline; these two only the fused linear loss.
    assert (provider.describe(headline) is None) == (name in ("fastkd-unfused", "trl"))


def test_providers_per_case_follow_the_grid_unless_named():
    cases = select_cases("cpu")
    per_case, skipped = select_providers(None, CPU, cases)
    names = {case: [p.name for p in ps] for case, ps in per_case.items()}
    with_compile = [c for c in cases if "torch-compile" in names[c]]
    if "torch-compile" not in skipped:
        assert [(c.divergence, c.n) for c in with_compile] == [("kl", 4096)] + [(d, 2048) for d in DIVERGENCES]
    assert all(names[c][:2] == ["torch-eager", "fastkd-torch"] for c in cases)
    per_case, _ = select_providers(["fastkd-torch", "torch-eager"], CPU, cases)
    assert all([p.name for p in ps] == ["torch-eager", "fastkd-torch"] for ps in per_case.values())
    with pytest.raises(ValueError, match="unknown nope"):
        select_providers(["nope"], CPU, cases)


def test_triton_and_its_variants_need_a_gpu_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _, skipped = select_providers(["torch-eager", "fastkd-triton", "fastkd-triton[two_pass]"], CPU,
                                  select_cases("smoke"))
    assert set(skipped) == {"fastkd-triton", "fastkd-triton[two_pass]"} and "CUDA" in skipped["fastkd-triton"]
    assert set(KERNEL_VARIANTS) <= set(PROVIDERS)


# ----------------------------------------------------------------------------------------- kernel variants
@pytest.fixture
def fake_launcher(monkeypatch):
    """A launcher that reads fastkd.config.kd_kernel at call time: 'two_pass' is right, 'resident'
    doubles the gradient (a wrong kernel), 'absent' (a name the config takes here) is not built."""
    real = fastkd.backends.triton.kd_forward
    seen = []

    def kd_forward(student, teacher, labels, grad_scale, opts, **kw):
        kernel = fastkd.config.kd_kernel
        seen.append(kernel)
        if kernel == "absent":
            raise NotImplementedError("absent needs a GPU this machine has not")
        loss, grad = real(student, teacher, labels, grad_scale, opts, **kw)
        return loss, grad * 2 if kernel == "resident" and grad is not None else grad

    monkeypatch.setattr(fastkd.config, "KD_KERNELS", fastkd.config.KD_KERNELS + ("absent",))
    monkeypatch.setattr(fastkd.backends.triton, "kd_forward", kd_forward)
    return seen


def test_kernel_variants_are_checked_then_timed_side_by_side(fake_launcher, monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(fastkd.config, "kd_kernel", "two_pass")  # the default provider ignores the caller's choice
    status = cli_main(["bench", "--preset", "smoke", "--ops", "kd_loss", "--divergences", "kl", "--n", "4",
                       "--v", "40", "--modes", "fwd+bwd", "--quick", "--no-plots", "--out", str(tmp_path),
                       "--providers", "torch-eager", "fastkd-triton", "fastkd-triton[two_pass]",
                       "fastkd-triton[resident]", "fastkd-triton[absent]", "fastkd-triton[nope]"])
    assert status == 1  # a failed check fails the run
    assert fastkd.config.kd_kernel == "two_pass"  # restored
    assert {"auto", "two_pass", "resident", "absent"} <= set(fake_launcher)
    assert "nope" not in fake_launcher  # refused by the config before the launch
    (csv_path,) = tmp_path.glob("*.csv")
    rows = {r["provider"]: r for r in csv.DictReader(open(csv_path)) if r["op"] != "copy"}
    assert rows["fastkd-triton"]["note"] == "" and float(rows["fastkd-triton"]["ms_p50"]) > 0
    two_pass = rows["fastkd-triton[two_pass]"]
    assert two_pass["check"].startswith("passed") and float(two_pass["gbps"]) > 0
    assert rows["fastkd-triton[resident]"]["note"].startswith("check failed against fastkd-triton")
    assert rows["fastkd-triton[resident]"]["ms_p50"] == ""  # not timed
    assert rows["fastkd-triton[absent]"]["note"].startswith("unavailable: NotImplementedError: absent needs")
    assert rows["fastkd-triton[nope]"]["note"].startswith("unavailable: ValueError: fastkd.config.kd_kernel='nope'")


# ----------------------------------------------------------------------------------------- GPU path, stood in
class _FakeCuda(types.SimpleNamespace):
    """torch.cuda's calls that the runner makes, answered on the CPU."""

    OutOfMemoryError = torch.cuda.OutOfMemoryError

    def __init__(self):
        super().__init__(allocated=0)

    def synchronize(self, device=None):
        pass

    def empty_cache(self):
        pass

    def is_available(self):
        return False

    def memory_allocated(self, device=None):
        return 0

    def reset_peak_memory_stats(self, device=None):
        pass

    def max_memory_allocated(self, device=None):
        return 3 * 2**20

    def mem_get_info(self, device=None):
        return 64 * 2**30, 80 * 2**30

    def get_device_name(self, device=None):
        return "stand-in GPU"


def test_gpu_path_on_a_cuda_stand_in(monkeypatch):
    """The GPU branches end to end (do_bench timing, CUDA peak memory, copy bandwidth, out-of-memory
    rows, TFLOP/s, speed-up as a ratio of medians), on CPU tensors."""
    import triton.testing

    calls = []

    def do_bench(fn, warmup, rep, quantiles):
        fn()
        calls.append(fn)
        return [2.0, 1.5, 3.0] if len(calls) % 2 else [1.0, 0.9, 1.1]

    def out_of_memory(case):
        def forward(*args):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
        return forward

    monkeypatch.setattr(runner, "on_gpu", lambda device: True)
    monkeypatch.setattr(torch, "cuda", _FakeCuda())
    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    monkeypatch.setitem(runner.COPY_NUMEL, (True, True), 2**16)
    oom = Provider("oom", lambda d: None, out_of_memory, lambda c: "raises")
    cases = [Case("kd_loss", "kl", "fp32", 16, 64, "fwd+bwd"), Case("fused_linear_kd", "kl", "fp32", 16, 64,
                                                                    "fwd+bwd", h=8)]
    per_case = {c: [PROVIDERS["torch-eager"], oom, PROVIDERS["fastkd-torch"], PROVIDERS["fastkd-unfused"]]
                for c in cases}
    rows, env = runner.run_cases(per_case, CPU, quick=True, log=lambda msg: None)
    assert env["device"] == "stand-in GPU" and rows[0]["op"] == "copy" and rows[0]["gbps"] > 0
    by = {(r["op"], r["provider"]): r for r in rows[1:]}
    assert by["kd_loss", "oom"]["note"] == "out of memory" and math.isnan(by["kd_loss", "oom"]["ms_p50"])
    eager, mine = by["kd_loss", "torch-eager"], by["kd_loss", "fastkd-torch"]
    assert mine["peak_mem_bytes"] == 3 * 2**20 and mine["rounds"] == ""
    assert mine["speedup_p50"] == pytest.approx(eager["ms_p50"] / mine["ms_p50"])
    assert mine["gbps"] == pytest.approx(min_bytes(cases[0]) / (mine["ms_p50"] * 1e-3) / 1e9)
    assert mine["frac_of_copy_bw"] == pytest.approx(mine["gbps"] / rows[0]["gbps"])
    fused = by["fused_linear_kd", "fastkd-torch"]
    assert fused["tflops"] == pytest.approx(min_flops(cases[1]) / (fused["ms_p50"] * 1e-3) / 1e12)
    assert ("fused_linear_kd", "fastkd-unfused") in by and ("kd_loss", "fastkd-unfused") not in by
    assert fused["diff_vs_eager"] < 1e-5


def test_long_cases_print_progress_with_estimates(monkeypatch):
    """Every PROGRESS_S a line: the case, its phase, about how long the case and the run have left
    (from the rounds so far, and from the cases done)."""
    def slow(case):
        def forward(s, t):
            time.sleep(0.03)
            return s.sum() + t.sum()
        return forward

    monkeypatch.setattr(runner, "PROGRESS_S", 0.01)
    monkeypatch.setattr(runner, "ROUND_BUDGET_S", 0.1)
    provider = Provider("slow", lambda d: None, slow, lambda c: "sleeps")
    cases = [Case("kd_loss", "kl", "fp32", 4, 8, "fwd+bwd"), Case("kd_loss", "kl", "fp32", 4, 16, "fwd+bwd")]
    lines = []
    runner.run_cases({c: [provider] for c in cases}, CPU, min_rounds=3, log=lines.append)
    progress = [line for line in lines if line.lstrip().startswith("...")]
    assert any("case 1/2" in line and "preparing slow" in line for line in progress)
    timing = [line for line in progress if "timing, round" in line]
    assert any(re.search(r"case 2/2 .*left: case about \d+ s, run about \d+ s", line) for line in timing)
    count = len(lines)
    time.sleep(0.05)
    assert len(lines) == count  # the progress thread ends with the run


def test_kd_loss_ce_providers_compute_the_same_loss():
    case = Case("kd_loss_ce", "kl", "fp32", 6, 10, "fwd+bwd")
    inputs = runner.make_inputs(case, CPU)
    eager = PROVIDERS["torch-eager"].make(case)(*inputs.args)
    mine = PROVIDERS["fastkd-torch"].make(case)(*inputs.args)
    torch.testing.assert_close(mine, eager)
    assert "cross_entropy" in PROVIDERS["torch-eager"].describe(case)


# ----------------------------------------------------------------------------------------- the command
def test_bad_options_exit_with_status_2(capsys):
    assert cli_main(["bench", "--dtypes", "fp8", "--list"]) == 2
    assert cli_main(["bench", "--providers", "nope", "--list"]) == 2
    assert cli_main(["bench", "--rounds", "0", "--list"]) == 2
    assert "nope" in capsys.readouterr().err


def test_fastkd_bench_smoke_run_writes_csv_tables_summary_and_plots(tmp_path, capsys):
    status = cli_main(["bench", "--preset", "smoke", "--quick", "--out", str(tmp_path),
                       "--providers", "torch-eager", "fastkd-torch", "fastkd-unfused"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "speed-up" in printed and re.search(r"^  torch-eager +kd_loss/kl +kl_div", printed, re.M)  # legend
    assert 'kl_div(log_softmax(s/T), softmax(t/T), "batchmean")·T²' in printed

    (csv_path,) = tmp_path.glob("*.csv")
    with open(csv_path) as f:
        reader = csv.DictReader(f)
        assert set(REQUIRED_COLUMNS) <= set(reader.fieldnames)
        rows = list(reader)
    copy_rows = [r for r in rows if r["op"] == "copy"]
    assert len(copy_rows) == 1 and float(copy_rows[0]["gbps"]) > 0
    measured = [r for r in rows if r["op"] != "copy"]
    smoke_cases = select_cases("smoke")
    assert len(measured) == 2 * len(smoke_cases) + sum(c.op == "fused_linear_kd" for c in smoke_cases)
    for r in measured:
        assert r["note"] == "", r
        p20, p50, p80 = (float(r[k]) for k in ("ms_p20", "ms_p50", "ms_p80"))
        assert 0 < p20 <= p50 <= p80 < math.inf
        lo, mid, hi = (float(r[k]) for k in ("speedup_min", "speedup_p50", "speedup_max"))
        assert 0 < lo <= mid <= hi < math.inf
        assert int(r["rounds"]) >= 2 and len(r["round_ms"].split()) == int(r["rounds"])
        assert 0 < float(r["gbps"]) < math.inf and 0 < float(r["frac_of_copy_bw"]) < math.inf
        assert (r["tflops"] != "") == (r["op"] == "fused_linear_kd")
        assert 0 <= float(r["peak_mem_bytes"]) < math.inf
        assert float(r["diff_vs_eager"]) < 1e-4
        assert all(r[k] for k in ("device", "torch", "triton", "commit", "date"))

    prefix = csv_path.stem
    assert prefix.endswith("_smoke-custom")
    info = json.loads((tmp_path / f"{prefix}.json").read_text())
    assert info["device"] == rows[0]["device"] and info["copy_gbps"] > 0
    assert info["machine"]["logical_cpus"] >= 1 and "load_average_end" in info["machine"]
    assert {"provider": "fastkd-torch", "case": "teacher_topk"} in [
        {k: d[k] for k in ("provider", "case")} for d in info["legend"]]
    summary = (tmp_path / f"{prefix}_summary.md").read_text()
    assert "**kd_loss/kl, fp32, fwd+bwd, N=16 V=64, T = 2**" in summary and info["machine"]["cpu"] in summary
    assert (tmp_path / f"{prefix}.md").read_text().count("| fastkd-torch |") >= len(smoke_cases)
    try:
        import matplotlib  # noqa: F401  (optional)
    except ImportError:
        assert "plots skipped" in printed
    else:
        assert (tmp_path / f"{prefix}_headline.png").stat().st_size > 0
        assert list(tmp_path.glob(f"{prefix}_kd_loss-kl-*.png")), "the smoke preset has a V sweep to plot"


def test_summary_says_where_torch_compile_beats_fastkd():
    def row(provider, ms, rounds, divergence="kl"):
        return dict(op="kd_loss", divergence=divergence, dtype="fp32", mode="fwd+bwd", n=8, v=64, k="", h="",
                    provider=provider, ms_p50=ms, ms_p20=ms, ms_p80=ms, round_ms=" ".join(map(str, rounds)),
                    speedup_p50=1.0, speedup_min=1.0, speedup_max=1.0, peak_mem_bytes=2**21, note="", check="")

    rows = [row("torch-eager", 30, [30, 30]), row("fastkd-torch", 10, [10, 12]), row("torch-compile", 20, [20, 24]),
            row("torch-eager", 30, [30, 30], "jsd"), row("fastkd-torch", 10, [10, 10], "jsd"),
            row("torch-compile", 5, [5, 6], "jsd")]
    (kl, _, kl_ratio, _, _), (jsd, _, jsd_ratio, lo, hi) = compile_comparisons(rows)
    assert (kl["divergence"], kl_ratio, jsd["divergence"], jsd_ratio, lo, hi) == ("kl", 2.0, "jsd", 0.55, 0.5, 0.6)
    env = dict(device="cpu x", torch="2", triton="3", commit="abc", date="2026-01-01T00:00:00Z")
    text = summary_markdown(rows, env, dict(load_average_start=1.0, load_average_end=2.0), [])
    assert "torch.compile beats fastkd in: kd_loss/jsd N=8 V=64 (fp32, fwd+bwd) against fastkd-torch." in text


def test_python_dash_m_fastkd_bench_lists_the_default_cases(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["python -m fastkd.bench", "--list", "--device", "cpu"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("fastkd.bench", run_name="__main__")
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert "kd_loss/kl fp32 fwd+bwd N=4096 V=32000: torch-eager, fastkd-torch" in printed


def test_default_output_is_git_ignored():
    out = command.default_out()
    root = out.parents[2]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    try:
        ignored = subprocess.run(["git", "-C", str(root), "check-ignore", "-q", str(out / "x.csv")]).returncode
    except OSError:
        pytest.skip("git is not installed")
    assert ignored == 0, f"{out} is not git-ignored"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_every_gpu_provider_computes_the_eager_number():
    """On a GPU: fastkd's backends, the kernel variants (checked or unavailable), torch.compile and
    Liger (when installed) agree with the eager idiom, dense and fused linear."""
    cases = [Case("kd_loss", d, "fp32", 64, 4096, "fwd+bwd") for d in ("kl", "jsd", "tvd")] + [
        Case("fused_linear_kd", d, "fp32", 64, 4096, "fwd+bwd", h=64) for d in ("kl", "jsd")]
    names = ["torch-eager", "fastkd-triton", *KERNEL_VARIANTS, "fastkd-torch", "fastkd-unfused", "torch-compile",
             "liger"]
    per_case, skipped = select_providers(names, torch.device("cuda"), cases)
    rows, _ = runner.run_cases(per_case, torch.device("cuda"), quick=True, log=lambda msg: None)
    for r in rows[1:]:
        assert not r["note"] or r["note"].startswith("unavailable:"), r
        if r["note"] == "":
            assert r["diff_vs_eager"] < 1e-4, r
    assert {"fastkd-triton", "fastkd-torch", "fastkd-unfused"} <= {r["provider"] for r in rows[1:] if not r["note"]}
