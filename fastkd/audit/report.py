"""The audit's CSV (long format: one row per launched kernel, one ``step`` row per case and V) and
its Markdown report."""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass

from ..backends.triton import MAX_REGISTERS
from . import cases, model, sass

MODEL_TEXT = (
    "per kernel, CTAs per SM from its registers and threads; elements iterated including the masked padding of "
    "the last tile; overlapped time = max(DRAM bytes / {bw:.1f} TB/s, MUFU ops / ({mufu} per clock x {sms} SMs x "
    "{ghz:.2f} GHz), warp-instructions / ({issue} per clock x {sms} SMs x {ghz:.2f} GHz x an issue efficiency of "
    "{eff:.2f})). A kernel at one CTA per SM has nothing to hide its phases behind: without loops (row-resident, "
    "clustered) its time is the sum of its phases per wave of CTAs (DRAM latency {lat:.1f} µs + loads at the SM's "
    "share of the bandwidth + instructions + cluster barriers x {bar:.2f} µs + stores + the fence after them); with "
    "loops, the overlapped time plus a DRAM latency per pass per wave. A step is its kernels one after another. "
    "floor = the least bytes a fused forward + backward moves (fastkd.bench.min_bytes; 6 N V for bf16 KD) / "
    "{bw:.1f} TB/s. The DRAM bytes are those requested less the modelled L2 hits of passes that re-read a row "
    "({l2:.0f} MB of L2 shared by the rows in flight); every time is also given with no L2 hit (\"no L2\"). "
    "Issue efficiency, latency and barrier cost are assumptions (`fastkd/audit/model.py`). A kernel whose loops "
    "request no bytes (the backward's `scale_rows` at an upstream gradient of 1: it returns at once) costs nothing."
).format(l2=model.H200.l2_bytes / 1e6, bw=model.H200.bandwidth / 1e12, mufu=model.H200.mufu_per_clock,
         sms=model.H200.sms, ghz=model.H200.clock / 1e9, issue=model.H200.issue_per_clock, eff=model.ISSUE_EFFICIENCY,
         lat=model.DRAM_LATENCY_SECONDS * 1e6, bar=model.CLUSTER_BARRIER_SECONDS * 1e6)


@dataclass
class Row:
    """One case at one V: its kernels' SASS audits, the bytes each requested, and the model."""
    case: object          # cases.Case
    case_id: str
    v: int
    n: int
    dtype: str            # "bf16", ...
    kernels: list         # sass.KernelAudit, in launch order
    traffic: list         # [kernel, loaded, stored] bytes per element, in launch order
    floor_bytes: int | None

    @property
    def bytes_per_element(self):
        return [loaded + stored for _, loaded, stored in self.traffic]

    def l2_hits(self, kernel, loaded):
        """(modelled fraction of the re-reads found in L2, modelled L2 bytes per element) of a kernel
        that loaded ``loaded`` B/elt over its passes."""
        if kernel.passes < 2 or loaded == 0:
            return 0.0, 0.0
        per_pass = loaded / kernel.passes
        fraction = model.l2_hit_fraction(per_pass * self.v, model.rows_in_flight(kernel.registers, kernel.num_warps),
                                         self.case.alternating)
        return fraction, fraction * per_pass * (kernel.passes - 1)

    @property
    def dram_bytes_per_element(self):
        return [loaded + stored - self.l2_hits(k, loaded)[1] for k, (_, loaded, stored) in zip(self.kernels, self.traffic)]

    def padded_v(self, kernel):
        """Elements a row's programs iterate over: V rounded up to the tile of one iteration (of a CTA,
        times the CTAs of a cluster)."""
        tile = kernel.block * kernel.ctas
        return -(-self.v // tile) * tile

    def work(self, kernel, loaded, stored):
        return model.KernelWork(
            rows=self.n, v=self.v, padded_v=self.padded_v(kernel), loaded=loaded, stored=stored,
            l2_hit_bytes=self.l2_hits(kernel, loaded)[1], mufu=kernel.mufu_per_element,
            instructions=kernel.instructions_per_element,
            ctas_per_sm=model.ctas_per_sm(kernel.registers, kernel.num_warps), ctas_per_row=kernel.ctas,
            passes=kernel.passes, loop_free=kernel.loop_free, cluster_barriers=kernel.cluster_barriers)

    def _runs(self, kernel, requested):
        return kernel.loop_free or requested > cases.BUDGET_SLACK

    def kernel_times(self, l2=True):
        """[(seconds, bound)] of each kernel of the step; a kernel that requests nothing costs nothing."""
        return [model.kernel_seconds(self.work(k, loaded, stored), l2) if self._runs(k, loaded + stored) else (0.0, "")
                for k, (_, loaded, stored) in zip(self.kernels, self.traffic)]

    def modelled(self, l2=True):
        """(seconds, bound) of the whole step: its kernels one after another; the bound of the longest."""
        times = self.kernel_times(l2)
        return sum(t for t, _ in times), max(times)[1]

    @property
    def upper_bound(self):
        """"≤" when some kernel's counts are upper bounds (a loop that jumps over part of its body)."""
        return "≤" if any(k.branchy for k in self.kernels) else ""

    @property
    def floor_seconds(self):
        return None if self.floor_bytes is None else model.floor_seconds(self.floor_bytes)

    @property
    def fraction_of_floor(self):
        return None if self.floor_bytes is None else self.floor_seconds / self.modelled()[0]

    @property
    def fraction_of_floor_no_l2(self):
        return None if self.floor_bytes is None else self.floor_seconds / self.modelled(l2=False)[0]


def _short(name):
    return name.removesuffix("_kernel")


def _loop_field(kernel, value):
    return "|".join(str(value(loop)) for loop in kernel.main_loops)


def csv_rows(rows, meta):
    out = []
    for row in rows:
        common = dict(case=row.case_id, divergence=row.case.options.get("divergence", ""), flags=row.case.flags,
                      dtype=row.dtype, n=row.n, v=row.v, **meta)
        for kernel, (_, loaded, stored), (seconds, bound), (no_l2, _) in zip(
                row.kernels, row.traffic, row.kernel_times(), row.kernel_times(l2=False)):
            out.append(dict(
                common, kernel=_short(kernel.name), num_warps=kernel.num_warps, elements_per_iteration=kernel.block,
                registers=kernel.registers, shared_bytes=kernel.shared, spill_store_bytes=kernel.spill_store_bytes,
                spill_load_bytes=kernel.spill_load_bytes, spill_in_loop=kernel.spill_in_loop,
                async_copies=kernel.async_copies, divisible_by_16=" ".join(kernel.divisible), ctas=kernel.ctas,
                ctas_per_sm=model.ctas_per_sm(kernel.registers, kernel.num_warps),
                padded_fraction=round(row.padded_v(kernel) / row.v - 1, 4),
                cluster_barriers_per_row=kernel.cluster_barriers,
                passes=kernel.passes, loop_free=kernel.loop_free,
                main_loop_lines=_loop_field(kernel, lambda loop: loop.source_line or loop.step),
                widest_load_bits=_loop_field(kernel, lambda loop: max(loop.widths("LDG"), default=0)),
                widest_store_bits=_loop_field(kernel, lambda loop: max(loop.widths("STG"), default=0)),
                unroll_per_loop=_loop_field(kernel, lambda loop: loop.unroll),
                loop_branches=kernel.branchy,
                instructions_per_iteration=_loop_field(kernel, lambda loop: loop.instructions),
                mufu_per_iteration=_loop_field(kernel, lambda loop: loop.count(sass.MUFU)),
                bar_sync_per_iteration=_loop_field(kernel, lambda loop: loop.count(sass.BARRIER)),
                shfl_per_iteration=_loop_field(kernel, lambda loop: loop.count(sass.SHUFFLE)),
                bytes_loaded_per_element=round(loaded, 4), bytes_stored_per_element=round(stored, 4),
                bytes_per_element=round(loaded + stored, 4),
                modelled_l2_hit_fraction=round(row.l2_hits(kernel, loaded)[0], 4),
                modelled_dram_bytes_per_element=round(loaded + stored - row.l2_hits(kernel, loaded)[1], 4),
                mufu_per_element=round(kernel.mufu_per_element, 4),
                warp_instructions_per_element=round(kernel.instructions_per_element, 4),
                modelled_ms=round(seconds * 1e3, 4), modelled_ms_no_l2=round(no_l2 * 1e3, 4), modelled_bound=bound,
                floor_ms="", modelled_fraction_of_floor=""))
        seconds, bound = row.modelled()
        out.append(dict(
            common, kernel="step", bytes_per_element=round(sum(row.bytes_per_element), 4),
            modelled_dram_bytes_per_element=round(sum(row.dram_bytes_per_element), 4),
            mufu_per_element=round(sum(k.mufu_per_element for k in row.kernels), 4),
            warp_instructions_per_element=round(sum(k.instructions_per_element for k in row.kernels), 4),
            modelled_ms=round(seconds * 1e3, 4), modelled_ms_no_l2=round(row.modelled(l2=False)[0] * 1e3, 4),
            modelled_bound=bound,
            floor_ms="" if row.floor_bytes is None else round(row.floor_seconds * 1e3, 4),
            modelled_fraction_of_floor="" if row.floor_bytes is None else round(row.fraction_of_floor, 4)))
    return out


def write_csv(path, rows, meta):
    records = csv_rows(rows, meta)
    fields = list(dict.fromkeys(k for r in records for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(records)


def _plus(values, fmt="{}"):
    return " + ".join(fmt.format(v) for v in values)


def _bounded(kernel, value):
    """``value`` to 2 decimals, marked "≤" when a main loop branches inside (an upper bound)."""
    return f"{'≤' if kernel.branchy else ''}{value:.2f}"


def _table(header, lines):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(x) for x in line) + " |" for line in lines]
    return "\n".join(out)


def headline_table(rows):
    header = ["case", "kernels", "CTAs/row", "regs", "CTAs/SM", "padded", "spill B st/ld", "spill in loop", "smem B",
              "widest load per main loop (bits)", "passes", "B/elt requested", "MUFU/elt", "warp-instr/elt",
              "modelled L2 hits of re-reads", "modelled DRAM B/elt", "cluster barriers/row", "modelled ms",
              "modelled % of floor", "modelled bound", "modelled ms, no L2 (% of floor)"]
    lines = []
    for row in rows:
        k = row.kernels
        seconds, bound = row.modelled()
        lines.append([
            row.case_id, _plus(_short(x.name) for x in k), _plus(x.ctas for x in k), _plus(x.registers for x in k),
            _plus(model.ctas_per_sm(x.registers, x.num_warps) for x in k),
            _plus(f"{100 * (row.padded_v(x) / row.v - 1):.0f} %" for x in k),
            _plus(f"{x.spill_store_bytes}/{x.spill_load_bytes}" for x in k),
            "yes" if any(x.spill_in_loop for x in k) else "no", _plus(x.shared for x in k),
            _plus("·".join(map(str, x.widest_loads)) for x in k), _plus(x.passes for x in k),
            _plus(row.bytes_per_element, "{:.2f}"), _plus(_bounded(x, x.mufu_per_element) for x in k),
            _plus(_bounded(x, x.instructions_per_element) for x in k),
            _plus(f"{100 * row.l2_hits(x, loaded)[0]:.0f} %" for x, (_, loaded, _) in zip(k, row.traffic)),
            f"{sum(row.dram_bytes_per_element):.2f}", _plus(x.cluster_barriers for x in k),
            f"{row.upper_bound}{seconds * 1e3:.2f}",
            "" if row.floor_bytes is None else f"{100 * row.fraction_of_floor:.0f} %", bound, _no_l2(row)])
    return _table(header, lines)


def _no_l2(row):
    """Modelled ms with no L2 hit (and its % of the floor)."""
    pct = "" if row.floor_bytes is None else f" ({100 * row.fraction_of_floor_no_l2:.0f} %)"
    return f"{row.upper_bound}{row.modelled(l2=False)[0] * 1e3:.2f}{pct}"


def by_v_table(rows, vs):
    """Modelled ms (and % of the floor) of every case at every V."""
    header = ["case"] + [f"V = {v}" for v in vs]  # each cell: with the modelled L2 hits; with none
    cells = {(r.case_id, r.v): r for r in rows}
    lines = []
    for case_id in dict.fromkeys(r.case_id for r in rows):
        line = [case_id]
        for v in vs:
            r = cells.get((case_id, v))
            pct = "" if r is None or r.floor_bytes is None else f" ({100 * r.fraction_of_floor:.0f} %)"
            line.append("–" if r is None else f"{r.upper_bound}{r.modelled()[0] * 1e3:.2f}{pct}; {_no_l2(r)}")
        lines.append(line)
    return _table(header, lines)


def _growth(aligned, unaligned):
    """Instructions per source iteration (BLOCK_V elements) of one main loop, aligned → unaligned."""
    before, after = aligned.instructions / aligned.unroll, unaligned.instructions / unaligned.unroll
    return f"{before:.0f}→{after:.0f} ({100 * (after / before - 1):+.0f} %)"


def alignment_table(rows, aligned_v, unaligned_v):
    """What a row stride that is not a multiple of 16 elements costs: load width and instructions."""
    header = ["case", f"widest loads V={aligned_v}", f"V={unaligned_v}", f"warp-instr/elt V={aligned_v}",
              f"V={unaligned_v}", "instructions per BLOCK_V of each main loop (aligned → unaligned)"]
    cells = {(r.case_id, r.v): r for r in rows}
    lines = []
    for case_id in dict.fromkeys(r.case_id for r in rows):
        a, u = cells.get((case_id, aligned_v)), cells.get((case_id, unaligned_v))
        if a is None or u is None:
            continue
        growth = "; ".join(", ".join(_growth(la, lu) for la, lu in zip(ka.main_loops, ku.main_loops))
                           for ka, ku in zip(a.kernels, u.kernels))
        lines.append([case_id, _plus("·".join(map(str, x.widest_loads)) for x in a.kernels),
                      _plus("·".join(map(str, x.widest_loads)) for x in u.kernels),
                      _plus((x.instructions_per_element for x in a.kernels), "{:.2f}"),
                      _plus((x.instructions_per_element for x in u.kernels), "{:.2f}"), growth])
    return _table(header, lines)


CONVERSIONS = """\
How the columns are counted, per element of the `[N, V]` inputs (a step's kernels are joined by `+` in launch order):

- **regs, spill, smem**: `cuobjdump --dump-resource-usage` of the cubin; spill bytes are the static bytes of its
  STL / LDL instructions (what `ptxas -v` reports as spill stores / loads); *spill in loop*: an STL or LDL inside
  any loop.
- **main loop**: a loop of the SASS (backward branch) whose instructions come from a `for ... in range(..., BLOCK_V)`
  of the kernel's source (line info) and that loads from global memory; *passes* counts them. A kernel without
  loops (`scale_rows`: one block per program) counts its whole body as one pass of BLOCK_V elements.
- **widest load**: the widest LDG in each main loop (128 = `ld.global.v4`, 16 = one bf16 per instruction).
- **B/elt requested**: bytes of every load and store lane the masks leave on, counted by the Triton interpreter on
  the launchers' real path at N = {shape_n}, V = {shape_v}, divided by N·V (per-row terms add a few thousandths).
- **warp-instr/elt** = SASS instructions of the main-loop bodies (NOPs out) / unroll × num_warps / BLOCK_V: each warp
  issues a body once per iteration, which covers unroll × BLOCK_V elements. Code outside the loops (once per row) is
  left out. **MUFU/elt** = MUFU instructions of the bodies / unroll × 32 × num_warps / BLOCK_V: lane operations, the
  unit of the MUFU rate.
- **CTAs/row, cluster barriers/row**: a kernel launched with `num_ctas` > 1 splits each row over a thread-block
  cluster (`.reqnctapercluster` in its PTX); its cluster barriers are the `UCGABAR_WAIT` (barrier.cluster.wait)
  of its SASS, each met once per row by a loop-free kernel, each costing an assumed {barrier_us:.2f} µs in the
  phase sum. **CTAs/SM**: from registers (allocated in multiples of 8 a thread) and threads. **padded**: the share
  of iterated elements past V (the masked lanes of the last tile), which issue instructions but load nothing.
- **unroll**: ptxas unrolling k times leaves adds of BLOCK_V, 2 BLOCK_V, ..., k BLOCK_V to the loop index; of several
  SASS loops from one source loop (unrolled body, remainder) the most unrolled counts. `≤`: a main loop jumps over
  part of its body (teacher_topk skips its merge for most blocks), and every instruction is counted as if it ran.
"""


def gate_findings(rows):
    """What the CI gate (tests/test_audit.py) would flag in ``rows`` of 16-aligned V: a spill, more
    registers than MAX_REGISTERS, a main loop whose widest load is under 128 bits, bytes per element
    over the budget."""
    found = []
    for row in rows:
        if row.v % 16 or not row.case.gate:
            continue
        for kernel, (_, loaded, stored), budget in zip(row.kernels, row.traffic, row.case.budget or ()):
            where = f"{row.case_id} V={row.v}: {_short(kernel.name)}"
            if kernel.spill_store_bytes or kernel.spill_load_bytes:
                found.append(f"{where} spills {kernel.spill_store_bytes} B / reloads {kernel.spill_load_bytes} B"
                             + (" inside a loop" if kernel.spill_in_loop else ""))
            if kernel.registers > MAX_REGISTERS:
                found.append(f"{where} uses {kernel.registers} registers, over {MAX_REGISTERS}")
            if any(width < 128 for width in kernel.widest_loads):
                found.append(f"{where} loads {kernel.widest_loads} bits at widest in its main loops")
            if loaded + stored > budget + cases.BUDGET_SLACK:
                found.append(f"{where} requests {loaded + stored:.2f} B/elt, over its budget of {budget}")
    return found


def markdown(rows, meta, headline_v, vs, aligned_v, unaligned_v, traffic_shape, unavailable=()):
    headline = [r for r in rows if r.v == headline_v]
    parts = [
        f"# fastkd kernel audit: sm_{meta['arch']}, Triton {meta['triton']}",
        "",
        f"Date {meta['date']}, commit {meta['commit']}; N = {meta['n']}, {meta['dtype']} student and teacher. "
        f"Produced by `fastkd audit --arch {meta['arch']}` on a machine without a GPU: every kernel compiled as a "
        "launch compiles it (Triton's own argument binder and specialisations, then its ptxas), SASS read with the "
        "nvdisasm / cuobjdump Triton bundles. Nothing here was timed.",
        "",
        "**Modelled columns are a model of an H200, not measurements:** " + MODEL_TEXT,
        "",
        CONVERSIONS.format(shape_n=traffic_shape[0], shape_v=traffic_shape[1],
                           barrier_us=model.CLUSTER_BARRIER_SECONDS * 1e6),
        f"## Each case at V = {headline_v}",
        "",
        "Each case is one training step: the forward kernel(s), then the backward's `scale_rows` pass.",
        "",
        headline_table(headline),
        "",
        f"## Modelled ms (and % of the floor) by V, N = {meta['n']}: with the modelled L2 hits; with none",
        "",
        by_v_table(rows, vs),
    ]
    if unavailable:
        parts += ["", "## Not compiled: the launcher refuses the kernel at this V (–)", ""]
        parts += [f"- {case_id} V={v}: {why}" for case_id, v, why in unavailable]
    findings = gate_findings(rows)
    parts += ["", "## What the CI gate flags (gated cases, 16-aligned V)", ""]
    parts += [f"- {line}" for line in findings] or [
        f"Nothing: no spill, at most {MAX_REGISTERS} registers, 128-bit loads, within budget."]
    if unaligned_v in vs and aligned_v in vs:
        parts += ["", f"## Rows whose stride is not a multiple of 16 elements (V = {unaligned_v})", "",
                  "Triton specialises an int argument (here V and the row strides) as divisible by 16 or not; "
                  "without it the row loads cannot be proven 16-byte aligned.", "",
                  alignment_table(rows, aligned_v, unaligned_v)]
    return "\n".join(parts) + "\n"


def write_markdown(path, text):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
