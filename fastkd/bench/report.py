"""Write the results: the long-format CSV, a JSON of the environment, the legend (what each provider
runs), the readable table (speed-up and memory ratio against torch eager, and against TRL where it
ran) as text and markdown, and the summary: the headline case, torch.compile against fastkd, fastkd
against TRL, and every case in one short table
(the README's figures are a run's summary, copied unchanged)."""
from __future__ import annotations

import csv
import json
import math
import re
import statistics

from .cases import BETA, SKEW, TEMPERATURE
from .providers import BASELINE
from .runner import COLUMNS

RANGE = "min–max over rounds"
TRL = "trl"
FASTKD = ("fastkd-torch", "fastkd-triton")


def file_prefix(env, label):
    """``<device>_<date>_<label>``, e.g. ``nvidia-h200_2026-12-01_headline``: the name of every
    file of a run (``label``: the presets run, ``-custom`` when options changed their cases)."""
    device = re.sub(r"\(.*?\)", "", env["device"])
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")[:40].strip("-") or "device"
    return f"{slug}_{env['date'][:10]}_{label}"


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row[k]) for k in COLUMNS})


def _csv_value(x):
    if isinstance(x, float):
        return "" if math.isnan(x) else f"{x:.6g}"
    return x


def write_json(info, path):
    with open(path, "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")


# ----------------------------------------------------------------------------------------- legend
def legend(case_providers):
    """``[(provider, case label, what it runs)]``, one line per provider and op family of the run."""
    lines = {}
    for case, providers in case_providers.items():
        for provider in providers:
            text = provider.describe(case)
            if text is not None:
                lines.setdefault((provider.name, case.label), text)
    return [(name, label, text) for (name, label), text in lines.items()]


def legend_header():
    return (f"s, t: student and teacher logits [N, V]; h, W, h_t, W_t: hidden states and LM-head weights; "
            f"T = {TEMPERATURE:g}, β = {BETA:g}, α = {SKEW:g}, batchmean over the N rows")


def format_legend(lines):
    width = max((len(name) for name, _, _ in lines), default=0)
    label_width = max((len(label) for _, label, _ in lines), default=0)
    return "\n".join(f"  {name:<{width}}  {label:<{label_width}}  {text}" for name, label, text in lines)


# ----------------------------------------------------------------------------------------- table
def _ok(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _fmt(x, spec):
    return format(x, spec) if _ok(x) else ""


def _times(x):
    return f"{x:.2f}×" if _ok(x) else ""


def _case_key(row):
    return tuple(row[k] for k in ("op", "divergence", "dtype", "mode", "n", "v", "k", "h"))


def _shape(row):
    k = f" k={row['k']}" if row["k"] else ""
    return f"N={row['n']} V={row['v']}{k}" + (f" H={row['h']}" if row["h"] else "")


def _label(row):
    return f"{row['op']}/{row['divergence']}" if row["divergence"] else row["op"]


def speedup_text(row):
    """``4.10x (3.20-4.60x)``: median and range of the per-round speed-up (GPU: ratio of medians)."""
    if not _ok(row["speedup_p50"]):
        return ""
    spread = f" ({row['speedup_min']:.2f}–{row['speedup_max']:.2f})" if _ok(row["speedup_min"]) else ""
    return f"{row['speedup_p50']:.2f}×{spread}"


def memory_ratio(row, eager):
    if not eager or not _ok(eager["peak_mem_bytes"]) or eager["peak_mem_bytes"] < 2**20:
        return math.nan  # a ratio of near-nothing is noise
    return row["peak_mem_bytes"] / eager["peak_mem_bytes"] if _ok(row["peak_mem_bytes"]) else math.nan


def table_rows(rows):
    """Header and one row per (case, provider), with ratios against the eager row of the case, and
    where the run timed TRL, the fastkd rows' ratios against TRL's row of the case (``vs_trl``)."""
    header = ["op", "dtype", "mode", "shape", "provider", "ms (p50)", "p20-p80", "GB/s", "of copy", "TFLOP/s",
              "peak MiB", "speed-up", "memory", "note"]
    eager = {_case_key(r): r for r in rows if r["provider"] == BASELINE}
    trl = _rows_of(rows, TRL)
    out = []
    for r in rows:
        if r["op"] == "copy":
            continue
        memory = memory_ratio(r, eager.get(_case_key(r)))
        spread = f"{_fmt(r['ms_p20'], '.4g')}-{_fmt(r['ms_p80'], '.4g')}" if _ok(r["ms_p20"]) else ""
        line = [_label(r), r["dtype"], r["mode"], _shape(r), r["provider"], _fmt(r["ms_p50"], ".3f"), spread,
                _fmt(r["gbps"], ".1f"), _fmt(r["frac_of_copy_bw"], ".1%"), _fmt(r["tflops"], ".1f"),
                _fmt(r["peak_mem_bytes"] / 2**20 if _ok(r["peak_mem_bytes"]) else math.nan, ".1f"),
                speedup_text(r), _times(memory)]
        if trl:
            line += vs_trl(r, trl.get(_case_key(r)))
        out.append(line + [_note(r)])
    if trl:
        header[-1:-1] = ["speed-up vs TRL", "memory vs TRL"]
    if not any(r[9] for r in out):  # no matmul case: drop the TFLOP/s column
        header.pop(9)
        out = [r[:9] + r[10:] for r in out]
    return header, out


def _rows_of(rows, provider):
    """The measured rows of ``provider`` by case."""
    return {_case_key(r): r for r in rows if r["provider"] == provider and _ok(r["ms_p50"])}


def time_ratio(theirs, mine):
    """(median, min, max) of their time / mine over the rounds in which both ran (the speed-up of
    ``mine`` against ``theirs``), or the ratio of the median times with NaN bounds (GPU, or rounds
    that do not pair)."""
    a, b = _rounds(theirs), _rounds(mine)
    if a and len(a) == len(b):
        ratios = [x / y for x, y in zip(a, b)]
        return statistics.median(ratios), min(ratios), max(ratios)
    return theirs["ms_p50"] / mine["ms_p50"], math.nan, math.nan


def vs_trl(row, trl):
    """A fastkd row's [speed-up against TRL's row of its case (median (min–max) of TRL's time / the
    row's per round), peak memory as a multiple of TRL's]: empty for other providers or cases."""
    if trl is None or row["provider"] not in FASTKD or not _ok(row["ms_p50"]):
        return ["", ""]
    ratio, lo, hi = time_ratio(trl, row)
    spread = f" ({lo:.2f}–{hi:.2f})" if _ok(lo) else ""
    return [f"{ratio:.2f}×{spread}", _times(memory_ratio(row, trl))]


def _note(row):
    if row["note"]:
        return row["note"] if len(row["note"]) <= 90 else row["note"][:87] + "..."
    if str(row["check"]).startswith("passed"):
        return "check passed"
    diff = row["diff_vs_eager"]
    if row["op"] == "uld_topk" and row["provider"].startswith("fastkd") and _ok(diff):  # eager: exact ULD (cases.py)
        return f"top-K error vs exact: {diff:.2g} (relative)"
    limit = 1e-3 if row["dtype"] == "fp32" else 5e-2
    if _ok(diff) and diff > limit:
        return f"differs from eager by {diff:.2g}"
    return ""


def format_text(header, body):
    widths = [max(len(str(c)) for c in column) for column in zip(header, *body)]
    right = {i for i, h in enumerate(header) if h not in ("op", "dtype", "mode", "shape", "provider", "note")}

    def line(cells):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in body])


def _markdown_table(header, body):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in body]


def machine_line(env, machine):
    load = f"load average {machine['load_average_start']} at the start, {machine.get('load_average_end', '?')} " \
           f"at the end" if machine.get("load_average_start") is not None else ""
    return (f"{env['device']}; torch {env['torch']}, triton {env['triton']}, commit {env['commit']}, "
            f"{env['date']}; {load}")


def format_markdown(header, body, env, machine, copy_gbps, legend_lines):
    lines = [f"{machine_line(env, machine)}; copy bandwidth {copy_gbps:.1f} GB/s. Speed-up and memory are "
             f"against `{BASELINE}` (> 1× speed-up is faster; < 1× memory is less); on the CPU the speed-up is "
             f"the median ({RANGE}) of the ratio within each round.", ""]
    lines += _markdown_table(header, body)
    lines += ["", f"What each provider runs ({legend_header()}):", ""]
    lines += _markdown_table(["provider", "case", "runs"], [[n, lb, f"`{t}`"] for n, lb, t in legend_lines])
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- summary
def _rounds(row):
    return [float(t) for t in str(row.get("round_ms", "")).split()]


def _number(x):
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _ms(x):
    return f"{_number(x)} ms"


def _time_text(row):
    rounds = _rounds(row)
    if rounds:
        return f"{_ms(statistics.median(rounds))} ({_number(min(rounds))}–{_number(max(rounds))})"
    return f"{_ms(row['ms_p50'])} (p20–p80 {_number(row['ms_p20'])}–{_number(row['ms_p80'])})"


def _first_call(row):
    """The first call's time (compilation included), in seconds."""
    x = row.get("first_call_ms")
    return f"{x / 1e3:.1f} s" if _ok(x) else ""


def _mib(x):
    return f"{x / 2**20:.0f} MiB" if _ok(x) else ""


def comparisons_with(rows, other):
    """Every case where provider ``other`` and a fastkd provider were both timed: (other's row,
    fastkd's row, median, min and max of other's time / fastkd's time per round: ``time_ratio``)."""
    theirs = _rows_of(rows, other)
    return [(theirs[_case_key(r)], r, *time_ratio(theirs[_case_key(r)], r)) for r in rows
            if r["provider"] in FASTKD and _ok(r["ms_p50"]) and _case_key(r) in theirs]


def compile_comparisons(rows):
    """``comparisons_with`` torch-compile."""
    return comparisons_with(rows, "torch-compile")


def summary_markdown(rows, env, machine, legend_lines):
    """The README block: the machine, the headline case (the run's first), torch.compile against
    fastkd, and the speed-up and memory of every case."""
    measured = [r for r in rows if r["op"] != "copy"]
    if not measured:
        return "No case was measured.\n"
    eager = {_case_key(r): r for r in measured if r["provider"] == BASELINE}
    headline_key = _case_key(measured[0])
    headline = [r for r in measured if _case_key(r) == headline_key]
    first = headline[0]
    rounds = max((len(_rounds(r)) for r in headline), default=0)
    formulas = {(n, lb): t for n, lb, t in legend_lines}
    lines = [f"Measured by `fastkd bench` on {machine_line(env, machine)}.", "",
             f"**{_label(first)}, {first['dtype']}, {first['mode']}, {_shape(first)}, T = {TEMPERATURE:g}**"
             + (f" ({rounds} rounds; the providers take turns within each round, and the speed-up is the median "
                f"({RANGE}) of torch-eager's time over the provider's in the same round)" if rounds else
                " (speed-up: ratio of the median times)") + ":", ""]
    body = [[r["provider"], f"`{formulas.get((r['provider'], _label(r)), '')}`",
             _time_text(r) if _ok(r["ms_p50"]) else r["note"], speedup_text(r), _mib(r["peak_mem_bytes"]),
             _times(memory_ratio(r, eager.get(headline_key))), _first_call(r)] for r in headline]
    lines += _markdown_table(["provider", "runs", "time: median (min–max)", "speed-up", "peak extra memory",
                              "memory", "first call"], body)
    comparisons = compile_comparisons(measured)
    if comparisons:
        wins = [f"{_label(c)} {_shape(c)} ({c['dtype']}, {c['mode']}) against {f['provider']}"
                for c, f, ratio, _, _ in comparisons if ratio < 1]
        lines += ["", "**torch.compile of the eager formula against fastkd** (time of torch-compile / time of "
                  "fastkd in the same round: below 1 means torch.compile is faster; its first call compiles):",
                  ""]
        lines += _markdown_table(["case", "torch-compile", "its first call", "fastkd", "compile / fastkd"], [
            [f"{_label(c)} {c['dtype']} {c['mode']} {_shape(c)}", _ms(c["ms_p50"]), _first_call(c),
             f"{_ms(f['ms_p50'])} ({f['provider']})",
             f"{ratio:.2f}" + (f" ({lo:.2f}–{hi:.2f})" if _ok(lo) else "")]
            for c, f, ratio, lo, hi in comparisons])
        lines += ["", ("torch.compile beats fastkd in: " + "; ".join(wins) + ".") if wins else
                  "torch.compile beats fastkd in none of these cases."]
    against_trl = comparisons_with(measured, TRL)
    if against_trl:
        lines += ["", "**fastkd against TRL's chunked divergence** (speed-up: TRL's time / fastkd's in the same "
                  "round; memory: fastkd's peak extra memory / TRL's, the returned gradients counted on both "
                  "sides):", ""]
        lines += _markdown_table(["case", "TRL", "TRL peak", "fastkd", "fastkd peak", "speed-up", "memory"], [
            [f"{_label(t)} {t['dtype']} {t['mode']} {_shape(t)}", _ms(t["ms_p50"]), _mib(t["peak_mem_bytes"]),
             f"{_ms(f['ms_p50'])} ({f['provider']})", _mib(f["peak_mem_bytes"]),
             f"{ratio:.2f}×" + (f" ({lo:.2f}–{hi:.2f})" if _ok(lo) else ""), _times(memory_ratio(f, t))]
            for t, f, ratio, lo, hi in against_trl])
    others = [r for r in measured if r["provider"] != BASELINE and _case_key(r) != headline_key]
    if others:
        lines += ["", "**Every other case** (speed-up and memory against torch-eager, as above):", ""]
        lines += _markdown_table(["case", "provider", "time", "speed-up", "memory"], [
            [f"{_label(r)} {r['dtype']} {r['mode']} {_shape(r)}", r["provider"],
             _ms(r["ms_p50"]) if _ok(r["ms_p50"]) else r["note"][:60], speedup_text(r),
             _times(memory_ratio(r, eager.get(_case_key(r))))] for r in others])
    return "\n".join(lines) + "\n"
