"""num_items_in_batch: micro-batch losses that add up to the whole batch's loss (HF Trainer convention)."""
import pytest
import torch

import fastkd
from helpers import logits

V = 29


def _batch(N=12):
    s, t = logits(N, V), logits(N, V)
    labels = torch.randint(0, V, (N,))
    labels[[0, 5, 6, 11]] = -100
    return s, t, labels


def _loss_and_grad(s, t, labels, **kw):
    s = s.detach().clone().requires_grad_(True)
    loss = fastkd.kd_loss(s, t, labels=labels, **kw)
    loss.backward()
    return loss.detach(), s.grad


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reduction", ["batchmean", "mean"])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_micro_batches_add_up_to_the_whole_batch(backend, reduction, as_tensor):
    s, t, labels = _batch()
    kw = dict(temperature=2.0, hard_weight=0.4, reduction=reduction, backend=backend)
    whole_loss, whole_grad = _loss_and_grad(s, t, labels, **kw)

    kept = (labels != -100).sum()
    n = kept if as_tensor else int(kept)
    parts = [_loss_and_grad(s[r], t[r], labels[r], num_items_in_batch=n, **kw)
             for r in (slice(0, 4), slice(4, 9), slice(9, 12))]
    torch.testing.assert_close(sum(loss for loss, _ in parts), whole_loss)
    torch.testing.assert_close(torch.cat([grad for _, grad in parts]), whole_grad)
    # and it is not the mean of the per-micro-batch means
    plain = sum(_loss_and_grad(s[r], t[r], labels[r], **kw)[0] for r in (slice(0, 4), slice(4, 9), slice(9, 12)))
    assert not torch.allclose(plain, whole_loss)


def test_module_and_3d_input_and_float_count():
    s, t, labels = _batch()
    module = fastkd.KDLoss(temperature=1.5)
    got = module(s.view(3, 4, V), t.view(3, 4, V), labels.view(3, 4), num_items_in_batch=torch.tensor(16.0))
    torch.testing.assert_close(got, fastkd.kd_loss(s, t, labels=labels, temperature=1.5, reduction="sum") / 16)


def test_zero_items_gives_zero_not_nan():
    s, t, _ = _batch()
    labels = torch.full((12,), -100)
    for n in (0, torch.tensor(0)):
        loss, grad = _loss_and_grad(s, t, labels, num_items_in_batch=n)
        assert loss == 0 and (grad == 0).all()


class _Unreadable(torch.Tensor):
    """A tensor, and everything computed from it, that fails when its value is read on the host."""
    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
             torch.Tensor.__float__, torch.Tensor.__index__}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in cls.READS:
            pytest.fail(f"a value derived from num_items_in_batch was read on the host ({func.__name__})")
        return super().__torch_function__(func, types, args, kwargs or {})


def test_the_count_tensor_is_never_read_on_the_host():
    """Reading it (``.item()``, ``int()``, ...) would synchronise with a GPU; it is only divided by."""
    s, t, labels = _batch()
    s.requires_grad_(True)
    n = torch.tensor(8).as_subclass(_Unreadable)
    loss = fastkd.kd_loss(s, t, labels=labels, num_items_in_batch=n, backend="torch")
    loss.backward()
    assert isinstance(loss, _Unreadable)  # the count did reach the result
    loss = loss.as_subclass(torch.Tensor)
    torch.testing.assert_close(loss, fastkd.kd_loss(s, t, labels=labels, reduction="sum") / 8)


@pytest.mark.parametrize("value,error,match", [
    (4, ValueError, "reduction='sum' has none"),
    (-1, ValueError, "must be >= 0"),
    (True, TypeError, "real number"),
    ("8", TypeError, "real number"),
    (torch.tensor([3, 4]), ValueError, "one-element"),
    (torch.tensor(True), TypeError, "real number"),
])
def test_bad_num_items_in_batch(value, error, match):
    s, t, labels = _batch()
    reduction = "sum" if match.startswith("reduction") else "batchmean"
    with pytest.raises(error, match=match):
        fastkd.kd_loss(s, t, labels=labels, num_items_in_batch=value, reduction=reduction)
    with pytest.raises(ValueError, match="reduction='none' has none"):
        fastkd.kd_loss(s, t, num_items_in_batch=3, reduction="none")


def test_fused_linear_micro_batches_add_up_to_the_whole_batch():
    H, N = 8, 12
    w = logits(V, H, scale=0.5).requires_grad_(True)
    h, h_t, w_t = logits(N, H, scale=1.0), logits(N, H, scale=1.0), logits(V, H, scale=0.5)
    _, _, labels = _batch(N)
    kw = dict(temperature=2.0, hard_weight=0.4, chunk_size=4, backend="torch")
    whole = fastkd.fused_linear_kd_loss(h, w, h_t, w_t, labels=labels, **kw)
    (whole_grad,) = torch.autograd.grad(whole, w)
    n = (labels != -100).sum()
    parts = [fastkd.FusedLinearKDLoss(**kw)(h[r], w, h_t[r], w_t, labels[r], num_items_in_batch=n)
             for r in (slice(0, 5), slice(5, 12))]
    (parts_grad,) = torch.autograd.grad(sum(parts), w)
    torch.testing.assert_close(sum(parts), whole)
    torch.testing.assert_close(parts_grad, whole_grad)
    with pytest.raises(ValueError, match="reduction='sum' has none"):
        fastkd.fused_linear_kd_loss(h, w, h_t, w_t, labels=labels, reduction="sum", num_items_in_batch=n)


@pytest.mark.parametrize("reduction", ["batchmean", "mean"])
def test_reference_takes_the_same_count(reduction):
    s, t, labels = _batch()
    for n in (7, torch.tensor(7), 0):
        kw = dict(labels=labels, temperature=2.0, reduction=reduction, num_items_in_batch=n)
        torch.testing.assert_close(fastkd.kd_loss(s, t, **kw), fastkd.reference.kd_loss(s, t, **kw))
