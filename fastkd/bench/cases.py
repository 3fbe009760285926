"""The one table of benchmark cases: what is measured, at which shapes, in which presets.

A case is one op at one shape, dtype and mode. A preset is a list of grids (cartesian products of
ops x divergences x dtypes x N x V x k x H x modes); command-line options replace a field in every
grid. A grid may name the providers that run on its cases by default (``providers``); otherwise
every provider that runs by default on the device does. The first case of a run is its headline
case: the one the summary and the headline plot show.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from .. import config
from ..divergences import DIVERGENCES
from .arguments import MODES, OPS  # declared there, torch-free, for the command's help

# kd_loss: dense logits. topk_kd_loss: the student against a teacher's top-k log-probabilities
# (tail="bucket"); teacher_topk: extracting them. fused_linear_kd: the LM head matmuls and the loss
# (hidden states and weights in, the [N, V] logits never stored by the fused providers).
# kd_loss_ce: classic (Hinton-style) distillation of a classifier, the dense loss at CE_TEMPERATURE
# with hard labels, CE_WEIGHT on each of the soft loss and the cross-entropy.
# uld: ULD between two vocabularies (fastkd.uld_loss, exact: both probability rows sorted); uld_topk:
# its top-K form (k=K). The eager idiom of both is the exact sorted L1, so uld_topk's difference from
# eager is the top-K error; TRL's GOLD (trl.experimental.gold) is the other exact provider. Logits of
# standard deviation ULD_LOGIT_SCALE: peaked rows, as a trained model's (at 3, random rows are so flat
# that the top 64 of 32000 columns hold a small part of the mass).
DIVERGENCE_OPS = ("kd_loss", "kd_loss_ce", "topk_kd_loss", "fused_linear_kd")
ULD_OPS = ("uld", "uld_topk")
TOPK_OPS = ("topk_kd_loss", "teacher_topk", "uld_topk")
ULD_LOGIT_SCALE = 8.0
OP_MODES = {op: MODES for op in OPS} | {"teacher_topk": ("fwd",)}  # the teacher has no gradient
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Options every provider of a case uses, so that they all compute the same number.
TEMPERATURE = 2.0
BETA = 0.5  # jsd: symmetric, so every library's convention for beta gives the same value
SKEW = 0.1
CE_TEMPERATURE = 20.0  # kd_loss_ce: Hinton et al.'s classifier distillation runs at high T
CE_WEIGHT = 0.5  # kd_loss_ce: hard_weight = soft_weight


@dataclass(frozen=True)
class Case:
    op: str
    divergence: str  # "" for softmax, log_softmax, teacher_topk
    dtype: str
    n: int  # rows (tokens)
    v: int  # vocabulary
    mode: str
    k: int = 0  # top-k ops: listed tokens per row
    h: int = 0  # fused_linear_kd: hidden size
    # Default providers of the case (None: every default provider of the device); not part of its identity.
    providers: Optional[tuple] = field(default=None, compare=False)

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]

    @property
    def label(self):
        """``op/divergence``, or ``op``."""
        return f"{self.op}/{self.divergence}" if self.divergence else self.op

    @property
    def shape(self):
        return f"N={self.n} V={self.v}" + (f" k={self.k}" if self.k else "") + (f" H={self.h}" if self.h else "")

    @property
    def name(self):
        return f"{self.label} {self.dtype} {self.mode} {self.shape}"


@dataclass(frozen=True)
class Grid:
    ops: tuple = ("kd_loss",)
    divergences: tuple = ("kl",)
    dtypes: tuple = ("fp32",)
    ns: tuple = (1024,)
    vs: tuple = (32000,)
    ks: tuple = (64,)
    hs: tuple = (4096,)
    modes: tuple = ("fwd+bwd",)
    providers: Optional[tuple] = None

    def cases(self):
        for op, dtype, n, v, mode in itertools.product(self.ops, self.dtypes, self.ns, self.vs, self.modes):
            if mode not in OP_MODES[op]:
                continue
            for divergence in self.divergences if op in DIVERGENCE_OPS else ("",):
                for k in self.ks if op in TOPK_OPS else (0,):
                    if k > v:  # more listed tokens than the vocabulary has
                        continue
                    for h in self.hs if op == "fused_linear_kd" else (0,):
                        yield Case(op, divergence, dtype, n, v, mode, k, h, self.providers)


_OTHER_DIVERGENCES = tuple(d for d in DIVERGENCES if d != "kl")
GPU_VS = (32000, 50257, 128256, 151936, 262144)
KD_KERNELS = tuple(k for k in config.KD_KERNELS if k != "auto")  # the kernels fastkd.config.kd_kernel names
KERNEL_VARIANTS = tuple(f"fastkd-triton[{kernel}]" for kernel in KD_KERNELS)
CPU_WITH_COMPILE = ("torch-eager", "fastkd-torch", "torch-compile")
GPU_PROVIDERS = ("torch-eager", "fastkd-triton", "fastkd-torch", "torch-compile", "liger")
FUSED_LINEAR_PROVIDERS = ("torch-eager", "fastkd-unfused", "fastkd-triton", "liger", "trl")
ULD_PROVIDERS = ("torch-eager", "fastkd-triton", "fastkd-torch", "fastkd-inplace", "trl")

# Small calls, where the per-call cost of the host path (validation, dispatch, the chunk loop's
# small ops) dominates: a classifier's distillation (V = 8 and 10, with labels at T = 20), a
# mid-size vocabulary at few rows, many rows of a tiny vocabulary. Milliseconds a call.
SMALL = (
    Grid(ns=(4,), vs=(8,)),
    Grid(ops=("kd_loss_ce",), ns=(100,), vs=(10,)),
    Grid(ns=(128,), vs=(1000,)),
    Grid(ns=(4096,), vs=(10,)),
)

PRESETS = {
    # The default on a CPU-only machine, a few minutes on 2 cores. First the headline case (the
    # torch backend against the eager idiom and its torch.compile, kl at N = 4096, V = 32000, fp32),
    # then every divergence at N = 2048 with torch.compile as well; a V sweep and softmax at
    # N = 256; the sparse top-k loss and its extraction beside dense kd_loss at V = 128256; the
    # small calls.
    "cpu": (
        Grid(ns=(4096,), vs=(32000,), providers=CPU_WITH_COMPILE),
        Grid(divergences=DIVERGENCES, ns=(2048,), vs=(32000,), providers=CPU_WITH_COMPILE),
        Grid(ns=(256,), vs=(8192, 32000, 128256)),
        Grid(ops=("softmax", "log_softmax"), ns=(256,), vs=(32000,)),
        Grid(ops=("kd_loss", "topk_kd_loss"), ns=(32,), vs=(128256,), ks=(16, 128, 1024)),
        Grid(ops=("teacher_topk",), ns=(32,), vs=(128256,), ks=(16, 128, 1024), modes=("fwd",)),
        *SMALL,
    ),
    "small": SMALL,
    # The GPU cases (H200 targets): bf16, N = 8192; headline kl at V = 128256, then 32000 and
    # 262144, timed with torch.compile (compiling takes most of a minute per case, so only here)
    # and with the variants of the dense Triton kernel side by side; the other divergences;
    # tempered softmax; the top-k loss and extraction.
    "headline": (
        Grid(dtypes=("bf16",), ns=(8192,), vs=(128256, 32000, 262144), providers=GPU_PROVIDERS + KERNEL_VARIANTS),
        Grid(divergences=_OTHER_DIVERGENCES, dtypes=("bf16",), ns=(8192,), vs=(128256,),
             providers=("torch-eager", "fastkd-triton", "fastkd-torch", "liger") + KERNEL_VARIANTS),
        Grid(ops=("softmax",), dtypes=("bf16",), ns=(8192,), vs=(32000, 128256, 262144), modes=("fwd", "bwd"),
             providers=("torch-eager", "fastkd-triton", "fastkd-torch", "liger")),
        Grid(ops=("topk_kd_loss",), dtypes=("bf16",), ns=(8192,), vs=(128256,), ks=(64, 1024),
             providers=("torch-eager", "fastkd-triton", "fastkd-torch")),
        Grid(ops=("teacher_topk",), dtypes=("bf16",), ns=(8192,), vs=(128256,), ks=(64, 1024), modes=("fwd",),
             providers=("torch-eager", "fastkd-triton", "fastkd-torch")),
    ),
    # Fused linear + KD loss on a GPU: the LM head matmuls and the loss, against the loss on
    # materialised logits and Liger's LigerFusedLinearJSD (peak memory and matmul TFLOP/s).
    "fused-linear": (
        Grid(ops=("fused_linear_kd",), divergences=("kl", "jsd"), dtypes=("bf16",), ns=(8192, 16384),
             vs=(128256, 262144), hs=(4096,), providers=FUSED_LINEAR_PROVIDERS),
    ),
    # The same on a CPU (minutes: every call is 1 TFLOP of float32 matmuls).
    "cpu-fused-linear": (
        Grid(ops=("fused_linear_kd",), ns=(4096,), vs=(32000,), hs=(1024,),
             providers=("torch-eager", "fastkd-unfused", "fastkd-torch")),
    ),
    # Fused linear JSD against TRL's chunked divergence (trl.DistillationTrainer's loss), fp32, at
    # Llama-2's and Llama-3's vocabulary and hidden sizes (CPU: minutes per case; not in "cpu").
    "trl": (
        Grid(ops=("fused_linear_kd",), divergences=("jsd",), ns=(2048,), vs=(32000,), hs=(1024,),
             providers=("fastkd-torch", "trl")),
        Grid(ops=("fused_linear_kd",), divergences=("jsd",), ns=(2048,), vs=(128256,), hs=(2048,),
             providers=("fastkd-torch", "trl")),
    ),
    # ULD across vocabularies against TRL's GOLD, fp32, at Llama-2's and Qwen's vocabulary sizes: exact
    # and top-64, the gradient returned (fastkd-inplace: written into the logits). CPU: minutes.
    "uld": (
        Grid(ops=ULD_OPS, ns=(256,), vs=(32000, 151936), ks=(64,), providers=ULD_PROVIDERS),
    ),
    # Everything on a GPU (hours, mostly torch.compile warm-ups).
    "full": (
        Grid(ops=("kd_loss", "softmax", "log_softmax"), divergences=DIVERGENCES, dtypes=("bf16", "fp32"),
             ns=(1024, 4096, 8192, 16384), vs=GPU_VS, modes=MODES),
        Grid(ops=TOPK_OPS, dtypes=("bf16", "fp32"), ns=(1024, 8192), vs=(32000, 128256), ks=(16, 64, 256, 1024),
             modes=MODES),
        Grid(ops=("fused_linear_kd",), divergences=DIVERGENCES, dtypes=("bf16",), ns=(8192, 16384),
             vs=(128256, 262144), hs=(4096,)),
    ),
    # The same table at CPU sizes (an hour).
    "cpu-full": (
        Grid(ops=("kd_loss", "softmax", "log_softmax"), divergences=DIVERGENCES, ns=(256, 1024, 4096),
             vs=(8192, 32000, 50257, 128256), modes=MODES),
        Grid(ops=TOPK_OPS, ns=(32, 256), vs=(32000, 128256), ks=(16, 128, 1024), modes=MODES),
        Grid(ops=("fused_linear_kd",), divergences=DIVERGENCES, ns=(1024, 4096), vs=(32000,), hs=(1024,)),
    ),
    # Tiny shapes that exercise every op and code path in seconds (CI smoke run, tests).
    "smoke": (
        Grid(ns=(16,), vs=(64, 100)),
        Grid(divergences=("jsd",), ns=(16,), vs=(64,), modes=("fwd", "bwd")),
        Grid(ops=("softmax",), ns=(16,), vs=(64,)),
        Grid(ops=("topk_kd_loss",), ns=(16,), vs=(100,), ks=(8,)),
        Grid(ops=("teacher_topk",), ns=(16,), vs=(100,), ks=(8,), modes=("fwd",)),
        Grid(ops=("fused_linear_kd",), divergences=("kl", "jsd"), ns=(16,), vs=(100,), hs=(8,)),
    ),
}

# Command-line option -> Grid field it replaces.
OVERRIDABLE = {"ops": "ops", "divergences": "divergences", "dtypes": "dtypes", "n": "ns", "v": "vs", "k": "ks",
               "h": "hs", "modes": "modes"}


def default_preset(device):
    return "headline" if torch.device(device).type == "cuda" else "cpu"


def select_cases(presets, **overrides):
    """The cases of ``presets`` (a name or a list of names, run in that order) with each given
    override (a list, or None to keep the preset's) replacing that field in every grid; duplicates
    dropped (the first grid's providers kept), order kept."""
    presets = [presets] if isinstance(presets, str) else list(presets)
    for preset in presets:
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(sorted(PRESETS))}, got {preset!r}")
    changes = {}
    for option, values in overrides.items():
        if option not in OVERRIDABLE:
            raise ValueError(f"unknown case option {option!r}")
        if values:
            changes[OVERRIDABLE[option]] = tuple(values)
    _check(changes)
    cases = {}
    for preset in presets:
        for grid in PRESETS[preset]:
            for case in replace(grid, **changes).cases():
                cases.setdefault(case, case)
    return list(cases.values())


def _check(changes):
    allowed = {"ops": OPS, "divergences": DIVERGENCES, "dtypes": tuple(DTYPES), "modes": MODES}
    for field_name, choices in allowed.items():
        for value in changes.get(field_name, ()):
            if value not in choices:
                raise ValueError(f"{field_name}: {value!r} is not one of {', '.join(choices)}")
    for field_name in ("ns", "vs", "ks", "hs"):
        for value in changes.get(field_name, ()):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{field_name[0]}: sizes must be positive integers, got {value!r}")
