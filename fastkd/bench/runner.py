"""Run the cases: time (median and 20/80 % quantiles), peak extra memory, GB/s against the
minimum bytes, and the fraction of a device-to-device copy bandwidth measured in the same run.

GPU: ``triton.testing.do_bench`` (which flushes L2 between runs), one provider after the other,
and ``torch.cuda`` peak memory statistics. CPU: ``time.perf_counter`` around each call, the
providers of a case taking turns call by call (so a machine shared with other work slows them
alike), and the peak RSS, whose high-water mark is reset through ``/proc/self/clear_refs`` before
each measured call; for that call glibc is told to map every block of 1 MiB or more on its own and
to give freed memory back at once, so that RSS follows the bytes the call really holds.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import importlib.metadata
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from .min_bytes import copy_bytes, min_bytes
from .providers import BASELINE

COLUMNS = ("op", "divergence", "provider", "mode", "dtype", "n", "v", "ms_p50", "ms_p20", "ms_p80",
           "min_bytes", "gbps", "frac_of_copy_bw", "peak_mem_bytes", "diff_vs_eager", "note",
           "device", "torch", "triton", "commit", "date")
QUANTILES = (0.5, 0.2, 0.8)
NAN = float("nan")


# ----------------------------------------------------------------------------------------- timing
def time_gpu(fn, quick):
    import triton.testing

    warmup, rep = (5, 20) if quick else (25, 100)
    return tuple(triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=list(QUANTILES)))


def _quantiles(times_ms):
    q = torch.tensor(times_ms, dtype=torch.float64).quantile(torch.tensor(QUANTILES, dtype=torch.float64))
    return tuple(q.tolist())


def time_cpu(fns, quick):
    """Median, 20 % and 80 % quantiles in ms of each of ``fns``, called in turns (one call of each
    per round): at least ``min_rounds`` rounds, then more while the time budget lasts."""
    min_rounds, max_rounds, budget_s = (2, 3, 0.05) if quick else (3, 30, 1.0 * len(fns))
    times = [[] for _ in fns]
    start = time.perf_counter()
    for rounds in range(max_rounds):
        if rounds >= min_rounds and time.perf_counter() - start > budget_s:
            break
        for fn, fn_times in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            fn_times.append((time.perf_counter() - t0) * 1e3)
    return [_quantiles(t) for t in times]


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
    """Bytes allocated by one call of ``fn`` above what was allocated before it (the inputs)."""
    gc.collect()
    if device.type == "cuda":
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
def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_name()} ({torch.get_num_threads()} threads)"


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
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": _package_version("triton"),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


# ----------------------------------------------------------------------------------------- cases
def _row(env, **fields):
    row = {column: "" for column in COLUMNS}
    row.update(env)
    row.update(fields)
    return row


def _nan_metrics():
    return dict(ms_p50=NAN, ms_p20=NAN, ms_p80=NAN, gbps=NAN, frac_of_copy_bw=NAN, peak_mem_bytes=NAN,
                diff_vs_eager=NAN)


def copy_bandwidth(device, quick, env):
    """A row for ``dst.copy_(src)`` of a large float32 tensor: bytes read + written / time."""
    numel = (2**26 if quick else 2**28) if device.type == "cuda" else (2**24 if quick else 2**25)
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch of dst's pages is not part of the bandwidth

    def copy():
        return dst.copy_(src)

    ms = time_gpu(copy, quick) if device.type == "cuda" else time_cpu([copy], quick)[0]
    nbytes = copy_bytes(numel, src.element_size())
    gbps = nbytes / (ms[0] * 1e-3) / 1e9
    return _row(env, op="copy", provider="torch", mode="copy", dtype="fp32", n=1, v=numel, ms_p50=ms[0],
                ms_p20=ms[1], ms_p80=ms[2], min_bytes=nbytes, gbps=gbps, frac_of_copy_bw=1.0)


def _available_bytes(device):
    if device.type == "cuda":
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
    providers of a CPU case are prepared together, for a gradient per provider."""
    available = _available_bytes(device)
    one = case.n * case.v * case.torch_dtype.itemsize
    need = (2 + 6 + n_providers) * one if device.type == "cpu" else 2 * one
    if available is not None and need > 0.8 * available:
        return f"does not fit: needs ~{need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB free"
    return None


def make_inputs(case, device, seed=0):
    generator = torch.Generator(device=device).manual_seed(seed)
    shape, dtype = (case.n, case.v), case.torch_dtype

    def randn():
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    if case.op == "kd_loss":
        return {"args": (randn().requires_grad_(), randn()), "grad_out": None}
    grad_out = randn() if case.mode != "fwd" else None
    return {"args": (randn().requires_grad_(),), "grad_out": grad_out}


def mode_call(case, forward, inputs):
    """The callable timed for ``case.mode``: the forward, a backward of a forward run once, or both."""
    args, grad_out = inputs["args"], inputs["grad_out"]
    leaf = args[0]
    if case.mode == "fwd":
        return lambda: forward(*args)
    if case.mode == "fwd+bwd":
        return lambda: torch.autograd.grad(forward(*args), leaf, grad_out)
    out = forward(*args)
    return lambda: torch.autograd.grad(out, leaf, grad_out, retain_graph=True)


def summary(case, out):
    """What is compared across providers: the loss, or the first rows of (log-)probabilities."""
    if case.op == "kd_loss":
        return float(out.detach())
    return out[:16].detach().float().cpu()


def difference(case, value, reference):
    if case.op == "kd_loss":
        return abs(value - reference) / max(abs(reference), 1e-30)
    finite = torch.isfinite(reference)  # log_softmax of -inf stays -inf in both
    return float((value[finite] - reference[finite]).abs().max()) if finite.any() else 0.0


def _error_note(error):
    if isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower():
        return "out of memory"
    text = str(error).strip()
    return f"error: {type(error).__name__}: {text.splitlines()[0][:160] if text else ''}"


def _release(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def prepare(case, forward, inputs, device):
    """First call (compiles, warms caches, gives the value compared across providers), on a GPU one
    call of the mode (kernels of the backward compile), then one measured for memory, which on the
    CPU is the warm-up of the timed calls. Returns (call, value, peak extra bytes)."""
    out = forward(*inputs["args"])
    value = summary(case, out)
    del out
    call = mode_call(case, forward, inputs)
    if device.type == "cuda":
        call()
    return call, value, peak_extra_memory(call, device)


def _measure_case(case, providers, inputs, device, quick):
    """{provider name: (ms quantiles, peak, value) or an error note}; None for no implementation."""
    results, prepared = {}, {}
    for provider in providers:
        try:
            forward = provider.make(case)
            if forward is None:
                results[provider.name] = None
                continue
            call, value, peak = prepare(case, forward, inputs, device)
            if device.type == "cuda":  # one at a time: the GPU is not shared, its memory is precious
                results[provider.name] = (time_gpu(call, quick), peak, value)
                del call
                _release(device)
            else:
                prepared[provider.name] = (call, value, peak)
        except Exception as error:  # one failing provider must not end the run
            results[provider.name] = _error_note(error)
            _release(device)
    if prepared:
        try:
            times = time_cpu([call for call, _, _ in prepared.values()], quick)
            for (name, (_, value, peak)), ms in zip(prepared.items(), times):
                results[name] = (ms, peak, value)
        except Exception as error:
            results.update({name: _error_note(error) for name in prepared})
    return {p.name: results[p.name] for p in providers}


def _case_rows(case, providers, device, quick, env, copy_gbps, log):
    base = dict(op=case.op, divergence=case.divergence, mode=case.mode, dtype=case.dtype, n=case.n,
                v=case.v, min_bytes=min_bytes(case))
    skip = does_not_fit(case, device, len(providers))
    if skip:
        log(f"      skipped: {skip}")
        return [_row(env, **base, provider=p.name, note=skip, **_nan_metrics()) for p in providers]
    inputs = make_inputs(case, device)
    results = _measure_case(case, providers, inputs, device, quick)
    del inputs
    _release(device)
    reference = results.get(BASELINE)
    reference = reference[2] if isinstance(reference, tuple) else None
    rows = []
    for name, result in results.items():
        if result is None:
            log(f"      {name:<14} -- (no implementation of this case)")
        elif isinstance(result, str):
            rows.append(_row(env, **base, provider=name, note=result, **_nan_metrics()))
            log(f"      {name:<14} {result}")
        else:
            ms, peak, value = result
            gbps = base["min_bytes"] / (ms[0] * 1e-3) / 1e9
            diff = difference(case, value, reference) if reference is not None else NAN
            rows.append(_row(env, **base, provider=name, ms_p50=ms[0], ms_p20=ms[1], ms_p80=ms[2], gbps=gbps,
                             frac_of_copy_bw=gbps / copy_gbps, peak_mem_bytes=peak, diff_vs_eager=diff))
            log(f"      {name:<14} {ms[0]:10.3f} ms {gbps:8.1f} GB/s {gbps / copy_gbps:6.1%} of copy"
                f"  peak {peak / 2**20:9.1f} MiB")
    return rows


def run_cases(cases, providers, device, *, quick=False, log=print, on_case_done=None):
    """Measure every (case, provider) pair; returns (rows, env). The first row is the copy bandwidth.
    ``on_case_done(rows, env)`` after each case lets the caller save partial results; an interrupt
    (Ctrl-C, or SIGTERM where the caller turns it into KeyboardInterrupt) ends the run early with
    the cases finished so far."""
    device = torch.device(device)
    if device.type == "cpu":
        steady_cpu_allocations()
    env = environment(device)
    log(f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']}")
    copy_row = copy_bandwidth(device, quick, env)
    log(f"copy bandwidth (read + write, same run): {copy_row['gbps']:.1f} GB/s")
    rows = [copy_row]
    for step, case in enumerate(cases, 1):
        log(f"[{step:>3}/{len(cases)}] {case.name}  ({min_bytes(case) / 1e9:.3g} GB minimum)")
        try:
            rows += _case_rows(case, providers, device, quick, env, copy_row["gbps"], log)
        except KeyboardInterrupt:
            log(f"interrupted: keeping the {step - 1} cases finished")
            break
        if on_case_done is not None:
            on_case_done(rows, env)
    return rows, env
