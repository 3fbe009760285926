"""The oracle itself: textbook identities and PyTorch's own losses, in float64."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastkd import reference
from helpers import DIVERGENCES, logits


@pytest.mark.parametrize("T", [0.5, 1.0, 3.0])
def test_kl_equals_pytorch_kldivloss_times_t2(T):
    s, t = logits(6, 11, dtype=torch.float64), logits(6, 11, dtype=torch.float64)
    expected = torch.nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s / T, -1), F.softmax(t / T, -1)) * T**2
    torch.testing.assert_close(reference.kd_loss(s, t, temperature=T), expected, rtol=1e-12, atol=1e-12)
    expected_mean = torch.nn.KLDivLoss(reduction="mean")(F.log_softmax(s / T, -1), F.softmax(t / T, -1))
    torch.testing.assert_close(reference.kd_loss(s, t, temperature=T, reduction="mean", t2_scale=False),
                               expected_mean, rtol=1e-12, atol=1e-12)


def test_hard_ce_equals_cross_entropy_at_t1():
    s, t = logits(2, 5, 9, dtype=torch.float64), logits(2, 5, 9, dtype=torch.float64)
    labels = torch.randint(0, 9, (2, 5))
    labels[0, 1] = labels[1, 4] = -100
    got = reference.kd_loss(s, t, temperature=4.0, labels=labels, hard_weight=1.0, soft_weight=0.0)
    expected = F.cross_entropy(s.reshape(-1, 9), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_divergence_is_zero_on_equal_and_positive_otherwise(name):
    s, t = logits(5, 13, dtype=torch.float64), logits(5, 13, dtype=torch.float64)
    same = reference.kd_loss(s, s.clone(), divergence=name, reduction="none")
    assert same.abs().max() < 1e-12
    assert (reference.kd_loss(s, t, divergence=name, reduction="none") > 0).all()


def test_closed_forms_on_two_points():
    """p = (0.75, 0.25), q = (0.5, 0.5): every divergence by hand."""
    p, q = torch.tensor([[0.75, 0.25]], dtype=torch.float64), torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    lp, lq = p.log(), q.log()
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    rkl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    m = [0.5 * 0.75 + 0.5 * 0.5, 0.5 * 0.25 + 0.5 * 0.5]
    jsd = 0.5 * (0.75 * math.log(0.75 / m[0]) + 0.25 * math.log(0.25 / m[1])) + \
        0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1]))
    a = 0.1
    skew_m = [a * 0.75 + 0.9 * 0.5, a * 0.25 + 0.9 * 0.5]
    skew = 0.75 * math.log(0.75 / skew_m[0]) + 0.25 * math.log(0.25 / skew_m[1])
    rskew_m = [a * 0.5 + 0.9 * 0.75, a * 0.5 + 0.9 * 0.25]
    rskew = 0.5 * math.log(0.5 / rskew_m[0]) + 0.5 * math.log(0.5 / rskew_m[1])
    expected = {"kl": kl, "reverse_kl": rkl, "jsd": jsd, "skew_kl": skew, "skew_reverse_kl": rskew, "tvd": 0.25}
    for name, value in expected.items():
        got = reference.row_divergence(lp, lq, name, beta=0.5, skew=a)
        assert got.item() == pytest.approx(value, rel=1e-12), name


def test_skew_zero_is_kl_and_reverse_kl():
    s, t = logits(4, 7, dtype=torch.float64), logits(4, 7, dtype=torch.float64)
    for skewed, plain in [("skew_kl", "kl"), ("skew_reverse_kl", "reverse_kl")]:
        torch.testing.assert_close(reference.kd_loss(s, t, divergence=skewed, skew=0.0),
                                   reference.kd_loss(s, t, divergence=plain), rtol=1e-12, atol=1e-12)


def test_masked_vocabulary_gives_finite_values_and_gradients():
    s, t = logits(3, 8, dtype=torch.float64), logits(3, 8, dtype=torch.float64)
    s[:, 5:] = t[:, 5:] = float("-inf")
    s.requires_grad_(True)
    for name in DIVERGENCES:
        loss = reference.kd_loss(s, t, divergence=name, temperature=2.0)
        (grad,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), name
        assert grad[:, 5:].abs().max() == 0, name


def test_all_rows_ignored_gives_zero_for_every_reduction():
    s = logits(3, 5, dtype=torch.float64).requires_grad_(True)
    t, labels = logits(3, 5, dtype=torch.float64), torch.full((3,), -100)
    for reduction in ("batchmean", "sum", "mean"):
        loss = reference.kd_loss(s, t, labels=labels, reduction=reduction)
        assert loss.item() == 0.0
        assert torch.autograd.grad(loss, s)[0].abs().max() == 0


@pytest.mark.parametrize("log", [False, True])
def test_softmax_reference(log):
    x = logits(4, 9, dtype=torch.float64)
    fn = reference.log_softmax if log else reference.softmax
    expected = (torch.log_softmax if log else torch.softmax)(x / 2.5, dim=0)
    torch.testing.assert_close(fn(x, 2.5, dim=0), expected)
