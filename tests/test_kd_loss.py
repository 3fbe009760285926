"""kd_loss on both backends against the float64 reference: every option, dtype and odd shape."""
import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd import reference
from helpers import DTYPES, assert_close_to_oracle, logits

BACKENDS = ("triton", "torch")


def _value_and_grad(fn, student, teacher, grad_out=None, **kw):
    s = student.detach().clone().requires_grad_(True)
    loss = fn(s, teacher, **kw)
    (grad,) = torch.autograd.grad(loss, s, grad_out)
    return loss.detach(), grad


def check_against_oracle(student, teacher, backend, grad_out=None, **kw):
    """fastkd's loss and gradient vs the float64 oracle, with the same-dtype reference as yardstick."""
    dtype = student.dtype
    loss, grad = _value_and_grad(fastkd.kd_loss, student, teacher, grad_out, backend=backend, **kw)
    loss64, grad64 = _value_and_grad(reference.kd_loss, student.double(), teacher.double(),
                                     None if grad_out is None else grad_out.double(), **kw)
    loss_same, grad_same = _value_and_grad(reference.kd_loss, student, teacher, grad_out, **kw)
    V = student.shape[-1]
    assert loss.dtype == torch.float32 and grad.dtype == dtype and grad.shape == student.shape
    assert_close_to_oracle(loss, loss64, loss_same, dtype=dtype, grows_with=V)
    assert_close_to_oracle(grad, grad64, grad_same, dtype=dtype, grows_with=V)
    return loss, grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_forward_kl_all_reductions_and_dtypes(backend, dtype, reduction):
    s, t = logits(7, 37, dtype=dtype), logits(7, 37, dtype=dtype)
    grad_out = torch.randn(7) if reduction == "none" else None
    check_against_oracle(s, t, backend, grad_out, temperature=2.0, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t2_scale", [True, False])
@pytest.mark.parametrize("hard_weight,soft_weight", [(0.0, 1.0), (0.3, 0.7), (1.0, 0.0)])
def test_labels_ignore_index_and_hard_ce(backend, t2_scale, hard_weight, soft_weight):
    s, t = logits(3, 4, 29), logits(3, 4, 29)
    labels = torch.randint(0, 29, (3, 4))
    labels[0, 0] = labels[2, 3] = labels[1, 1] = -1
    check_against_oracle(s, t, backend, temperature=3.0, labels=labels, ignore_index=-1,
                         hard_weight=hard_weight, soft_weight=soft_weight, t2_scale=t2_scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_pytorch_kldivloss_idiom(backend):
    T = 2.5
    s, t = logits(6, 40), logits(6, 40)
    s.requires_grad_(True)
    ours = fastkd.KDLoss(temperature=T, backend=backend)(s, t)
    (g_ours,) = torch.autograd.grad(ours, s)
    idiom = torch.nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s / T, -1), F.softmax(t / T, -1)) * T**2
    (g_idiom,) = torch.autograd.grad(idiom, s)
    torch.testing.assert_close(ours, idiom, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours, g_idiom, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("student_dtype,teacher_dtype", [(torch.bfloat16, torch.float32),
                                                          (torch.float32, torch.float16),
                                                          (torch.float16, torch.bfloat16)])
def test_mixed_student_and_teacher_dtypes(backend, student_dtype, teacher_dtype):
    s, t = logits(5, 33, dtype=student_dtype), logits(5, 33, dtype=teacher_dtype)
    loss, grad = _value_and_grad(fastkd.kd_loss, s, t, backend=backend, temperature=1.5)
    loss64, grad64 = _value_and_grad(reference.kd_loss, s.double(), t.double(), temperature=1.5)
    loss_same, grad_same = _value_and_grad(reference.kd_loss, s, t, temperature=1.5)
    assert grad.dtype == student_dtype
    assert_close_to_oracle(loss, loss64, loss_same, dtype=student_dtype, grows_with=33)
    assert_close_to_oracle(grad, grad64, grad_same, dtype=student_dtype, grows_with=33)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V", [1, 2, 16, 17, 31, 53])
def test_odd_vocabulary_sizes(backend, V):
    s, t = logits(4, V), logits(4, V)
    labels = torch.randint(0, V, (4,))
    check_against_oracle(s, t, backend, labels=labels, hard_weight=0.5, temperature=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_empty_batch(backend, reduction):
    s = torch.zeros(0, 11, requires_grad=True)
    loss = fastkd.kd_loss(s, torch.zeros(0, 11), reduction=reduction, backend=backend)
    assert loss.shape == ((0,) if reduction == "none" else ())
    assert torch.isfinite(loss).all() and loss.sum().item() == 0
    loss.sum().backward()
    assert s.grad.shape == (0, 11)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_all_rows_ignored(backend, reduction):
    s = logits(4, 19).requires_grad_(True)
    labels = torch.full((4,), -100)
    loss = fastkd.kd_loss(s, logits(4, 19), labels=labels, hard_weight=0.5, reduction=reduction, backend=backend)
    assert (loss == 0).all()
    loss.sum().backward()
    assert (s.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocabulary_minus_inf(backend):
    s, t = logits(4, 30), logits(4, 30)
    s[:, 20:] = t[:, 20:] = float("-inf")  # a padded vocabulary
    t[1, 3] = float("-inf")  # one token the teacher rules out
    labels = torch.tensor([0, 5, -100, 19])
    loss, grad = check_against_oracle(s, t, backend, labels=labels, hard_weight=0.5, temperature=2.0)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert (grad[:, 20:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_strided_views_and_inplace_write_into_the_view(backend):
    base_s, base_t = logits(2, 3, 50), logits(2, 3, 50)
    s, t = base_s[..., 5:40], base_t[..., 2:37]  # rows of stride 50, not V = 35
    expected_loss, expected_grad = check_against_oracle(s, t, backend, temperature=1.3)

    storage = base_s.clone()
    view = storage[..., 5:40].requires_grad_(True)
    loss = fastkd.kd_loss(view, t, temperature=1.3, inplace=True, backend=backend)
    loss.backward()
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(view.grad, expected_grad)
    torch.testing.assert_close(storage[..., 5:40], expected_grad)  # written into the caller's storage
    assert storage[..., :5].equal(base_s[..., :5]) and storage[..., 40:].equal(base_s[..., 40:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_upstream_gradient_and_retained_graph(backend):
    s = logits(5, 23).requires_grad_(True)
    t = logits(5, 23)
    loss = fastkd.kd_loss(s, t, temperature=2.0, backend=backend)
    (g1,) = torch.autograd.grad(loss * 3.0, s, retain_graph=True)
    (g2,) = torch.autograd.grad(loss * 3.0, s, retain_graph=True)
    (g3,) = torch.autograd.grad(loss, s)
    torch.testing.assert_close(g1, g2)
    torch.testing.assert_close(g1, 3.0 * g3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient_wanted(backend):
    s, t = logits(4, 21), logits(4, 21)
    with torch.no_grad():
        loss = fastkd.kd_loss(s, t, backend=backend)
    torch.testing.assert_close(loss, reference.kd_loss(s, t))
    assert not loss.requires_grad


def test_properties_on_the_kernel_path():
    s, t = logits(6, 45), logits(6, 45)
    kl = fastkd.kd_loss(s, t, reduction="none", backend="triton")
    assert (kl > 0).all()
    assert fastkd.kd_loss(t, t.clone(), reduction="none", backend="triton").abs().max() < 1e-6
    shifted = fastkd.kd_loss(s + 7.0, t - 3.0, reduction="none", backend="triton")
    torch.testing.assert_close(shifted, kl, rtol=1e-4, atol=1e-5)


def test_gradcheck_forward_kl_through_triton():
    s = logits(3, 20, dtype=torch.float64).requires_grad_(True)
    t = logits(3, 20, dtype=torch.float64)
    labels = torch.tensor([4, -100, 19])
    for reduction, fast_mode in (("batchmean", False), ("none", True)):  # the full Jacobian once
        assert torch.autograd.gradcheck(
            lambda s: fastkd.kd_loss(s, t, temperature=2.0, labels=labels, hard_weight=0.4,
                                     reduction=reduction, backend="triton"), (s,), fast_mode=fast_mode)
