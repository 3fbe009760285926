"""Argument checking shared by every entry point, and the validated KD options it produces.

Every check here looks at shapes, dtypes, devices and Python scalars only: nothing reads tensor
values, so validation never synchronises with the device.
"""
import math
import numbers
from dataclasses import dataclass

import torch

DIVERGENCES = ("kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")
REDUCTIONS = ("batchmean", "sum", "mean", "none")
BACKENDS = ("auto", "triton", "torch")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class KDOptions:
    temperature: float = 1.0
    divergence: str = "kl"
    beta: float = 0.5
    skew: float = 0.1
    hard_weight: float = 0.0
    soft_weight: float = 1.0
    t2_scale: bool = True
    reduction: str = "batchmean"
    ignore_index: int = -100

    @property
    def soft_scale(self):
        """Factor on the divergence: soft_weight, times T**2 when t2_scale."""
        return self.soft_weight * (self.temperature**2 if self.t2_scale else 1.0)

    def mixture_weights(self):
        """(mix_weight, log w_p, log w_q) of the mixture M = w_p p + w_q q this divergence uses."""
        if self.divergence == "jsd":
            w_p, w_q = self.beta, 1.0 - self.beta
        elif self.divergence == "skew_kl":
            w_p, w_q = self.skew, 1.0 - self.skew
        elif self.divergence == "skew_reverse_kl":
            w_p, w_q = 1.0 - self.skew, self.skew
        else:
            return 0.0, 0.0, 0.0
        mix = self.beta if self.divergence == "jsd" else self.skew
        log = lambda w: math.log(w) if w > 0 else float("-inf")  # noqa: E731
        return mix, log(w_p), log(w_q)


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


def check_temperature(temperature):
    temperature = _real("temperature", temperature)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return temperature


def check_backend(backend):
    return _choice("backend", backend, BACKENDS)


def make_options(*, temperature=1.0, divergence="kl", beta=0.5, skew=0.1, ignore_index=-100,
                 hard_weight=0.0, soft_weight=1.0, t2_scale=True, reduction="batchmean"):
    """Validate the scalar KD options (SPEC.md) and return them as ``KDOptions``."""
    divergence = _choice("divergence", divergence, DIVERGENCES)
    reduction = _choice("reduction", reduction, REDUCTIONS)
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
    if not isinstance(t2_scale, bool):
        raise TypeError(f"t2_scale must be a bool, got {type(t2_scale).__name__}")
    return KDOptions(check_temperature(temperature), divergence, beta, skew, hard_weight, soft_weight,
                     t2_scale, reduction, int(ignore_index))


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


def check_kd_inputs(student, teacher, labels, opts: KDOptions):
    """Check the tensors of a KD loss call against each other and the options."""
    check_logits("student_logits", student)
    check_logits("teacher_logits", teacher)
    if student.shape != teacher.shape:
        raise ValueError(f"student_logits shape {tuple(student.shape)} and teacher_logits shape "
                         f"{tuple(teacher.shape)} differ")
    if student.device != teacher.device:
        raise ValueError(f"student_logits is on {student.device} and teacher_logits on {teacher.device}")
    if teacher.requires_grad:
        raise ValueError("teacher_logits requires grad; the teacher is a constant: pass teacher_logits.detach()")
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
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 (or int32), got {labels.dtype}")
    if labels.shape != student.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match the leading dims "
                         f"{tuple(student.shape[:-1])} of {name}")
    if labels.device != student.device:
        raise ValueError(f"labels is on {labels.device} and {name} on {student.device}")


def check_num_items_in_batch(num_items_in_batch, reduction):
    """``num_items_in_batch``: None, a real number >= 0, or a one-element real tensor (never read,
    so no synchronisation), returned as a number or a 0-d tensor. It replaces the kept-row count
    that ``"batchmean"`` (and ``"mean"``, times V) divides by; other reductions have no normaliser."""
    if num_items_in_batch is None:
        return None
    if reduction not in ("batchmean", "mean"):
        raise ValueError(f"num_items_in_batch replaces the normaliser of reduction='batchmean' (or 'mean'); "
                         f"reduction={reduction!r} has none: drop num_items_in_batch or change the reduction")
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(f"num_items_in_batch must be a number or a one-element tensor, got shape "
                             f"{tuple(num_items_in_batch.shape)}")
        if num_items_in_batch.dtype == torch.bool or num_items_in_batch.is_complex():
            raise TypeError(f"num_items_in_batch must hold a real number, got {num_items_in_batch.dtype}")
        return num_items_in_batch.detach().reshape(())
    value = _real("num_items_in_batch", num_items_in_batch)
    if value < 0:
        raise ValueError(f"num_items_in_batch must be >= 0, got {num_items_in_batch}")
    return num_items_in_batch
