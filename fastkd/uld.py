"""Universal Logit Distillation (ULD, Boizard et al. 2024): a loss between a student and a teacher
whose vocabularies differ, so no column of one corresponds to a column of the other.

Math. q = softmax(z_s / T) over the student's V_s columns, p = softmax(z_t / T_t) over the
teacher's V_t; q_(i), p_(i) the i-th largest probability, the shorter side padded with zeros:

    exact:  W   = sum_i |q_(i) - p_(i)|                       (Wasserstein-1 over ranks)
    top-K:  W_K = sum_{i <= K} |q_(i) - p_(i)| + |R_s - R_t|  R = the mass outside a side's top K

    W_K + |R_s - R_t| <= W <= W_K + R_s + R_t, so the top-K loss errs by at most 2 min(R_s, R_t)
    (``bound``, per row).

Gradient (once differentiable; ties between probabilities take the order the sort gives, a valid
subgradient): g_j = sign(q_(i) - p_(i)) at the column j holding the student's rank i (a rank past
the teacher's V_t has a padded 0 for partner: +1), and in top-K mode -sign(R_s - R_t) added on the
student's top-K columns, 0 elsewhere; then dW / dz_j = (1 / T) q_j (g_j - sum_k q_k g_k).

Here: the exact mode (the torch backend: rows in chunks on its worker threads, one sort per row and
side), the top-K mode on either backend (``uld_topk_forward``: each side's streaming top K and
log-sum-exp, then one gradient pass; no ``[N, V]`` buffer but the gradient), both computing the
``[N, V_s]`` gradient in the forward as every fastkd loss does; their autograd Function and
``uld_loss``; the fused linear form (``fused_linear_uld_loss``); GOLD's hybrid loss
(``hybrid_uld_loss``) and its pipeline over two tokenizations (``aligned_uld_loss``). The reduction is
``fastkd.reduction``'s; "mean" divides by rows times max(V_s, V_t), the number of terms of the
exact sum. No T**2 factor (as TRL's GOLD).
"""
import torch

from .autograd import once_differentiable, scaled_student_grad
from .backends import flat_labels, implementation, resolve_backend, rows
from .backends.torch import chunks, for_each_chunk
from .buffers import accumulation_dtype, gradient_buffer
from .divergences import lookup
from .options import (KDOptions, _real, check_hidden_size, check_inplace, check_int, check_labels, check_logits,
                      check_teacher_constant, check_temperature, make_options, make_reduction)
from .reduction import grad_scale, normaliser, reduce
from .topk_values import TopK, topk_teacher


def _tail(logprobs):
    """1 - sum(exp(logprobs)) per row, as -expm1(logsumexp): no cancellation when it is small."""
    return (-torch.expm1(torch.logsumexp(logprobs, -1))).clamp_min(0)


def _topk_terms(lq, lp):
    """(q_top, row losses, bounds, g_top) of the top-K mode from both sides' k largest
    log-probabilities [r, k], sorted descending (the tails R as ``_tail``)."""
    q_top, p_top = lq.exp(), lp.exp()
    r_s, r_t = _tail(lq), _tail(lp)
    diff = q_top - p_top
    loss = diff.abs().sum(-1) + (r_s - r_t).abs()
    return q_top, loss, 2 * torch.minimum(r_s, r_t), diff.sign() - (r_s - r_t).sign()[:, None]


def _uld_chunk(s, t, k, T, need_grad):
    """Per-row W (or W_K), its error bound and dW/dz_s of tempered logits ``s`` [r, V_s], ``t`` [r, V_t]
    (accumulation dtype), all at once (the exact mode's and the fused linear form's chunks)."""
    if k is None:
        q = torch.softmax(s, -1)
        q_sorted, q_index = q.sort(-1, descending=True)
        p_sorted = torch.softmax(t, -1).sort(-1, descending=True).values
        width = max(q.shape[-1], p_sorted.shape[-1])
        diff = (torch.nn.functional.pad(q_sorted, (0, width - q.shape[-1]))
                - torch.nn.functional.pad(p_sorted, (0, width - p_sorted.shape[-1])))
        loss, bound = diff.abs().sum(-1), torch.zeros_like(q[:, 0])
        g_rank = diff[:, :q.shape[-1]].sign()
    else:
        log_q = torch.log_softmax(s, -1)
        lq, q_index = log_q.topk(k, -1)
        _, loss, bound, g_rank = _topk_terms(lq, torch.log_softmax(t, -1).topk(k, -1).values)
        q = log_q.exp_()
    if not need_grad:
        return loss, bound, None
    g = torch.zeros_like(q).scatter_(1, q_index, g_rank)
    return loss, bound, q * (g - (q * g).sum(-1, keepdim=True)) / T


def uld_forward(student, teacher, labels, scale, T, T_t, ignore_index, *, grad=None):
    """The exact mode, on the torch backend: (row losses [N], row bounds [N] (0), and the gradient
    [N, V_s] times ``scale`` written into ``grad``, or None) of ``student`` [N, V_s] and ``teacher``
    [N, V_t] logits, one sort per row and side, in chunks of rows. Ignored rows are 0; a row with no
    distribution on either side (all -inf, a NaN) is NaN."""
    N, V = student.shape
    acc = accumulation_dtype(student.dtype, teacher.dtype)
    row_loss = torch.zeros(N, dtype=acc, device=student.device)
    row_bound = torch.zeros(N, dtype=acc, device=student.device)
    keep = None if labels is None else labels != ignore_index

    def one_chunk(r0, r1, work):
        s, t = student[r0:r1].to(acc) / T, teacher[r0:r1].to(acc)
        loss, bound, g = _uld_chunk(s, t / T_t, None, T, grad is not None)
        kept = None if keep is None else keep[r0:r1]
        if kept is not None:
            loss, bound = torch.where(kept, loss, 0.0), torch.where(kept, bound, 0.0)
        row_loss[r0:r1], row_bound[r0:r1] = loss, bound
        if grad is not None:  # after every read of the chunk's student rows (grad may be their storage)
            g = g * scale
            grad[r0:r1] = g if kept is None else torch.where(kept[:, None], g, 0.0)

    V_max = max(V, teacher.shape[-1])
    for_each_chunk(chunks(N, V_max, device=student.device), V_max, acc, student.device, one_chunk)
    return row_loss, row_bound, grad


def uld_topk_forward(student, teacher, labels, scale, k, T, T_t, ignore_index, *, backend, grad=None,
                     teacher_is_topk=False):
    """The top-K mode on ``backend`` ("triton" or "torch"): each side's top k and log-sum-exp in one
    streaming read of its logits (the backend's ``teacher_topk``; a teacher given as top
    log-probabilities is only sorted), the row terms on the [N, k] results, and the gradient times
    ``scale`` in one more pass over the student's logits (``uld_topk_gradient``), written into
    ``grad`` (or None). No ``[N, V]`` buffer besides ``grad``: the torch backend's passes go in
    chunks of rows."""
    impl = implementation(backend)
    acc = accumulation_dtype(student.dtype, teacher.dtype)
    lq, index = impl.teacher_topk(student, k, T)
    lp = teacher.sort(-1, descending=True).values[:, :k] if teacher_is_topk else impl.teacher_topk(teacher, k, T_t)[0]
    q_top, loss, bound, g_top = _topk_terms(lq.to(acc), lp.to(acc))
    keep = torch.ones_like(loss, dtype=torch.bool) if labels is None else labels != ignore_index
    loss, bound = torch.where(keep, loss, 0.0), torch.where(keep, bound, 0.0)
    if grad is None:
        return loss, bound, None
    index = index.long()
    c = (q_top * g_top).sum(-1)
    # The student's largest logit z_0 and -lq_0 = log sum exp(s - z_0 / T): its softmax as (s - m) - log d.
    z_max, log_d = student.gather(1, index[:, :1]).to(acc)[:, 0], -lq[:, 0].to(acc)
    factor = torch.where(keep, scale / T, 0.0)
    impl.uld_topk_gradient(student, z_max, log_d.contiguous(), (-c * factor).contiguous(), T, out=grad)
    top = torch.where(keep[:, None], q_top * (g_top - c[:, None]) * factor[:, None], 0.0)
    # put_, not scatter_: torch's CPU scatter_ into a half-precision tensor copies all of it to float32.
    at = index + torch.arange(grad.shape[0], device=grad.device)[:, None] * grad.shape[1]
    return loss, bound, grad.put_(at.reshape(-1), top.to(grad.dtype).reshape(-1))


def _reduced_loss_and_bound(ctx, row_loss, row_bound, norm, reduction, shape):
    """The reduced loss and its (non-differentiable) bound, from their per-row values."""
    ctx.mark_non_differentiable(row_bound)
    return reduce(row_loss, norm, reduction, shape), reduce(row_bound, norm, reduction, shape)


class ULDLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, labels, k, T, T_t, ignore_index, reduction, backend, teacher_is_topk, inplace):
        # Detached, so that an in-place gradient is a plain write into storage, not an autograd op.
        s2, t2, labels1 = rows(student.detach()), rows(teacher), flat_labels(labels)
        acc = accumulation_dtype(student.dtype, teacher.dtype)
        norm = normaliser(reduction, labels1, s2.shape[0], max(s2.shape[1], t2.shape[1]), ignore_index,
                          device=student.device, dtype=acc)
        grad = gradient_buffer(s2, inplace, ctx.needs_input_grad[0])
        scale = grad_scale(norm, device=student.device, dtype=acc)
        if k is None:
            row_loss, row_bound, grad = uld_forward(s2, t2, labels1, scale, T, T_t, ignore_index, grad=grad)
        else:
            row_loss, row_bound, grad = uld_topk_forward(s2, t2, labels1, scale, k, T, T_t, ignore_index,
                                                         backend=backend, grad=grad, teacher_is_topk=teacher_is_topk)
        if grad is not None:
            ctx.save_for_backward(grad)
        ctx.backend, ctx.shape, ctx.held = backend, student.shape, False  # never held: not a custom op
        return _reduced_loss_and_bound(ctx, row_loss, row_bound, norm, reduction, student.shape[:-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_bound):
        return (scaled_student_grad(ctx, grad_loss),) + (None,) * 10


def as_teacher(teacher, k):
    """(tensor, k, whether it holds top-k log-probabilities) of ``uld_loss``'s teacher argument:
    logits, or the ``(logprobs, indices)`` pair of ``teacher_topk`` (``k`` defaults to its width)."""
    if not isinstance(teacher, tuple):
        return teacher, k, False
    if len(teacher) != 2:
        raise TypeError(f"teacher_logits must be a tensor of logits or the (logprobs, indices) pair of "
                        f"fastkd.teacher_topk, got a tuple of {len(teacher)}")
    logprobs = teacher[0]
    check_logits("teacher_logits[0] (the top-k log-probabilities)", logprobs)
    return logprobs, logprobs.shape[-1] if k is None else k, True


def check_uld_inputs(student_logits, teacher_logits, labels, k, ignore_index):
    """Static checks of ``uld_loss``'s tensors (two vocabularies: only the leading dims must agree);
    returns ``k`` checked (None, or an int in [1, min(V_s, V_t)])."""
    check_logits("student_logits", student_logits)
    return _check_teacher_side("student_logits", student_logits.shape, student_logits.device, teacher_logits, labels,
                               k, ignore_index)


def _check_teacher_side(student_name, student_shape, device, teacher_logits, labels, k, ignore_index):
    """The checks of the teacher, labels and ``k`` against a student of logits' shape ``student_shape``."""
    check_logits("teacher_logits", teacher_logits)
    check_teacher_constant("teacher_logits", teacher_logits)
    if tuple(student_shape[:-1]) != tuple(teacher_logits.shape[:-1]):
        raise ValueError(f"{student_name} (logits {tuple(student_shape)}) and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must agree in every dimension but the last (vocabulary)")
    if device != teacher_logits.device:
        raise ValueError(f"{student_name} is on {device} and teacher_logits on {teacher_logits.device}")
    check_labels(teacher_logits, labels, KDOptions(ignore_index=check_int("ignore_index", ignore_index)),
                 name="teacher_logits")
    if k is None:
        return None
    V = min(student_shape[-1], teacher_logits.shape[-1])
    k = check_int("k", k)
    if not 1 <= k <= V:
        raise ValueError(f"k must be None (exact) or in [1, min(V_s, V_t)] = [1, {V}], got {k}")
    return k


def _resolve(backend, student_logits, k):
    """"triton" for the top-K mode with k <= MAX_TOPK_K where Triton runs, else "torch" (the exact
    mode, a full sort, runs on the torch backend on any device); asking for "triton" where it has
    no kernel raises."""
    from .backends.triton import MAX_TOPK_K
    chosen = resolve_backend(backend, student_logits)
    if chosen == "triton" and (k is None or k > MAX_TOPK_K):
        if backend == "triton":
            raise ValueError(f"uld_loss has a Triton kernel for the top-K mode with k <= {MAX_TOPK_K} only, "
                             f"got k={k}: use backend='torch' or 'auto'")
        return "torch"
    return chosen


def uld_loss(student_logits, teacher_logits, *, k=None, temperature=1.0, teacher_temperature=None, labels=None,
             ignore_index=-100, reduction="batchmean", num_items_in_batch=None, inplace=False, backend="auto",
             return_bound=False):
    """Universal Logit Distillation loss between vocabularies of any two sizes (see the module docstring).

    ``student_logits`` [..., V_s], ``teacher_logits`` [..., V_t] (a constant): the same leading dims,
    any float dtypes, any strides. ``k=None``: exact (a full sort of both rows); ``k`` an int: the
    top-K form, whose error against the exact loss is at most ``bound`` (``return_bound=True`` returns
    ``(loss, bound)``, the bound reduced as the loss). ``temperature`` divides the student's logits,
    ``teacher_temperature`` the teacher's (default: ``temperature``). ``labels`` / ``ignore_index``
    drop rows, ``reduction`` ("batchmean", "mean", "sum", "none") and ``num_items_in_batch`` as in
    ``fastkd.kd_loss``. ``teacher_logits`` may instead be the ``(logprobs, indices)`` of
    ``fastkd.teacher_topk`` or a ``TeacherCache`` (``k`` defaults to their width; their temperature
    must be the teacher's: see ``topk_kd_loss``); the teacher's tail is then 1 - the sum of its top
    k, and "mean" counts max(V_s, width) terms. ``inplace=True`` writes the student's gradient into
    ``student_logits``' storage, as ``kd_loss``'s (do not read those logits afterwards). ``backend``:
    "triton" (the top-K mode, k <= 1024), "torch" (the chunked PyTorch backend, both modes), "auto"
    (Triton where it runs and has the mode).

    On equal-length answers, ``uld_loss(s, t, labels=labels, teacher_temperature=...)`` equals TRL's
    ``trl.experimental.gold`` ULD loss (``use_extended_uld=False``, no EOS skipping).
    """
    if isinstance(teacher_logits, TopK):  # refuses one taken at another temperature than the teacher's
        topk_teacher(teacher_logits, None, KDOptions(temperature=check_temperature(temperature),
                                                     teacher_temperature=teacher_temperature))
    teacher_logits, k, teacher_is_topk = as_teacher(teacher_logits, k)
    k = check_uld_inputs(student_logits, teacher_logits, labels, k, ignore_index)
    check_inplace(inplace, student_logits)
    T = check_temperature(temperature)
    T_t = T if teacher_temperature is None else check_temperature(teacher_temperature, "teacher_temperature")
    reduction = make_reduction(reduction, num_items_in_batch)
    backend = _resolve(backend, student_logits, k)
    loss, bound = ULDLossFunction.apply(student_logits, teacher_logits, labels, k, T, T_t, ignore_index, reduction,
                                        backend, teacher_is_topk, inplace)
    return (loss, bound) if return_bound else loss


def _sorted_l1(q, p):
    """Per row, the L1 distance of ``q`` [r, a] and ``p`` [r, b] sorted decreasingly, the shorter
    padded with zeros (0 when either side has no column); differentiable through the sort."""
    if q.shape[-1] == 0 or p.shape[-1] == 0:
        return q.new_zeros(q.shape[0])
    width = max(q.shape[-1], p.shape[-1])
    q_sorted = torch.nn.functional.pad(q.sort(-1, descending=True).values, (0, width - q.shape[-1]))
    p_sorted = torch.nn.functional.pad(p.sort(-1, descending=True).values, (0, width - p.shape[-1]))
    return (q_sorted - p_sorted).abs().sum(-1)


def _weight(name, value):
    value = _real(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def hybrid_uld_loss(student, teacher, vocab_map, *, divergence="jsd", beta=0.5, skew=0.1, matched_weight=None,
                    unmatched_weight=None, temperature=1.0, teacher_temperature=None, probabilities=False,
                    labels=None, ignore_index=-100, reduction="batchmean", num_items_in_batch=None):
    """GOLD's hybrid loss: per row, ``matched_weight`` D(p_m || q_m) + ``unmatched_weight`` ULD(p_u, q_u).

    ``student`` [..., V_s], ``teacher`` [..., V_t]: logits (softmax at ``temperature`` /
    ``teacher_temperature``), or with ``probabilities=True`` probabilities, possibly unnormalised
    (rows of ``fastkd.vocab_map.merge_probabilities``). ``vocab_map``: a ``VocabMap``. p_m, q_m: the
    two sides at the matched ids, not renormalised; D: any ``divergence`` of ``fastkd.kd_loss``
    (``beta``, ``skew`` as there) on log max(x, 1e-8), as GOLD; p_u, q_u: the unmatched columns,
    compared by ``uld_loss``'s exact sorted L1. ``matched_weight`` default: the matched fraction
    len(vocab_map) / V_t (GOLD's adaptive weight); ``unmatched_weight`` default: 1 - matched_weight.
    Rows reduce as in ``uld_loss`` ("mean": / rows * max(V_s, V_t)). Plain PyTorch, differentiable
    by autograd (no fused kernel yet).
    """
    check_uld_inputs(student, teacher, labels, None, ignore_index)
    opts = make_options(divergence=divergence, beta=beta, skew=skew, ignore_index=ignore_index)
    reduction = make_reduction(reduction, num_items_in_batch)
    V_s, V_t = student.shape[-1], teacher.shape[-1]
    if len(vocab_map) and (int(vocab_map.teacher_ids.max()) >= V_t or int(vocab_map.student_ids.max()) >= V_s):
        raise ValueError(f"vocab_map holds ids beyond the vocabularies of the inputs (V_s={V_s}, V_t={V_t})")
    ids_t, ids_s = vocab_map.teacher_ids.to(student.device), vocab_map.student_ids.to(student.device)
    w_matched = len(vocab_map) / max(1, V_t) if matched_weight is None else _weight("matched_weight", matched_weight)
    w_unmatched = 1 - w_matched if unmatched_weight is None else _weight("unmatched_weight", unmatched_weight)
    dtype = accumulation_dtype(student.dtype, teacher.dtype)
    q, p = student.reshape(-1, V_s).to(dtype), teacher.reshape(-1, V_t).to(dtype)
    if not probabilities:
        T = check_temperature(temperature)
        T_t = T if teacher_temperature is None else check_temperature(teacher_temperature, "teacher_temperature")
        q, p = torch.softmax(q / T, -1), torch.softmax(p / T_t, -1)
    keep = torch.ones(q.shape[0], dtype=torch.bool, device=q.device) if labels is None else \
        labels.reshape(-1) != ignore_index
    q, p = q[keep], p[keep]
    row = torch.zeros_like(q[:, 0])
    if len(vocab_map):
        log_p = p[:, ids_t].clamp_min(1e-8).log()
        log_q = q[:, ids_s].clamp_min(1e-8).log()
        entry = lookup(opts.divergence)  # the registry's textbook formula, on the matched columns
        row = row + w_matched * entry.reference(log_p, log_q, entry.parameter_value(beta=opts.beta, skew=opts.skew))
    unmatched_s = torch.ones(V_s, dtype=torch.bool, device=q.device).index_fill(0, ids_s, False)
    unmatched_t = torch.ones(V_t, dtype=torch.bool, device=q.device).index_fill(0, ids_t, False)
    row = row + w_unmatched * _sorted_l1(q[:, unmatched_s], p[:, unmatched_t])
    row_loss = torch.zeros(keep.shape[0], dtype=dtype, device=q.device).masked_scatter(keep, row)
    norm = normaliser(reduction, None if labels is None else labels.reshape(-1), keep.shape[0], max(V_s, V_t),
                      ignore_index, device=q.device, dtype=dtype)
    return reduce(row_loss, norm, reduction, student.shape[:-1])


def aligned_uld_loss(student_logits, teacher_logits, student_ids, teacher_ids, groups, vocab_map=None, *, k=None,
                     temperature=1.0, teacher_temperature=None, merge_strategy="observed", divergence="jsd", beta=0.5,
                     skew=0.1, matched_weight=None, unmatched_weight=None):
    """GOLD's loss over two tokenizations of the same completions: ``(sum over aligned rows, rows)``.

    ``student_logits`` [B, C_s, V_s] and ``teacher_logits`` [B, C_t, V_t]: row i predicts token i of
    ``student_ids`` / ``teacher_ids`` ([B, C] each, any padding past the groups); ``groups``: per
    sample, the ``(student groups, teacher groups)`` of ``fastkd.vocab_map.align_completion``; pairs
    with an empty side are dropped. A pair of one token on each side compares the two logit rows:
    ``uld_loss`` (``k`` for its top-K form) or, with a ``vocab_map``, ``hybrid_uld_loss``. A longer
    pair compares merged probabilities (``merge_probabilities`` with ``merge_strategy``) by
    ``hybrid_uld_loss(..., probabilities=True)`` (exact; an empty map without ``vocab_map``). The
    other options as ``hybrid_uld_loss``'s. Divide the sum by the rows (or a count over the
    micro-batches of a step) for the mean over aligned rows."""
    from .vocab_map import VocabMap, merge_probabilities

    T = check_temperature(temperature)
    T_t = T if teacher_temperature is None else check_temperature(teacher_temperature, "teacher_temperature")
    hybrid = vocab_map is not None
    if not hybrid:
        empty = torch.zeros(0, dtype=torch.long)
        vocab_map = VocabMap(empty, empty)
    options = dict(divergence=divergence, beta=beta, skew=skew, matched_weight=matched_weight,
                   unmatched_weight=unmatched_weight, reduction="sum")
    single_s, single_t, merged_s, merged_t = [], [], [], []
    for b, (s_groups, t_groups) in enumerate(groups):
        pairs = [(sg, tg) for sg, tg in zip(s_groups, t_groups) if sg and tg]
        single_s += [(b, sg[0]) for sg, tg in pairs if len(sg) == len(tg) == 1]
        single_t += [(b, tg[0]) for sg, tg in pairs if len(sg) == len(tg) == 1]
        longer = [(sg, tg) for sg, tg in pairs if len(sg) > 1 or len(tg) > 1]
        if longer:
            q = torch.softmax(student_logits[b].float() / T, -1)
            p = torch.softmax(teacher_logits[b].float() / T_t, -1)
            merged_s.append(merge_probabilities(q, [sg for sg, _ in longer], student_ids[b], merge_strategy))
            merged_t.append(merge_probabilities(p, [tg for _, tg in longer], teacher_ids[b], merge_strategy))
    total = student_logits.sum() * 0.0  # on the graph, 0 without a pair
    if single_s:
        s_rows = student_logits[tuple(torch.tensor(single_s, device=student_logits.device).t())]
        t_rows = teacher_logits[tuple(torch.tensor(single_t, device=teacher_logits.device).t())]
        if hybrid:
            total = total + hybrid_uld_loss(s_rows, t_rows, vocab_map, temperature=T, teacher_temperature=T_t,
                                            **options)
        else:
            total = total + uld_loss(s_rows, t_rows, k=k, temperature=T, teacher_temperature=T_t, reduction="sum")
    if merged_s:
        total = total + hybrid_uld_loss(torch.cat(merged_s), torch.cat(merged_t), vocab_map, probabilities=True,
                                        **options)
    return total, len(single_s) + sum(m.shape[0] for m in merged_s)


# ---------------------------------------------------------------------------------------------
# The fused linear form: the student's logits h W^T + b one chunk of rows at a time


def _linear_uld_pass(hidden, weight, bias, teacher, labels, scale, k, T, T_t, ignore_index, chunk, *, want_grad):
    """Row losses and bounds [N] of the student logits ``hidden @ weight.T + bias`` (in the
    accumulation dtype, one chunk of rows at a time, never [N, V_s]) against ``teacher`` [N, V_t],
    and with ``want_grad`` the gradients [hidden [N, H], weight [V_s, H], bias [V_s] or None] of the
    row losses times ``scale`` (a [1] factor, or [N], one per row), in the accumulation dtype."""
    N, H = hidden.shape
    acc = accumulation_dtype(hidden.dtype, weight.dtype, teacher.dtype)
    w = weight.to(acc)  # bf16/fp16 weights: one float32 [V_s, H] copy, the size of the weight's gradient
    b = None if bias is None else bias.to(acc)
    row_loss = torch.zeros(N, dtype=acc, device=hidden.device)
    row_bound = torch.zeros(N, dtype=acc, device=hidden.device)
    grads = None
    if want_grad:
        grads = [torch.empty(N, H, dtype=acc, device=hidden.device), torch.zeros_like(w),
                 None if b is None else torch.zeros_like(b)]
    keep = None if labels is None else labels != ignore_index
    for r0 in range(0, N, chunk):
        r1 = min(N, r0 + chunk)
        h = hidden[r0:r1].to(acc)
        s = (h @ w.t() if b is None else torch.addmm(b, h, w.t())).div_(T)
        loss, bound, g = _uld_chunk(s, teacher[r0:r1].to(acc) / T_t, k, T, want_grad)
        kept = None if keep is None else keep[r0:r1]
        if kept is not None:
            loss, bound = torch.where(kept, loss, 0.0), torch.where(kept, bound, 0.0)
        row_loss[r0:r1], row_bound[r0:r1] = loss, bound
        if want_grad:
            g = g * (scale if scale.numel() == 1 else scale[r0:r1, None])
            if kept is not None:
                g = torch.where(kept[:, None], g, 0.0)
            grads[0][r0:r1] = g @ w
            grads[1].addmm_(g.t(), h)
            if b is not None:
                grads[2].add_(g.sum(0))
    return row_loss, row_bound, grads


class FusedLinearULDFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher, labels, k, T, T_t, ignore_index, reduction, chunk):
        h2, t2, labels1 = hidden.detach().reshape(-1, hidden.shape[-1]), rows(teacher), flat_labels(labels)
        weight, bias = weight.detach(), None if bias is None else bias.detach()
        acc = accumulation_dtype(hidden.dtype, weight.dtype, teacher.dtype)
        norm = normaliser(reduction, labels1, h2.shape[0], max(weight.shape[0], t2.shape[1]), ignore_index,
                          device=hidden.device, dtype=acc)
        # "none" has one upstream gradient per row, known only in the backward: that recomputes the pass.
        want_grad = any(ctx.needs_input_grad[:3]) and reduction.kind != "none"
        ctx.args = (labels1, k, T, T_t, ignore_index, chunk)
        row_loss, row_bound, grads = _linear_uld_pass(h2, weight, bias, t2, labels1,
                                                      grad_scale(norm, device=hidden.device, dtype=acc),
                                                      *ctx.args[1:], want_grad=want_grad)
        ctx.kind, ctx.acc, ctx.shape, ctx.has_bias = reduction.kind, acc, hidden.shape, bias is not None
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        if want_grad:
            ctx.save_for_backward(*(x for x in grads if x is not None))
        else:
            ctx.save_for_backward(h2, weight, t2, *(() if bias is None else (bias,)))
        return _reduced_loss_and_bound(ctx, row_loss, row_bound, norm, reduction, hidden.shape[:-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_bound):
        if ctx.kind == "none":
            h2, weight, t2, *bias = ctx.saved_tensors
            labels1, k, T, T_t, ignore_index, chunk = ctx.args
            _, _, grads = _linear_uld_pass(h2, weight, bias[0] if bias else None, t2, labels1,
                                           grad_loss.reshape(-1).to(ctx.acc), k, T, T_t, ignore_index, chunk,
                                           want_grad=True)
        else:
            grads = [x * grad_loss.to(ctx.acc) for x in ctx.saved_tensors] + [None] * (not ctx.has_bias)
        grads = [None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)]
        return (grads[0].view(ctx.shape), grads[1], grads[2]) + (None,) * 8


def fused_linear_uld_loss(student_hidden, student_weight, teacher_logits, *, student_bias=None, k=None,
                          temperature=1.0, teacher_temperature=None, labels=None, ignore_index=-100,
                          reduction="batchmean", num_items_in_batch=None, chunk_size=None, return_bound=False):
    """``uld_loss(student_hidden @ student_weight.T + student_bias, teacher_logits, ...)`` without
    the student's ``[N, V_s]`` logits: rows go through in chunks of ``chunk_size`` (default:
    ``fastkd.fused_linear.default_chunk_size``), each chunk's logits, loss and gradients computed
    at once (the loss's gradient for hidden states, weight and bias is ready after the forward;
    ``reduction="none"`` recomputes it in the backward). ``student_hidden`` [..., H],
    ``student_weight`` [V_s, H], ``teacher_logits`` [..., V_t]; the other options as ``uld_loss``.
    Memory beyond the inputs: the [N, H], [V_s, H] (and [V_s]) gradients and a few [chunk, V] blocks.
    """
    from .fused_linear import default_chunk_size
    for name, x in (("student_hidden", student_hidden), ("student_weight", student_weight)):
        check_logits(name, x)
    check_hidden_size("student_hidden", student_hidden)
    if student_weight.dim() != 2 or student_hidden.shape[-1] != student_weight.shape[1]:
        raise ValueError(f"student_weight {tuple(student_weight.shape)} must be [V_s, H] with H = "
                         f"student_hidden's last dimension ({student_hidden.shape[-1]})")
    if student_bias is not None and (not isinstance(student_bias, torch.Tensor)
                                     or student_bias.shape != student_weight.shape[:1]):
        raise ValueError(f"student_bias must be None or a tensor of shape [{student_weight.shape[0]}]")
    if student_weight.device != student_hidden.device:
        raise ValueError(f"student_weight is on {student_weight.device} and student_hidden on {student_hidden.device}")
    k = _check_teacher_side("student_hidden", (*student_hidden.shape[:-1], student_weight.shape[0]),
                            student_hidden.device, teacher_logits, labels, k, ignore_index)
    T = check_temperature(temperature)
    T_t = T if teacher_temperature is None else check_temperature(teacher_temperature, "teacher_temperature")
    reduction = make_reduction(reduction, num_items_in_batch)
    chunk = default_chunk_size(max(student_weight.shape[0], teacher_logits.shape[-1]), student_weight.shape[1]) \
        if chunk_size is None else check_int("chunk_size", chunk_size, 1)
    loss, bound = FusedLinearULDFunction.apply(student_hidden, student_weight, student_bias, teacher_logits, labels, k,
                                               T, T_t, ignore_index, reduction, chunk)
    return (loss, bound) if return_bound else loss
