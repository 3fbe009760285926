"""Compile every kernel variant the launchers can launch for a GPU, on a machine without one.

The interpreter runs code the compiler rejects (non-constexpr globals, if-branches of mixed types,
ops a Triton version lacks), so CPU tests alone do not show the kernels build for CUDA. This script
runs the real launchers on CPU tensors inside ``fastkd.audit.cubin.compiling_for(--arch)`` (sm_90 by
default, the H200): Triton's own binder specialises every launch as on a GPU (divisibility by 16
included) and compiles it down to a cubin with the Triton installed here; nothing is launched and
the outputs are never read. Run it without TRITON_INTERPRET:

    python tests/gpu_compile.py [--quick] [--arch 90]

It prints one line per distinct compiled variant and exits non-zero on the first failure.
"""
import argparse
import itertools
import os
import sys
import time

import torch

DTYPE_PAIRS = [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32), (torch.float16, torch.float16),
               (torch.bfloat16, torch.float32), (torch.float64, torch.float64)]
WIDE_V = 128256  # the default heuristic's largest block and most warps
NARROW_V = 50
N = 2


def _kd_variants(s, t, divergence, tails, quick):
    """kd_forward (two-pass, a mixture of teachers, resident), topk_kd_forward and the
    vocab-parallel launchers at every (labels, hard CE, gradient) combination the API reaches;
    ``quick``: every kernel and divergence, with the combinations cut to the ones that differ most."""
    from fastkd.backends import VOCAB_PARALLEL_ROW
    from fastkd.backends import triton as launch
    from fastkd import config
    from fastkd.buffers import accumulation_dtype
    from fastkd.options import KDOptions

    labels = torch.zeros(N, dtype=torch.int64)
    acc = accumulation_dtype(s.dtype, t.dtype)
    scale = torch.ones(1, dtype=acc)
    combinations = ((None, 0.0, True), (labels, 0.5, True), (labels, 0.0, False))
    for i, (labels, hard_weight, need_grad) in enumerate(combinations):
        everything = not quick or i == 1  # quick: the dense two-pass kernel at every combination only
        opts = KDOptions(divergence=divergence, temperature=2.0, hard_weight=hard_weight)
        launch.kd_forward(s, t, labels, scale, opts, need_grad=need_grad)
        if not everything:
            continue
        mixture = KDOptions(divergence=divergence, temperature=2.0, hard_weight=hard_weight,
                            teacher_weights=(0.25,) * launch.MAX_TEACHERS)
        launch.kd_forward(s, (t,) * launch.MAX_TEACHERS, labels, scale, mixture, need_grad=need_grad)
        resident = slice(0, launch.resident_capacity(acc))  # one CTA holds the row
        with config.override(kd_kernel="resident"):
            launch.kd_forward(s[:, resident], t[:, resident], labels, scale, opts, need_grad=need_grad)
        for tail in tails:
            launch.topk_kd_forward(s, torch.empty(N, 8, dtype=acc), torch.zeros(N, 8, dtype=torch.int32),
                                   labels, scale, opts, tail, need_grad=need_grad)
        launch.partial_stats(s, t, labels, opts, 0)
        row = torch.empty(N, len(VOCAB_PARALLEL_ROW), dtype=acc)
        launch.row_scalars(s, t, labels, row, opts)
        launch.shard_finish(s, t, labels, row, scale, opts, 0, need_grad=need_grad)


def _single_input_variants(x):
    from fastkd.backends import triton as launch

    for log in (False, True):
        y = launch.softmax_forward(x, 2.0, log=log)
        launch.softmax_backward(y, torch.empty_like(y), 2.0, log=log)
    for out in (None, x):
        launch.scale_rows(x, torch.empty(N, dtype=torch.float32), out=out)
        launch.scale_rows(x, torch.empty(1, dtype=torch.float32), out=out)
    for k in (1, 5, 64, launch.MAX_TOPK_K):
        launch.teacher_topk(x, k, 2.0)


def drive_launchers(quick):
    """Every launcher of fastkd.backends.triton, with
    every divergence, tail and flag; ``quick`` takes one dtype pair and the widest block only, the
    full run every dtype pair the API accepts at two block widths."""
    from fastkd.divergences import DIVERGENCES
    from fastkd.options import TAILS

    pairs = DTYPE_PAIRS[:1] if quick else DTYPE_PAIRS
    widths = (WIDE_V,) if quick else (WIDE_V, NARROW_V)
    for divergence, (ds, dt), V in itertools.product(DIVERGENCES, pairs, widths):
        _kd_variants(torch.empty(N, V, dtype=ds), torch.empty(N, V, dtype=dt), divergence,
                     TAILS[:1] if quick and divergence != "kl" else TAILS, quick)
    for dtype, V in itertools.product(sorted({ds for ds, _ in pairs}, key=str), widths):
        _single_input_variants(torch.empty(N, V, dtype=dtype))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET=1: the interpreter compiles nothing")
    import triton

    from fastkd.audit.cubin import compiling_for

    start = time.perf_counter()
    with compiling_for(args.arch) as launched:
        drive_launchers(args.quick)
    variants = {}
    for compiled in launched:
        if compiled.kernel.hash not in variants:
            variants[compiled.kernel.hash] = compiled
            assert compiled.kernel.asm.get("cubin"), f"{compiled.name}: no cubin"
            shown = {k: v for k, v in compiled.constants.items() if k != "ACC_DTYPE"}
            first = next(iter(compiled.kernel.src.signature.values()))
            print(f"ok {compiled.name} {first} {shown} num_warps={compiled.num_warps}", flush=True)
    print(f"compiled {len(variants)} kernel variants for sm_{args.arch} with triton {triton.__version__} "
          f"in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
