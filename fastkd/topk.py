"""The top-k (offline distillation) API: extract a sparse teacher, and the KD loss against it.

    logprobs, indices = fastkd.teacher_topk(teacher_logits, k=64, temperature=2.0)   # store these
    loss = fastkd.topk_kd_loss(student_logits, logprobs, indices, temperature=2.0)
"""
from . import launch_topk, torch_topk
from .autograd import _rows
from .autograd_topk import TopKKDLossFunction
from .backends import resolve_backend
from .checks import check_label_range
from .options import check_labels, check_logits, check_num_items_in_batch, check_temperature, make_options
from .topk_options import (check_index_values, check_k, check_tail, check_topk_inputs, debug_enabled,
                           without_repeated_indices)


def teacher_topk(teacher_logits, k, *, temperature=1.0, backend="auto"):
    """The k largest log-probabilities of ``softmax(teacher_logits / temperature)`` over the last
    dimension, and where they are: ``(logprobs, indices)``, both ``[..., k]``.

    ``logprobs`` is float32 (float64 for float64 logits), sorted descending; ``indices`` is int32.
    These are what ``topk_kd_loss`` takes, at the same temperature. Not differentiable (the
    teacher is a constant). Ties: the Triton kernel lists equal values lowest index first (float64
    logits are ranked by their float32 rounding); ``torch.topk`` (torch backend, and the Triton
    backend for k > 1024) leaves their order unspecified. ``backend``: ``"triton"``, ``"torch"``,
    ``"auto"``. The Triton kernel reads the logits once (online log-sum-exp and a running top-k).
    """
    check_logits("teacher_logits", teacher_logits)
    V = teacher_logits.shape[-1]
    if V == 0:
        raise ValueError("teacher_logits has an empty vocabulary dimension (V = 0)")
    k = check_k(k, V)
    temperature = check_temperature(temperature)
    backend = resolve_backend(backend, teacher_logits)
    x = _rows(teacher_logits.detach())
    if backend == "triton" and k <= launch_topk.MAX_TOPK_K:
        logprobs, indices = launch_topk.teacher_topk(x, k, temperature)
    else:
        logprobs, indices = torch_topk.teacher_topk(x, k, temperature)
    lead = teacher_logits.shape[:-1]
    return logprobs.view(*lead, k), indices.view(*lead, k)


def topk_kd_loss(student_logits, teacher_logprobs, teacher_indices, *, tail="bucket", temperature=1.0,
                 divergence="kl", beta=0.5, skew=0.1, labels=None, ignore_index=-100, hard_weight=0.0,
                 soft_weight=1.0, t2_scale=True, reduction="batchmean", inplace=False, backend="auto",
                 validate_indices=None, num_items_in_batch=None):
    """KD loss of a student ``[..., V]`` against a sparse teacher: its top-k log-probabilities
    ``teacher_logprobs`` ``[..., k]`` at ``temperature`` (as ``teacher_topk`` returns them) at
    columns ``teacher_indices`` ``[..., k]`` (int32 or int64, distinct, in [0, V)).

    The student is softmax(student_logits / T) over its full vocabulary. ``tail`` says what
    becomes of the mass outside the k listed tokens:
    - ``"bucket"`` (default): both sides become k + 1 points, the k listed tokens and one tail
      holding 1 - (their sum); D is taken between these two distributions. With k = V it is
      ``kd_loss`` exactly (the tail is empty).
    - ``"renormalize"``: the teacher is renormalised over its k tokens, the student is not; D over
      the k tokens.
    - ``"ignore"``: D over the k tokens, neither renormalised.
    D (``divergence``, ``beta``, ``skew``), ``temperature``, ``t2_scale``, ``labels`` /
    ``hard_weight`` (hard CE at T = 1), ``ignore_index``, ``reduction`` (``"mean"`` divides by kept
    rows * V), ``inplace``, ``backend`` and ``num_items_in_batch`` (gradient accumulation) are as in
    ``kd_loss``. The gradient reaches every student logit (through the normalisation), so it is a
    dense ``[..., V]`` tensor in the student's dtype, computed in the forward.

    Index checks read the indices (a device synchronisation), so they run on the torch backend,
    and on the Triton path only with ``validate_indices=True`` or ``FASTKD_DEBUG=1`` in the
    environment; they raise ValueError for an index outside [0, V) or repeated in a row. Unchecked,
    either makes its row NaN (loss and gradient). ``validate_indices=False`` skips the checks
    everywhere.
    """
    opts = make_options(temperature=temperature, divergence=divergence, beta=beta, skew=skew,
                        ignore_index=ignore_index, hard_weight=hard_weight, soft_weight=soft_weight,
                        t2_scale=t2_scale, reduction=reduction)
    tail = check_tail(tail)
    check_topk_inputs(student_logits, teacher_logprobs, teacher_indices)
    check_labels(student_logits, labels, opts)
    for name, flag in (("inplace", inplace), ("validate_indices", validate_indices)):
        if not isinstance(flag, bool) and not (name == "validate_indices" and flag is None):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    V = student_logits.shape[-1]
    check_label_range(labels, V, opts)
    num_items_in_batch = check_num_items_in_batch(num_items_in_batch, opts.reduction)
    backend = resolve_backend(backend, student_logits)
    if validate_indices or (validate_indices is None and (backend == "torch" or debug_enabled())):
        keep = None if labels is None else labels.reshape(-1) != opts.ignore_index
        check_index_values(_rows(teacher_indices), V, keep)
    else:
        teacher_indices = without_repeated_indices(teacher_indices)
    return TopKKDLossFunction.apply(student_logits, teacher_logprobs, teacher_indices, labels, opts,
                                    tail, backend, inplace, num_items_in_batch)
