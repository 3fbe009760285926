"""PNG plots of time and peak memory against V, one line per provider, one file per case group
(op, divergence, dtype, mode, N) that has at least two V. matplotlib is optional."""
from __future__ import annotations

import math
from collections import defaultdict


def _groups(rows):
    groups = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["op"] == "copy" or not _ok(r["ms_p50"]):
            continue
        key = (r["op"], r["divergence"], r["dtype"], r["mode"], r["n"])
        groups[key][r["provider"]].append(r)
    return {k: v for k, v in groups.items() if len({r["v"] for rs in v.values() for r in rs}) >= 2}


def _ok(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def write_plots(rows, out_dir, prefix, copy_gbps, log=print):
    """Write the PNGs; returns their paths ([] with a message when matplotlib is missing)."""
    groups = _groups(rows)
    if not groups:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("plots skipped: matplotlib is not installed (pip install matplotlib, or fastkd[bench])")
        return []
    paths = []
    for (op, divergence, dtype, mode, n), providers in groups.items():
        name = f"{op}-{divergence}" if divergence else op
        title = f"{op}/{divergence}" if divergence else op
        fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
        floor = {}
        for provider, rs in providers.items():
            rs = sorted(rs, key=lambda r: r["v"])
            vs = [r["v"] for r in rs]
            ax_time.plot(vs, [r["ms_p50"] for r in rs], marker="o", label=provider)
            ax_mem.plot(vs, [r["peak_mem_bytes"] / 2**20 for r in rs], marker="o", label=provider)
            floor.update({r["v"]: r["min_bytes"] / (copy_gbps * 1e9) * 1e3 for r in rs})
        vs = sorted(floor)
        ax_time.plot(vs, [floor[v] for v in vs], "k--", label="min bytes at copy bandwidth")
        ax_time.set(xscale="log", yscale="log", xlabel="V", ylabel="ms (median)",
                    title=f"{title} {dtype} {mode} N={n}: time")
        ax_mem.set(xscale="log", xlabel="V", ylabel="peak extra memory (MiB)",
                   title=f"{title} {dtype} {mode} N={n}: memory")
        for ax in (ax_time, ax_mem):
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{prefix}_{name}-{dtype}-{mode.replace('+', '')}-n{n}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
