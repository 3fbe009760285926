"""fused_linear_kd_loss(return_entropy=True): the student's per-row entropy from the chunk logits."""
import pytest
import torch

import fastkd
from fastkd.fused_linear import linear_logits


def _inputs():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 5, 8, dtype=torch.float64, generator=g)
    w = torch.randn(11, 8, dtype=torch.float64, generator=g)
    return h.float(), w.float(), torch.randn(15, 6, generator=g).view(3, 5, 6), torch.randn(11, 6, generator=g)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_entropy_is_the_students_at_its_temperature_and_leaves_the_loss_alone(backend, reduction):
    h, w, ht, wt = _inputs()
    h = h.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # a non-contiguous view
    b = torch.zeros(11)
    b[3] = float("-inf")  # a masked column: contributes 0, no NaN
    kw = dict(temperature=2.0, student_bias=b, student_logit_scale=1.5, chunk_size=4, backend=backend,
              reduction=reduction,
              labels=torch.tensor([[0, -100, 1, 2, 4]] * 3))
    loss, entropy = fastkd.fused_linear_kd_loss(h, w, ht, wt, return_entropy=True, **kw)
    assert entropy.shape == (3, 5) and entropy.dtype == torch.float32 and not entropy.requires_grad
    z = linear_logits(h.double(), w.double(), b.double(), logit_scale=1.5) / 2.0
    q = torch.softmax(z, -1)
    expected = -(q * torch.where(q > 0, q.log(), 0.0)).sum(-1)
    torch.testing.assert_close(entropy.double(), expected, rtol=1e-5, atol=1e-6)
    plain = fastkd.fused_linear_kd_loss(h, w, ht, wt, **kw)
    torch.testing.assert_close(loss, plain)
    (grad,) = torch.autograd.grad(loss.sum(), h)
    (plain_grad,) = torch.autograd.grad(plain.sum(), h)
    torch.testing.assert_close(grad, plain_grad)


def test_return_entropy_must_be_a_bool():
    h, w, ht, wt = _inputs()
    with pytest.raises(TypeError, match="return_entropy"):
        fastkd.fused_linear_kd_loss(h, w, ht, wt, return_entropy=1)
