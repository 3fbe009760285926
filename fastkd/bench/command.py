"""``fastkd bench`` / ``python -m fastkd.bench``: pick the cases and providers, run, write results."""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import torch

from .arguments import build_parser, default_out
from .cases import default_preset, select_cases
from .providers import select_providers


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
    """Run ``fastkd bench`` with parsed ``args``; returns the process exit status: 0, 1 when a kernel
    variant failed its check, 2 for bad options."""
    log = log or (lambda msg: print(msg, flush=True))
    overrides = dict(ops=_words(args.ops), divergences=_words(args.divergences), dtypes=_words(args.dtypes),
                     modes=_words(args.modes), n=_ints(args.n), v=_ints(args.v), k=_ints(args.k), h=_ints(args.h))
    try:
        device = _device(args.device)
        presets = args.preset or [default_preset(device)]
        cases = select_cases(presets, **overrides)
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        if args.rounds < 1:
            raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
        case_providers, skipped = select_providers(_words(args.providers), device, cases)
    except (ValueError, argparse.ArgumentTypeError) as error:
        print(f"fastkd bench: {error}", file=sys.stderr)
        return 2
    from . import report

    label = "+".join(presets) + ("-custom" if any(overrides.values()) or args.providers else "")
    names = list(dict.fromkeys(p.name for case, ps in case_providers.items() for p in ps if p.describe(case)))
    log(f"preset {' + '.join(presets)}: {len(cases)} cases, providers {', '.join(names) or 'none'}, on {device}"
        f"{' (quick)' if args.quick else ''}")
    for name, why in skipped.items():
        log(f"  provider {name} skipped: {why}")
    legend_lines = report.legend(case_providers)
    log(f"what each provider runs ({report.legend_header()}):")
    log(report.format_legend(legend_lines))
    if args.list:
        for case, providers in case_providers.items():
            log(f"  {case.name}: {', '.join(p.name for p in providers if p.describe(case)) or 'no provider'}")
        return 0
    if not any(case_providers.values()):
        print("fastkd bench: no provider can run", file=sys.stderr)
        return 2

    from . import plots
    from .runner import load_average, machine, run_cases

    out = Path(args.out) if args.out is not None else default_out()
    out.mkdir(parents=True, exist_ok=True)
    machine_info = machine(device)
    prefix_of = {}

    def save_partial(rows, env):  # a run cut short (timeout, Ctrl-C) keeps the cases it finished
        prefix_of.setdefault("prefix", report.file_prefix(env, label))
        report.write_csv(rows, out / f"{prefix_of['prefix']}.csv")

    previous = _sigterm_as_interrupt()
    try:
        rows, env = run_cases(case_providers, device, quick=args.quick, min_rounds=args.rounds, log=log,
                              on_case_done=save_partial)
    finally:
        _restore_sigterm(previous)
    machine_info["load_average_end"] = load_average()
    prefix = report.file_prefix(env, label)
    header, body = report.table_rows(rows)
    copy_gbps = rows[0]["gbps"]
    log("")
    log(f"{report.machine_line(env, machine_info)} | copy bandwidth {copy_gbps:.1f} GB/s")
    log("speed-up and memory against torch-eager; on the CPU the speed-up is the median (min–max) of the "
        "per-round ratios")
    log(report.format_text(header, body))
    summary = report.summary_markdown(rows, env, machine_info, legend_lines)
    written = [out / f"{prefix}.csv", out / f"{prefix}.json", out / f"{prefix}.md", out / f"{prefix}_summary.md"]
    report.write_csv(rows, written[0])
    report.write_json(dict(env, machine=machine_info, copy_gbps=copy_gbps, presets=presets, label=label,
                           cases=len(cases), providers=names, skipped_providers=skipped,
                           legend=[dict(provider=n, case=lb, runs=t) for n, lb, t in legend_lines]), written[1])
    written[2].write_text(report.format_markdown(header, body, env, machine_info, copy_gbps, legend_lines))
    written[3].write_text(summary)
    if not args.no_plots:
        written += plots.write_plots(rows, out, prefix, copy_gbps, log=log)
    failed = [f"{r['provider']} on {r['op']} {r['dtype']} N={r['n']} V={r['v']}" for r in rows
              if str(r["note"]).startswith("check failed")]
    log("")
    log("wrote " + ", ".join(str(p) for p in written))
    if failed:
        log("FAILED CHECKS (not timed): " + "; ".join(failed))
        return 1
    return 0


def main(argv=None, prog="fastkd bench"):
    return run(build_parser(prog).parse_args(argv))
