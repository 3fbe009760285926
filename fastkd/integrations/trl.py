"""TRL's generalised Jensen-Shannon loss on the fused kernels.

``generalized_jsd_loss`` has the signature and the semantics of TRL's
``GKDTrainer.generalized_jsd_loss`` (trl.experimental.gkd; Agarwal et al. 2024, eq. 1), so it can
replace that staticmethod:

    from trl.experimental.gkd import GKDTrainer
    from fastkd.integrations.trl import generalized_jsd_loss
    GKDTrainer.generalized_jsd_loss = staticmethod(generalized_jsd_loss)

What it computes, with q = softmax(student / T), p = softmax(teacher / T), per token:
    beta = 0          KL(p || q)                      (forward KL, TRL's endpoint switch)
    beta = 1          KL(q || p)                      (reverse KL)
    0 < beta < 1      beta KL(p || M) + (1 - beta) KL(q || M),  M = beta p + (1 - beta) q
No T**2 factor. Tokens whose label is -100 are dropped. Reduction, as TRL:
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

from ..functional import kd_loss

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
