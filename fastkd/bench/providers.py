"""The one registry of benchmark providers: fastkd per backend, the eager PyTorch idiom, its
``torch.compile``, and Liger when installed.

Every provider of a case computes the same number: the eager idioms below fix the convention
(forward KL as users write it today, T**2-scaled; JSD as TRL's generalized JSD, unscaled), and
fastkd is called with the matching ``t2_scale``. A provider's ``make(case)`` returns the forward
function (``fn(student, teacher) -> loss`` for kd_loss, ``fn(x) -> y`` for softmax) or None when
it has no implementation of that case. Optional packages are imported inside ``make`` only.
"""
from __future__ import annotations

import importlib.util
import math
import shutil
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import fastkd

from ..backends import interpreter_enabled, triton_installed
from .cases import BETA, SKEW, TEMPERATURE, Case

# t2_scale per divergence, matching the idiom each divergence's eager formula follows.
T2_SCALE = {"kl": True, "reverse_kl": True, "skew_kl": True, "skew_reverse_kl": True,
            "jsd": False, "tvd": False}


def _log_mix(log_a, log_b, weight_a):
    """log(weight_a * a + (1 - weight_a) * b) from log a and log b."""
    return torch.logsumexp(torch.stack([log_a + math.log(weight_a), log_b + math.log(1 - weight_a)]), dim=0)


def eager_kd_loss(divergence: str, T: float = TEMPERATURE) -> Callable:
    """The plain PyTorch a user writes for each divergence (``batchmean`` over the N rows)."""

    def kl(s, t):
        return F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T**2

    def reverse_kl(s, t):
        return F.kl_div(F.log_softmax(t / T, -1), F.log_softmax(s / T, -1), reduction="batchmean",
                        log_target=True) * T**2

    def jsd(s, t):  # TRL's generalized_jsd_loss for 0 < beta < 1, rows of [N, V]
        ls, lt = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
        lm = _log_mix(lt, ls, BETA)
        kl_teacher = F.kl_div(lm, lt, reduction="none", log_target=True)
        kl_student = F.kl_div(lm, ls, reduction="none", log_target=True)
        return (BETA * kl_teacher + (1 - BETA) * kl_student).sum() / s.shape[0]

    def skew_kl(s, t):
        ls, lt = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
        return F.kl_div(_log_mix(lt, ls, SKEW), lt, reduction="batchmean", log_target=True) * T**2

    def skew_reverse_kl(s, t):
        ls, lt = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
        return F.kl_div(_log_mix(ls, lt, SKEW), ls, reduction="batchmean", log_target=True) * T**2

    def tvd(s, t):
        return 0.5 * (F.softmax(t / T, -1) - F.softmax(s / T, -1)).abs().sum() / s.shape[0]

    return {"kl": kl, "reverse_kl": reverse_kl, "jsd": jsd, "skew_kl": skew_kl,
            "skew_reverse_kl": skew_reverse_kl, "tvd": tvd}[divergence]


def eager_softmax(op: str, T: float = TEMPERATURE) -> Callable:
    fn = torch.softmax if op == "softmax" else torch.log_softmax
    return lambda x: fn(x / T, dim=-1)


def eager_forward(case: Case) -> Callable:
    return eager_kd_loss(case.divergence) if case.op == "kd_loss" else eager_softmax(case.op)


def _fastkd(backend):
    def make(case: Case):
        if case.op == "kd_loss":
            options = dict(temperature=TEMPERATURE, divergence=case.divergence, beta=BETA, skew=SKEW,
                           t2_scale=T2_SCALE[case.divergence], backend=backend)
            return lambda s, t: fastkd.kd_loss(s, t, **options)
        fn = fastkd.softmax if case.op == "softmax" else fastkd.log_softmax
        return lambda x: fn(x, TEMPERATURE, backend=backend)

    return make


def _compiled(case: Case):
    torch._dynamo.reset()  # a fresh cache per case: no recompile limit, no silent eager fallback
    try:
        import torch._functorch.config as functorch_config
    except ImportError:
        functorch_config = None
    if hasattr(functorch_config, "donated_buffer"):
        # The bwd mode runs one graph's backward again and again (retain_graph=True), which a
        # backward compiled with donated buffers refuses; other modes keep torch's default.
        functorch_config.donated_buffer = case.mode != "bwd"
    return torch.compile(eager_forward(case), dynamic=False)


def _liger(case: Case):
    T = TEMPERATURE
    if case.op == "kd_loss" and case.divergence == "kl":
        from liger_kernel.transformers.kl_div import LigerKLDIVLoss

        loss = LigerKLDIVLoss(reduction="batchmean")
        return lambda s, t: loss(F.log_softmax(s / T, -1), F.softmax(t / T, -1)) * T**2
    if case.op == "kd_loss" and case.divergence == "jsd":
        from liger_kernel.transformers.jsd import LigerJSD

        loss = LigerJSD(beta=BETA)
        return lambda s, t: loss(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1))
    if case.op == "kd_loss" and case.divergence == "tvd":
        try:
            from liger_kernel.transformers.tvd import LigerTVDLoss
        except ImportError:
            return None
        loss = LigerTVDLoss(reduction="batchmean")
        return lambda s, t: loss(F.softmax(s / T, -1), F.softmax(t / T, -1))
    if case.op == "softmax":
        try:
            from liger_kernel.transformers.softmax import LigerSoftmax
        except ImportError:
            return None
        softmax = LigerSoftmax()
        return lambda x: softmax(x / T)
    return None


def _needs_cuda(device):
    return None if torch.device(device).type == "cuda" else "needs a CUDA device"


def _fastkd_triton_runs(device):
    if not triton_installed():
        return "triton is not installed"
    if torch.device(device).type == "cuda":
        return None
    # The interpreter runs the kernels on the CPU, about 1000x slower: only for tiny shapes, on request.
    if interpreter_enabled():
        return None
    return "needs a CUDA device (or TRITON_INTERPRET=1 for tiny shapes)"


def _compile_runs(device):
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if torch.device(device).type == "cuda":
        return None if triton_installed() else "torch.compile on CUDA needs triton"
    if not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
        return "torch.compile on the CPU needs a C++ compiler"
    return None


def _liger_runs(device):
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger_kernel is not installed (optional: pip install liger-kernel)"
    return _needs_cuda(device)


@dataclass(frozen=True)
class Provider:
    name: str
    why_not: Callable[[object], Optional[str]]  # device -> None when it can run there, else why not
    make: Callable[[Case], Optional[Callable]]
    default_on_cpu: bool = True


BASELINE = "torch-eager"

PROVIDERS = {p.name: p for p in (
    Provider(BASELINE, lambda device: None, eager_forward),
    Provider("fastkd-triton", _fastkd_triton_runs, _fastkd("triton"), default_on_cpu=False),
    Provider("fastkd-torch", lambda device: None, _fastkd("torch")),
    # On the CPU inductor compiles C++ for each shape (a minute on 2 cores): on request only.
    Provider("torch-compile", _compile_runs, _compiled, default_on_cpu=False),
    Provider("liger", _liger_runs, _liger),
)}


def select_providers(names, device):
    """(providers that will run, {name: why not} for those asked for or defaulted that cannot)."""
    on_cpu = torch.device(device).type != "cuda"
    if names:
        unknown = [n for n in names if n not in PROVIDERS]
        if unknown:
            raise ValueError(f"providers: unknown {', '.join(unknown)}; choose from {', '.join(PROVIDERS)}")
        wanted = [PROVIDERS[n] for n in PROVIDERS if n in names]
    else:
        wanted = list(PROVIDERS.values())
    ready, skipped = [], {}
    for provider in wanted:
        why = provider.why_not(device)
        if why is None and not names and on_cpu and not provider.default_on_cpu:
            why = f"not by default on the CPU (ask with --providers {provider.name})"
        if why is None:
            ready.append(provider)
        else:
            skipped[provider.name] = why
    return ready, skipped
