"""``fastkd audit`` / ``python -m fastkd.audit``: compile the cases, read their SASS, count their
bytes, apply the model, write the CSV and the Markdown report."""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import warnings
from pathlib import Path

from ..bench.arguments import default_out

DEFAULT_VS = (8192, 32000, 50257, 128256, 262144)  # 8192: a row one CTA of the resident kernel holds
HEADLINE_V = 128256
UNALIGNED_V = 50257
COMPILE_ROWS = 2  # rows of the tensors the launchers see while compiling (N is not a kernel argument)
ARCHS = (80, 90, 100)


def tools_missing():
    """Why the audit cannot run here (None when it can): Triton's NVIDIA backend and its tools."""
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        return "triton's NVIDIA backend is not installed"
    from .sass import tool

    missing = [name for name in ("nvdisasm", "cuobjdump") if tool(name) is None]
    if tool("ptxas") is None and tool("ptxas_blackwell") is None:
        missing.append("ptxas")
    return f"triton ships no {', '.join(missing)} here" if missing else None


def compile_rows(cases, vs, n, dtype_name, arch):
    """{(case id, V): [sass.KernelAudit, ...]} with every kernel compiled as its launch would (or
    why the launcher refused the case's kernel at that V)."""
    from ..bench.cases import DTYPES
    from . import cases as case_table
    from .cubin import compiling_for
    from .sass import analyse

    audits, by_hash = {}, {}
    # A launch warns the same way: the audit compiles with Triton's defaults, as a launch does.
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION is unset")
    with compiling_for(arch) as launched:
        for case in cases:
            for v in vs:
                first = len(launched)
                try:
                    case_table.run_step(case, case_table.make_inputs(COMPILE_ROWS, v, DTYPES[dtype_name]))
                except NotImplementedError as refused:  # a kernel variant the launcher has not for this V
                    audits[case_table.case_id(case), v] = str(refused)
                    continue
                for compiled in launched[first:]:
                    if compiled.kernel.hash not in by_hash:
                        by_hash[compiled.kernel.hash] = analyse(compiled)
                audits[case_table.case_id(case), v] = [by_hash[c.kernel.hash] for c in launched[first:]]
    return audits


def floor_bytes(case, n, v, dtype_name):
    if case.floor_op is None:
        return None
    from ..bench.cases import Case as BenchCase
    from ..bench.min_bytes import min_bytes

    divergence = case.options.get("divergence", "") if case.floor_op == "kd_loss" else ""
    return min_bytes(BenchCase(case.floor_op, divergence, dtype_name, n, v, "fwd+bwd"))


def audit(cases, vs, n, dtype_name, arch):
    """The report rows of ``cases`` at each V, and (case id, V, why) of those the launcher refused."""
    from ..bench.cases import DTYPES
    from . import cases as case_table, traffic
    from .report import Row

    counting = traffic.start([case_table.case_id(c) for c in cases], DTYPES[dtype_name])  # runs meanwhile
    try:
        compiled = compile_rows(cases, vs, n, dtype_name, arch)
    except BaseException:
        counting.kill()
        counting.wait()
        raise
    counted = traffic.finish(counting)
    rows, unavailable = [], []
    for case in cases:
        cid = case_table.case_id(case)
        for v in vs:
            kernels = compiled[cid, v]
            if isinstance(kernels, str):
                unavailable.append((cid, v, kernels))
                continue
            if [k.name for k in kernels] != [name for name, _, _ in counted[cid]]:
                raise RuntimeError(f"{cid}: compiled {[k.name for k in kernels]} but the interpreter ran "
                                   f"{[name for name, _, _ in counted[cid]]}")
            rows.append(Row(case, cid, v, n, dtype_name, kernels, counted[cid], floor_bytes(case, n, v, dtype_name)))
    return rows, unavailable


def _ints(text):
    try:
        values = tuple(int(x) for x in text.split(",") if x)
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def add_arguments(parser):
    parser.add_argument("--arch", type=int, default=90, choices=ARCHS, help="target: sm_80, sm_90 (H200), sm_100")
    parser.add_argument("--n", type=int, default=8192, help="rows (tokens) of the modelled step (default 8192)")
    parser.add_argument("--v", type=_ints, default=DEFAULT_VS, metavar="V,V,...",
                        help=f"vocabulary sizes (default {','.join(map(str, DEFAULT_VS))})")
    parser.add_argument("--headline-v", type=int, default=HEADLINE_V, help="V of the report's main table")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="student and teacher dtype")
    parser.add_argument("--cases", nargs="+", metavar="TEXT", help="only cases whose name contains one of these")
    parser.add_argument("--gate", action="store_true", help="only the cases the CI gate checks")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: fastkd bench's, bench/results/local/ of the checkout, "
                             "git-ignored; ~/.cache/fastkd/bench for an installed fastkd)")
    parser.add_argument("--list", action="store_true", help="print the cases, compile nothing")
    return parser


def build_parser(prog="fastkd audit"):
    return add_arguments(argparse.ArgumentParser(
        prog=prog, description="Compile fastkd's kernels as a launch would for a GPU this machine need not have, "
        "and report registers, spills, load widths, bytes requested, SASS work per element and a modelled H200 time."))


def run(args):
    from . import cases as case_table

    try:
        selected = case_table.select(args.cases, args.gate)
    except ValueError as error:
        print(f"fastkd audit: {error}", file=sys.stderr)
        return 2
    if args.list:
        for case in selected:
            print(case_table.case_id(case))
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("fastkd audit: run without TRITON_INTERPRET=1 (the interpreter compiles nothing)", file=sys.stderr)
        return 2
    why = tools_missing()
    if why:
        print(f"fastkd audit: {why}", file=sys.stderr)
        return 2
    import triton

    from ..bench.runner import git_commit
    from . import report, traffic

    vs = tuple(dict.fromkeys(args.v + ((args.headline_v,) if args.headline_v not in args.v else ())))
    start = time.perf_counter()
    rows, unavailable = audit(selected, vs, args.n, args.dtype, args.arch)
    meta = dict(arch=args.arch, triton=triton.__version__, commit=git_commit(),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"))
    out = args.out if args.out is not None else default_out()
    stem = out / f"audit_sm{args.arch}_triton{triton.__version__}_{meta['date']}"
    out.mkdir(parents=True, exist_ok=True)
    report.write_csv(f"{stem}.csv", rows, meta)
    text = report.markdown(rows, dict(meta, n=args.n, dtype=args.dtype), args.headline_v, vs, args.headline_v,
                           UNALIGNED_V, traffic.SHAPE, unavailable)
    report.write_markdown(f"{stem}.md", text)
    print(report.headline_table([r for r in rows if r.v == args.headline_v]))
    print(f"\nwrote {stem}.csv and {stem}.md ({len(rows)} rows, {time.perf_counter() - start:.0f} s)")
    return 0


def main(argv=None, prog="python -m fastkd.audit"):
    return run(build_parser(prog).parse_args(argv))
