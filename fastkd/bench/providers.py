"""The one registry of benchmark providers: fastkd per backend (and per variant of its dense Triton
kernel, and ``fastkd-inplace``: the gradient written into the logits), the eager PyTorch idiom, its
``torch.compile``, and Liger and TRL (its chunked divergence, for the fused linear loss; GOLD's ULD
loss, for the uld ops) when installed.

Every provider of a case computes the same number: the eager idioms of ``fastkd.divergences`` fix the convention
(forward KL as users write it today, T**2-scaled; JSD as TRL's generalized JSD, unscaled), and
fastkd is called with the matching ``t2_scale``. A provider's ``make(case)`` returns the forward
function, called with the case's inputs (see ``runner.make_inputs``), or None when it has no
implementation of that case; ``describe(case)`` says in one line what that function runs (the
legend ``fastkd bench`` prints). Optional packages are imported inside ``make`` only.

Variants of the dense Triton kernel: ``fastkd-triton[KERNEL]`` runs fastkd-triton with
``fastkd.config.kd_kernel`` set to KERNEL around every call (``fastkd.config.override``); a name the
config refuses (ValueError) or a kernel that cannot run the case (NotImplementedError) makes the
variant unavailable, and the runner checks a variant's loss and gradients against fastkd-triton
before timing it.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import re
import shutil
import warnings
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import fastkd

from ..backends import interpreter_enabled, triton_installed
from ..divergences import lookup
from .cases import BETA, CE_TEMPERATURE, CE_WEIGHT, KD_KERNELS, SKEW, TEMPERATURE, ULD_OPS, Case

REFUSED = (ValueError, NotImplementedError)  # how the config or the launcher says it has no such kernel


def t2_scale(divergence):
    """Whether the divergence's eager idiom (and so every provider of its cases) scales by T**2."""
    return lookup(divergence).eager_t2_scale


# ----------------------------------------------------------------------------------------- eager idioms
def eager_kd_loss(divergence: str, T: float = TEMPERATURE) -> Callable:
    """The plain PyTorch a user writes for the divergence (the registry's idiom, ``batchmean`` over
    the N rows), or its textbook formula where the registry gives no idiom."""
    entry = lookup(divergence)
    if entry.eager is None:
        return lambda s, t: fastkd.reference.kd_loss(s, t, temperature=T, divergence=divergence, beta=BETA, skew=SKEW)
    a = entry.parameter_value(beta=BETA, skew=SKEW)
    return lambda s, t: entry.eager(s, t, T, a)


def eager_kd_loss_ce(divergence: str) -> Callable:
    """The soft loss at CE_TEMPERATURE plus the cross-entropy at T = 1, CE_WEIGHT each."""
    soft = eager_kd_loss(divergence, CE_TEMPERATURE)
    return lambda s, t, labels: CE_WEIGHT * soft(s, t) + CE_WEIGHT * F.cross_entropy(s, labels)


def eager_softmax(op: str, T: float = TEMPERATURE) -> Callable:
    fn = torch.softmax if op == "softmax" else torch.log_softmax
    return lambda x: fn(x / T, dim=-1)


def eager_topk_kd_loss(student, logprobs, indices, T: float = TEMPERATURE):
    """Forward KL against a top-k teacher with a bucket tail, as written by hand: log_softmax over
    V, gather the k listed tokens, the tail's mass by log1p; autograd keeps every [N, V] step."""
    log_q = torch.log_softmax(student.float() / T, -1)
    log_q_k = log_q.gather(-1, indices.long())
    log_q_tail = torch.log1p(-log_q_k.exp().sum(-1).clamp(max=1 - 1e-7))
    p = logprobs.exp()
    p_tail = (1 - p.sum(-1)).clamp_min(0)
    listed = (p * (logprobs - log_q_k)).sum(-1)
    tail = torch.where(p_tail > 0, p_tail * (p_tail.clamp_min(1e-30).log() - log_q_tail), 0.0)
    return (listed + tail).mean() * T**2


def eager_teacher_topk(k: int, T: float = TEMPERATURE) -> Callable:
    def extract(teacher):
        t = teacher.float() / T
        values, indices = torch.topk(t, k, dim=-1)
        return values - torch.logsumexp(t, -1, keepdim=True), indices.int()

    return extract


def eager_uld(s, t, T: float = TEMPERATURE):
    """Exact ULD as plain PyTorch (GOLD's formula without its loop over samples): both softmaxes
    sorted, the L1 of the sorted rows summed, over the N rows (one vocabulary size here: no padding)."""
    q = torch.softmax(s / T, -1).sort(-1, descending=True).values
    p = torch.softmax(t / T, -1).sort(-1, descending=True).values
    return (q - p).abs().sum() / s.shape[0]


def eager_forward(case: Case) -> Optional[Callable]:
    """The eager idiom of ``case`` (None where there is none: top-k losses other than kl)."""
    if case.op == "kd_loss":
        return eager_kd_loss(case.divergence)
    if case.op == "kd_loss_ce":
        return eager_kd_loss_ce(case.divergence)
    if case.op in ("softmax", "log_softmax"):
        return eager_softmax(case.op)
    if case.op == "topk_kd_loss":
        return eager_topk_kd_loss if case.divergence == "kl" else None
    if case.op == "teacher_topk":
        return eager_teacher_topk(case.k)
    if case.op in ULD_OPS:
        return eager_uld
    loss = eager_kd_loss(case.divergence)
    return lambda h, W, th, Wt: loss(h @ W.T, th @ Wt.T)


def _eager_formula(divergence):
    return lookup(divergence).eager_formula or f"fastkd.reference.kd_loss(s, t, T, divergence={divergence!r})"


def describe_eager(case: Case) -> Optional[str]:
    if case.op == "kd_loss":
        return _eager_formula(case.divergence)
    if case.op == "kd_loss_ce":
        return f"{CE_WEIGHT}·({_eager_formula(case.divergence)}, T = {CE_TEMPERATURE:g}) + {CE_WEIGHT}·cross_entropy(s, labels)"
    if case.op in ("softmax", "log_softmax"):
        return f"{case.op}(x/T)"
    if case.op == "topk_kd_loss":
        return ("log_softmax(s/T) gathered at the k indices, tail log1p(−Σ q_k), "
                "Σ p (log p − log q) over the k + tail, mean·T²") if case.divergence == "kl" else None
    if case.op == "teacher_topk":
        return "topk(t/T, k) − logsumexp(t/T)"
    if case.op in ULD_OPS:
        return "Σ |sort(softmax(s/T)) − sort(softmax(t/T))| / N: exact ULD (uld_topk: the reference of its error)"
    return f"{_eager_formula(case.divergence)} on s = h @ W.T, t = h_t @ W_t.T"


# ----------------------------------------------------------------------------------------- fastkd
def _kd_options(case, backend):
    return dict(temperature=TEMPERATURE, divergence=case.divergence, beta=BETA, skew=SKEW,
                t2_scale=t2_scale(case.divergence), backend=backend)


def _fastkd(backend):
    def make(case: Case):
        if case.op == "kd_loss":
            options = _kd_options(case, backend)
            return lambda s, t: fastkd.kd_loss(s, t, **options)
        if case.op == "kd_loss_ce":
            options = dict(_kd_options(case, backend), temperature=CE_TEMPERATURE, hard_weight=CE_WEIGHT,
                           soft_weight=CE_WEIGHT)
            return lambda s, t, labels: fastkd.kd_loss(s, t, labels=labels, **options)
        if case.op in ("softmax", "log_softmax"):
            fn = fastkd.softmax if case.op == "softmax" else fastkd.log_softmax
            return lambda x: fn(x, TEMPERATURE, backend=backend)
        if case.op == "topk_kd_loss":
            options = _kd_options(case, backend)
            return lambda s, logprobs, indices: fastkd.topk_kd_loss(s, logprobs, indices, tail="bucket", **options)
        if case.op == "teacher_topk":
            return lambda t: fastkd.teacher_topk(t, case.k, temperature=TEMPERATURE, backend=backend)
        if case.op in ULD_OPS:
            return _fastkd_uld(case, backend)
        options = _kd_options(case, backend)
        return lambda h, W, th, Wt: fastkd.fused_linear_kd_loss(h, W, th, Wt, **options)

    return make


def _fastkd_uld(case, backend, inplace=False):
    """``fastkd.uld_loss`` of a uld case (None for the exact mode on Triton, which has no kernel for it)."""
    if case.op == "uld" and backend == "triton":
        return None
    k = case.k if case.op == "uld_topk" else None
    return lambda s, t: fastkd.uld_loss(s, t, k=k, temperature=TEMPERATURE, inplace=inplace, backend=backend)


def _describe_fastkd(backend):
    how = {"torch": "the chunked PyTorch backend", "triton": "the fused Triton kernels"}[backend]

    def describe(case: Case):
        scale = f"divergence={case.divergence!r}, t2_scale={t2_scale(case.divergence)}, " if case.divergence else ""
        call = {
            "kd_loss": f"fastkd.kd_loss(s, t, T, {scale}backend={backend!r})",
            "kd_loss_ce": f"fastkd.kd_loss(s, t, T={CE_TEMPERATURE:g}, {scale}labels=labels, "
                          f"hard_weight={CE_WEIGHT}, soft_weight={CE_WEIGHT}, backend={backend!r})",
            "softmax": f"fastkd.softmax(x, T, backend={backend!r})",
            "log_softmax": f"fastkd.log_softmax(x, T, backend={backend!r})",
            "topk_kd_loss": f'fastkd.topk_kd_loss(s, *teacher_topk(t, k, T), tail="bucket", {scale}'
                            f"backend={backend!r})",
            "teacher_topk": f"fastkd.teacher_topk(t, k, T, backend={backend!r})",
            "fused_linear_kd": f"fastkd.fused_linear_kd_loss(h, W, h_t, W_t, T, {scale}"
                               f"backend={backend!r}), the [N, V] logits never stored",
            "uld": None if backend == "triton" else f"fastkd.uld_loss(s, t, T, backend={backend!r}): exact",
            "uld_topk": f"fastkd.uld_loss(s, t, T, k, backend={backend!r}): top-K",
        }[case.op]
        if call is None:
            return None
        return f"{call}; {how}"

    return describe


def _fastkd_unfused(case: Case):
    if case.op != "fused_linear_kd":
        return None
    options = _kd_options(case, "auto")
    return lambda h, W, th, Wt: fastkd.kd_loss(h @ W.T, th @ Wt.T, **options)


def _describe_fastkd_unfused(case: Case):
    if case.op != "fused_linear_kd":
        return None
    return (f"fastkd.kd_loss(h @ W.T, h_t @ W_t.T, T, divergence={case.divergence!r}, "
            f"t2_scale={t2_scale(case.divergence)}, backend='auto'); the logits materialised")


def _fastkd_inplace(case: Case):
    """fastkd ("auto" backend) with ``inplace=True``, the student gradient written into the student's
    logits: before every call they are restored from a copy taken at the first call (timed, not
    counted in the peak memory: the copy exists before the measured call)."""
    if case.op == "kd_loss":
        options = _kd_options(case, "auto")
        loss = lambda s, t: fastkd.kd_loss(s, t, inplace=True, **options)  # noqa: E731
    elif case.op in ULD_OPS:
        loss = _fastkd_uld(case, "auto", inplace=True)
    else:
        return None
    pristine = []

    def forward(s, t):
        if not pristine:
            pristine.append(s.detach().clone())
        s.detach().copy_(pristine[0])
        return loss(s, t)

    return forward


def _describe_fastkd_inplace(case: Case):
    if case.op == "kd_loss":
        call = f"fastkd.kd_loss(s, t, T, divergence={case.divergence!r}, t2_scale={t2_scale(case.divergence)}"
    elif case.op in ULD_OPS:
        call = "fastkd.uld_loss(s, t, T" + (", k" if case.op == "uld_topk" else "")
    else:
        return None
    return f"{call}, inplace=True); the student's logits restored from a copy before each call (timed)"


# ----------------------------------------------------------------------------------------- torch.compile
def _compiled(case: Case):
    forward = eager_forward(case)
    if forward is None:
        return None
    torch._dynamo.reset()  # a fresh cache per case: no recompile limit, no silent eager fallback
    try:
        import torch._functorch.config as functorch_config
    except ImportError:
        functorch_config = None
    if hasattr(functorch_config, "donated_buffer"):
        # The bwd mode runs one graph's backward again and again (retain_graph=True), which a
        # backward compiled with donated buffers refuses; other modes keep torch's default.
        functorch_config.donated_buffer = case.mode != "bwd"
    return torch.compile(forward, dynamic=False)


def _describe_compiled(case: Case):
    return None if describe_eager(case) is None else "torch.compile(torch-eager's function, dynamic=False)"


# ----------------------------------------------------------------------------------------- Liger
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
    if case.op == "fused_linear_kd" and case.divergence in ("kl", "jsd"):
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

        try:  # jsd_beta = 0 is forward KL where Liger allows it (older versions assert 0 < beta < 1)
            loss = LigerFusedLinearJSD(jsd_beta=BETA if case.divergence == "jsd" else 0.0, temperature=T)
        except AssertionError:
            return None
        no_labels = (None,) if "shift_labels" in inspect.signature(loss.forward).parameters else ()
        scale = T**2 if t2_scale(case.divergence) else 1.0
        return lambda h, W, th, Wt: loss(h, W, th, Wt, *no_labels) * scale
    return None


def _describe_liger(case: Case):
    if case.op == "kd_loss":
        return {"kl": 'LigerKLDIVLoss("batchmean")(log_softmax(s/T), softmax(t/T))·T²',
                "jsd": "LigerJSD(β)(log_softmax(s/T), log_softmax(t/T))",
                "tvd": 'LigerTVDLoss("batchmean")(softmax(s/T), softmax(t/T))'}.get(case.divergence)
    if case.op == "softmax":
        return "LigerSoftmax()(x/T)"
    if case.op == "fused_linear_kd":
        return {"kl": "LigerFusedLinearJSD(jsd_beta=0, temperature=T)(h, W, h_t, W_t)·T²",
                "jsd": "LigerFusedLinearJSD(jsd_beta=β, temperature=T)(h, W, h_t, W_t)"}.get(case.divergence)
    return None


# ----------------------------------------------------------------------------------------- TRL
# TRL's beta for each divergence its chunked divergence covers (its convention is fastkd's jsd).
TRL_BETA = {"kl": 0.0, "reverse_kl": 1.0, "jsd": BETA}


def _gold_uld(case: Case):
    """TRL's GOLD ``ULDLoss`` (trl.experimental.gold), exact, on one sample of N answer rows."""
    with warnings.catch_warnings():  # TRLExperimentalWarning: the module is experimental
        warnings.simplefilter("ignore")
        from trl.experimental.gold.gold_trainer import ULDLoss
    loss = ULDLoss(SimpleNamespace(
        uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=TEMPERATURE,
        uld_teacher_temperature=TEMPERATURE, uld_skip_student_eos=False, uld_skip_teacher_eos=False,
        use_extended_uld=False, uld_token_merge_strategy="observed"))

    def forward(s, t):
        ids = torch.zeros(1, s.shape[0], dtype=torch.long, device=s.device)  # labels and ids: every row an answer
        return loss(s[None], t[None], ids, ids, ids, ids)

    return forward


def _trl(case: Case):
    """TRL's ``_chunked_divergence_loss`` (trl.DistillationTrainer's loss), every row in the loss; for
    the uld ops, GOLD's ULD loss."""
    if case.op in ULD_OPS:
        return _gold_uld(case)
    if case.op != "fused_linear_kd" or case.divergence not in TRL_BETA:
        return None
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    beta, scale = TRL_BETA[case.divergence], TEMPERATURE**2 if t2_scale(case.divergence) else 1.0
    return lambda h, W, th, Wt: _chunked_divergence_loss(h, th, W, Wt, h.new_ones(h.shape[:-1]), beta,
                                                         temperature=TEMPERATURE)[0] * scale


def _describe_trl(case: Case):
    if case.op in ULD_OPS:
        return "trl.experimental.gold ULDLoss(s[None], t[None], ...), T on both sides: exact, a loop over samples"
    if case.op != "fused_linear_kd" or case.divergence not in TRL_BETA:
        return None
    scale = "·T²" if t2_scale(case.divergence) else ""
    return f"trl _chunked_divergence_loss(h, h_t, W, W_t, mask=1, beta={TRL_BETA[case.divergence]}, T){scale}"


# ----------------------------------------------------------------------------------------- availability
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


def _trl_runs(device):
    if importlib.util.find_spec("trl") is None:
        return "trl is not installed (optional: pip install trl)"
    return None


def _liger_runs(device):
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger_kernel is not installed (optional: pip install liger-kernel)"
    return None if torch.device(device).type == "cuda" else "needs a CUDA device"


# ----------------------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class Provider:
    name: str
    why_not: Callable[[object], Optional[str]]  # device -> None when it can run there, else why not
    make: Callable[[Case], Optional[Callable]]
    describe: Callable[[Case], Optional[str]]  # None exactly where make has no implementation
    default_on_cpu: bool = True
    default_on_gpu: bool = True
    kd_kernel: Optional[str] = None  # fastkd.config.kd_kernel around every call of the provider (None: as set)
    check_against: Optional[str] = None  # checked (loss, gradients) against this provider before timing

    def is_default(self, device):
        return self.default_on_gpu if torch.device(device).type == "cuda" else self.default_on_cpu


BASELINE = "torch-eager"
TRITON = "fastkd-triton"
VARIANT_NAME = re.compile(r"^fastkd-triton\[([A-Za-z0-9_]+)\]$")


def kernel_variant(kernel: str) -> Provider:
    """fastkd-triton with ``fastkd.config.kd_kernel = kernel`` around its calls, checked against fastkd-triton."""
    describe_triton = _describe_fastkd("triton")

    def make(case: Case):
        return _fastkd("triton")(case) if case.op in ("kd_loss", "fused_linear_kd") else None

    def describe(case: Case):
        if case.op not in ("kd_loss", "fused_linear_kd"):
            return None
        return f"{describe_triton(case)}, kd_kernel={kernel}"

    return Provider(f"{TRITON}[{kernel}]", _fastkd_triton_runs, make, describe, default_on_cpu=False,
                    default_on_gpu=False, kd_kernel=kernel, check_against=TRITON)


PROVIDERS = {p.name: p for p in (
    Provider(BASELINE, lambda device: None, eager_forward, describe_eager),
    # The default kernel, whatever fastkd.config.kd_kernel (or FASTKD_KD_KERNEL) says in the caller.
    Provider(TRITON, _fastkd_triton_runs, _fastkd("triton"), _describe_fastkd("triton"), default_on_cpu=False,
             kd_kernel="auto"),
    *(kernel_variant(kernel) for kernel in KD_KERNELS),
    Provider("fastkd-torch", lambda device: None, _fastkd("torch"), _describe_fastkd("torch")),
    Provider("fastkd-unfused", lambda device: None, _fastkd_unfused, _describe_fastkd_unfused),
    # On the CPU inductor compiles C++ for each shape (most of a minute on 2 cores): where a grid
    # of the preset names it, or on request.
    Provider("torch-compile", _compile_runs, _compiled, _describe_compiled, default_on_cpu=False),
    Provider("liger", _liger_runs, _liger, _describe_liger),
    Provider("trl", _trl_runs, _trl, _describe_trl),
    Provider("fastkd-inplace", lambda device: None, _fastkd_inplace, _describe_fastkd_inplace, default_on_cpu=False,
             default_on_gpu=False),
)}


def provider(name: str) -> Provider:
    """The registered provider ``name``, or a kernel variant ``fastkd-triton[KERNEL]`` of any name."""
    if name in PROVIDERS:
        return PROVIDERS[name]
    match = VARIANT_NAME.match(name)
    if match:
        return kernel_variant(match.group(1))
    raise ValueError(f"providers: unknown {name}; choose from {', '.join(PROVIDERS)} "
                     f"(or fastkd-triton[KERNEL] for any fastkd.config.kd_kernel value)")


def _ordered(names):
    registered = [n for n in PROVIDERS if n in names]
    return registered + [n for n in dict.fromkeys(names) if n not in PROVIDERS]


def select_providers(names, device, cases):
    """Which providers run each case: ``({case: [Provider]}, {name: why not})``.

    ``names`` (the command line's list) apply to every case; without them a case gets its grid's
    providers, or else every provider that runs by default on ``device``. A provider that cannot
    run on ``device`` is left out of every case, with the reason in the second result.
    """
    if names:
        explicit = _ordered(names)
        for name in explicit:
            provider(name)  # unknown names raise here, before anything runs
    defaults = [n for n, p in PROVIDERS.items() if p.is_default(device)]
    wanted = {case: explicit if names else _ordered(case.providers) if case.providers else defaults
              for case in cases}
    runs, skipped = {}, {}
    for name in _ordered([n for case_names in wanted.values() for n in case_names]):
        why = provider(name).why_not(device)
        if why is None:
            runs[name] = provider(name)
        else:
            skipped[name] = why
    return {case: [runs[n] for n in case_names if n in runs] for case, case_names in wanted.items()}, skipped
