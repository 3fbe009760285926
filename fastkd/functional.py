"""The functional API: validate arguments, pick the backend, call the autograd Function."""
import torch

from . import torch_backend
from .autograd import KDLossFunction, SoftmaxFunction
from .backends import resolve_backend
from .options import check_kd_inputs, check_logits, check_temperature, make_options


def kd_loss(student_logits, teacher_logits, *, temperature=1.0, divergence="kl", beta=0.5, skew=0.1,
            labels=None, ignore_index=-100, hard_weight=0.0, soft_weight=1.0, t2_scale=True,
            reduction="batchmean", inplace=False, backend="auto"):
    """Knowledge-distillation loss between student and teacher logits ``[..., V]`` (SPEC.md).

    loss = hard_weight * CE(student, labels) + soft_weight * (T**2 if t2_scale else 1) * D(p || q)
    with p = softmax(teacher / T), q = softmax(student / T) and D one of ``"kl"`` (default),
    ``"reverse_kl"``, ``"jsd"`` (``beta`` in (0, 1)), ``"skew_kl"``, ``"skew_reverse_kl"``
    (``skew`` in [0, 1)), ``"tvd"``. CE is taken at T = 1. Rows whose label is ``ignore_index``
    count for nothing. ``reduction``: ``"batchmean"`` (sum / kept rows; equals
    ``nn.KLDivLoss(reduction="batchmean")`` on 2-D input), ``"sum"``, ``"mean"`` (sum / (kept rows * V))
    or ``"none"`` (per-row loss, 0 on ignored rows). With no kept row every reduction is 0.

    The loss is float32 (float64 for float64 input); the student gradient, computed in the forward,
    has the student's dtype. ``inplace=True`` writes that gradient into ``student_logits``' storage:
    do not read those logits afterwards. ``backend``: ``"triton"``, ``"torch"`` or ``"auto"``.
    A label outside [0, V) that is not ``ignore_index`` makes its row's loss NaN (checking values
    would synchronise with the device).
    """
    opts = make_options(temperature=temperature, divergence=divergence, beta=beta, skew=skew,
                        ignore_index=ignore_index, hard_weight=hard_weight, soft_weight=soft_weight,
                        t2_scale=t2_scale, reduction=reduction)
    check_kd_inputs(student_logits, teacher_logits, labels, opts)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    backend = resolve_backend(backend, student_logits)
    return KDLossFunction.apply(student_logits, teacher_logits, labels, opts, backend, inplace)


def _softmax(x, temperature, dim, backend, log):
    check_logits("x", x)
    temperature = check_temperature(temperature)
    if not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim!r} is not a dimension of a {x.dim()}-d tensor")
    if resolve_backend(backend, x) == "triton":
        return SoftmaxFunction.apply(x, temperature, log, dim)
    return torch_backend.softmax(x, temperature, dim, log=log)


def softmax(x, temperature=1.0, dim=-1, backend="auto"):
    """softmax(x / temperature) along ``dim``, differentiable, in x's dtype (float32 statistics)."""
    return _softmax(x, temperature, dim, backend, log=False)


def log_softmax(x, temperature=1.0, dim=-1, backend="auto"):
    """log_softmax(x / temperature) along ``dim``, differentiable, in x's dtype (float32 statistics)."""
    return _softmax(x, temperature, dim, backend, log=True)
