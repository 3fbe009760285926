"""TRL's losses on fastkd's fused kernels (``fastkd.integrations.trl`` exports them, and the trainer).

The drop-ins (checked against TRL 1.16; only the trainer imports trl):

- ``generalized_jsd_loss``: TRL's ``GKDTrainer.generalized_jsd_loss`` (trl.experimental.gkd),
  through ``fastkd.kd_loss``.
- ``chunked_divergence_loss``: TRL's ``_chunked_divergence_loss`` (the loss of the stable
  ``trl.DistillationTrainer``: both models' hidden states and LM heads, never their ``[N, V]``
  logits), through ``fastkd.fused_linear_kd_loss``.
- ``server_sparse_loss``: the sparse top-k loss of ``trl.experimental.server_distillation``,
  through ``fastkd.topk_kd_loss``.
- ``DistillationTrainer`` / ``DistillationConfig`` (``fastkd.integrations.trl_trainer``, imported
  on first use): ``trl.DistillationTrainer`` on ``chunked_divergence_loss``, plus every fastkd
  divergence, a teacher temperature, a hard-label CE and several teachers.

TRL's beta convention, shared by all of them, with p the teacher and q the student:
    beta = 0          KL(p || q)                      (forward KL)
    beta = 1          KL(q || p)                      (reverse KL)
    0 < beta < 1      beta KL(p || M) + (1 - beta) KL(q || M),  M = beta p + (1 - beta) q
which is fastkd's ``divergence="jsd"`` between the endpoints. No T**2 factor.

``generalized_jsd_loss`` has the signature and the semantics of TRL's staticmethod, so it can
replace it:

    from trl.experimental.gkd import GKDTrainer
    from fastkd.integrations.trl import generalized_jsd_loss
    GKDTrainer.generalized_jsd_loss = staticmethod(generalized_jsd_loss)

With q = softmax(student / T), p = softmax(teacher / T), per token, the divergence above.
Tokens whose label is -100 are dropped. Reduction, as TRL:
    num_items_in_batch given   sum / num_items_in_batch (whatever ``reduction`` says)
    "batchmean"                sum / kept tokens (at least 1); without labels sum / size(0), the
                               batch size of [B, S, V] logits
    "sum"                      sum
    "mean"                     sum / (kept tokens * V)
    anything else ("none")     the element-wise terms [..., V] (kept tokens only, when labels are
                               given), computed in plain PyTorch: a result of that size has
                               nothing to fuse
The loss comes back in the logits' dtype, as TRL's does; the statistics are float32 inside.

Differences, all for input where TRL returns NaN or cannot run: beta outside [0, 1], a temperature
<= 0, or mismatched shapes raise ValueError; a -inf logit (a masked vocabulary) gives finite terms
instead of NaN; teacher logits that require grad raise ValueError (TRL computes them under no_grad).
"""
import torch
import torch.nn.functional as F

from ..functional import fused_linear_kd_loss, kd_loss, topk_kd_loss

FUSED_REDUCTIONS = ("batchmean", "sum", "mean")


def _divergence(beta):
    if beta == 0:
        return dict(divergence="kl")
    if beta == 1:
        return dict(divergence="reverse_kl")
    return dict(divergence="jsd", beta=beta)


def elementwise_generalized_jsd(student_logits, teacher_logits, beta, temperature):
    """The per-element terms [..., V] that TRL sums, in float32 (float64 for float64 input)."""
    acc = torch.float64 if torch.float64 in (student_logits.dtype, teacher_logits.dtype) else torch.float32
    log_q = F.log_softmax(student_logits.to(acc) / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.to(acc) / temperature, dim=-1)
    if beta == 0:
        return F.kl_div(log_q, log_p, reduction="none", log_target=True)
    if beta == 1:
        return F.kl_div(log_p, log_q, reduction="none", log_target=True)
    log_m = torch.logsumexp(torch.stack([log_q + torch.log1p(torch.tensor(-beta, dtype=acc)),
                                         log_p + torch.log(torch.tensor(beta, dtype=acc))]), dim=0)
    return (beta * F.kl_div(log_m, log_p, reduction="none", log_target=True)
            + (1 - beta) * F.kl_div(log_m, log_q, reduction="none", log_target=True))


def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                         reduction="batchmean", num_items_in_batch=None):
    """TRL's ``GKDTrainer.generalized_jsd_loss`` (see the module docstring), fused.

    student_logits, teacher_logits ``[B, S, V]`` (or any ``[..., V]``); labels ``[B, S]`` with
    -100 on the tokens to ignore, or None.
    """
    out_dtype = torch.promote_types(student_logits.dtype, teacher_logits.dtype)
    if num_items_in_batch is None and reduction not in FUSED_REDUCTIONS:
        jsd = elementwise_generalized_jsd(student_logits, teacher_logits, beta, temperature)
        return (jsd if labels is None else jsd[labels != -100]).to(out_dtype)

    total = kd_loss(student_logits, teacher_logits, temperature=temperature, labels=labels,
                    t2_scale=False, reduction="sum", **_divergence(beta))
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        loss = total / num_items_in_batch
    elif reduction == "sum":
        loss = total
    else:
        V = student_logits.shape[-1]
        if labels is not None:
            kept = (labels != -100).sum()
        else:
            kept = student_logits.numel() // V
        if reduction == "batchmean":
            denominator = kept.clamp_min(1) if labels is not None else max(student_logits.size(0), 1)
        else:  # "mean": the mean over the kept [tokens, V] terms (NaN for none, as torch's mean)
            denominator = kept * V
        loss = total / denominator
    return loss.to(out_dtype)


# ------------------------------------------------------------------ trl.DistillationTrainer's loss


def _gathered(weight, bias, dtype):
    """An FSDP2 LM head (a DTensor) gathered once and cast to the hidden states' ``dtype``, as TRL
    does; any other head as it is."""
    if not torch.distributed.is_available():
        return weight, bias
    from torch.distributed.tensor import DTensor
    if not isinstance(weight, DTensor):
        return weight, bias
    return weight.full_tensor().to(dtype), None if bias is None else bias.full_tensor()


def fused_divergence_loss(student_hidden_states, student_lm_head_weight, teachers, completion_mask, *,
                          num_items_in_batch=None, student_lm_head_bias=None, student_logit_scale=1.0,
                          student_final_logit_softcapping=None, teacher_logit_scale=1.0,
                          teacher_final_logit_softcapping=None, completion_ids=None, t2_scale=False, **kd_options):
    """``chunked_divergence_loss`` for any of fastkd's KD options and several teachers.

    ``teachers``: a list of ``(hidden_states [B, K, Ht], lm_head_weight [V, Ht], lm_head_bias [V] or
    None)``, mixed with ``teacher_weights`` (one transform for all of them). ``completion_ids``
    ``[B, K]``: the tokens the hidden states predict, the labels of a ``hard_weight`` CE (at T = 1).
    ``kd_options``: ``fastkd.fused_linear_kd_loss``'s (divergence, beta, temperature,
    teacher_temperature, hard_weight, soft_weight, teacher_weights, chunk_size, backend, ...).
    Returns the loss (sum over the positions where ``completion_mask`` != 0, divided by
    ``num_items_in_batch`` or else by their count, at least 1), the student's entropy summed over
    those positions (nats, no gradient) and their count.
    """
    valid = completion_mask != 0
    labels = torch.where(valid, 0 if completion_ids is None else completion_ids, -100)
    lead = student_hidden_states.shape[:-1]
    student_weight, student_bias = _gathered(student_lm_head_weight, student_lm_head_bias, student_hidden_states.dtype)
    t_hidden, t_weight, t_bias = [], [], []
    for h, w, b in teachers:  # constants, detached (TRL's teacher heads may still require grad)
        w, b = _gathered(w, b, h.dtype)
        t_hidden.append(h.detach())
        t_weight.append(w.detach())
        t_bias.append(None if b is None else b.detach())
    loss, entropy = fused_linear_kd_loss(
        student_hidden_states, student_weight, t_hidden, t_weight, student_bias=student_bias,
        teacher_bias=t_bias, labels=labels.reshape(lead), num_items_in_batch=num_items_in_batch,
        student_logit_scale=student_logit_scale, student_softcap=student_final_logit_softcapping,
        teacher_logit_scale=teacher_logit_scale, teacher_softcap=teacher_final_logit_softcapping,
        t2_scale=t2_scale, return_entropy=True, **kd_options)
    valid = valid.reshape(lead)
    return loss, entropy.masked_fill(~valid, 0).sum(), valid.sum()


def chunked_divergence_loss(student_hidden_states, teacher_hidden_states, student_lm_head_weight,
                            teacher_lm_head_weight, completion_mask, beta, num_items_in_batch=None,
                            student_lm_head_bias=None, teacher_lm_head_bias=None, student_logit_scale=1.0,
                            teacher_logit_scale=1.0, student_final_logit_softcapping=None,
                            teacher_final_logit_softcapping=None, temperature=1.0):
    """TRL's ``trl.trainer.distillation_trainer._chunked_divergence_loss``: same arguments, same
    results, through ``fastkd.fused_linear_kd_loss``.

    Hidden states ``[B, K, H]`` (the teacher's width may differ), LM heads ``[V, H]`` (FSDP2
    DTensors are gathered once), ``completion_mask`` ``[B, K]`` (nonzero: in the loss), ``beta``
    (TRL's convention, module docstring), logit transforms ``f(z) = softcap tanh(scale z /
    softcap)`` (or ``scale z``) per side, ``temperature`` on both sides after them. Returns the
    scalar loss (the divergence summed over the valid positions, over ``num_items_in_batch`` when
    given, else over their count clamped to 1), the sum of the student's per-position entropy
    (nats; from the same chunk logits, no gradient, as TRL's) and the count of valid positions.
    Unlike TRL's Triton path, masked positions are not compacted out (that needs a device
    synchronisation): they are computed and given no weight.
    """
    return fused_divergence_loss(
        student_hidden_states, student_lm_head_weight,
        [(teacher_hidden_states, teacher_lm_head_weight, teacher_lm_head_bias)], completion_mask,
        num_items_in_batch=num_items_in_batch, student_lm_head_bias=student_lm_head_bias,
        student_logit_scale=student_logit_scale, student_final_logit_softcapping=student_final_logit_softcapping,
        teacher_logit_scale=teacher_logit_scale, teacher_final_logit_softcapping=teacher_final_logit_softcapping,
        temperature=temperature, **_divergence(beta))


# ----------------------------------------------------- trl.experimental.server_distillation's loss


def _sparse_sum(student_logits, teacher_logprobs, token_ids, labels, beta, temperature, add_tail):
    """The divergence summed over the kept rows between the student and the teacher's log-probs on
    the support ``token_ids`` ``[..., k]``: with TRL's tail bucket (``topk_kd_loss``'s
    ``tail="bucket"``), or both sides renormalised over the support (the student's logits there,
    through ``kd_loss``)."""
    options = dict(labels=labels, temperature=temperature, t2_scale=False, reduction="sum", **_divergence(beta))
    if add_tail:
        return topk_kd_loss(student_logits, teacher_logprobs, token_ids, tail="bucket", **options)
    return kd_loss(student_logits.gather(-1, token_ids), teacher_logprobs, teacher_temperature=1.0, **options)


def _per_kept_token(total, labels, num_items_in_batch):
    if num_items_in_batch is None:
        return total / (labels != -100).sum().clamp_min(1)
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def server_forward_kl_loss(student_logits, teacher_topk_logprobs, teacher_topk_token_ids, labels, *,
                           temperature=1.0, add_tail=True, num_items_in_batch=None):
    """``ServerDistillationTrainer._compute_server_forward_kl_loss`` (beta = 0) from the student's
    logits ``[B, T, V]`` (TRL takes their log-softmax at ``temperature``; here no ``[B, T, V]``
    log-probabilities are built): KL(teacher || student) on the teacher's top-k tokens
    (``teacher_topk_logprobs`` / ``teacher_topk_token_ids`` ``[B, T, k]``), each side with a tail
    bucket of 1 - its mass there (``add_tail``, TRL's ``loss_add_tail``) or renormalised over them;
    summed over the tokens whose label is not -100, divided by their count (at least 1), or by
    ``num_items_in_batch``. The teacher's log-probs are used as they are (not re-tempered).

    Differs from TRL where a kept row lists a -inf teacher log-prob (a top-k shorter than k): TRL
    moves the student's mass on that token into its tail, fastkd keeps it as a point of its own.
    """
    total = _sparse_sum(student_logits, teacher_topk_logprobs, teacher_topk_token_ids, labels, 0.0, temperature,
                        add_tail)
    return _per_kept_token(total, labels, num_items_in_batch)


def server_top_1_loss(student_logits, teacher_top1_token_ids, teacher_top1_logprobs, reverse_token_ids,
                      reverse_teacher_logprobs, labels, *, beta, temperature=1.0, add_tail=True,
                      num_items_in_batch=None):
    """``ServerDistillationTrainer._compute_sparse_top_1_divergence_loss`` (beta > 0) from the
    student's logits ``[B, T, V]``: TRL's generalized JSD (reverse KL at beta = 1) on the support
    {teacher's top-1 token, reverse token} (``[B, T]`` ids and teacher log-probs of each; the
    reverse token alone at beta = 1, and once when both are the same token), with a tail bucket
    (``add_tail``) or renormalised over the support; the same reduction as
    ``server_forward_kl_loss``. A row whose support is one token is one call of the sparse loss,
    a row of two tokens another (so each support is a top-k of distinct tokens)."""
    if beta == 1:
        total = _sparse_sum(student_logits, reverse_teacher_logprobs.unsqueeze(-1), reverse_token_ids.unsqueeze(-1),
                            labels, beta, temperature, add_tail)
        return _per_kept_token(total, labels, num_items_in_batch)
    same = teacher_top1_token_ids == reverse_token_ids
    one = _sparse_sum(student_logits, teacher_top1_logprobs.unsqueeze(-1), teacher_top1_token_ids.unsqueeze(-1),
                      torch.where(same, labels, -100), beta, temperature, add_tail)
    # Rows left out of the two-token call (same token) get a distinct second column, never read.
    V = student_logits.shape[-1]
    second = torch.where(same, (teacher_top1_token_ids + 1) % V, reverse_token_ids)
    two = _sparse_sum(student_logits, torch.stack([teacher_top1_logprobs, reverse_teacher_logprobs], -1),
                      torch.stack([teacher_top1_token_ids, second], -1), torch.where(same, -100, labels),
                      beta, temperature, add_tail)
    return _per_kept_token(one + two, labels, num_items_in_batch)
