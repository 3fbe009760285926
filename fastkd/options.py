"""The options of every entry point and their static checks.

Every check here looks at shapes, dtypes, devices and Python scalars only: nothing reads tensor
values, so validation never synchronises with the device (``fastkd.checks`` holds the checks that
read values).

The names of DIVERGENCES and TAILS are also the kernels' integer codes, by position: the kernels
define the same order as constexprs (``kernels/divergences.py``, ``kernels/topk_kd_loss.py``), and
a test checks the correspondence.
"""
import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch

DIVERGENCES = ("kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")
# kl and reverse_kl know D after the first pass over a row, from a cross term summed against the
# maximum of t (kl) or of s (reverse_kl); the other divergences need the row scalars A1, A2, summed
# once both log-sum-exps are known (a second pass, or a third exchange in the vocab-parallel loss).
CROSS_TERM_SIDE = {"kl": "teacher", "reverse_kl": "student"}
TAILS = ("bucket", "renormalize", "ignore")
REDUCTIONS = ("batchmean", "sum", "mean", "none")
BACKENDS = ("auto", "triton", "torch")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class KDOptions:
    """What the kernels (and their torch peers) compute per row; the reduction is ``Reduction``'s."""
    temperature: float = 1.0
    divergence: str = "kl"
    beta: float = 0.5
    skew: float = 0.1
    hard_weight: float = 0.0
    soft_weight: float = 1.0
    t2_scale: bool = True
    ignore_index: int = -100
    teacher_temperature: Optional[float] = None  # None: the student's temperature

    @property
    def teacher_T(self):
        return self.temperature if self.teacher_temperature is None else self.teacher_temperature

    @property
    def divergence_code(self):
        return DIVERGENCES.index(self.divergence)

    @property
    def soft_scale(self):
        """Factor on the divergence: soft_weight, times T**2 (the student's T) when t2_scale."""
        return self.soft_weight * (self.temperature**2 if self.t2_scale else 1.0)

    @property
    def has_cross_term(self):
        return self.divergence in CROSS_TERM_SIDE

    def mixture_weights(self):
        """(mix_weight, log w_p, log w_q) of the mixture M = w_p p + w_q q this divergence uses."""
        if self.divergence == "jsd":
            mix, w_p, w_q = self.beta, self.beta, 1.0 - self.beta
        elif self.divergence == "skew_kl":
            mix, w_p, w_q = self.skew, self.skew, 1.0 - self.skew
        elif self.divergence == "skew_reverse_kl":
            mix, w_p, w_q = self.skew, 1.0 - self.skew, self.skew
        else:
            return 0.0, 0.0, 0.0
        log = lambda w: math.log(w) if w > 0 else float("-inf")  # noqa: E731
        return mix, log(w_p), log(w_q)


@dataclass(frozen=True)
class Reduction:
    """How the per-row losses become the loss: ``kind`` one of REDUCTIONS, and the gradient
    accumulation count that replaces the kept-row count (None, a number, or a 0-d tensor)."""
    kind: str = "batchmean"
    num_items_in_batch: object = None


def _real(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not -math.inf < value < math.inf:  # not math.isfinite: comparisons trace under torch.compile
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}")
    return value


def check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_temperature(temperature, name="temperature"):
    temperature = _real(name, temperature)
    if temperature <= 0:
        raise ValueError(f"{name} must be > 0, got {temperature}")
    return temperature


def check_backend(backend):
    return _choice("backend", backend, BACKENDS)


def check_tail(tail):
    return _choice("tail", tail, TAILS)


def make_options(*, temperature=1.0, divergence="kl", beta=0.5, skew=0.1, ignore_index=-100,
                 hard_weight=0.0, soft_weight=1.0, t2_scale=True, teacher_temperature=None):
    """Validate the per-row KD options and return them as ``KDOptions``."""
    divergence = _choice("divergence", divergence, DIVERGENCES)
    beta, skew = _real("beta", beta), _real("skew", skew)
    if divergence == "jsd" and beta in (0.0, 1.0):
        other = "kl" if beta == 0.0 else "reverse_kl"
        raise ValueError(
            f"beta={beta} makes the generalized JSD identically 0; use divergence={other!r} "
            "for the endpoint (TRL switches to unscaled KL there silently)")
    if divergence == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1) for divergence='jsd', got {beta}")
    if divergence in ("skew_kl", "skew_reverse_kl") and not 0.0 <= skew < 1.0:
        raise ValueError(f"skew must be in [0, 1) for divergence={divergence!r}, got {skew}")
    hard_weight, soft_weight = _real("hard_weight", hard_weight), _real("soft_weight", soft_weight)
    if hard_weight < 0 or soft_weight < 0:
        raise ValueError(f"hard_weight and soft_weight must be >= 0, got {hard_weight} and {soft_weight}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    check_bool("t2_scale", t2_scale)
    if teacher_temperature is not None:
        teacher_temperature = check_temperature(teacher_temperature, "teacher_temperature")
    return KDOptions(check_temperature(temperature), divergence, beta, skew, hard_weight, soft_weight,
                     t2_scale, int(ignore_index), teacher_temperature)


def make_reduction(reduction="batchmean", num_items_in_batch=None):
    """Validate ``reduction`` and ``num_items_in_batch`` and return them as ``Reduction``.

    ``num_items_in_batch``: None, a real number >= 0, or a one-element real tensor (never read, so
    no synchronisation), kept as a number or a 0-d tensor. It replaces the kept-row count that
    ``"batchmean"`` (and ``"mean"``, times V) divides by; other reductions have no normaliser."""
    reduction = _choice("reduction", reduction, REDUCTIONS)
    if num_items_in_batch is None:
        return Reduction(reduction)
    if reduction not in ("batchmean", "mean"):
        raise ValueError(f"num_items_in_batch replaces the normaliser of reduction='batchmean' (or 'mean'); "
                         f"reduction={reduction!r} has none: drop num_items_in_batch or change the reduction")
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(f"num_items_in_batch must be a number or a one-element tensor, got shape "
                             f"{tuple(num_items_in_batch.shape)}")
        if num_items_in_batch.dtype == torch.bool or num_items_in_batch.is_complex():
            raise TypeError(f"num_items_in_batch must hold a real number, got {num_items_in_batch.dtype}")
        return Reduction(reduction, num_items_in_batch.detach().reshape(()))
    value = _real("num_items_in_batch", num_items_in_batch)
    if value < 0:
        raise ValueError(f"num_items_in_batch must be >= 0, got {num_items_in_batch}")
    return Reduction(reduction, num_items_in_batch)


def check_dim(x, dim):
    """``dim`` must index one of ``x``'s dimensions (negative counts from the end)."""
    if not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim!r} is not a dimension of a {x.dim()}-d tensor")
    return dim


def check_logits(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{name} must have a vocabulary dimension, got a 0-d tensor")


def check_teacher_constant(name, x):
    if x.requires_grad:
        raise ValueError(f"{name} requires grad; the teacher is a constant: pass {name}.detach()")


def check_kd_inputs(student, teacher, labels, opts: KDOptions):
    """Check the tensors of a KD loss call against each other and the options."""
    check_logits("student_logits", student)
    check_logits("teacher_logits", teacher)
    if student.shape != teacher.shape:
        raise ValueError(f"student_logits shape {tuple(student.shape)} and teacher_logits shape "
                         f"{tuple(teacher.shape)} differ")
    if student.device != teacher.device:
        raise ValueError(f"student_logits is on {student.device} and teacher_logits on {teacher.device}")
    check_teacher_constant("teacher_logits", teacher)
    if student.shape[-1] == 0:
        raise ValueError("student_logits has an empty vocabulary dimension (V = 0)")
    check_labels(student, labels, opts)


def check_labels(student, labels, opts: KDOptions, *, name="student_logits"):
    """Check ``labels`` (or None) against the leading dims and device of ``student`` (the logits
    ``[..., V]``, or ``name``d another ``[..., X]`` tensor of the same rows) and the options."""
    if labels is None:
        if opts.hard_weight > 0:
            raise ValueError(f"hard_weight={opts.hard_weight} needs labels")
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype not in INDEX_DTYPES:
        raise TypeError(f"labels must be int64 (or int32), got {labels.dtype}")
    if labels.shape != student.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match the leading dims "
                         f"{tuple(student.shape[:-1])} of {name}")
    if labels.device != student.device:
        raise ValueError(f"labels is on {labels.device} and {name} on {student.device}")


def check_k(k, V):
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= V:
        raise ValueError(f"k must be in [1, V] = [1, {V}], got {k}")
    return int(k)


def check_topk_inputs(student, logprobs, indices):
    """Check a student ``[..., V]`` against a top-k teacher ``logprobs``/``indices`` ``[..., k]``."""
    check_logits("student_logits", student)
    check_logits("teacher_logprobs", logprobs)
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"teacher_indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"teacher_indices must be int32 or int64, got {indices.dtype}")
    if logprobs.shape != indices.shape:
        raise ValueError(f"teacher_logprobs shape {tuple(logprobs.shape)} and teacher_indices shape "
                         f"{tuple(indices.shape)} differ")
    if logprobs.shape[:-1] != student.shape[:-1]:
        raise ValueError(f"teacher_logprobs shape {tuple(logprobs.shape)} does not match the leading dims "
                         f"{tuple(student.shape[:-1])} of student_logits")
    for name, t in (("teacher_logprobs", logprobs), ("teacher_indices", indices)):
        if t.device != student.device:
            raise ValueError(f"{name} is on {t.device} and student_logits on {student.device}")
    check_teacher_constant("teacher_logprobs", logprobs)
    V = student.shape[-1]
    if V == 0:
        raise ValueError("student_logits has an empty vocabulary dimension (V = 0)")
    k = logprobs.shape[-1]
    if not 1 <= k <= V:
        raise ValueError(f"teacher_logprobs lists k={k} tokens; k must be in [1, V] = [1, {V}]")
