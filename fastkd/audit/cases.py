"""The table of what the audit compiles and measures: one row per case.

A case is one training step of a loss, run through the public API as a user runs it: the forward
kernel(s), then the backward's ``scale_rows`` pass (``fastkd.autograd.scaled_student_grad``, which
returns at once for an upstream gradient of 1: the forward applied the reduction's normaliser).
A new kernel variant is one more row; ``kd_kernel`` is the dense kernel (``fastkd.config.kd_kernel``)
set around its launches, e.g.

    Case("kd_loss kl two_pass", kd_step, dict(divergence="kl"), floor_op="kd_loss", gate=True,
         budget=(10, 0), kd_kernel="two_pass"),

Case ids (the name, and the flags in brackets) must be unique.

``budget``: the most bytes per element of the ``[N, V]`` inputs each launched kernel may request
with bf16 student and teacher, in launch order. It is the ceiling ``tests/test_audit.py`` holds the
gated cases to: lower it when a kernel moves less.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import torch

from ..divergences import DIVERGENCES, lookup

BUDGET_SLACK = 0.01  # B/elt the per-row terms (the loss, a label, the scale) may add at the measured shape
TEMPERATURE = 2.0
HARD_WEIGHT = 0.5
TOPK_K = 64


def make_inputs(n, v, dtype, seed=0):
    """Student and teacher logits ``[n, v]`` of ``dtype`` and labels ``[n]`` int64, on the CPU."""
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        student=(2 * torch.randn(n, v, generator=g)).to(dtype),
        teacher=(2 * torch.randn(n, v, generator=g)).to(dtype),
        labels=torch.randint(0, v, (n,), generator=g),
    )


def _train_step(loss_fn, student, *args, **kw):
    """One training step through the public API, as a user runs it: the loss (batchmean), then its
    backward with an upstream gradient of 1 (the normaliser is applied inside the forward kernels,
    so the backward's ``scale_rows`` has nothing left to do)."""
    import fastkd

    leaf = student.detach().requires_grad_()
    getattr(fastkd, loss_fn)(leaf, *args, backend="triton", **{"temperature": TEMPERATURE, **kw}).backward()


def kd_step(x, divergence, hard_ce=False, temperature=TEMPERATURE, teachers=1):
    ce = dict(labels=x.labels, hard_weight=HARD_WEIGHT) if hard_ce else {}
    teacher = x.teacher if teachers == 1 else [x.teacher] * teachers  # a mixture reads each teacher tensor
    _train_step("kd_loss", x.student, teacher, divergence=divergence, temperature=temperature, **ce)


def softmax_step(x, log):
    import fastkd

    leaf = x.student.detach().requires_grad_()
    y = (fastkd.log_softmax if log else fastkd.softmax)(leaf, TEMPERATURE, backend="triton")
    y.backward(x.teacher)  # the teacher stands in for dy


def teacher_topk_step(x, k):
    import fastkd

    fastkd.teacher_topk(x.teacher, k, temperature=TEMPERATURE, backend="triton")


def topk_kd_step(x, divergence, tail, k):
    logprobs, indices = torch.log_softmax(x.teacher.float() / TEMPERATURE, dim=-1).topk(k, dim=-1)
    _train_step("topk_kd_loss", x.student, logprobs, indices.to(torch.int32), divergence=divergence, tail=tail,
                validate_indices=False)


def vocab_parallel_step(x, divergence):
    """One rank holding the whole vocabulary: the all-reduces between the kernels are identities."""
    from fastkd import distributed
    from fastkd.backends import triton as launchers
    from fastkd.options import KDOptions, Reduction

    opts = KDOptions(divergence=divergence, temperature=TEMPERATURE)
    steps = distributed.forward_steps(x.student, x.teacher, None, opts, "triton", 0, reduction=Reduction())
    try:
        while True:
            next(steps)
    except StopIteration as done:
        _, grad, _, _ = done.value
    launchers.scale_rows(grad, torch.ones(1), out=grad)  # the backward, upstream gradient 1


@dataclass(frozen=True)
class Case:
    name: str
    step: Callable                 # step(inputs, **options): the launches of one training step
    options: dict = field(default_factory=dict)
    flags: str = ""                # shown in the report
    floor_op: str | None = None    # fastkd.bench.min_bytes op whose fwd+bwd traffic is the floor
    gate: bool = False             # held to no spill in a loop, 128-bit loads and its budget
    budget: tuple | None = None    # bf16 bytes requested per element, per launched kernel
    kd_kernel: str = "auto"        # fastkd.config.kd_kernel around its launches
    alternating: bool = False      # the kernels' passes over a row alternate direction (for the L2 model)


def _two_pass_budget(divergence):
    """bf16 B/elt of the two-pass step: two reads of both inputs and the gradient for a divergence
    known after the first pass, three reads otherwise; the backward at upstream 1, none."""
    return (10, 0) if lookup(divergence).cross_term else (14, 0)


def _kd(divergence, budget, hard_ce=False, gate=True):
    """The two-pass kernel, whatever V (the default picks the resident kernel for short rows)."""
    return Case(f"kd_loss {divergence}", kd_step, dict(divergence=divergence, hard_ce=hard_ce),
                flags="hard CE" if hard_ce else "", floor_op="kd_loss", gate=gate, budget=budget,
                kd_kernel="two_pass", alternating=True)


def _resident(divergence, hard_ce=False):
    """The resident kernel (``kd_kernel="resident"``): one CTA a row, up to 8192 columns; the
    launcher refuses longer rows (reported as not compiled)."""
    return Case(f"kd_loss {divergence}", kd_step, dict(divergence=divergence, hard_ce=hard_ce),
                flags="hard CE, resident" if hard_ce else "resident", floor_op="kd_loss", gate=True,
                budget=(6, 0), kd_kernel="resident")


CASES = (
    *(_kd(divergence, _two_pass_budget(divergence)) for divergence in DIVERGENCES),
    *(_kd(divergence, _two_pass_budget(divergence), hard_ce=True) for divergence in DIVERGENCES),
    Case("kd_loss kl", kd_step, dict(divergence="kl", hard_ce=True, temperature=1.0), flags="hard CE, T = 1",
         floor_op="kd_loss", gate=True, budget=(10, 0), alternating=True, kd_kernel="two_pass"),
    Case("kd_loss kl", kd_step, dict(divergence="kl", teachers=2), flags="2 teachers", gate=True, budget=(20, 0),
         alternating=True, kd_kernel="two_pass"),
    *(_resident(divergence) for divergence in DIVERGENCES),
    *(_resident(divergence, hard_ce=True) for divergence in DIVERGENCES),
    Case("softmax", softmax_step, dict(log=False), floor_op="softmax"),
    Case("log_softmax", softmax_step, dict(log=True), floor_op="log_softmax"),
    # the row, then per row k winners re-read (bf16) and k (4 + 4) B written: 10 k / V = 0.08 at traffic.SHAPE
    Case(f"teacher_topk k={TOPK_K}", teacher_topk_step, dict(k=TOPK_K), gate=True, budget=(2.08,)),
    Case(f"topk_kd_loss kl k={TOPK_K}", topk_kd_step, dict(divergence="kl", tail="bucket", k=TOPK_K), flags="bucket"),
    Case("vocab_parallel kl", vocab_parallel_step, dict(divergence="kl"), flags="1 rank", floor_op="kd_loss"),
    Case("vocab_parallel jsd", vocab_parallel_step, dict(divergence="jsd"), flags="1 rank", floor_op="kd_loss"),
)


def case_id(case):
    """Unique key of a case: its name and flags."""
    return f"{case.name} [{case.flags}]" if case.flags else case.name


def select(names=None, gate_only=False):
    """Cases whose id contains one of ``names`` (all when None), gated ones only if asked."""
    chosen = [c for c in CASES if (not gate_only or c.gate) and (not names or any(n in case_id(c) for n in names))]
    if names and not chosen:
        raise ValueError(f"no audit case matches {names}; cases: {', '.join(map(case_id, CASES))}")
    return chosen


def run_step(case, inputs):
    """Run ``case``'s launches on ``inputs`` with its dense kernel set."""
    from .. import config

    with config.override(kd_kernel=case.kd_kernel):
        case.step(inputs, **case.options)
