"""Run the cases: time (median and 20/80 % quantiles), peak extra memory, GB/s against the
minimum bytes, TFLOP/s for the matmul cases, the fraction of a device-to-device copy bandwidth
measured in the same run, and the speed-up against torch eager.

GPU: ``triton.testing.do_bench`` (which flushes L2 between runs), one provider after the other,
and ``torch.cuda`` peak memory statistics; a provider that runs out of memory gets a row saying so.
CPU: ``time.perf_counter`` around each call, in rounds: every provider of a case is called once per
round, in an order that rotates from round to round, so a machine shared with other work slows
them alike and each round gives one speed-up ratio per provider (the report gives their median and
range). Peak memory: the RSS high-water mark, reset through ``/proc/self/clear_refs`` before the
measured call; for that call glibc is told to map every block of 1 MiB or more on its own and to
give freed memory back at once, so that RSS follows the bytes the call really holds.

Variants of the Triton kernel (providers with ``check_against``) are checked first: loss and
gradients against the provider they stand in for, on the same inputs; a mismatch is a failed
check and is not timed, a launcher that refuses the variant makes it unavailable.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import importlib.metadata
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .. import config
from .arguments import MIN_ROUNDS  # CPU: alternating rounds per case at least (--rounds)
from .cases import TEMPERATURE, ULD_LOGIT_SCALE, ULD_OPS
from .min_bytes import copy_bytes, min_bytes, min_flops
from .providers import BASELINE, REFUSED, provider as provider_named

COLUMNS = ("op", "divergence", "provider", "mode", "dtype", "n", "v", "k", "h", "ms_p50", "ms_p20", "ms_p80",
           "first_call_ms", "rounds", "round_ms", "speedup_p50", "speedup_min", "speedup_max", "min_bytes", "gbps",
           "frac_of_copy_bw", "tflops", "peak_mem_bytes", "diff_vs_eager", "check", "note", "device", "torch",
           "triton", "commit", "date")
QUANTILES = (0.5, 0.2, 0.8)
NAN = float("nan")
COPY_NUMEL = {(True, False): 2**28, (True, True): 2**26, (False, False): 2**25, (False, True): 2**24}  # (gpu, quick)
MAX_ROUNDS = 1000  # CPU: and at most, while ROUND_BUDGET_S per provider lasts
ROUND_BUDGET_S = 0.5
PROGRESS_S = 30.0  # a run prints where it stands at least this often

# A kernel variant passes its check when its loss is within LOSS_RTOL of the reference's and every
# gradient within GRAD_TOL[dtype] of it, relative to the gradient's largest magnitude: a few
# roundings of the gradient's dtype (fp32: summation order inside the kernels).
LOSS_RTOL = 1e-4
GRAD_TOL = {"fp32": 1e-5, "fp16": 2**-9, "bf16": 2**-6}


def on_gpu(device):
    """Whether ``device`` is measured as a GPU (tests stand a CPU in for one by replacing this)."""
    return torch.device(device).type == "cuda"


# ----------------------------------------------------------------------------------------- timing
def time_gpu(fn, quick):
    import triton.testing

    warmup, rep = (5, 20) if quick else (25, 100)
    return tuple(triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=list(QUANTILES)))


def quantiles(times_ms):
    q = torch.tensor(times_ms, dtype=torch.float64).quantile(torch.tensor(QUANTILES, dtype=torch.float64))
    return tuple(q.tolist())


def time_cpu(fns, quick, min_rounds=MIN_ROUNDS, progress=None):
    """Per-round times in ms of each of ``fns``: one call of each per round, the order rotating by
    one place every round; at least ``min_rounds`` rounds, then more while the time budget lasts
    (ROUND_BUDGET_S per provider, up to MAX_ROUNDS: small calls get many rounds, long ones
    ``min_rounds``). ``progress`` (a Progress) is told of each round."""
    min_rounds, max_rounds, budget_s = ((2, 3, 0.05) if quick else
                                        (min_rounds, max(min_rounds, MAX_ROUNDS), ROUND_BUDGET_S * len(fns)))
    times = [[] for _ in fns]
    start = time.perf_counter()
    for round_ in range(max_rounds):
        elapsed = time.perf_counter() - start
        if progress is not None:
            progress.timing(round_, elapsed, min_rounds, max_rounds, budget_s)
        if round_ >= min_rounds and elapsed > budget_s:
            break
        for i in range(len(fns)):
            j = (i + round_) % len(fns)
            t0 = time.perf_counter()
            fns[j]()
            times[j].append((time.perf_counter() - t0) * 1e3)
    return times


# ----------------------------------------------------------------------------------------- memory
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def _mallopt(mmap_threshold, trim_threshold, trim_now=False):
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
        libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
        if trim_now:
            libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS is then only approximate
        pass


def steady_cpu_allocations():
    """Fix glibc's malloc at the state its dynamic thresholds reach in any torch program (blocks
    under 32 MiB reused from the heap, larger ones mapped), so every timed call sees the same."""
    _mallopt(32 << 20, 64 << 20)


@contextlib.contextmanager
def exact_cpu_allocations():
    """Make RSS follow live allocations (glibc): map each block of 1 MiB or more on its own and give
    freed memory back at once. Otherwise freed blocks stay resident and a call reusing them looks free."""
    _mallopt(1 << 20, 1 << 20, trim_now=True)
    try:
        yield
    finally:
        steady_cpu_allocations()


def _proc_status_bytes(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss():
    """Reset the kernel's high-water mark of this process's RSS to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _ru_maxrss_bytes():
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def peak_extra_memory(fn, device):
    """Bytes allocated by one call of ``fn`` above what was allocated before it (the inputs): the
    one peak-memory measurement of the suite, on a GPU and on the CPU."""
    device = torch.device(device)
    gc.collect()
    if on_gpu(device):
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        del out
        return peak - before
    with exact_cpu_allocations():
        if _reset_peak_rss() and _proc_status_bytes("VmHWM") is not None:
            before = _proc_status_bytes("VmRSS")
            out = fn()
            peak = _proc_status_bytes("VmHWM")
        else:  # no /proc: the growth of the lifetime peak, a lower bound
            before = _ru_maxrss_bytes()
            out = fn()
            peak = _ru_maxrss_bytes()
        del out
    return max(0, peak - before)


# ----------------------------------------------------------------------------------------- environment
def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device):
    if on_gpu(device):
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} torch threads, {os.cpu_count()} logical CPUs)"


def load_average():
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return NAN


def _package_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def git_commit():
    """Short commit of the fastkd checkout (``-dirty`` with uncommitted changes), else "unknown".
    ``FASTKD_COMMIT`` overrides, for copies of a checkout without ``.git``."""
    if os.environ.get("FASTKD_COMMIT"):
        return os.environ["FASTKD_COMMIT"]
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").exists():
        return "unknown"  # an installed copy, not a checkout
    try:
        git = ["git", "-C", str(root)]
        commit = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit or "unknown"


def environment(device):
    """What the CSV repeats on every row (device, versions, commit, date)."""
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": _package_version("triton"),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def machine(device):
    """What the JSON and the summary add: the CPU, its logical CPUs and torch threads, the load."""
    return {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(),
            "cuda": torch.version.cuda if on_gpu(device) else None, "load_average_start": load_average()}


# ----------------------------------------------------------------------------------------- inputs
@dataclass
class Inputs:
    args: tuple  # what the providers' forward functions take
    leaves: tuple  # what gradients are taken for
    grad_out: Optional[torch.Tensor]  # upstream gradient of a non-scalar output (softmax), else None


def make_inputs(case, device, seed=0):
    generator = torch.Generator(device=device).manual_seed(seed)
    dtype = case.torch_dtype

    def randn(*shape, scale=1.0):
        x = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        return (x * scale).to(dtype)

    n, v = case.n, case.v
    if case.op == "kd_loss":
        s = randn(n, v).requires_grad_()
        return Inputs((s, randn(n, v)), (s,), None)
    if case.op == "kd_loss_ce":
        s = randn(n, v).requires_grad_()
        labels = torch.randint(0, v, (n,), generator=generator, device=device)
        return Inputs((s, randn(n, v), labels), (s,), None)
    if case.op in ("softmax", "log_softmax"):
        x = randn(n, v).requires_grad_()
        return Inputs((x,), (x,), randn(n, v) if case.mode != "fwd" else None)
    if case.op == "teacher_topk":
        return Inputs((randn(n, v, scale=3.0),), (), None)
    if case.op == "topk_kd_loss":
        import fastkd

        s = randn(n, v, scale=3.0).requires_grad_()
        logprobs, indices = fastkd.teacher_topk(randn(n, v, scale=3.0), case.k, temperature=TEMPERATURE)
        return Inputs((s, logprobs, indices), (s,), None)
    if case.op in ULD_OPS:
        s = randn(n, v, scale=ULD_LOGIT_SCALE).requires_grad_()
        return Inputs((s, randn(n, v, scale=ULD_LOGIT_SCALE)), (s,), None)
    # fused_linear_kd: logits h @ W.T of unit variance
    h = randn(n, case.h, scale=case.h**-0.5).requires_grad_()
    W = randn(v, case.h).requires_grad_()
    return Inputs((h, W, randn(n, case.h, scale=case.h**-0.5), randn(v, case.h)), (h, W), None)


def mode_call(case, forward, inputs):
    """The callable timed for ``case.mode``: the forward, a backward of a forward run once, or both."""
    args, leaves, grad_out = inputs.args, inputs.leaves, inputs.grad_out
    if case.mode == "fwd":
        return lambda: forward(*args)
    if case.mode == "fwd+bwd":
        return lambda: torch.autograd.grad(forward(*args), leaves, grad_out)
    out = forward(*args)
    return lambda: torch.autograd.grad(out, leaves, grad_out, retain_graph=True)


def with_kd_kernel(kernel, fn):
    """``fn`` with ``fastkd.config.kd_kernel`` set to ``kernel`` around every call (None: ``fn``)."""
    if kernel is None:
        return fn

    def call(*args):
        with config.override(kd_kernel=kernel):
            return fn(*args)

    return call


def summary(case, out):
    """What is compared across providers: the loss, or the first rows of (log-)probabilities."""
    if case.op == "teacher_topk":
        out = out[0]  # the log-probabilities (tied indices may be listed in any order)
    if out.dim() == 0:
        return float(out.detach())
    return out[:16].detach().float().cpu()


def difference(value, reference):
    if isinstance(value, float):
        return abs(value - reference) / max(abs(reference), 1e-30)
    finite = torch.isfinite(reference)  # log_softmax of -inf stays -inf in both
    return float((value[finite] - reference[finite]).abs().max()) if finite.any() else 0.0


def value_and_grads(case, forward, inputs):
    """One forward and its gradients (for the check of a kernel variant)."""
    out = forward(*inputs.args)
    grads = torch.autograd.grad(out, inputs.leaves, inputs.grad_out) if inputs.leaves else ()
    return summary(case, out), grads


def compare(case, mine, reference):
    """(passed, text) of a provider's (value, grads) against the reference's."""
    value, grads = mine
    loss_diff = difference(value, reference[0])
    grad_diff = max((float((g.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-30))
                     for g, r in zip(grads, reference[1])), default=0.0)
    passed = loss_diff <= LOSS_RTOL and grad_diff <= GRAD_TOL[case.dtype]
    text = f"loss {loss_diff:.1e}, grad {grad_diff:.1e} (limits {LOSS_RTOL:.0e}, {GRAD_TOL[case.dtype]:.1e})"
    return passed, text


# ----------------------------------------------------------------------------------------- progress
def case_weight(case, providers):
    """A rough cost of a case, for the run's estimate of what is left: its bytes per provider, the
    matmul flops of a fused linear case (a CPU does some 10 GFLOP/s per byte/s it copies), and a
    minute per torch.compile (inductor's C++ build)."""
    compiled = sum(p.name == "torch-compile" for p in providers)
    return len(providers) * (min_bytes(case) + min_flops(case) / 10 + 1e7) + compiled * 3e10


def _seconds(s):
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


class Progress:
    """Where a run stands, printed from a daemon thread every PROGRESS_S seconds: the case, its phase
    (preparing a provider: the first call, a compile; or timing), about how long the case and the
    whole run have left. The case's estimate comes from its rounds so far; the run's from the time
    per ``case_weight`` of the cases done (or of this one, at the first)."""

    def __init__(self, weights, log):
        self.weights, self.log = weights, log
        self.start = time.perf_counter()
        self.done_weight, self.step, self.case, self.case_start = 0.0, 0, "", self.start
        self.phase, self.case_left = "starting", None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fastkd-bench-progress", daemon=True)
        self._thread.start()

    def begin_case(self, step, case):
        self.step, self.case, self.case_start = step, case.name, time.perf_counter()
        self.phase, self.case_left = "preparing", None

    def end_case(self, weight):
        self.done_weight += weight

    def preparing(self, provider_name):
        self.phase, self.case_left = f"preparing {provider_name} (first calls)", None

    def timing(self, round_, elapsed, min_rounds, max_rounds, budget_s):
        if round_ == 0:
            self.phase, self.case_left = "timing", None
            return
        per_round = elapsed / round_
        rounds = min(max_rounds, max(min_rounds, math.ceil(budget_s / per_round)))
        self.phase, self.case_left = f"timing, round {round_ + 1} of about {rounds}", (rounds - round_) * per_round

    def line(self):
        now = time.perf_counter()
        in_case = now - self.case_start
        weight_left = sum(self.weights[self.step - 1:]) if self.step else sum(self.weights)
        if self.done_weight > 0:
            run_left = (now - self.start - in_case) / self.done_weight * weight_left
        elif self.step and self.case_left is not None:  # the first case: its own pace
            run_left = (in_case + self.case_left) / self.weights[0] * weight_left
        else:
            run_left = None
        case_left = "unknown" if self.case_left is None else f"about {_seconds(self.case_left)}"
        run = "unknown" if run_left is None else f"about {_seconds(max(run_left, self.case_left or 0))}"
        return (f"      ... {_seconds(now - self.start)} into the run, case {self.step}/{len(self.weights)} "
                f"{self.case}: {self.phase}, {_seconds(in_case)} in the case, left: case {case_left}, run {run}")

    def _run(self):
        while not self._stop.wait(PROGRESS_S):
            self.log(self.line())

    def stop(self):
        self._stop.set()
        self._thread.join()


# ----------------------------------------------------------------------------------------- cases
def _row(env, **fields):
    row = {column: "" for column in COLUMNS}
    row.update(env)
    row.update(fields)
    return row


def _nan_metrics():
    return dict(first_call_ms=NAN, ms_p50=NAN, ms_p20=NAN, ms_p80=NAN, speedup_p50=NAN, speedup_min=NAN,
                speedup_max=NAN, gbps=NAN, frac_of_copy_bw=NAN, tflops=NAN, peak_mem_bytes=NAN, diff_vs_eager=NAN)


def copy_bandwidth(device, quick, env):
    """A row for ``dst.copy_(src)`` of a large float32 tensor: bytes read + written / time."""
    numel = COPY_NUMEL[on_gpu(device), quick]
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch of dst's pages is not part of the bandwidth

    def copy():
        return dst.copy_(src)

    ms = time_gpu(copy, quick) if on_gpu(device) else quantiles(time_cpu([copy], quick)[0])
    nbytes = copy_bytes(numel, src.element_size())
    gbps = nbytes / (ms[0] * 1e-3) / 1e9
    return _row(env, op="copy", provider="torch", mode="copy", dtype="fp32", n=1, v=numel, ms_p50=ms[0],
                ms_p20=ms[1], ms_p80=ms[2], min_bytes=nbytes, gbps=gbps, frac_of_copy_bw=1.0)


def _available_bytes(device):
    if on_gpu(device):
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def does_not_fit(case, device, n_providers):
    """Why ``case`` is skipped for memory, or None. On the CPU the OOM killer does not raise, so the
    guard leaves room for the eager idiom's temporaries (about six [N, V] tensors) and, as the
    providers of a CPU case are prepared together, for a gradient per provider. On a GPU only the
    inputs must fit: a provider that runs out of memory gets a row saying so."""
    available = _available_bytes(device)
    one = case.n * case.v * (4 if case.op == "fused_linear_kd" else case.torch_dtype.itemsize)
    inputs = 2 * (case.n + case.v) * case.h * case.torch_dtype.itemsize if case.op == "fused_linear_kd" else 2 * one
    need = inputs + (6 + n_providers) * one if not on_gpu(device) else inputs
    if available is not None and need > 0.8 * available:
        return f"does not fit: needs ~{need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB free"
    return None


def _is_oom(error):
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def _error_note(error):
    if _is_oom(error):
        return "out of memory"
    text = str(error).strip()
    return f"error: {type(error).__name__}: {text.splitlines()[0][:160] if text else ''}"


def _release(device):
    gc.collect()
    if on_gpu(device):
        torch.cuda.empty_cache()


def _synchronize(device):
    if on_gpu(device):
        torch.cuda.synchronize(device)


def prepare(case, forward, inputs, device):
    """First call (compiles, warms caches, gives the value compared across providers), on a GPU one
    call of the mode (kernels of the backward compile), then one measured for memory, which on the
    CPU is the warm-up of the timed calls. Returns (call, value, peak extra bytes, first call ms)."""
    _synchronize(device)
    start = time.perf_counter()
    out = forward(*inputs.args)
    value = summary(case, out)
    _synchronize(device)
    first_ms = (time.perf_counter() - start) * 1e3
    del out
    call = mode_call(case, forward, inputs)
    if on_gpu(device):
        call()
    return call, value, peak_extra_memory(call, device), first_ms


@dataclass
class Measured:
    ms: tuple  # median, 20 %, 80 % quantiles
    rounds: Optional[list]  # CPU: the time of every round, ms
    peak: float
    value: object
    first_ms: float  # the first call, compilation included
    check: str = ""


class _Reference:
    """The (value, grads) of the providers that kernel variants are checked against, computed once."""

    def __init__(self, case, inputs):
        self.case, self.inputs, self.results = case, inputs, {}

    def get(self, name):
        if name not in self.results:
            reference = provider_named(name)
            forward = with_kd_kernel(reference.kd_kernel, reference.make(self.case))
            try:
                self.results[name] = value_and_grads(self.case, forward, self.inputs)
            except Exception as error:  # noqa: BLE001 - reported on the variant's row
                self.results[name] = f"{name} failed: {_error_note(error)}"
        return self.results[name]


def _check(case, provider, forward, inputs, references):
    """None when ``provider`` may be timed, else the note of its row; and the check text."""
    try:
        mine = value_and_grads(case, forward, inputs)
    except REFUSED as error:
        return f"unavailable: {type(error).__name__}: {error}", ""
    reference = references.get(provider.check_against)
    if isinstance(reference, str):
        return f"check impossible: {reference}", "not checked"
    passed, text = compare(case, mine, reference)
    if not passed:
        return f"check failed against {provider.check_against}: {text}", f"failed: {text}"
    return None, f"passed: {text}"


def _run_provider(case, provider, inputs, device, quick, references):
    """Measured (GPU), ``(call, value, peak, first_ms, check)`` to time with the others (CPU), ``(note,
    check)`` when it is not timed, or None without an implementation of the case."""
    try:
        forward = provider.make(case)
        if forward is None:
            return None
        forward = with_kd_kernel(provider.kd_kernel, forward)
        check = ""
        if provider.check_against:
            note, check = _check(case, provider, forward, inputs, references)
            if note:
                return note, check
        call, value, peak, first_ms = prepare(case, forward, inputs, device)
        call = with_kd_kernel(provider.kd_kernel, call)
        if on_gpu(device):  # one at a time: the GPU is not shared, its memory is precious
            return Measured(time_gpu(call, quick), None, peak, value, first_ms, check)
        return call, value, peak, first_ms, check
    except Exception as error:  # one failing provider must not end the run
        return _error_note(error), ""


def _measure_case(case, providers, inputs, device, quick, min_rounds, progress=None):
    """{provider name: Measured or (note, check)}; providers without an implementation left out."""
    results, prepared = {}, {}
    references = _Reference(case, inputs)
    for provider in providers:
        if progress is not None:
            progress.preparing(provider.name)
        outcome = _run_provider(case, provider, inputs, device, quick, references)
        if outcome is None:
            continue
        if isinstance(outcome, tuple) and len(outcome) == 5:  # CPU: timed with the others below
            prepared[provider.name] = outcome
        else:
            results[provider.name] = outcome
        _release(device)  # after the return: a failed call's frames (and tensors) are gone
    del references
    if prepared:
        try:
            times = time_cpu([call for call, *_ in prepared.values()], quick, min_rounds, progress)
            for (name, (_, value, peak, first_ms, check)), rounds in zip(prepared.items(), times):
                results[name] = Measured(quantiles(rounds), rounds, peak, value, first_ms, check)
        except Exception as error:  # noqa: BLE001
            results.update({name: (_error_note(error), "") for name in prepared})
    return {p.name: results[p.name] for p in providers if p.name in results}


def _speedups(result, baseline):
    """Median, min and max of the speed-up over torch eager: per round on the CPU (rounds of the
    same case run the providers in turn), the ratio of the medians on a GPU."""
    if not isinstance(baseline, Measured):
        return NAN, NAN, NAN
    if result.rounds and baseline.rounds:
        ratios = [b / t for b, t in zip(baseline.rounds, result.rounds)]
        return statistics.median(ratios), min(ratios), max(ratios)
    return baseline.ms[0] / result.ms[0], NAN, NAN


def _case_rows(case, providers, device, quick, min_rounds, env, copy_gbps, log, progress=None):
    base = dict(op=case.op, divergence=case.divergence, mode=case.mode, dtype=case.dtype, n=case.n, v=case.v,
                k=case.k or "", h=case.h or "", min_bytes=min_bytes(case))
    skip = does_not_fit(case, device, len(providers))
    if skip:
        log(f"      skipped: {skip}")
        return [_row(env, **base, provider=p.name, note=skip, **_nan_metrics()) for p in providers
                if p.describe(case) is not None]
    inputs = make_inputs(case, device)
    results = _measure_case(case, providers, inputs, device, quick, min_rounds, progress)
    del inputs
    _release(device)
    baseline = results.get(BASELINE)
    flops = min_flops(case)
    rows = []
    for name, result in results.items():
        if not isinstance(result, Measured):
            note, check = result
            rows.append(_row(env, **base, provider=name, note=note, check=check, **_nan_metrics()))
            log(f"      {name:<24} {note}")
            continue
        gbps = base["min_bytes"] / (result.ms[0] * 1e-3) / 1e9
        tflops = flops / (result.ms[0] * 1e-3) / 1e12 if flops else NAN
        speedup = _speedups(result, baseline)
        diff = difference(result.value, baseline.value) if isinstance(baseline, Measured) else NAN
        rows.append(_row(env, **base, provider=name, ms_p50=result.ms[0], ms_p20=result.ms[1], ms_p80=result.ms[2],
                         first_call_ms=result.first_ms, rounds=len(result.rounds) if result.rounds else "",
                         round_ms=" ".join(f"{t:.4g}" for t in result.rounds or ()), speedup_p50=speedup[0],
                         speedup_min=speedup[1], speedup_max=speedup[2], gbps=gbps, frac_of_copy_bw=gbps / copy_gbps,
                         tflops=tflops, peak_mem_bytes=result.peak, diff_vs_eager=diff, check=result.check))
        rate = f"{tflops:7.1f} TFLOP/s" if flops else f"{gbps:8.1f} GB/s {gbps / copy_gbps:6.1%} of copy"
        faster = f"  {speedup[0]:5.2f}x eager" if math.isfinite(speedup[0]) else ""
        log(f"      {name:<24} {result.ms[0]:10.3f} ms {rate}  peak {result.peak / 2**20:9.1f} MiB{faster}"
            + (f"  check {result.check}" if result.check else ""))
    return rows


def run_cases(case_providers, device, *, quick=False, min_rounds=MIN_ROUNDS, log=print, on_case_done=None):
    """Measure every case with its providers (``{case: [Provider]}``); returns (rows, env). The
    first row is the copy bandwidth. ``on_case_done(rows, env)`` after each case lets the caller
    save partial results; an interrupt (Ctrl-C, or SIGTERM where the caller turns it into
    KeyboardInterrupt) ends the run early with the cases finished so far."""
    device = torch.device(device)
    if not on_gpu(device):
        steady_cpu_allocations()
    env = environment(device)
    log(f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']}"
        f" | load average {load_average()}")
    copy_row = copy_bandwidth(device, quick, env)
    log(f"copy bandwidth (read + write, same run): {copy_row['gbps']:.1f} GB/s")
    rows = [copy_row]
    gc.collect()
    gc.freeze()  # the collections before each measurement then skip the libraries' objects (seconds)
    weights = [case_weight(case, providers) for case, providers in case_providers.items()]
    progress = Progress(weights, log)
    try:
        for step, (case, providers) in enumerate(case_providers.items(), 1):
            log(f"[{step:>3}/{len(case_providers)}] {case.name}  ({min_bytes(case) / 1e9:.3g} GB minimum)")
            progress.begin_case(step, case)
            try:
                rows += _case_rows(case, providers, device, quick, min_rounds, env, copy_row["gbps"], log, progress)
            except KeyboardInterrupt:
                log(f"interrupted: keeping the {step - 1} cases finished")
                break
            progress.end_case(weights[step - 1])
            if on_case_done is not None:
                on_case_done(rows, env)
    finally:
        progress.stop()
        gc.unfreeze()
    return rows, env
