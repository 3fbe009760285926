"""The functional API: validate arguments, pick the backend, call the autograd Function.

    kd_loss                 the KD loss between student and teacher logits [..., V]
    softmax, log_softmax    tempered, differentiable
    teacher_topk            a sparse teacher: its top-k log-probabilities and where they are
    topk_kd_loss            the KD loss against such a teacher
    vocab_parallel_kd_loss  kd_loss of logits sharded by vocabulary over torch.distributed ranks
    fused_linear_kd_loss    kd_loss of hidden @ weight.T (+ bias) without the [N, V] logits
"""
import dataclasses
import functools

import torch

from . import dtensor, fused_linear
from .autograd import (FusedLinearKDFunction, KDLossFunction, SoftmaxFunction, TopKKDLossFunction,
                       VocabParallelKDLossFunction)
from .backends import flat_labels, implementation, resolve_backend, rows
from .distributed import check_group, check_vocab_start, group_name
from .checks import (check_index_values, check_topk_values, check_values, debug_enabled,
                     without_repeated_indices)
from .options import (IDENTITY, as_teachers, check_bool, check_chunk_size, check_dim, check_fused_inputs,
                      check_inplace, check_k, check_kd_inputs, check_labels, check_logits, check_tail, check_temperature, check_topk_inputs,
                      check_teacher_weights, check_transforms, make_options, make_reduction)
from .topk_values import TopK, topk_teacher


def _cached(make):
    """``make`` (``make_options``, ``make_reduction``) called once per distinct set of arguments
    (a loss is called with the same ones at every step), keyed by value and type: 1, 1.0 and True
    are three keys, so that t2_scale=1 still raises. Unhashable arguments skip the cache (``make``
    names a wrong one, or raised TypeError itself)."""
    cached = functools.lru_cache(maxsize=64, typed=True)(make)

    @functools.wraps(make)
    def call(*args, **kwargs):
        try:
            return cached(*args, **kwargs)
        except TypeError:
            return make(*args, **kwargs)

    return call


# ``make_options`` cached; the entry points pass the options by position, in KDOptions' order.
_options = _cached(make_options)
_cached_reduction = _cached(make_reduction)


def _reduction(reduction, num_items_in_batch):
    """``make_reduction``, from the cache without ``num_items_in_batch`` (a tensor there is never a key)."""
    return _cached_reduction(reduction) if num_items_in_batch is None else make_reduction(reduction, num_items_in_batch)


def _check_teacher_count(backend, num_teachers):
    if backend != "triton" or num_teachers == 1:
        return
    limit = implementation("triton").MAX_TEACHERS
    if num_teachers > limit:
        raise ValueError(f"the Triton kernels take up to {limit} teachers, got {num_teachers}; use backend='torch' "
                         "for more")


def kd_loss(student_logits, teacher_logits, *, temperature=1.0, divergence="kl", beta=0.5, skew=0.1,
            labels=None, ignore_index=-100, hard_weight=0.0, soft_weight=1.0, t2_scale=True,
            reduction="batchmean", inplace=False, backend="auto", check_finite=False, num_items_in_batch=None,
            teacher_temperature=None, teacher_weights=None):
    """Knowledge-distillation loss between student and teacher logits ``[..., V]``.

    loss = hard_weight * CE(student, labels) + soft_weight * (T**2 if t2_scale else 1) * D(p || q)
    with p = softmax(teacher / T_t), q = softmax(student / T) and D the ``divergence`` named (default
    ``"kl"``), one of ``fastkd.divergences.DIVERGENCES`` (the README's table); ``beta`` in (0, 1)
    parametrises ``"jsd"``, ``skew`` in [0, 1) the skewed KLs. T is ``temperature``; the teacher's T_t is
    ``teacher_temperature``, which defaults to T (the T**2 factor is always the student's T,
    whose 1 / T every gradient carries). Several teachers: ``teacher_logits`` a list of
    ``[..., V]`` tensors (any float dtypes), and p their mixture sum_i w_i softmax(teacher_i / T_t)
    with ``teacher_weights`` (one number >= 0 per teacher, normalised to sum to 1; default equal),
    formed per element in log space inside the kernel, never stored; one teacher is today's loss
    exactly (up to 4 teachers on the Triton backend). CE is taken at T = 1. Rows whose label is
    ``ignore_index``
    count for nothing. ``reduction``: ``"batchmean"`` (sum / kept rows; equals
    ``nn.KLDivLoss(reduction="batchmean")`` on 2-D input), ``"sum"``, ``"mean"`` (sum / (kept rows * V))
    or ``"none"`` (per-row loss, 0 on ignored rows). With no kept row every reduction is 0.

    The loss is float32 (float64 for float64 input); the student gradient, computed in the forward,
    has the student's dtype. ``inplace=True`` writes that gradient into ``student_logits``' storage:
    do not read those logits afterwards (a student whose elements overlap, such as an ``expand``ed
    view, is a ValueError). ``backend``: ``"triton"``, ``"torch"`` or ``"auto"``.
    Every tensor may be a non-contiguous view (``labels[:, 1:]``, a column, a ``tensor_split``
    chunk): the result is that of its contiguous copy.

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
    stay float32. Differentiable once (as every fastkd loss): a backward with ``create_graph=True``
    raises RuntimeError.

    DTensor logits (``torch.distributed.tensor``): their placements decide, see ``fastkd.dtensor``.
    """
    if dtensor.has_dtensor(student_logits, teacher_logits, labels):
        return dtensor.kd_loss(dict(locals()), kd_loss, vocab_parallel_kd_loss)
    teachers = as_teachers(teacher_logits)
    opts = _options(temperature, divergence, beta, skew, hard_weight, soft_weight, t2_scale, ignore_index,
                    teacher_temperature, check_teacher_weights(teacher_weights, len(teachers)))
    check_kd_inputs(student_logits, teachers, labels, opts)
    check_inplace(inplace, student_logits)
    check_values(student_logits, teachers, labels, opts, check_finite)
    reduction = _reduction(reduction, num_items_in_batch)
    backend = resolve_backend(backend, student_logits)
    _check_teacher_count(backend, len(teachers))
    return KDLossFunction.apply(student_logits, teachers, labels, opts, reduction, backend, inplace)


def _softmax(x, temperature, dim, backend, log):
    check_logits("x", x)
    temperature = check_temperature(temperature)
    check_dim(x, dim)
    if resolve_backend(backend, x) == "triton":
        return SoftmaxFunction.apply(x, temperature, log, dim)
    return implementation("torch").softmax(x, temperature, dim, log=log)


def softmax(x, temperature=1.0, dim=-1, backend="auto"):
    """softmax(x / temperature) along ``dim``, in x's dtype (float32 statistics); differentiable (once on the
    Triton backend: a backward with ``create_graph=True`` raises; the torch backend is plain autograd)."""
    return _softmax(x, temperature, dim, backend, log=False)


def log_softmax(x, temperature=1.0, dim=-1, backend="auto"):
    """log_softmax(x / temperature) along ``dim``, in x's dtype (float32 statistics); differentiable as ``softmax``."""
    return _softmax(x, temperature, dim, backend, log=True)


def teacher_topk(teacher_logits, k, *, temperature=1.0, backend="auto"):
    """The k largest log-probabilities of ``softmax(teacher_logits / temperature)`` over the last
    dimension, and where they are: a ``fastkd.TopK``, the pair ``(logprobs, indices)``, both
    ``[..., k]``, with ``.temperature``.

    ``logprobs`` is float32 (float64 for float64 logits), sorted descending; ``indices`` is int32.
    This is what ``topk_kd_loss`` and ``TeacherCache.writer(...).append`` take; they refuse it at
    another temperature (reshape it with its own methods, ``TopK.view`` etc., which keep the
    temperature; a tensor's own methods give plain tensors, which carry none). Not differentiable (the
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
    x = rows(teacher_logits.detach())
    triton_backend = implementation("triton") if backend == "triton" else None
    if triton_backend is not None and k <= triton_backend.MAX_TOPK_K:
        logprobs, indices = triton_backend.teacher_topk(x, k, temperature)
    else:
        logprobs, indices = implementation("torch").teacher_topk(x, k, temperature)
    lead = teacher_logits.shape[:-1]
    return TopK(logprobs.view(*lead, k), indices.view(*lead, k), temperature)


def topk_kd_loss(student_logits, teacher_logprobs, teacher_indices=None, *, tail="bucket", temperature=1.0,
                 divergence="kl", beta=0.5, skew=0.1, labels=None, ignore_index=-100, hard_weight=0.0,
                 soft_weight=1.0, t2_scale=True, reduction="batchmean", inplace=False, backend="auto",
                 validate_indices=None, num_items_in_batch=None, teacher_temperature=None, check_finite=False):
    """KD loss of a student ``[..., V]`` against a sparse teacher: its top-k log-probabilities
    ``teacher_logprobs`` ``[..., k]`` at ``temperature`` (as ``teacher_topk`` returns them) at
    columns ``teacher_indices`` ``[..., k]`` (int32 or int64, distinct, in [0, V)).

    The teacher may instead be one ``fastkd.TopK`` (what ``teacher_topk`` and ``TeacherCache``
    return, reshaped with its own methods if need be) in place of the two tensors:
    ``topk_kd_loss(student_logits, topk, ...)``.

    Temperatures. Stored log-probabilities cannot be re-tempered (their tail is gone), so
    ``teacher_temperature`` declares the temperature they were taken at, and they are used as they
    are; the student is taken at ``temperature`` (and T**2 is the student's T). Undeclared (None),
    they are taken to be at ``temperature``. A ``TopK`` carries the temperature it was taken at:
    one that differs from the declared (or assumed) temperature is a ValueError, never a silent
    mismatch. Plain tensors carry none and are taken as declared.

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

    Value checks (kept rows only). On CPU tensors, and anywhere with ``check_finite=True`` (which
    synchronises with the device), ``teacher_logprobs`` must be log-probabilities: every value <= 0
    and each row's log-sum-exp <= 0, within rounding: their dtype's, and 2**-10 for that of whatever
    computed them (``fastkd.checks.PRODUCER_ROUNDING``: ``t - logsumexp(t)`` in float32 rounds at
    the scale of t = logits / T). Probabilities, or shifted values, are a ValueError.
    ``check_finite=True`` also raises ValueError for a NaN there and for what ``kd_loss``'s
    ``check_finite`` reports of the student and the labels.

    Index checks read the indices (a device synchronisation), so they run on the torch backend,
    and on the Triton path only with ``validate_indices=True`` or ``FASTKD_DEBUG=1`` in the
    environment; they raise ValueError for an index outside [0, V) or repeated in a row. Unchecked,
    either makes its row NaN (loss and gradient). ``validate_indices=False`` skips the checks
    everywhere.

    DTensor logits with their rows sharded or replicated: see ``fastkd.dtensor``.
    """
    if dtensor.has_dtensor(student_logits, teacher_logprobs, teacher_indices, labels):
        return dtensor.topk_kd_loss(dict(locals()), topk_kd_loss)
    opts = _options(temperature, divergence, beta, skew, hard_weight, soft_weight, t2_scale, ignore_index,
                    teacher_temperature)
    tail = check_tail(tail)
    teacher_logprobs, teacher_indices = topk_teacher(teacher_logprobs, teacher_indices, opts)
    check_topk_inputs(student_logits, teacher_logprobs, teacher_indices)
    check_labels(student_logits, labels, opts)
    check_inplace(inplace, student_logits)
    if validate_indices is not None:
        check_bool("validate_indices", validate_indices)
    V = student_logits.shape[-1]
    check_topk_values(student_logits, teacher_logprobs, labels, opts, check_finite)
    reduction = _reduction(reduction, num_items_in_batch)
    backend = resolve_backend(backend, student_logits)
    if validate_indices or (validate_indices is None and (backend == "torch" or debug_enabled())):
        keep = None if labels is None else labels.reshape(-1) != opts.ignore_index
        check_index_values(rows(teacher_indices), V, keep)
    else:
        teacher_indices = without_repeated_indices(teacher_indices)
    return TopKKDLossFunction.apply(student_logits, teacher_logprobs, teacher_indices, labels, opts, tail,
                                    reduction, backend, inplace)


def vocab_parallel_kd_loss(student_shard, teacher_shard, *, group=None, vocab_start=None, labels=None,
                           temperature=1.0, divergence="kl", beta=0.5, skew=0.1, ignore_index=-100,
                           hard_weight=0.0, soft_weight=1.0, t2_scale=True, reduction="batchmean",
                           inplace=False, backend="auto", num_items_in_batch=None, teacher_temperature=None):
    """``kd_loss`` of the logits sharded by vocabulary over the ranks of ``group``.

    ``student_shard``, ``teacher_shard``: ``[..., W]``, this rank's columns [vocab_start,
    vocab_start + W) of the ``[..., V]`` logits; the same rows on every rank. ``vocab_start``
    defaults to ``rank * W`` (rank within ``group``, equal widths); pass it when the widths differ.
    ``labels``: ``[...]`` global vocabulary ids, the same on every rank (the rank that owns a label
    supplies its logit to the hard CE). ``group``: the vocab-parallel process group (None: the
    default group). Every other option is ``kd_loss``'s, with the same meaning; "mean" divides by
    the full V (the sum of the widths).

    Returns the same loss on every rank; its backward gives each rank the gradient of its own shard
    (in the shard's dtype, in its storage with ``inplace=True``). Collectives: 2 all-reduces for
    kl, 3 for the other divergences (``fastkd.distributed`` has the bytes). Works inside
    ``torch.compile(fullgraph=True)``: the rank's whole forward, collectives included, is one custom
    operator.
    """
    opts = _options(temperature, divergence, beta, skew, hard_weight, soft_weight, t2_scale, ignore_index,
                    teacher_temperature)
    if isinstance(teacher_shard, (list, tuple)):
        raise TypeError("vocab_parallel_kd_loss takes one teacher_shard (a tensor); a mixture of teachers is "
                        "kd_loss's and fused_linear_kd_loss's")
    check_kd_inputs(student_shard, (teacher_shard,), labels, opts)
    check_inplace(inplace, student_shard, "student_shard")
    vocab_start = check_vocab_start(vocab_start)
    reduction = _reduction(reduction, num_items_in_batch)
    backend = resolve_backend(backend, student_shard)
    rank, _ = check_group(group)
    if vocab_start is None:
        vocab_start = rank * student_shard.shape[-1]
    return VocabParallelKDLossFunction.apply(student_shard, teacher_shard, labels, opts, reduction, backend,
                                             inplace, group_name(group), vocab_start)


def _autocast_dtype(x):
    """Autocast's dtype on ``x``'s device when an autocast region is active there, else None."""
    if not isinstance(x, torch.Tensor) or x.device.type not in ("cpu", "cuda"):
        return None
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None


def _autocast(x, dtype):
    """A matmul operand (or a list of them) in autocast's ``dtype``, as ``F.linear`` would take it
    (float32 only; float64 stays, as autocast leaves it); unchanged when ``dtype`` is None."""
    if isinstance(x, (list, tuple)):
        return [_autocast(y, dtype) for y in x]
    if dtype is None or not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        return x
    return x.to(dtype)


def fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, *,
                         teacher_logits=None, student_bias=None, teacher_bias=None, chunk_size=None,
                         temperature=1.0, divergence="kl", beta=0.5, skew=0.1, labels=None,
                         ignore_index=-100, hard_weight=0.0, soft_weight=1.0, t2_scale=True,
                         reduction="batchmean", backend="auto", num_items_in_batch=None,
                         student_logit_scale=1.0, student_softcap=None, teacher_logit_scale=1.0,
                         teacher_softcap=None, teacher_temperature=None, teacher_weights=None,
                         return_entropy=False):
    """``kd_loss(f_s(student_hidden @ student_weight.T + student_bias), teacher logits, **kd_options)``
    without materialising the ``[N, V]`` logits.

    student_hidden ``[..., H]``, student_weight ``[V, H]`` (the ``lm_head.weight`` layout),
    student_bias ``[V]`` or None. The teacher is either ``teacher_hidden`` ``[..., Ht]`` with
    ``teacher_weight`` ``[V, Ht]`` (and ``teacher_bias``), whose logits are computed chunk by chunk
    under no-grad (Ht may differ from H), or precomputed ``teacher_logits`` ``[..., V]``. Several
    teachers: lists of ``teacher_hidden``, ``teacher_weight`` (and ``teacher_bias``), or of
    ``teacher_logits``, one entry per teacher, mixed with ``teacher_weights`` as in ``kd_loss``
    (each teacher adds one float32 ``[chunk, V]`` block to the chunk buffers). Teacher tensors are
    constants: one that requires grad is a ValueError (detach it).

    The keyword options are ``fastkd.kd_loss``'s (divergence, temperature, t2_scale, labels,
    hard_weight, ignore_index, reduction, backend, ...) with the same meaning and result.
    (No ``inplace``: the chunk logits are always private buffers that the gradient overwrites.)
    Gradients flow to student_hidden, student_weight and
    student_bias (the weight and bias gradients are summed over chunks in float32, float64 for
    float64, and returned in the weight's dtype). Rows are processed ``chunk_size`` at a time
    (default ``fastkd.fused_linear.default_chunk_size``), so the extra memory is O(chunk V + N H + V H).
    With ``reduction="none"`` the backward recomputes the logits chunk by chunk (the per-row
    upstream gradient is not known in the forward).

    Logit transforms, for models that post-process their LM head's output: the logits of a side
    are ``f(z) = softcap * tanh(logit_scale * z / softcap)`` when its softcap is given, else
    ``logit_scale * z``, with z = hidden @ weight.T + bias (``student_logit_scale``,
    ``student_softcap``, ``teacher_logit_scale``, ``teacher_softcap``; real, finite, > 0; defaults:
    no transform). Gemma 2/3 ``final_logit_softcapping`` is the softcap, Cohere ``logit_scale`` the
    scale, Granite ``logits_scaling`` d the scale 1 / d. They apply chunk by chunk, with their
    gradient; a student softcap adds one float32 ``[chunk, V]`` block. ``teacher_logits`` are
    taken as they are: the teacher's transform with them is a ValueError.

    The chunk logits are float32 whatever the weights' dtype (float64 for float64): bf16/fp16
    products are summed and kept in float32 (rounding the logits to bf16 costs tens of percent of
    gradient accuracy when the student is close to the teacher); the gradient matmuls take the
    logits gradient in the weight dtype. Module docstring: Precision and Memory.

    ``num_items_in_batch`` (gradient accumulation) replaces the kept-row count, as in
    ``fastkd.kd_loss``. Under ``torch.autocast`` the float32 hidden states, weights and biases are
    cast to autocast's dtype, as ``F.linear`` would cast them (the logits chunks are float32 all
    the same, the products of those bf16/fp16 operands). Works inside
    ``torch.compile(fullgraph=True)``: the chunk loop is the custom operator
    ``fastkd::fused_linear_pass``.

    DTensor heads (tensor-parallel ``Shard(0)``, or FSDP2-sharded) and hidden states: see ``fastkd.dtensor``.

    ``return_entropy=True`` returns ``(loss, entropy)``: ``entropy`` ``[...]`` (the leading dims,
    every row, ignored ones included) is the student's entropy of softmax(f_s(z) / T) in nats,
    computed from the same chunk logits as the loss (no second projection), float32 (float64 for
    float64 weights), without a gradient (as TRL's ``DistillationTrainer`` logs it).
    """
    check_bool("return_entropy", return_entropy)
    if dtensor.has_dtensor(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                           teacher_logits):
        return dtensor.fused_linear_kd_loss(dict(locals()), fused_linear_kd_loss)
    dtype = _autocast_dtype(student_hidden)
    student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias = (
        _autocast(x, dtype) for x in (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                      teacher_bias))
    opts = _options(temperature, divergence, beta, skew, hard_weight, soft_weight, t2_scale, ignore_index,
                    teacher_temperature)
    teachers = check_fused_inputs(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                  teacher_bias, teacher_logits, labels, opts)
    opts = dataclasses.replace(opts, teacher_weights=check_teacher_weights(teacher_weights, len(teachers)))
    chunk_size = check_chunk_size(chunk_size)
    transforms = check_transforms(student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap)
    if teacher_logits is not None and transforms[1] != IDENTITY:
        raise ValueError("teacher_logit_scale and teacher_softcap transform teacher_hidden @ teacher_weight.T; "
                         "teacher_logits are taken as they are: pass them already transformed")
    reduction = _reduction(reduction, num_items_in_batch)
    backend = resolve_backend(backend, student_hidden)

    _check_teacher_count(backend, len(teachers))

    V, H = student_weight.shape
    lead = student_hidden.shape[:-1]
    teachers = tuple((kind, x.reshape(-1, x.shape[-1]), *rest) for kind, x, *rest in teachers)  # [N, Ht] / [N, V]
    blocks = 1 + len(teachers) + (student_softcap is not None)
    chunk = chunk_size or fused_linear.default_chunk_size(V, H, blocks, student_hidden.device.type)
    loss, entropy = FusedLinearKDFunction.apply(student_hidden.reshape(-1, H), student_weight, student_bias, teachers,
                                                flat_labels(labels), opts, reduction, backend, chunk, lead, transforms,
                                                return_entropy)
    return (loss, entropy) if return_entropy else loss
