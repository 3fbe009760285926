"""The functional API: validate arguments, pick the backend, call the autograd Function."""
from . import torch_backend
from .autograd import KDLossFunction, SoftmaxFunction
from .backends import resolve_backend
from .checks import check_values
from .options import check_kd_inputs, check_logits, check_num_items_in_batch, check_temperature, make_options


def kd_loss(student_logits, teacher_logits, *, temperature=1.0, divergence="kl", beta=0.5, skew=0.1,
            labels=None, ignore_index=-100, hard_weight=0.0, soft_weight=1.0, t2_scale=True,
            reduction="batchmean", inplace=False, backend="auto", check_finite=False, num_items_in_batch=None):
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

    Degenerate rows, as in PyTorch: a row whose student or teacher logits (over T) hold a NaN or a
    +inf, or are entirely -inf, has a NaN loss and an all-NaN gradient row; so does, with
    ``hard_weight > 0``, a label outside [0, V) that is not ``ignore_index`` (on CPU labels this
    raises ValueError instead; on a GPU checking would synchronise). Nothing leaks into other rows;
    ignored rows are never read. ``-inf`` logits (a masked vocabulary) are legal; a one-hot teacher
    is fine; the loss is +inf where the divergence is (e.g. teacher mass on a -inf student logit).
    ``check_finite=True`` (debug; synchronises) raises ValueError naming the first such row.

    Gradient accumulation: ``num_items_in_batch`` (an int or a 0-d tensor, never read on the host)
    replaces the kept-row count that ``"batchmean"`` divides by (``"mean"``: by it times V), so
    that summing the losses of micro-batches, each given the kept-row count of the whole batch,
    gives the whole batch's loss (the Hugging Face Trainer convention). A count of 0 acts as 1.
    With ``"sum"`` or ``"none"`` it is a ValueError (they have no normaliser).

    Works inside ``torch.compile(fullgraph=True)``: the fused call is a custom operator
    (``fastkd.ops``). Under ``torch.autocast`` the logits keep their dtype and the statistics
    stay float32.
    """
    opts = make_options(temperature=temperature, divergence=divergence, beta=beta, skew=skew,
                        ignore_index=ignore_index, hard_weight=hard_weight, soft_weight=soft_weight,
                        t2_scale=t2_scale, reduction=reduction)
    check_kd_inputs(student_logits, teacher_logits, labels, opts)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    check_values(student_logits, teacher_logits, labels, opts, check_finite)
    num_items_in_batch = check_num_items_in_batch(num_items_in_batch, opts.reduction)
    backend = resolve_backend(backend, student_logits)
    return KDLossFunction.apply(student_logits, teacher_logits, labels, opts, backend, inplace, num_items_in_batch)


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
