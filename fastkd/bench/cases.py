"""The one table of benchmark cases: what is measured, at which shapes, in which presets.

A case is one op at one shape, dtype and mode. A preset is a list of grids (cartesian products of
ops x divergences x dtypes x N x V x modes); command-line options replace a field in every grid.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import torch

from ..options import DIVERGENCES

OPS = ("kd_loss", "softmax", "log_softmax")
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Options every provider of a case uses, so that they all compute the same number.
TEMPERATURE = 2.0
BETA = 0.5  # jsd: symmetric, so every library's convention for beta gives the same value
SKEW = 0.1


@dataclass(frozen=True)
class Case:
    op: str
    divergence: str  # "" for softmax / log_softmax
    dtype: str
    n: int
    v: int
    mode: str

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]

    @property
    def name(self):
        op = f"{self.op}/{self.divergence}" if self.divergence else self.op
        return f"{op} {self.dtype} {self.mode} N={self.n} V={self.v}"


@dataclass(frozen=True)
class Grid:
    ops: tuple = ("kd_loss",)
    divergences: tuple = ("kl",)
    dtypes: tuple = ("fp32",)
    ns: tuple = (1024,)
    vs: tuple = (32000,)
    modes: tuple = ("fwd+bwd",)

    def cases(self):
        for op, dtype, n, v, mode in itertools.product(self.ops, self.dtypes, self.ns, self.vs, self.modes):
            for divergence in self.divergences if op == "kd_loss" else ("",):
                yield Case(op, divergence, dtype, n, v, mode)


_OTHER_DIVERGENCES = tuple(d for d in DIVERGENCES if d != "kl")
GPU_VS = (32000, 50257, 128256, 151936, 262144)

PRESETS = {
    # CPU-only machines, about a minute on 2 cores. The first grid is the README's CPU figure
    # (issue 2 item 5): the torch backend against the eager idiom at N = 4096, V = 32000, fp32.
    "cpu": (
        Grid(ns=(4096,), vs=(32000,)),
        Grid(ns=(256,), vs=(8192, 32000, 128256)),
        Grid(divergences=_OTHER_DIVERGENCES, ns=(256,), vs=(32000,)),
        Grid(ops=("softmax", "log_softmax"), ns=(256,), vs=(32000,)),
    ),
    # The headline GPU cases of issue 5 (H200 targets): bf16, N = 8192.
    "headline": (
        Grid(dtypes=("bf16",), ns=(8192,), vs=(32000, 128256, 262144)),
        Grid(divergences=_OTHER_DIVERGENCES, dtypes=("bf16",), ns=(8192,), vs=(128256,)),
        Grid(ops=("softmax",), dtypes=("bf16",), ns=(8192,), vs=(32000, 128256, 262144), modes=("fwd", "bwd")),
    ),
    # The whole table of issue 4 on a GPU (hours, mostly torch.compile warm-ups).
    "full": (
        Grid(ops=OPS, divergences=DIVERGENCES, dtypes=("bf16", "fp32"), ns=(1024, 4096, 8192, 16384),
             vs=GPU_VS, modes=MODES),
    ),
    # The same table at CPU sizes (several minutes).
    "cpu-full": (
        Grid(ops=OPS, divergences=DIVERGENCES, dtypes=("fp32",), ns=(256, 1024, 4096),
             vs=(8192, 32000, 50257, 128256), modes=MODES),
    ),
    # Tiny shapes that exercise every code path in seconds (CI smoke run, tests).
    "smoke": (
        Grid(ns=(16,), vs=(64, 100)),
        Grid(divergences=("jsd",), ns=(16,), vs=(64,), modes=("fwd", "bwd")),
        Grid(ops=("softmax",), ns=(16,), vs=(64,)),
    ),
}

# Command-line option -> Grid field it replaces.
OVERRIDABLE = {"ops": "ops", "divergences": "divergences", "dtypes": "dtypes", "n": "ns", "v": "vs",
               "modes": "modes"}


def default_preset(device):
    return "headline" if torch.device(device).type == "cuda" else "cpu"


def select_cases(preset, **overrides):
    """The cases of ``preset`` with each given override (a list, or None to keep the preset's)
    replacing that field in every grid; duplicates dropped, order kept."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    changes = {}
    for option, values in overrides.items():
        if option not in OVERRIDABLE:
            raise ValueError(f"unknown case option {option!r}")
        if values:
            changes[OVERRIDABLE[option]] = tuple(values)
    _check(changes)
    cases = {}
    for grid in PRESETS[preset]:
        for case in replace(grid, **changes).cases():
            cases.setdefault(case, None)
    return list(cases)


def _check(changes):
    allowed = {"ops": OPS, "divergences": DIVERGENCES, "dtypes": tuple(DTYPES), "modes": MODES}
    for field, choices in allowed.items():
        for value in changes.get(field, ()):
            if value not in choices:
                raise ValueError(f"{field}: {value!r} is not one of {', '.join(choices)}")
    for field in ("ns", "vs"):
        for value in changes.get(field, ()):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{field[0]}: sizes must be positive integers, got {value!r}")
