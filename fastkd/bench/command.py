"""``fastkd bench`` / ``python -m fastkd.bench``: pick the cases and providers, run, write results."""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import torch

from .cases import DTYPES, MODES, OPS, PRESETS, default_preset, select_cases
from .providers import PROVIDERS, select_providers

DEFAULT_OUT = Path("bench") / "results" / "local"


def _words(values):
    """``--v 32000,128256`` and ``--v 32000 128256`` both work."""
    return [w for value in values or () for w in value.split(",") if w] or None


def _ints(values):
    words = _words(values)
    if words is None:
        return None
    try:
        return [int(w) for w in words]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers, got {' '.join(words)}") from None


def add_arguments(parser):
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="case set (default: 'headline' on a GPU, 'cpu' otherwise; both about a minute)")
    parser.add_argument("--ops", nargs="+", metavar="OP", help=f"replace the preset's ops: {', '.join(OPS)}")
    parser.add_argument("--divergences", nargs="+", metavar="D", help="replace the preset's kd_loss divergences")
    parser.add_argument("--n", nargs="+", metavar="N", help="replace the preset's row counts (tokens)")
    parser.add_argument("--v", nargs="+", metavar="V", help="replace the preset's vocabulary sizes")
    parser.add_argument("--dtypes", nargs="+", metavar="DT", help=f"replace the preset's dtypes: {', '.join(DTYPES)}")
    parser.add_argument("--modes", nargs="+", metavar="M", help=f"replace the preset's modes: {', '.join(MODES)}")
    parser.add_argument("--providers", nargs="+", metavar="P",
                        help=f"providers to run (default: all that can run here): {', '.join(PROVIDERS)}")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:K")
    parser.add_argument("--threads", type=int, metavar="K",
                        help="torch CPU threads (default: torch's choice); 1 steadies timings on a busy machine")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--quick", "--smoke", action="store_true",
                        help="few repetitions and a small copy: checks that everything runs, numbers are rough")
    parser.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    parser.add_argument("--list", action="store_true", help="print the cases and providers, run nothing")
    return parser


def build_parser(prog="fastkd bench"):
    parser = argparse.ArgumentParser(
        prog=prog, description="Benchmark fastkd against torch eager, torch.compile and Liger: time, "
        "peak extra memory, GB/s and the fraction of the copy bandwidth measured in the same run.")
    return add_arguments(parser)


def _device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return device


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _sigterm_as_interrupt():
    """``timeout`` stops a command with SIGTERM: finish by writing what was measured."""
    try:
        return signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread
        return None


def _restore_sigterm(previous):
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def run(args, log=None):
    """Run ``fastkd bench`` with parsed ``args``; returns the process exit status."""
    log = log or (lambda msg: print(msg, flush=True))
    try:
        device = _device(args.device)
        preset = args.preset or default_preset(device)
        cases = select_cases(preset, ops=_words(args.ops), divergences=_words(args.divergences),
                             dtypes=_words(args.dtypes), modes=_words(args.modes), n=_ints(args.n),
                             v=_ints(args.v))
        providers, skipped = select_providers(_words(args.providers), device)
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
    except (ValueError, argparse.ArgumentTypeError) as error:
        print(f"fastkd bench: {error}", file=sys.stderr)
        return 2
    log(f"preset {preset}: {len(cases)} cases x {len(providers)} providers on {device}"
        f"{' (quick)' if args.quick else ''}")
    for name, why in skipped.items():
        log(f"  provider {name} skipped: {why}")
    if args.list:
        for case in cases:
            log(f"  {case.name}")
        return 0
    if not providers:
        print("fastkd bench: no provider can run", file=sys.stderr)
        return 2

    from . import plots, report
    from .runner import run_cases

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save_partial(rows, env):  # a run cut short (timeout, Ctrl-C) keeps the cases it finished
        report.write_csv(rows, out / f"{report.file_prefix(env)}.csv")

    previous = _sigterm_as_interrupt()
    try:
        rows, env = run_cases(cases, providers, device, quick=args.quick, log=log, on_case_done=save_partial)
    finally:
        _restore_sigterm(previous)
    prefix = report.file_prefix(env)
    header, body = report.table_rows(rows)
    copy_gbps = rows[0]["gbps"]
    log("")
    log(f"{env['device']} | copy bandwidth {copy_gbps:.1f} GB/s | speed-up and memory against torch-eager")
    log(report.format_text(header, body))
    written = [out / f"{prefix}.csv", out / f"{prefix}.json", out / f"{prefix}.md"]
    report.write_csv(rows, written[0])
    report.write_json(env, rows[0], cases, providers, skipped, written[1])
    written[2].write_text(report.format_markdown(header, body, env, copy_gbps))
    if not args.no_plots:
        written += plots.write_plots(rows, out, prefix, copy_gbps, log=log)
    log("")
    log("wrote " + ", ".join(str(p) for p in written))
    return 0


def main(argv=None, prog="fastkd bench"):
    return run(build_parser(prog).parse_args(argv))


