"""Plain-PyTorch reference of every loss fastkd computes: the oracle of every test.

Nothing here is fused, chunked or clever: each divergence is its textbook formula on full
``[N, V]`` log-probabilities (declared with the divergence in ``fastkd.divergences``), and
gradients come from autograd. Run it in float64 for ground truth. It computes in float32 (float64
when an input is float64), like the kernels' accumulators.
"""
import torch
import torch.nn.functional as F

from .checks import check_index_values, check_values
from .divergences import log_mixture, lookup
from .options import (as_teachers, check_dim, check_kd_inputs, check_labels, check_logits, check_tail,
                      check_teacher_weights, check_temperature, check_topk_inputs, make_reduction, options_of)
from .topk_values import topk_teacher


def _compute_dtype(*tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def softmax(x, temperature=1.0, dim=-1, backend="auto"):
    """softmax(x / T) along ``dim``, in x's dtype (``backend`` is accepted and ignored)."""
    check_logits("x", x)
    T = check_temperature(temperature)
    check_dim(x, dim)
    return torch.softmax(x.to(_compute_dtype(x)) / T, dim=dim).to(x.dtype)


def log_softmax(x, temperature=1.0, dim=-1, backend="auto"):
    """log_softmax(x / T) along ``dim``, in x's dtype (``backend`` is accepted and ignored)."""
    check_logits("x", x)
    T = check_temperature(temperature)
    check_dim(x, dim)
    return torch.log_softmax(x.to(_compute_dtype(x)) / T, dim=dim).to(x.dtype)


def _log_mixture_of(log_ps, weights):
    """log p of the teachers' mixture sum_i w_i p_i from their log-probabilities ``log_ps``; one
    teacher is itself (weight 1)."""
    return log_ps[0] if len(log_ps) == 1 else log_mixture(log_ps, weights)


def row_divergence(log_p, log_q, name="kl", beta=0.5, skew=0.1):
    """Per-row divergence D between teacher p and student q given as log-probabilities ``[N, V]``:
    the registry's textbook formula of ``name`` (``fastkd.divergences``)."""
    entry = lookup(name)
    return entry.reference(log_p, log_q, entry.parameter_value(beta=beta, skew=skew))


def _has_distribution(x):
    """Per row of ``x``, whether softmax(x) exists: a finite log-sum-exp."""
    return torch.isfinite(torch.logsumexp(x, -1))


def _reduce(row_loss, keep, V, reduction, leading_shape):
    """The reduction: per row ("none"), sum, or sum / (kept rows, or num_items_in_batch; 0 counts
    as 1; times V for "mean")."""
    if reduction.kind == "none":
        return row_loss.reshape(leading_shape)
    total = row_loss.sum()
    if reduction.kind == "sum":
        return total
    items = reduction.num_items_in_batch
    count = int(keep.sum()) if items is None else float(items)
    return total / ((count or 1) * (V if reduction.kind == "mean" else 1))


def kd_loss(student_logits, teacher_logits, *, temperature=1.0, divergence="kl", beta=0.5, skew=0.1,
            labels=None, ignore_index=-100, hard_weight=0.0, soft_weight=1.0, t2_scale=True,
            reduction="batchmean", inplace=False, backend="auto", check_finite=False, num_items_in_batch=None,
            teacher_temperature=None, teacher_weights=None):
    """Hinton's KD loss, in plain PyTorch (``inplace``/``backend`` ignored).

    loss = hard_weight * CE(z_s, labels) + soft_weight * (T**2 if t2_scale else 1) * D(p || q),
    p = softmax(z_t / T_t) (several teachers: sum_i w_i softmax(z_t_i / T_t), the weights
    normalised), q = softmax(z_s / T), reduced over the rows whose label is not
    ``ignore_index`` ("batchmean": / rows, "mean": / (rows * V), "sum", "none": per row);
    ``num_items_in_batch`` (0 counts as 1) replaces the kept-row count.
    Degenerate rows are NaN and the value checks raise, as in ``fastkd.kd_loss`` (its gradient on a
    NaN row is whatever autograd gives).
    """
    teachers = as_teachers(teacher_logits)
    opts = options_of(locals(), teacher_weights=check_teacher_weights(teacher_weights, len(teachers)))
    check_kd_inputs(student_logits, teachers, labels, opts)
    check_values(student_logits, teachers, labels, opts, check_finite)
    reduction = make_reduction(reduction, num_items_in_batch)
    dtype = _compute_dtype(student_logits, *teachers)
    V = student_logits.shape[-1]
    z_s = student_logits.reshape(-1, V).to(dtype)
    z_ts = [t.reshape(-1, V).to(dtype) for t in teachers]
    if labels is None:
        keep = torch.ones(z_s.shape[0], dtype=torch.bool, device=z_s.device)
    else:
        labels = labels.reshape(-1).long()
        keep = labels != opts.ignore_index

    z_s_kept, z_t_kept = z_s[keep], [z[keep] for z in z_ts]
    T, T_t = opts.temperature, opts.teacher_T
    log_p = _log_mixture_of([torch.log_softmax(z / T_t, -1) for z in z_t_kept], opts.teacher_weights)
    soft = row_divergence(log_p, torch.log_softmax(z_s_kept / T, -1), opts.divergence, opts.beta, opts.skew)
    kept_loss = opts.soft_scale * soft
    # A row with no student or teacher distribution (all -inf, or a NaN or +inf in it) is NaN.
    defined = _has_distribution(z_s_kept / T)
    for z in z_t_kept:
        defined = defined & _has_distribution(z / T_t)
    if opts.hard_weight > 0:
        kept_labels = labels[keep]
        in_range = (kept_labels >= 0) & (kept_labels < V)
        kept_loss = kept_loss + opts.hard_weight * F.cross_entropy(
            z_s_kept, torch.where(in_range, kept_labels, 0), reduction="none")
        defined = defined & in_range  # a label outside [0, V) makes its row NaN, as in the kernels
    kept_loss = kept_loss + torch.where(defined, 0.0, float("nan")).to(dtype)
    row_loss = torch.zeros(z_s.shape[0], dtype=dtype, device=z_s.device).masked_scatter(keep, kept_loss)
    return _reduce(row_loss, keep, V, reduction, student_logits.shape[:-1])


def topk_kd_loss(student_logits, teacher_logprobs, teacher_indices=None, *, tail="bucket", temperature=1.0,
                 divergence="kl", beta=0.5, skew=0.1, labels=None, ignore_index=-100, hard_weight=0.0,
                 soft_weight=1.0, t2_scale=True, reduction="batchmean", inplace=False, backend="auto",
                 validate_indices=None, num_items_in_batch=None, teacher_temperature=None, check_finite=False):
    """``fastkd.topk_kd_loss`` built densely (``inplace``/``backend``/``validate_indices``/``check_finite``
    ignored: the indices are always checked, the log-probabilities never; the teacher may be a
    ``fastkd.TopK``, and ``teacher_temperature`` declares the stored log-probabilities' temperature,
    as there).

    The listed columns are scattered into a ``[N, V]`` mask over the student's full log-softmax; the
    student's points are its log-probabilities at the listed columns and (``tail="bucket"``) the
    log of its summed probability over the unlisted columns. The teacher's points are the given
    log-probabilities, renormalised over the k (``"renormalize"``), and (``"bucket"``) the log of
    max(0, 1 - their total) (0 when k = V). ``row_divergence`` of the two, autograd for gradients.
    """
    opts = options_of(locals())
    reduction = make_reduction(reduction, num_items_in_batch)
    tail = check_tail(tail)
    teacher_logprobs, teacher_indices = topk_teacher(teacher_logprobs, teacher_indices, opts)
    check_topk_inputs(student_logits, teacher_logprobs, teacher_indices)
    check_labels(student_logits, labels, opts)
    dtype = _compute_dtype(student_logits, teacher_logprobs)
    V, k = student_logits.shape[-1], teacher_logprobs.shape[-1]
    z = student_logits.reshape(-1, V).to(dtype)
    log_p = teacher_logprobs.reshape(-1, k).to(dtype)
    index = teacher_indices.reshape(-1, k).long()
    keep = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
    if labels is not None:
        labels = labels.reshape(-1).long()
        keep = labels != opts.ignore_index
    z, log_p, index = z[keep], log_p[keep], index[keep]
    check_index_values(index, V)

    log_q_full = torch.log_softmax(z / opts.temperature, -1)
    log_q = log_q_full.gather(1, index)
    if tail == "bucket":
        listed = torch.zeros_like(log_q_full, dtype=torch.bool).scatter(1, index, True)
        empty_tail = listed.all(-1)
        unlisted = torch.where(listed, float("-inf"), log_q_full)
        unlisted = torch.where(empty_tail[:, None], 0.0, unlisted)  # finite input: no NaN gradient
        log_q_tail = torch.where(empty_tail, float("-inf"), torch.logsumexp(unlisted, -1))
        p_tail = (1 - log_p.exp().sum(-1)).clamp_min(0) if k < V else torch.zeros_like(log_p[:, 0])
        log_p = torch.cat([log_p, p_tail.log()[:, None]], 1)
        log_q = torch.cat([log_q, log_q_tail[:, None]], 1)
    elif tail == "renormalize":
        log_p = log_p - torch.logsumexp(log_p, -1, keepdim=True)
    kept_loss = opts.soft_scale * row_divergence(log_p, log_q, opts.divergence, opts.beta, opts.skew)
    defined = _has_distribution(z / opts.temperature)
    if opts.hard_weight > 0:
        kept_labels = labels[keep]
        in_range = (kept_labels >= 0) & (kept_labels < V)
        kept_loss = kept_loss + opts.hard_weight * F.cross_entropy(
            z, torch.where(in_range, kept_labels, 0), reduction="none")
        defined = defined & in_range
    kept_loss = kept_loss + torch.where(defined, 0.0, float("nan")).to(dtype)
    row_loss = torch.zeros(keep.shape[0], dtype=dtype, device=z.device).masked_scatter(keep, kept_loss)
    return _reduce(row_loss, keep, V, reduction, student_logits.shape[:-1])


def uld_loss(student_logits, teacher_logits, *, k=None, temperature=1.0, teacher_temperature=None, labels=None,
             ignore_index=-100, reduction="batchmean", num_items_in_batch=None, backend="auto", return_bound=False):
    """``fastkd.uld_loss`` as its textbook formula (``backend`` ignored): both softmaxes sorted
    (``k``: their top k), the shorter row padded with zeros, the L1 of the sorted rows (plus, for
    ``k``, |R_s - R_t| of the masses outside the top k, and the bound 2 min(R_s, R_t)); autograd
    through the sort for gradients. A ``(logprobs, indices)`` teacher (``teacher_topk``): its top
    k probabilities, its tail 1 - their sum."""
    from .uld import as_teacher, check_uld_inputs
    teacher_logits, k, teacher_is_topk = as_teacher(teacher_logits, k)
    k = check_uld_inputs(student_logits, teacher_logits, labels, k, ignore_index)
    T = check_temperature(temperature)
    T_t = T if teacher_temperature is None else check_temperature(teacher_temperature, "teacher_temperature")
    reduction = make_reduction(reduction, num_items_in_batch)
    dtype = _compute_dtype(student_logits, teacher_logits)
    V_s, V_t = student_logits.shape[-1], teacher_logits.shape[-1]
    q = torch.softmax(student_logits.reshape(-1, V_s).to(dtype) / T, -1)
    p = teacher_logits.reshape(-1, V_t).to(dtype)
    p = p.exp() if teacher_is_topk else torch.softmax(p / T_t, -1)
    keep = torch.ones(q.shape[0], dtype=torch.bool, device=q.device) if labels is None else \
        labels.reshape(-1) != ignore_index
    q, p = q[keep], p[keep]
    if k is None:
        width = max(V_s, V_t)
        q_sorted = F.pad(q.sort(-1, descending=True).values, (0, width - V_s))
        p_sorted = F.pad(p.sort(-1, descending=True).values, (0, width - V_t))
        kept_loss, kept_bound = (q_sorted - p_sorted).abs().sum(-1), torch.zeros_like(q[:, 0])
    else:
        q_top, p_top = q.topk(k, -1).values, p.topk(k, -1).values
        r_s, r_t = 1 - q_top.sum(-1), 1 - p_top.sum(-1)
        kept_loss = (q_top - p_top).abs().sum(-1) + (r_s - r_t).abs()
        kept_bound = 2 * torch.minimum(r_s, r_t)
    out = []
    for kept in (kept_loss, kept_bound):
        row = torch.zeros(keep.shape[0], dtype=dtype, device=q.device).masked_scatter(keep, kept)
        out.append(_reduce(row, keep, max(V_s, V_t), reduction, student_logits.shape[:-1]))
    return tuple(out) if return_bound else out[0]
