"""CPU benchmark of the fused linear + KD loss against the unfused path (issue 6).

    python bench/bench_fused_linear.py                          # N=4096, H=1024, V=32000, fp32
    python bench/bench_fused_linear.py --threads 1              # steadier timings on a busy machine
    python bench/bench_fused_linear.py --N 512 --V 4000 --H 256 --repeats 1   # a quick look

Providers, both forward + backward with gradients for student_hidden and student_weight:
    unfused   fastkd.kd_loss(student_hidden @ W.T, teacher_hidden @ Wt.T)        (torch backend)
    fused     fastkd.fused_linear_kd_loss(student_hidden, W, teacher_hidden, Wt)  (torch backend)

Memory: one fresh subprocess per provider, so allocator state never leaks between them. The inputs
are allocated and a tiny call warms the libraries up; then the peak RSS counter is reset
(``/proc/self/clear_refs`` <- "5") and one forward + backward runs. "extra" is VmHWM minus the RSS
just before the call (so the inputs and the interpreter are left out), "peak" is VmHWM itself.
Each is measured twice: with glibc malloc as it comes ("default": what a program sees; freed heap
blocks under its mmap threshold stay resident) and with every block of 1 MiB or more mapped on its
own and freed memory returned at once ("exact": RSS follows live allocations).
Time: one subprocess holds the inputs, warms every provider up once, then runs ``--repeats``
rounds, providers alternating within each round so that load from other processes on a shared
machine hits all alike; the minimum over rounds is reported (noise only adds), median alongside,
and process CPU time (summed over threads). Rows go to a long-format CSV (kernel, provider, mode,
metric, unit, N, H, V, dtype, chunk_size, threads, value) under bench/results/. Linux (/proc) only.
"""
import argparse
import csv
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


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


def _make_inputs(N, H, V, dtype, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, H, generator=g) / H**0.5).to(dtype).requires_grad_()
    W = torch.randn(V, H, generator=g).to(dtype).requires_grad_()
    th = (torch.randn(N, H, generator=g) / H**0.5).to(dtype)
    Wt = torch.randn(V, H, generator=g).to(dtype)
    return h, W, th, Wt


def _step(provider, chunk_size, inputs):
    """One forward + backward; the gradients are dropped afterwards."""
    import fastkd

    h, W, th, Wt = inputs
    if provider == "unfused":
        loss = fastkd.kd_loss(h @ W.T, th @ Wt.T, backend="torch")
    else:
        loss = fastkd.fused_linear_kd_loss(h, W, th, Wt, chunk_size=chunk_size, backend="torch")
    loss.backward()
    h.grad = W.grad = None


def child(args):
    """The measurements of one subprocess; prints one JSON line."""
    import gc

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    cases = json.loads(args.cases)
    for provider, chunk in cases:  # load the libraries' kernels
        _step(provider, chunk, _make_inputs(64, 64, 256, dtype, seed=1))
    inputs = _make_inputs(args.N, args.H, args.V, dtype)
    gc.collect()
    if args.mode == "memory":
        (provider, chunk), = cases
        if args.malloc == "exact":
            _exact_malloc()
        before = _status_kib("VmRSS")
        _reset_peak_rss()
        _step(provider, chunk, inputs)
        peak = _status_kib("VmHWM")
        print(json.dumps({"extra_MiB": (peak - before) / 1024, "peak_MiB": peak / 1024}))
        return
    for provider, chunk in cases:
        _step(provider, chunk, inputs)
    times = [[] for _ in cases]
    for _ in range(args.repeats):
        for (provider, chunk), out in zip(cases, times):
            start, start_cpu = time.perf_counter(), time.process_time()
            _step(provider, chunk, inputs)
            out.append((time.perf_counter() - start, time.process_time() - start_cpu))
    print(json.dumps(times))


def _run_child(args, mode, cases, malloc="default"):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--mode", mode, "--cases", json.dumps(cases),
           "--malloc", malloc, "--N", str(args.N), "--H", str(args.H), "--V", str(args.V),
           "--dtype", args.dtype, "--repeats", str(args.repeats), "--threads", str(args.threads or 0)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(args):
    import torch

    import fastkd.fused_linear as fl

    default_chunk = fl.default_chunk_size(args.V, args.H)
    cases = [["unfused", None]] + [["fused", c or default_chunk] for c in (args.chunk_sizes or [None])]
    names = [p if p == "unfused" else f"fused(chunk={c})" for p, c in cases]
    memory = {m: [_run_child(args, "memory", [case], m) for case in cases] for m in ("default", "exact")}
    times = _run_child(args, "time", cases)

    threads = args.threads or torch.get_num_threads()
    shape = dict(N=args.N, H=args.H, V=args.V, dtype=args.dtype)
    print(f"fused linear + KD (kl, batchmean), forward+backward, CPU torch backend, {shape}, {threads} "
          f"threads, default chunk {default_chunk} rows; time over {args.repeats} alternating rounds")
    print(f"{'provider':<18}{'extra MiB':>10}{'/unf':>7}{'exact MiB':>10}{'/unf':>7}{'peak MiB':>9}"
          f"{'wall min':>9}{'median':>8}{'/unf':>7}{'cpu min':>8}{'/unf':>7}")
    rows = []
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
            rows.append(dict(kernel="fused_linear_kd", provider=provider, mode="fwd+bwd", metric=metric, unit=unit,
                             **shape, chunk_size=chunk or "", threads=threads, value=f"{r[key]:.4g}"))
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.csv}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--N", type=int, default=4096)
    parser.add_argument("--H", type=int, default=1024)
    parser.add_argument("--V", type=int, default=32000)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--chunk-sizes", type=int, nargs="*", default=None,
                        help="fused chunk sizes to measure (default: the library's default only)")
    parser.add_argument("--csv", default=os.path.join(HERE, "results", "fused_linear_cpu.csv"),
                        help="output CSV ('' for none)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("memory", "time"), help=argparse.SUPPRESS)
    parser.add_argument("--cases", help=argparse.SUPPRESS)
    parser.add_argument("--malloc", choices=("default", "exact"), default="default", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    child(args) if args.child else main(args)
