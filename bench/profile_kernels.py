"""What the first GPU run must settle about the model (`fastkd/audit/model.py`): the DRAM bytes each
dense kernel really moves per element (are the modelled L2 hits real?), the share of issue slots it
uses (the assumed issue efficiency), and its occupancy (CTAs per SM from registers).

    python bench/profile_kernels.py OUTDIR [--n 8192] [--v 8192,128256]

Under Nsight Compute (``ncu`` on the PATH) it profiles one forward of ``kd_loss`` per case (kl and
jsd, bf16, upstream gradient 1) and writes OUTDIR/kernel_profile.csv (ncu's raw metrics) and
OUTDIR/kernel_profile.md (per element: DRAM bytes read and written, issue-slot use, achieved
occupancy, registers). Without ncu it says so and times each case instead (CUDA events), giving
the achieved bytes per second of the requested bytes: then the L2 assumption stays unmeasured.
"""
import argparse
import csv
import io
import os
import shutil
import subprocess
import sys

METRICS = ("dram__bytes_read.sum", "dram__bytes_write.sum", "sm__inst_issued.avg.pct_of_peak_sustained_active",
           "sm__warps_active.avg.pct_of_peak_sustained_active", "launch__registers_per_thread",
           "launch__occupancy_limit_registers", "gpu__time_duration.sum")
CASES = ("kl", "jsd")


def run_cases(n, vs):
    """One warm-up and one profiled forward + backward per (divergence, V), each in a named NVTX range."""
    import torch

    import fastkd

    for v in vs:
        for divergence in CASES:
            s = torch.randn(n, v, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            t = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
            for _ in range(2):
                fastkd.kd_loss(s, t, divergence=divergence, temperature=2.0, backend="triton").backward()
            torch.cuda.synchronize()


def timed(n, vs):
    """Without ncu: median time of a forward + backward per case (requested bytes: 6 N V for bf16)."""
    import torch
    import triton.testing

    import fastkd

    lines = ["| case | ms | requested GB/s (6 B/elt) |", "|---|---|---|"]
    for v in vs:
        for divergence in CASES:
            s = torch.randn(n, v, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            t = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
            ms = triton.testing.do_bench(
                lambda: fastkd.kd_loss(s, t, divergence=divergence, temperature=2.0, backend="triton").backward())
            lines.append(f"| {divergence} V={v} | {ms:.3f} | {6 * n * v / ms / 1e6:.0f} |")
    return "\n".join(lines)


def summarise(raw, n, vs):
    """Markdown of ncu's CSV: one line per profiled kernel launch of the second (warm) call of a case."""
    rows = [r for r in csv.DictReader(io.StringIO(raw[raw.index('"ID"'):]))] if '"ID"' in raw else []
    by_launch = {}
    for r in rows:
        by_launch.setdefault(r["ID"], {"kernel": r["Kernel Name"]})[r["Metric Name"]] = r["Metric Value"]
    launches = list(by_launch.values())
    lines = ["| # | kernel | DRAM B/elt read | written | issue slots % | warps active % | regs | occupancy limit (regs) |",
             "|---|---|---|---|---|---|---|---|"]
    per_case = len(launches) // max(1, len(vs) * len(CASES))
    for i, launch in enumerate(launches):
        v = vs[min(len(vs) - 1, i // max(1, per_case * len(CASES)))]
        def number(key):
            return float(str(launch.get(key, "nan")).replace(",", ""))
        lines.append(f"| {i} | {launch['kernel'][:40]} | {number(METRICS[0]) / (n * v):.2f} | "
                     f"{number(METRICS[1]) / (n * v):.2f} | {number(METRICS[2]):.0f} | {number(METRICS[3]):.0f} | "
                     f"{launch.get(METRICS[4], '')} | {launch.get(METRICS[5], '')} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?")
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--v", default="8192,128256")
    parser.add_argument("--run", action="store_true", help="(internal) run the cases; ncu launches this")
    args = parser.parse_args(argv)
    vs = [int(x) for x in args.v.split(",")]
    if args.run:
        run_cases(args.n, vs)
        return 0
    if args.out is None:
        parser.error("OUTDIR is required")
    os.makedirs(args.out, exist_ok=True)
    ncu = shutil.which("ncu")
    if ncu is None:
        text = ("ncu is not on the PATH: DRAM bytes, issue slots and occupancy unmeasured (the model's L2 hits "
                "and issue efficiency stay assumptions). Times of a forward + backward instead:\n\n" + timed(args.n, vs))
    else:
        command = [ncu, "--csv", "--metrics", ",".join(METRICS), "--kernel-name-base", "function",
                   sys.executable, os.path.abspath(__file__), "--run", "--n", str(args.n), "--v", args.v]
        done = subprocess.run(command, capture_output=True, text=True)
        with open(os.path.join(args.out, "kernel_profile.csv"), "w") as f:
            f.write(done.stdout)
        text = (f"ncu exit status {done.returncode}; every launch (warm-up calls included), N = {args.n}, "
                f"V = {args.v}, kl then jsd per V:\n\n" + summarise(done.stdout, args.n, vs))
        if done.returncode:
            text += "\n\n" + done.stderr[-2000:]
    with open(os.path.join(args.out, "kernel_profile.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
