"""Read a cubin's SASS: registers, spills, and what each loop of a kernel executes per iteration.

Tools: the ``nvdisasm`` and ``cuobjdump`` that Triton bundles (``triton/backends/nvidia/bin``).

A loop is the span from a backward branch's target to the branch (``nvdisasm -c -gi`` listing);
nested loops count inside the outermost one. Every instruction of the span is counted once per
iteration (NOPs left out): a branch inside a loop that skips code overstates the count (``skips``).
Each loop is matched to the ``for`` statement of the kernel's source most of its instructions come
from (the line info Triton emits, inlined helpers resolved through "inlined at"), which names its
step; ptxas unrolling shows as adds of 1, 2, ..., k steps to the loop index on the ``for`` line.
Counts are warp-instructions: one SASS instruction issued once by each warp of the CTA.
"""
from __future__ import annotations

import ast
import collections
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_FILE_LINE = re.compile(r'"([^"]+)", line (\d+)')
_BRANCH_TARGET = re.compile(r"\(\s*(\.L_x_\d+)\s*\)")
_RESOURCE = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)")

MUFU = "MUFU"
BARRIER = "BAR.SYNC"
SHUFFLE = "SHFL"
CLUSTER_BARRIER = "UCGABAR_WAIT"  # barrier.cluster.wait: one barrier of a thread-block cluster (its arrive: UCGABAR_ARV)
ASYNC_COPIES = ("LDGSTS", "UTMALDG", "UBLKCP", "LDGDEPBAR")  # cp.async, TMA: what num_stages would pipeline


@dataclass(frozen=True)
class Instruction:
    offset: int
    opcode: str               # e.g. "LDG.E.128", "MUFU.EX2"
    operands: str
    sources: frozenset        # (file, line) pairs of the line info, "inlined at" callers included

    def is_(self, op):
        return self.opcode == op or self.opcode.startswith(op + ".")


def bits(opcode):
    """Access width of a load or store opcode: LDG.E.128 -> 128, LDG.E.U16 -> 16, LDG.E -> 32."""
    parts = opcode.split(".")
    for width in ("128", "64"):
        if width in parts:
            return int(width)
    if any(p in ("U16", "S16") for p in parts):
        return 16
    if any(p in ("U8", "S8") for p in parts):
        return 8
    return 32


@dataclass
class Loop:
    """One loop of the SASS, the ``for`` of the source it comes from, and its per-iteration counts."""
    start: int
    end: int
    source_line: int | None = None   # line of the matched ``for`` in the kernel's file
    step: str | None = None          # its range step as written, e.g. "BLOCK_V"
    unroll: int = 1                  # source iterations per SASS iteration (ptxas unrolling)
    skips: bool = False              # a branch inside the body jumps over part of it
    opcodes: collections.Counter = field(default_factory=collections.Counter)
    body: list = field(default_factory=list, repr=False)

    @property
    def instructions(self):
        return sum(self.opcodes.values())

    def count(self, op):
        return sum(n for opcode, n in self.opcodes.items() if opcode == op or opcode.startswith(op + "."))

    def widths(self, op):
        """Counter of access widths (bits) of ``op`` ("LDG", "STG", "LDL", "STL") per iteration."""
        widths = collections.Counter()
        for opcode, n in self.opcodes.items():
            if opcode.split(".")[0] == op:
                widths[bits(opcode)] += n
        return widths


def tool(name):
    """Path of a CUDA binary tool Triton bundles (None when absent)."""
    from triton import knobs

    found = getattr(knobs.nvidia, name, None)
    path = found.path if found is not None else None
    return path if path and os.path.exists(path) else None


def _run_on_cubin(cubin, *command):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([*command, f.name], check=True, capture_output=True, text=True).stdout


def disassemble(cubin):
    """``nvdisasm -c -gi`` listing of the code sections, with source lines and their callers."""
    return _run_on_cubin(cubin, tool("nvdisasm"), "-c", "-gi")


def resources(cubin):
    """{"REG", "STACK", "SHARED", "LOCAL"} of the cubin's one function (``cuobjdump``)."""
    out = _run_on_cubin(cubin, tool("cuobjdump"), "--dump-resource-usage")
    function = out[out.index("Function"):]
    return {key: int(value) for key, value in _RESOURCE.findall(function)}


def parse(listing):
    """The instructions of a listing in order, and its labels' offsets. An instruction without
    "//##" comments of its own has the source lines of the one before it."""
    instructions, labels, pending_labels, comments, sources = [], {}, [], [], frozenset()
    for line in listing.splitlines():
        text = line.strip()
        if text.startswith("//##"):
            comments.append(text)
        elif label := _LABEL.match(text):
            pending_labels.append(label.group(1))
        elif match := _INSTRUCTION.search(text):
            offset = int(match.group(1), 16)
            labels.update((name, offset) for name in pending_labels)
            if comments:
                sources = frozenset((os.path.realpath(path), int(n))
                                    for comment in comments for path, n in _FILE_LINE.findall(comment))
            instructions.append(Instruction(offset, match.group(2), match.group(3).strip(), sources))
            pending_labels, comments = [], []
    return instructions, labels


def loops(instructions, labels):
    """Outermost loops: spans [target, branch] of backward branches, nested spans merged. Branches
    from the warp-divergence fallbacks of shuffles (the targets of BRA.DIV, which ptxas places after
    the kernel's code) back into the body are not loops."""
    def target(ins):
        found = _BRANCH_TARGET.search(ins.operands)
        return labels.get(found.group(1)) if found else None

    fallback = min((target(i) for i in instructions if i.is_("BRA.DIV") and target(i) is not None),
                   default=float("inf"))
    spans = [(target(i), i.offset) for i in instructions
             if i.is_("BRA") and i.offset < fallback and target(i) is not None and target(i) < i.offset]
    outer = [s for s in spans if not any(o != s and o[0] <= s[0] and s[1] <= o[1] for o in spans)]
    return [span(instructions, labels, start, end) for start, end in sorted(set(outer))]


def span(instructions, labels, start, end):
    """The Loop of the instructions at offsets [start, end] (NOPs left out)."""
    body = [i for i in instructions if start <= i.offset <= end and i.opcode != "NOP"]
    loop = Loop(start, end, body=body)
    loop.opcodes.update(i.opcode for i in body)
    for ins in body:
        target = _BRANCH_TARGET.search(ins.operands) if ins.is_("BRA") and not ins.is_("BRA.DIV") else None
        if target and ins.offset < labels.get(target.group(1), -1) <= end:
            loop.skips = True
    return loop


def for_statements(function_def, first_line):
    """(first line, last line, step as written) of every ``for ... in range(...)`` of a kernel, in
    file line numbers (``first_line``: where the function's source starts in its file)."""
    found = []
    for node in ast.walk(function_def):
        if isinstance(node, ast.For) and isinstance(node.iter, ast.Call) and len(node.iter.args) == 3:
            step = ast.unparse(node.iter.args[2])
            found.append((node.lineno + first_line - 1, node.end_lineno + first_line - 1, step))
    return found


def match_sources(found_loops, instructions, source_file, fors):
    """Set each loop's ``source_line`` and ``step`` from the innermost ``for`` holding most of its
    instructions' lines in ``source_file``."""
    source_file = os.path.realpath(source_file)
    for loop in found_loops:
        votes = collections.Counter()
        for ins in instructions:
            if loop.start <= ins.offset <= loop.end:
                for path, line in ins.sources:
                    holding = [f for f in fors if f[0] <= line <= f[1]] if path == source_file else []
                    if holding:
                        votes[max(holding)] += 1  # the innermost: the latest first line
        if votes:
            (loop.source_line, _, loop.step), _ = votes.most_common(1)[0]


_IMMEDIATE = re.compile(r"(?<![\w.+-])0x([0-9a-f]+)")


def unroll_factor(loop, source_file, step_value):
    """How many source iterations one pass through ``loop`` covers. The induction variable
    ``start`` advances by ``step_value`` per source iteration; ptxas unrolling k times leaves adds of
    ``step_value``, 2 ``step_value``, ..., k ``step_value`` attributed to the ``for`` line."""
    source_file = os.path.realpath(source_file)
    multiples = [int(h, 16) // step_value for i in loop.body if (source_file, loop.source_line) in i.sources
                 for h in _IMMEDIATE.findall(i.operands) if int(h, 16) % step_value == 0]
    return max((k for k in multiples if 1 <= k <= 16), default=1)


ROW_STEP = "BLOCK_V"  # a main loop walks the row: ``for ... in range(..., BLOCK_V)`` and loads from it
WARP = 32


@dataclass
class KernelAudit:
    """What the SASS of one compiled kernel says (per-element figures: see the package docstring)."""
    name: str
    num_warps: int
    block: int                 # elements per source iteration of a main loop (or per program): BLOCK_V
    registers: int
    shared: int                # bytes of shared memory
    spill_store_bytes: int     # static bytes of STL / LDL, as ptxas -v counts spill stores / loads
    spill_load_bytes: int
    spill_in_loop: bool        # an STL or LDL inside any loop (a loop-free kernel: anywhere)
    main_loops: list           # of Loop, one per source loop; a pseudo-loop spanning a loop-free kernel
    loop_free: bool
    async_copies: int          # LDGSTS / TMA instructions anywhere
    divisible: tuple           # parameters Triton specialised as divisible by 16
    ctas: int = 1              # CTAs a program spans: a thread-block cluster when > 1 (num_ctas)
    cluster_barriers: int = 0  # cluster barriers in the code (a loop-free kernel: per row)

    @property
    def passes(self):
        return len(self.main_loops)

    @property
    def widest_loads(self):
        return [max(loop.widths("LDG"), default=0) for loop in self.main_loops]

    @property
    def branchy(self):
        """Some main loop jumps over part of its body: the per-element counts are upper bounds."""
        return any(loop.skips for loop in self.main_loops)

    def _per_element(self, count):
        return sum(count(loop) / loop.unroll for loop in self.main_loops) * self.num_warps / self.block

    @property
    def instructions_per_element(self):
        return self._per_element(lambda loop: loop.instructions)

    @property
    def mufu_per_element(self):
        return self._per_element(lambda loop: loop.count(MUFU)) * WARP


def _static_bytes(instructions, op):
    return sum(bits(i.opcode) // 8 for i in instructions if i.opcode.split(".")[0] == op)


def main_loops(found):
    """One SASS loop per source loop over the row that loads from memory: where ptxas made several
    of one ``for`` (an unrolled body and its remainder), the most unrolled, which runs for most of a
    long row."""
    best = {}
    for loop in found:
        if loop.step == ROW_STEP and loop.widths("LDG"):
            kept = best.get(loop.source_line)
            if kept is None or (loop.unroll, loop.instructions) > (kept.unroll, kept.instructions):
                best[loop.source_line] = loop
    return sorted(best.values(), key=lambda loop: loop.start)


def analyse(compiled):
    """KernelAudit of a ``cubin.Compiled``."""
    from .cubin import kernel_source

    cubin = compiled.kernel.asm["cubin"]
    block = compiled.constants[ROW_STEP]
    instructions, labels = parse(disassemble(cubin))
    found = loops(instructions, labels)
    source_file, first_line, function_def = kernel_source(compiled.fn)
    match_sources(found, instructions, source_file, for_statements(function_def, first_line))
    for loop in found:
        if loop.step == ROW_STEP:
            loop.unroll = unroll_factor(loop, source_file, block)
    main = main_loops(found)
    if not found:
        program = span(instructions, labels, instructions[0].offset, instructions[-1].offset)
        program.step = "program"
        main = [program]
    usage = resources(cubin)
    return KernelAudit(
        name=compiled.name, num_warps=compiled.num_warps, block=block,
        registers=usage["REG"], shared=usage["SHARED"],
        spill_store_bytes=_static_bytes(instructions, "STL"), spill_load_bytes=_static_bytes(instructions, "LDL"),
        spill_in_loop=any(loop.widths("STL") or loop.widths("LDL") for loop in found or main),
        main_loops=main, loop_free=not found,
        async_copies=sum(1 for i in instructions if i.opcode.split(".")[0] in ASYNC_COPIES),
        divisible=compiled.divisible, ctas=getattr(compiled.kernel.metadata, "num_ctas", 1),
        cluster_barriers=sum(1 for i in instructions if i.is_(CLUSTER_BARRIER)),
    )
