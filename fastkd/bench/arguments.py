"""The command line of ``fastkd bench``: its arguments and default output folder, without torch.

``fastkd --help`` and ``fastkd bench --help`` parse with this module alone (``fastkd.cli``), so it
imports nothing heavy. The ops, modes and rounds are declared here (cases.py and runner.py import
them); the names of the presets, dtypes and providers, which cases.py and providers.py define with
torch objects, are repeated here, and ``tests/test_cli.py`` checks that each list equals its
registry.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

PRESETS = ("cpu", "small", "headline", "fused-linear", "cpu-fused-linear", "trl", "uld", "full", "cpu-full", "smoke")
OPS = ("kd_loss", "kd_loss_ce", "softmax", "log_softmax", "topk_kd_loss", "teacher_topk", "fused_linear_kd", "uld",
       "uld_topk")
DTYPES = ("bf16", "fp16", "fp32")
MODES = ("fwd", "bwd", "fwd+bwd")
PROVIDERS = ("torch-eager", "fastkd-triton", "fastkd-torch", "fastkd-unfused", "torch-compile", "liger", "trl",
             "fastkd-inplace")
MIN_ROUNDS = 3  # CPU: alternating rounds per case at least (--rounds; runner.py)


def default_out():
    """``bench/results/local/`` of the checkout fastkd runs from (git-ignored); for an installed
    copy, ``$XDG_CACHE_HOME/fastkd/bench`` (``~/.cache/fastkd/bench``): never the working directory.
    ``fastkd audit`` writes there too."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").exists() and (root / "bench").is_dir():
        return root / "bench" / "results" / "local"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "fastkd" / "bench"


def add_arguments(parser):
    parser.add_argument("--preset", nargs="+", metavar="P",
                        help=f"case sets, run in order: {', '.join(PRESETS)} (default: 'headline' on a GPU, "
                             "'cpu' otherwise)")
    parser.add_argument("--ops", nargs="+", metavar="OP", help=f"replace the preset's ops: {', '.join(OPS)}")
    parser.add_argument("--divergences", nargs="+", metavar="D", help="replace the preset's divergences")
    parser.add_argument("--n", nargs="+", metavar="N", help="replace the preset's row counts (tokens)")
    parser.add_argument("--v", nargs="+", metavar="V", help="replace the preset's vocabulary sizes")
    parser.add_argument("--k", nargs="+", metavar="K", help="replace the preset's top-k sizes (top-k ops)")
    parser.add_argument("--h", nargs="+", metavar="H", help="replace the preset's hidden sizes (fused_linear_kd)")
    parser.add_argument("--dtypes", nargs="+", metavar="DT", help=f"replace the preset's dtypes: {', '.join(DTYPES)}")
    parser.add_argument("--modes", nargs="+", metavar="M", help=f"replace the preset's modes: {', '.join(MODES)}")
    parser.add_argument("--providers", nargs="+", metavar="P",
                        help=f"providers of every case (default: each grid's, else all that run by default "
                             f"here): {', '.join(PROVIDERS)}, or fastkd-triton[KERNEL] for any fastkd.config.kd_kernel")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:K")
    parser.add_argument("--threads", type=int, metavar="K",
                        help="torch CPU threads (default: torch's choice); 1 steadies timings on a busy machine")
    parser.add_argument("--rounds", type=int, default=MIN_ROUNDS, metavar="R",
                        help=f"CPU: alternating rounds per case at least (default {MIN_ROUNDS})")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: bench/results/local/ of the checkout, git-ignored; "
                             "~/.cache/fastkd/bench for an installed fastkd)")
    parser.add_argument("--quick", "--smoke", action="store_true",
                        help="few repetitions and a small copy: checks that everything runs, numbers are rough")
    parser.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    parser.add_argument("--list", action="store_true", help="print the cases, their providers and what each "
                                                            "provider runs; run nothing")
    return parser


def build_parser(prog="fastkd bench"):
    parser = argparse.ArgumentParser(
        prog=prog, description="Benchmark fastkd against torch eager, torch.compile and Liger: time, "
        "speed-up, peak extra memory, GB/s and the fraction of the copy bandwidth measured in the same run.")
    return add_arguments(parser)
