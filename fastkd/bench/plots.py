"""PNG plots (matplotlib is optional): the headline case (the run's first) as bars of time and peak
memory per provider, and time and peak memory against V, one line per provider, for every case
group (op, divergence, dtype, mode, N, k, H) that has at least two V."""
from __future__ import annotations

from collections import defaultdict

from .report import _ok, _rounds


def _key(r):
    return (r["op"], r["divergence"], r["dtype"], r["mode"], r["n"], r["k"], r["h"])


def _title(op, divergence, dtype, mode, n, k, h):
    label = f"{op}/{divergence}" if divergence else op
    return f"{label} {dtype} {mode} N={n}" + (f" k={k}" if k else "") + (f" H={h}" if h else "")


def _groups(rows):
    groups = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["op"] == "copy" or not _ok(r["ms_p50"]):
            continue
        groups[_key(r)][r["provider"]].append(r)
    return {k: v for k, v in groups.items() if len({r["v"] for rs in v.values() for r in rs}) >= 2}


def _pyplot(log):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("plots skipped: matplotlib is not installed (pip install matplotlib, or fastkd[bench])")
        return None
    return plt


def _headline_plot(plt, rows, path, copy_gbps, device):
    measured = [r for r in rows if r["op"] != "copy"]
    if not measured:
        return None
    first = measured[0]
    case = [r for r in measured if _key(r) == _key(first) and r["v"] == first["v"] and _ok(r["ms_p50"])]
    if not case:
        return None
    names = [r["provider"] for r in case]
    medians = [r["ms_p50"] for r in case]
    spread = []
    for r in case:
        rounds = _rounds(r)
        low, high = (min(rounds), max(rounds)) if rounds else (r["ms_p20"], r["ms_p80"])
        spread.append((max(0.0, r["ms_p50"] - low), max(0.0, high - r["ms_p50"])))
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    bars = ax_time.bar(names, medians, yerr=list(zip(*spread)), capsize=4, color="tab:blue")
    for bar, r in zip(bars, case):
        if _ok(r["speedup_p50"]):
            ax_time.annotate(f"{r['speedup_p50']:.2f}×", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                             ha="center", va="bottom", fontsize=9, xytext=(0, 3), textcoords="offset points")
    floor = first["min_bytes"] / (copy_gbps * 1e9) * 1e3
    ax_time.axhline(floor, color="k", linestyle="--", label="min bytes at copy bandwidth")
    ax_time.set(ylabel="ms per call: median, bars = range over rounds", title="time (label: speed-up vs torch-eager)")
    ax_time.legend(fontsize=8)
    ax_mem.bar(names, [r["peak_mem_bytes"] / 2**20 if _ok(r["peak_mem_bytes"]) else 0 for r in case],
               color="tab:orange")
    ax_mem.set(ylabel="MiB", title="peak extra memory of one call")
    for ax in (ax_time, ax_mem):
        ax.tick_params(axis="x", labelrotation=20)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"{_title(*_key(first))} V={first['v']}: {device}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(rows, out_dir, prefix, copy_gbps, log=print):
    """Write the PNGs; returns their paths ([] with a message when matplotlib is missing)."""
    plt = _pyplot(log)
    if plt is None:
        return []
    paths = []
    device = next((r["device"] for r in rows), "")
    headline = _headline_plot(plt, rows, out_dir / f"{prefix}_headline.png", copy_gbps, device)
    if headline:
        paths.append(headline)
    for key, providers in _groups(rows).items():
        op, divergence, dtype, mode, n, k, h = key
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
        title = _title(*key)
        ax_time.set(xscale="log", yscale="log", xlabel="V", ylabel="ms (median)", title=f"{title}: time")
        ax_mem.set(xscale="log", xlabel="V", ylabel="peak extra memory (MiB)", title=f"{title}: memory")
        for ax in (ax_time, ax_mem):
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"{op}-{divergence}" if divergence else op
        extra = (f"-k{k}" if k else "") + (f"-h{h}" if h else "")
        path = out_dir / f"{prefix}_{name}-{dtype}-{mode.replace('+', '')}-n{n}{extra}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
