"""fastkd.integrations.trl.generalized_jsd_loss against TRL's GKDTrainer.generalized_jsd_loss.

Checked twice: against a transcription of TRL's definition written out below (so CI checks the
semantics without trl installed), and against TRL's own staticmethod when trl is importable.
"""
import importlib
import os

import pytest
import torch

from fastkd.integrations.trl import generalized_jsd_loss
from helpers import logits

B, S, V = 2, 5, 33
BETAS = (0.0, 0.3, 0.5, 1.0)
REDUCTIONS = ("batchmean", "sum", "mean", "none")


def transcribed_generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                                     reduction="batchmean", num_items_in_batch=None):
    """TRL's definition, term by term: q = softmax(s / T), p = softmax(t / T); per element
    beta = 0: p log(p / q); beta = 1: q log(q / p); otherwise, with m = beta p + (1 - beta) q,
    beta p log(p / m) + (1 - beta) q log(q / m); no T**2. Ignored tokens (label -100) are dropped;
    sum / num_items_in_batch when given, else "batchmean": sum / kept tokens (at least 1), or
    sum / size(0) without labels; "sum"; "mean": mean over the kept elements; else the elements."""
    log_q = torch.log_softmax(student_logits.double() / temperature, -1)
    log_p = torch.log_softmax(teacher_logits.double() / temperature, -1)
    q, p = log_q.exp(), log_p.exp()
    if beta == 0:
        terms = p * (log_p - log_q)
    elif beta == 1:
        terms = q * (log_q - log_p)
    else:
        log_m = torch.log(beta * p + (1 - beta) * q)
        terms = beta * p * (log_p - log_m) + (1 - beta) * q * (log_q - log_m)
    if labels is not None:
        mask = labels != -100
        terms = terms[mask]
    if num_items_in_batch is not None:
        return terms.sum() / num_items_in_batch
    if reduction == "batchmean":
        return terms.sum() / (mask.sum().clamp_min(1) if labels is not None else max(terms.size(0), 1))
    if reduction == "sum":
        return terms.sum()
    if reduction == "mean":
        return terms.mean()
    return terms


def _inputs(dtype=torch.float32):
    s, t = logits(B, S, V, dtype=dtype), logits(B, S, V, dtype=dtype)
    labels = torch.randint(0, V, (B, S))
    labels[0, :2] = labels[1, 4] = -100
    return s, t, labels


def _value_and_grad(fn, s, t, **kw):
    s = s.detach().clone().requires_grad_(True)
    loss = fn(s, t, **kw)
    weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).view(loss.shape)  # upstream != 1
    (grad,) = torch.autograd.grad((loss * weights).sum(), s)
    return loss.detach(), grad


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_labels", [True, False])
def test_matches_the_transcribed_definition(beta, reduction, with_labels):
    s, t, labels = _inputs()
    kw = dict(labels=labels if with_labels else None, beta=beta, temperature=2.0, reduction=reduction)
    ours, ours_grad = _value_and_grad(generalized_jsd_loss, s, t, **kw)
    ref, ref_grad = _value_and_grad(transcribed_generalized_jsd_loss, s, t, **kw)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    torch.testing.assert_close(ours, ref.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_grad, ref_grad.float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("num_items", [7, torch.tensor(7)])
def test_num_items_in_batch_overrides_the_reduction(num_items):
    s, t, labels = _inputs()
    for reduction in ("batchmean", "none"):
        kw = dict(labels=labels, beta=0.5, reduction=reduction, num_items_in_batch=num_items)
        torch.testing.assert_close(generalized_jsd_loss(s, t, **kw),
                                   transcribed_generalized_jsd_loss(s, t, **kw).float())


def test_bf16_logits_give_a_bf16_loss_close_to_float64():
    s, t, labels = _inputs(torch.bfloat16)
    loss = generalized_jsd_loss(s, t, labels=labels, beta=0.3)
    assert loss.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), transcribed_generalized_jsd_loss(s, t, labels=labels, beta=0.3),
                               rtol=1e-2, atol=1e-3)


def _trl_generalized_jsd_loss():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # GKDTrainer lives in trl.experimental
    for module in ("trl.experimental.gkd", "trl"):
        try:
            return importlib.import_module(module).GKDTrainer.generalized_jsd_loss
        except (ImportError, AttributeError):
            continue
    pytest.skip("trl is not installed (pip install trl): TRL's own GKDTrainer.generalized_jsd_loss is "
                "unavailable; the transcription tests above still check the semantics")


@pytest.mark.parametrize("beta", BETAS)
def test_matches_trl(beta):
    trl_loss = _trl_generalized_jsd_loss()
    s, t, labels = _inputs()
    for reduction in REDUCTIONS:
        for kw in (dict(labels=labels), dict(labels=None), dict(labels=labels, num_items_in_batch=torch.tensor(9))):
            kw.update(beta=beta, temperature=1.5, reduction=reduction)
            ours, ours_grad = _value_and_grad(generalized_jsd_loss, s, t, **kw)
            theirs, theirs_grad = _value_and_grad(trl_loss, s, t, **kw)
            assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-4, atol=1e-6)
