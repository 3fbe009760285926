"""Benchmark of the sparse top-k KD loss against dense ``kd_loss`` and an eager top-k formulation
(issue 7), and of the top-k extraction.

    python bench/bench_topk.py                         # N=32, V=128256, k in {16, 128, 1024}, fp32
    python bench/bench_topk.py --N 8 --k 16 --repeats 3   # a quick look

Providers, forward + backward (gradient for the student logits), tail="bucket", divergence="kl":
    fastkd_topk   fastkd.topk_kd_loss(student, logprobs, indices)     (torch backend on CPU,
                                                                        Triton kernel on CUDA)
    eager_topk    log_softmax over V, gather the k, bucket tail by log1p, autograd backward
                  (the formulation TRL / torchtune users write by hand)
    fastkd_dense  fastkd.kd_loss(student, teacher_logits) on the full teacher logits
and the extraction (no backward):
    fastkd_teacher_topk  fastkd.teacher_topk(teacher_logits, k)
    eager_teacher_topk   torch.topk + torch.logsumexp on the tempered logits

Each (provider, k) runs in two fresh subprocesses, one for time and one for memory, so allocator
state never leaks between providers. Both build the inputs and make one warm-up call first.
Memory, CPU: with a fixed glibc mmap threshold (``MALLOC_MMAP_THRESHOLD_``, so that freed large
buffers leave the RSS), the peak RSS counter is reset (``/proc/self/clear_refs`` <- "5"), one call
runs, and "extra" is VmHWM minus the RSS just before it (inputs excluded). CUDA:
``torch.cuda.max_memory_allocated`` after a reset, minus the memory allocated before.
Time (default allocator settings): ``--repeats`` calls (CPU: ``--threads`` torch threads, default
1); the minimum (other load on a shared machine only adds) and the median. Rows go to a long-format CSV under bench/results/ (kernel, provider, mode, metric,
unit, N, V, k, dtype, device, value). Linux only on the CPU (/proc).
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
LOSS_PROVIDERS = ("fastkd_topk", "eager_topk", "fastkd_dense")
TOPK_PROVIDERS = ("fastkd_teacher_topk", "eager_teacher_topk")
TEMPERATURE = 2.0


def _status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def eager_topk_kl(student, logprobs, indices, T):
    """The eager top-k bucket KL: every [N, V] intermediate kept for autograd."""
    import torch

    log_q = torch.log_softmax(student.float() / T, -1)
    log_q_k = log_q.gather(-1, indices.long())
    log_q_tail = torch.log1p(-log_q_k.exp().sum(-1).clamp(max=1 - 1e-7))
    p = logprobs.exp()
    p_tail = (1 - p.sum(-1)).clamp_min(0)
    listed = (p * (logprobs - log_q_k)).sum(-1)
    tail = torch.where(p_tail > 0, p_tail * (p_tail.clamp_min(1e-30).log() - log_q_tail), 0.0)
    return (listed + tail).mean() * T**2


def _make_call(provider, N, V, k, dtype, device):
    import torch

    import fastkd

    g = torch.Generator(device="cpu").manual_seed(0)
    student = (torch.randn(N, V, generator=g) * 3).to(device=device, dtype=dtype).requires_grad_()
    teacher = (torch.randn(N, V, generator=g) * 3).to(device=device, dtype=dtype)
    backend = "triton" if device == "cuda" else "torch"
    logprobs, indices = fastkd.teacher_topk(teacher, k, temperature=TEMPERATURE, backend=backend)

    def loss_step(loss_fn):
        def step():
            loss_fn().backward()
            student.grad = None
        return step

    calls = {
        "fastkd_topk": loss_step(lambda: fastkd.topk_kd_loss(student, logprobs, indices, temperature=TEMPERATURE,
                                                             backend=backend)),
        "eager_topk": loss_step(lambda: eager_topk_kl(student, logprobs, indices, TEMPERATURE)),
        "fastkd_dense": loss_step(lambda: fastkd.kd_loss(student, teacher, temperature=TEMPERATURE, backend=backend)),
        "fastkd_teacher_topk": lambda: fastkd.teacher_topk(teacher, k, temperature=TEMPERATURE, backend=backend),
        "eager_teacher_topk": lambda: _eager_teacher_topk(teacher, k),
    }
    return calls[provider]


def _eager_teacher_topk(teacher, k):
    import torch

    t = teacher.float() / TEMPERATURE
    values, indices = torch.topk(t, k, dim=-1)
    return values - torch.logsumexp(t, -1, keepdim=True), indices.int()


def child(args):
    """One (provider, k) measurement in this fresh process, of ``--measure`` time or memory;
    prints one JSON line."""
    import gc

    import torch

    dtype = getattr(torch, args.dtype)
    cuda = args.device == "cuda"
    torch.set_num_threads(args.threads)
    call = _make_call(args.provider, args.N, args.V, args.k[0], dtype, args.device)
    call()  # warm-up (and compile on CUDA)
    gc.collect()
    if args.measure == "memory":
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            call()
            torch.cuda.synchronize()
            extra = torch.cuda.max_memory_allocated() - base
        else:
            base = _status_bytes("VmRSS")
            _reset_peak_rss()
            call()
            extra = _status_bytes("VmHWM") - base
        print(json.dumps({"extra_memory_mib": extra / 2**20}))
        return
    times = []
    for _ in range(args.repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        call()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"time_min_ms": 1e3 * min(times), "time_median_ms": 1e3 * statistics.median(times)}))


def _run_child(args, provider, k, measure):
    command = [sys.executable, __file__, "--child", "--provider", provider, "--measure", measure,
               "--N", str(args.N), "--V", str(args.V), "--k", str(k), "--dtype", args.dtype,
               "--device", args.device, "--repeats", str(args.repeats), "--threads", str(args.threads)]
    env = dict(os.environ)
    if measure == "memory":  # a fixed mmap threshold: big buffers are unmapped on free, so RSS tracks them
        env["MALLOC_MMAP_THRESHOLD_"] = str(2**17)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--N", type=int, default=32)
    parser.add_argument("--V", type=int, default=128256)
    parser.add_argument("--k", type=int, nargs="+", default=[16, 128, 1024])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if _cuda_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    parser.add_argument("--providers", nargs="+", default=list(LOSS_PROVIDERS + TOPK_PROVIDERS))
    parser.add_argument("--out", default=os.path.join(HERE, "results", "topk_{device}.csv"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--provider", help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=["time", "memory"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    rows = []
    print(f"N={args.N} V={args.V} dtype={args.dtype} device={args.device} repeats={args.repeats} "
          f"threads={args.threads}")
    print(f"{'provider':22s} {'k':>5s} {'min ms':>9s} {'median ms':>10s} {'extra MiB':>10s}")
    for k in args.k:
        for provider in args.providers:
            try:
                result = {**_run_child(args, provider, k, "time"), **_run_child(args, provider, k, "memory")}
            except RuntimeError as e:
                print(f"{provider:22s} {k:5d} failed: {e}")
                continue
            print(f"{provider:22s} {k:5d} {result['time_min_ms']:9.2f} {result['time_median_ms']:10.2f} "
                  f"{result['extra_memory_mib']:10.1f}")
            kernel = "teacher_topk" if provider in TOPK_PROVIDERS else "topk_kd_loss"
            mode = "fwd" if provider in TOPK_PROVIDERS else "fwd+bwd"
            for metric, unit, key in (("time_min", "ms", "time_min_ms"), ("time_median", "ms", "time_median_ms"),
                                      ("extra_memory", "MiB", "extra_memory_mib")):
                rows.append(dict(kernel=kernel, provider=provider, mode=mode, metric=metric, unit=unit,
                                 N=args.N, V=args.V, k=k, dtype=args.dtype, device=args.device,
                                 value=round(result[key], 3)))
    out = args.out.format(device=args.device)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["kernel"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")


def _cuda_available():
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
