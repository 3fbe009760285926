"""Write the results: the long-format CSV, a JSON of the environment, and the readable table
(provider rows, speed-up and memory ratio against torch eager) as text and markdown."""
from __future__ import annotations

import csv
import json
import math
import re

from .providers import BASELINE
from .runner import COLUMNS


def file_prefix(env):
    """``<device>_<date>``, e.g. ``nvidia-h200_2026-12-01``: the name of every file of a run."""
    device = re.sub(r"\(.*?\)", "", env["device"])
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")[:40].strip("-") or "device"
    return f"{slug}_{env['date'][:10]}"


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


def write_json(env, copy_row, cases, providers, skipped, path):
    info = dict(env, copy_gbps=copy_row["gbps"], cases=len(cases), providers=[p.name for p in providers],
                skipped_providers=skipped)
    with open(path, "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")


def _fmt(x, spec):
    return "" if not isinstance(x, (int, float)) or math.isnan(x) else format(x, spec)


def table_rows(rows):
    """Header and one row per (case, provider), with ratios against the eager row of the case."""
    header = ["op", "dtype", "mode", "N", "V", "provider", "ms (p50)", "p20-p80", "GB/s", "of copy",
              "peak MiB", "speed-up", "memory", "note"]
    eager = {_case_key(r): r for r in rows if r["provider"] == BASELINE}
    out = []
    for r in rows:
        if r["op"] == "copy":
            continue
        base = eager.get(_case_key(r))
        speedup = base["ms_p50"] / r["ms_p50"] if base and _ok(base["ms_p50"]) and _ok(r["ms_p50"]) else math.nan
        memory = (r["peak_mem_bytes"] / base["peak_mem_bytes"]  # a ratio of near-nothing is noise
                  if base and _ok(base["peak_mem_bytes"]) and base["peak_mem_bytes"] >= 2**20
                  and _ok(r["peak_mem_bytes"]) else math.nan)
        op = f"{r['op']}/{r['divergence']}" if r["divergence"] else r["op"]
        spread = f"{_fmt(r['ms_p20'], '.3g')}-{_fmt(r['ms_p80'], '.3g')}" if _ok(r["ms_p20"]) else ""
        out.append([op, r["dtype"], r["mode"], str(r["n"]), str(r["v"]), r["provider"],
                    _fmt(r["ms_p50"], ".3f"), spread, _fmt(r["gbps"], ".1f"), _fmt(r["frac_of_copy_bw"], ".1%"),
                    _fmt(r["peak_mem_bytes"] / 2**20 if _ok(r["peak_mem_bytes"]) else math.nan, ".1f"),
                    _fmt(speedup, ".2f") + ("x" if _ok(speedup) else ""),
                    _fmt(memory, ".2f") + ("x" if _ok(memory) else ""), _note(r)])
    return header, out


def _ok(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def _note(row):
    if row["note"]:
        return row["note"] if len(row["note"]) <= 70 else row["note"][:67] + "..."
    diff = row["diff_vs_eager"]
    limit = 1e-3 if row["dtype"] == "fp32" else 5e-2
    if _ok(diff) and diff > limit:
        return f"differs from eager by {diff:.2g}"
    return ""


def _case_key(row):
    return tuple(row[k] for k in ("op", "divergence", "dtype", "mode", "n", "v"))


def format_text(header, body):
    widths = [max(len(str(c)) for c in column) for column in zip(header, *body)]
    right = {i for i, h in enumerate(header) if h not in ("op", "dtype", "mode", "provider", "note")}

    def line(cells):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in body])


def format_markdown(header, body, env, copy_gbps):
    lines = [f"{env['device']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}, "
             f"{env['date']}; copy bandwidth {copy_gbps:.1f} GB/s. Speed-up and memory are against "
             f"`{BASELINE}` (> 1x speed-up is faster; < 1x memory is less).", "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines) + "\n"
