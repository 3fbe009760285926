"""Benchmark of the fused linear + KD loss against the unfused path (issue 6), on the CPU or a GPU.

    python bench/bench_fused_linear.py                          # CPU: N=4096, H=1024, V=32000, fp32
    python bench/bench_fused_linear.py --threads 1              # steadier CPU timings on a busy machine
    python bench/bench_fused_linear.py --N 512 --V 4000 --H 256 --repeats 1   # a quick look
    python bench/bench_fused_linear.py --device cuda            # H200: N in {8192, 16384}, H=4096,
                                                                #   V in {128256, 262144}, bf16, kl and jsd

Providers, each forward + backward with gradients for student_hidden and student_weight (batchmean,
T = 1; the teacher is hidden + weight, its logits under no-grad):
    unfused   fastkd.kd_loss(student_hidden @ W.T, teacher_hidden @ Wt.T)
    fused     fastkd.fused_linear_kd_loss(student_hidden, W, teacher_hidden, Wt)
    liger     liger_kernel's LigerFusedLinearJSD (GPU, jsd only: the one divergence it fuses)
On the CPU both fastkd providers use the torch backend; on a GPU the default (Triton).

CPU memory: one fresh subprocess per provider, so allocator state never leaks between them. The
inputs are allocated and a tiny call warms the libraries up; then the peak RSS counter is reset
(``/proc/self/clear_refs`` <- "5") and one forward + backward runs. "extra" is VmHWM minus the RSS
just before the call (so the inputs and the interpreter are left out), "peak" is VmHWM itself.
Each is measured twice: with glibc malloc as it comes ("default": what a program sees; freed heap
blocks under its mmap threshold stay resident) and with every block of 1 MiB or more mapped on its
own and freed memory returned at once ("exact": RSS follows live allocations).
CPU time: one subprocess holds the inputs, warms every provider up once, then runs ``--repeats``
rounds, providers alternating within each round so that load from other processes on a shared
machine hits all alike; the minimum over rounds is reported (noise only adds), median alongside,
and process CPU time (summed over threads). Linux (/proc) only.
GPU: one process; per provider a warm-up step, then one step between
``torch.cuda.reset_peak_memory_stats`` and ``max_memory_allocated`` ("extra": the peak above the
memory held before the step, so the inputs are left out; the gradients are in), then ``--repeats``
steps timed with CUDA events (min and median). A provider that runs out of memory is recorded as
such. The achieved matmul rate counts the four matmuls of a step, 2 N V (3 H + H_t) flops.
Rows go to a long-format CSV (kernel, provider, divergence, mode, metric, unit, N, H, V, dtype,
chunk_size, threads, device, value) under bench/results/, written as they are measured, with a JSON
beside it (device, torch, CUDA, triton, commit, date, arguments).
"""
import argparse
import csv
import ctypes
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
COLUMNS = ("kernel", "provider", "divergence", "mode", "metric", "unit", "N", "H", "V", "dtype", "chunk_size",
           "threads", "device", "value")
GPU_NS, GPU_VS = (8192, 16384), (128256, 262144)
JSD_BETA = 0.5


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _exact_malloc():
    """glibc: map every block of 1 MiB or more on its own and return freed memory at once."""
    libc = ctypes.CDLL(None)
    libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD
    libc.malloc_trim(0)


def _make_inputs(N, H, V, dtype, seed=0, device="cpu"):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    h = (torch.randn(N, H, generator=g, device=device) / H**0.5).to(dtype).requires_grad_()
    W = torch.randn(V, H, generator=g, device=device).to(dtype).requires_grad_()
    th = (torch.randn(N, H, generator=g, device=device) / H**0.5).to(dtype)
    Wt = torch.randn(V, H, generator=g, device=device).to(dtype)
    return h, W, th, Wt


def make_loss(provider, divergence, chunk_size, backend):
    """``loss(h, W, th, Wt)`` of one provider; None where it has no such divergence."""
    import fastkd

    options = dict(divergence=divergence, beta=JSD_BETA, backend=backend)
    if provider == "unfused":
        return lambda h, W, th, Wt: fastkd.kd_loss(h @ W.T, th @ Wt.T, **options)
    if provider == "fused":
        return lambda h, W, th, Wt: fastkd.fused_linear_kd_loss(h, W, th, Wt, chunk_size=chunk_size, **options)
    if provider == "liger" and divergence == "jsd":
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

        loss = LigerFusedLinearJSD(jsd_beta=JSD_BETA, temperature=1.0)
        return lambda h, W, th, Wt: loss(h, W, th, Wt, None)  # no labels: every row counts
    return None


def _step(loss_fn, inputs):
    """One forward + backward; the gradients are dropped afterwards. Returns the loss."""
    h, W, th, Wt = inputs
    loss = loss_fn(h, W, th, Wt)
    loss.backward()
    h.grad = W.grad = None
    return loss.detach()


# ---------------------------------------------------------------------------------------------
# CPU: subprocesses for RSS


def child(args):
    """The measurements of one CPU subprocess; prints one JSON line."""
    import gc

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    cases = [(make_loss(provider, args.divergences[0], chunk, "torch"), chunk) for provider, chunk in
             json.loads(args.cases)]
    for loss_fn, _ in cases:  # load the libraries' kernels
        _step(loss_fn, _make_inputs(64, 64, 256, dtype, seed=1))
    inputs = _make_inputs(args.N[0], args.H, args.V[0], dtype)
    gc.collect()
    if args.mode == "memory":
        (loss_fn, _), = cases
        if args.malloc == "exact":
            _exact_malloc()
        before = _status_kib("VmRSS")
        _reset_peak_rss()
        _step(loss_fn, inputs)
        peak = _status_kib("VmHWM")
        print(json.dumps({"extra_MiB": (peak - before) / 1024, "peak_MiB": peak / 1024}))
        return
    for loss_fn, _ in cases:
        _step(loss_fn, inputs)
    times = [[] for _ in cases]
    for _ in range(args.repeats):
        for (loss_fn, _), out in zip(cases, times):
            start, start_cpu = time.perf_counter(), time.process_time()
            _step(loss_fn, inputs)
            out.append((time.perf_counter() - start, time.process_time() - start_cpu))
    print(json.dumps(times))


def _run_child(args, mode, cases, malloc="default"):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--mode", mode, "--cases", json.dumps(cases),
           "--malloc", malloc, "--N", str(args.N[0]), "--H", str(args.H), "--V", str(args.V[0]),
           "--divergences", args.divergences[0], "--dtype", args.dtype, "--repeats", str(args.repeats),
           "--threads", str(args.threads or 0)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_main(args, write):
    import torch

    import fastkd.fused_linear as fl

    N, V = args.N[0], args.V[0]
    default_chunk = fl.default_chunk_size(V, args.H)
    cases = [["unfused", None]] + [["fused", c or default_chunk] for c in (args.chunk_sizes or [None])]
    names = [p if p == "unfused" else f"fused(chunk={c})" for p, c in cases]
    memory = {m: [_run_child(args, "memory", [case], m) for case in cases] for m in ("default", "exact")}
    times = _run_child(args, "time", cases)

    threads = args.threads or torch.get_num_threads()
    shape = dict(N=N, H=args.H, V=V, dtype=args.dtype)
    print(f"fused linear + KD ({args.divergences[0]}, batchmean), forward+backward, CPU torch backend, {shape}, "
          f"{threads} threads, default chunk {default_chunk} rows; time over {args.repeats} alternating rounds")
    print(f"{'provider':<18}{'extra MiB':>10}{'/unf':>7}{'exact MiB':>10}{'/unf':>7}{'peak MiB':>9}"
          f"{'wall min':>9}{'median':>8}{'/unf':>7}{'cpu min':>8}{'/unf':>7}")
    base = None
    for i, ((provider, chunk), name) in enumerate(zip(cases, names)):
        mem, exact = memory["default"][i], memory["exact"][i]
        wall = [w for w, _ in times[i]]
        cpu = [c for _, c in times[i]]
        r = dict(extra=mem["extra_MiB"], exact=exact["extra_MiB"], peak=mem["peak_MiB"],
                 wall=min(wall), median=statistics.median(wall), cpu=min(cpu))
        base = base or r
        print(f"{name:<18}{r['extra']:>10.0f}{r['extra'] / base['extra']:>7.3f}{r['exact']:>10.0f}"
              f"{r['exact'] / base['exact']:>7.3f}{r['peak']:>9.0f}{r['wall']:>9.2f}{r['median']:>8.2f}"
              f"{r['wall'] / base['wall']:>7.3f}{r['cpu']:>8.2f}{r['cpu'] / base['cpu']:>7.3f}")
        for metric, unit, key in (("extra_rss", "MiB", "extra"), ("extra_rss_exact_malloc", "MiB", "exact"),
                                  ("peak_rss", "MiB", "peak"), ("time_min", "s", "wall"),
                                  ("time_median", "s", "median"), ("cpu_time_min", "s", "cpu")):
            write(dict(provider=provider, divergence=args.divergences[0], metric=metric, unit=unit, **shape,
                       chunk_size=chunk or "", threads=threads, device="cpu", value=f"{r[key]:.4g}"))


# ---------------------------------------------------------------------------------------------
# GPU: CUDA memory statistics and events, in one process


def _cuda_measure(loss_fn, inputs, repeats):
    """(extra peak MiB, [step seconds], loss) of one provider on CUDA."""
    import torch

    _step(loss_fn, inputs)  # compiles and autotunes
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = _step(loss_fn, inputs)
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - before) / 2**20
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        _step(loss_fn, inputs)
        end.record()
    torch.cuda.synchronize()
    return extra, [start.elapsed_time(end) / 1e3 for start, end in events], float(loss)


def cuda_main(args, write, device="cuda"):
    import importlib.util

    import torch

    import fastkd.fused_linear as fl

    dtype = getattr(torch, args.dtype)
    has_liger = importlib.util.find_spec("liger_kernel") is not None
    print(f"fused linear + KD, forward+backward on {torch.cuda.get_device_name()}, {args.dtype}, H={args.H}, "
          f"{args.repeats} timed steps per provider; liger_kernel {'found' if has_liger else 'not installed'}")
    print(f"{'N':>6}{'V':>8} {'divergence':<11}{'provider':<9}{'extra MiB':>10}{'/unf':>7}{'ms min':>8}"
          f"{'median':>8}{'/unf':>7}{'TFLOP/s':>8}{'loss':>12}")
    deadline = time.monotonic() + args.deadline_s
    for N in args.N:
        for V in args.V:
            inputs = _make_inputs(N, args.H, V, dtype, device=device)
            chunk = args.chunk_sizes[0] if args.chunk_sizes else fl.default_chunk_size(V, args.H)
            flops = 2 * N * V * 4 * args.H
            for divergence in args.divergences:
                base = None
                for provider in ("unfused", "fused", "liger"):
                    if time.monotonic() > deadline:
                        print(f"deadline of {args.deadline_s} s reached: stopping")
                        return
                    if provider == "liger" and not has_liger:
                        continue
                    loss_fn = make_loss(provider, divergence, chunk, "auto")
                    if loss_fn is None:
                        continue
                    row = dict(provider=provider, divergence=divergence, N=N, H=args.H, V=V, dtype=args.dtype,
                               chunk_size=chunk if provider == "fused" else "", threads="",
                               device=torch.cuda.get_device_name())
                    try:
                        extra, times, loss = _cuda_measure(loss_fn, inputs, args.repeats)
                    except torch.cuda.OutOfMemoryError:
                        inputs[0].grad = inputs[1].grad = None
                        torch.cuda.empty_cache()
                        print(f"{N:>6}{V:>8} {divergence:<11}{provider:<9} out of memory")
                        write(dict(row, metric="out_of_memory", unit="", value=1))
                        continue
                    r = dict(extra=extra, min=min(times), median=statistics.median(times))
                    base = base or r
                    print(f"{N:>6}{V:>8} {divergence:<11}{provider:<9}{extra:>10.0f}{extra / base['extra']:>7.3f}"
                          f"{r['min'] * 1e3:>8.1f}{r['median'] * 1e3:>8.1f}{r['min'] / base['min']:>7.3f}"
                          f"{flops / r['min'] / 1e12:>8.0f}{loss:>12.6g}", flush=True)
                    for metric, unit, value in (("extra_cuda_peak", "MiB", extra), ("time_min", "s", r["min"]),
                                                ("time_median", "s", r["median"]),
                                                ("matmul_tflops", "TFLOP/s", flops / r["min"] / 1e12),
                                                ("loss", "", loss)):
                        write(dict(row, metric=metric, unit=unit, value=f"{value:.5g}"))
            del inputs
            torch.cuda.empty_cache()


def _run_info(device):
    import torch

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    commit = os.environ.get("FASTKD_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
    return dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
                cuda=torch.version.cuda, triton=triton_version, commit=commit or "unknown",
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))


def _csv_writer(path):
    """``write(row)``: one CSV row, flushed at once (a run stopped early keeps what it measured)."""
    if not path:
        return lambda row: None
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    f = open(path, "w", newline="")
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()

    def write(row):
        writer.writerow(dict(dict(kernel="fused_linear_kd", mode="fwd+bwd"), **row))
        f.flush()

    return write


def main(args):
    if args.csv:
        info = dict(_run_info(args.device), argv=sys.argv[1:])
        with open(os.path.splitext(args.csv)[0] + ".json", "w") as f:
            json.dump(info, f, indent=2)
        print(f"writing {args.csv} and its .json ({info})")
    (cuda_main if args.device == "cuda" else cpu_main)(args, _csv_writer(args.csv))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--N", type=int, nargs="+", default=None, help="tokens (CPU: one; default 4096 / 8192 16384)")
    parser.add_argument("--H", type=int, default=None, help="hidden size (default 1024 CPU / 4096 GPU)")
    parser.add_argument("--V", type=int, nargs="+", default=None, help="vocabulary (default 32000 / 128256 262144)")
    parser.add_argument("--divergences", nargs="+", default=None, help="default kl (CPU) / kl jsd (GPU)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                        help="default float32 (CPU) / bfloat16 (GPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--chunk-sizes", type=int, nargs="*", default=None,
                        help="fused chunk sizes to measure (default: the library's default only; GPU: the first)")
    parser.add_argument("--deadline-s", type=float, default=float("inf"), help="GPU: start no provider after this")
    parser.add_argument("--csv", default=None, help="output CSV ('' for none; default bench/results/"
                                                    "fused_linear_<device>.csv)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("memory", "time"), help=argparse.SUPPRESS)
    parser.add_argument("--cases", help=argparse.SUPPRESS)
    parser.add_argument("--malloc", choices=("default", "exact"), default="default", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    args.N = args.N or list(GPU_NS if gpu else (4096,))
    args.V = args.V or list(GPU_VS if gpu else (32000,))
    args.H = args.H or (4096 if gpu else 1024)
    args.divergences = args.divergences or (["kl", "jsd"] if gpu else ["kl"])
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    if args.csv is None:
        args.csv = os.path.join(HERE, "results", f"fused_linear_{args.device}.csv")
    if not gpu and (len(args.N) > 1 or len(args.V) > 1 or len(args.divergences) > 1):
        parser.error("the CPU run takes one N, one V and one divergence")
    return args


if __name__ == "__main__":
    args = parse_args()
    child(args) if args.child else main(args)
