"""Compile every kernel variant the launchers can launch for a GPU, on a machine without one.

The interpreter runs code the compiler rejects (non-constexpr globals, if-branches of mixed types,
ops a Triton version lacks), so CPU tests alone do not show the kernels build for CUDA. This script
runs the real launchers on CPU tensors with ``JITFunction.run`` replaced by a compile for
``--arch`` (sm_90 by default, the H200) down to a cubin with the Triton installed here; nothing is
launched and the outputs are never read. Run it without TRITON_INTERPRET:

    python tests/gpu_compile.py [--quick] [--arch 90]

It prints one line per distinct compiled variant and exits non-zero on the first failure.
"""
import argparse
import inspect
import itertools
import os
import sys
import time

import torch

LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas")
POINTER_TYPES = {torch.float64: "*fp64", torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16",
                 torch.int64: "*i64", torch.int32: "*i32", torch.int16: "*i16", torch.int8: "*i8",
                 torch.uint8: "*u8", torch.bool: "*i1"}


def _type_of(value):
    if isinstance(value, torch.Tensor):
        return POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


class Compiler:
    """Stands in for ``JITFunction.run``: compiles each distinct (kernel, types, constexprs,
    options) once for the target and returns without launching."""

    def __init__(self, arch):
        import triton
        from triton.backends.compiler import GPUTarget

        self.triton = triton
        self.target = GPUTarget("cuda", arch, 32)
        self.seen = set()

    def run(self, fn, *args, grid, warmup, **kwargs):
        from triton.compiler import ASTSource

        options = {k: kwargs.pop(k) for k in LAUNCH_OPTIONS if k in kwargs}
        bound = inspect.signature(fn.fn).bind(*args, **kwargs).arguments
        # As the launcher does: constexpr parameters, and ints equal to 1 (Triton specialises them).
        constexprs = {p.name: bound[p.name] for p in fn.params
                      if p.is_constexpr or (type(bound[p.name]) is int and bound[p.name] == 1
                                            and not p.do_not_specialize)}
        annotated = {p.name: p.annotation_type for p in fn.params if p.annotation_type and not p.is_constexpr}
        signature = {name: "constexpr" if name in constexprs else annotated.get(name) or _type_of(value)
                     for name, value in bound.items()}
        key = (fn.__name__, tuple(signature.items()), tuple(map(str, constexprs.items())), tuple(options.items()))
        if key in self.seen:
            return None
        self.seen.add(key)
        try:
            compiled = self.triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                           target=self.target, options=options)
            assert compiled.asm.get("cubin"), f"{fn.__name__}: no cubin"
        except Exception as error:
            raise RuntimeError(f"{fn.__name__} does not compile for sm_{self.target.arch} with "
                               f"signature {signature}, constexprs {constexprs}, options {options}") from error
        shown = {k: v for k, v in constexprs.items() if k != "ACC_DTYPE"}
        print(f"ok {fn.__name__} {signature[next(iter(signature))]} {shown} {options}", flush=True)
        return None

    def install(self):
        from triton.runtime.jit import JITFunction

        compiler = self

        def run(self, *args, grid, warmup, **kwargs):
            return compiler.run(self, *args, grid=grid, warmup=warmup, **kwargs)

        JITFunction.run = run


DTYPE_PAIRS = [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32), (torch.float16, torch.float16),
               (torch.bfloat16, torch.float32), (torch.float64, torch.float64)]
WIDE_V = 128256  # the default heuristic's largest block and most warps
NARROW_V = 50
N = 2


def _kd_variants(s, t, divergence, tails):
    """kd_forward, topk_kd_forward and the vocab-parallel launchers at every (labels, hard CE,
    gradient) combination the API reaches."""
    from fastkd import launch, launch_topk, launch_vocab_parallel
    from fastkd.options import KDOptions

    labels = torch.zeros(N, dtype=torch.int64)
    acc = launch.accumulation_dtype(s.dtype, t.dtype)
    for labels, hard_weight, need_grad in ((None, 0.0, True), (labels, 0.5, True), (labels, 0.0, False)):
        opts = KDOptions(divergence=divergence, temperature=2.0, hard_weight=hard_weight)
        launch.kd_forward(s, t, labels, opts, need_grad=need_grad)
        for tail in tails:
            launch_topk.topk_kd_forward(s, torch.empty(N, 8, dtype=acc), torch.zeros(N, 8, dtype=torch.int32),
                                        labels, opts, tail, need_grad=need_grad)
        launch_vocab_parallel.partial_stats(s, t, labels, opts, 0)
        row = torch.empty(N, len(launch_vocab_parallel.ROW), dtype=acc)
        launch_vocab_parallel.row_scalars(s, t, labels, row, opts)
        launch_vocab_parallel.shard_gradient(s, t, labels, row, opts, 0)


def _single_input_variants(x):
    from fastkd import launch, launch_topk

    for log in (False, True):
        y = launch.softmax_forward(x, 2.0, log=log)
        launch.softmax_backward(y, torch.empty_like(y), 2.0, log=log)
    launch.scale_rows(x, torch.empty(N, dtype=torch.float32))
    launch.scale_rows(x, torch.empty(1, dtype=torch.float32))
    for k in (1, 5, 64, launch_topk.MAX_TOPK_K):
        launch_topk.teacher_topk(x, k, 2.0)


def drive_launchers(quick):
    """Every launcher of fastkd.launch, fastkd.launch_topk and fastkd.launch_vocab_parallel, with
    every divergence, tail and flag; ``quick`` takes one dtype pair and the widest block only, the
    full run every dtype pair the API accepts at two block widths."""
    from fastkd.options import DIVERGENCES
    from fastkd.topk_options import TAILS

    pairs = DTYPE_PAIRS[:1] if quick else DTYPE_PAIRS
    widths = (WIDE_V,) if quick else (WIDE_V, NARROW_V)
    for divergence, (ds, dt), V in itertools.product(DIVERGENCES, pairs, widths):
        _kd_variants(torch.empty(N, V, dtype=ds), torch.empty(N, V, dtype=dt), divergence, TAILS)
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

    compiler = Compiler(args.arch)
    compiler.install()
    start = time.perf_counter()
    drive_launchers(args.quick)
    print(f"compiled {len(compiler.seen)} kernel variants for sm_{args.arch} with triton {triton.__version__} "
          f"in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
