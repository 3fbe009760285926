"""Extreme and degenerate rows: one-hot teachers, rows without a distribution, NaN / inf inputs,
labels out of range, and ``check_finite``. A bad row is NaN (loss and whole gradient row) and
never changes any other row."""
import pytest
import torch

import fastkd
from fastkd import reference
from fastkd.backends import torch as torch_backend
from fastkd.backends import triton as launch
from fastkd.options import make_options
from helpers import DIVERGENCES

BACKENDS = ("triton", "torch")
INF, NAN = float("inf"), float("nan")


def _loss_and_grad(s, t, backend, **kw):
    s = s.detach().clone().requires_grad_(True)
    loss = fastkd.kd_loss(s, t, backend=backend, reduction="none", **kw)
    loss.backward(torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape))
    return loss.detach(), s.grad


def _good_rows_unchanged(s, t, bad, backend, **kw):
    """Per-row loss and gradient of the rows not in ``bad`` equal a call on those rows alone."""
    loss, grad = _loss_and_grad(s, t, backend, **kw)
    good = torch.ones(s.shape[0], dtype=torch.bool)
    good[bad] = False
    sub_kw = dict(kw)
    if "labels" in kw:
        sub_kw["labels"] = kw["labels"][good]
    sub = fastkd.kd_loss(s[good].detach().clone().requires_grad_(True), t[good], backend=backend,
                         reduction="none", **sub_kw)
    assert torch.isfinite(loss[good]).all() and torch.isfinite(grad[good]).all()
    torch.testing.assert_close(loss[good], sub.detach(), rtol=1e-6, atol=1e-7)
    return loss, grad


# One-hot teachers (all other teacher logits -inf): finite wherever the divergence is.

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", DIVERGENCES)
def test_one_hot_teacher_row(backend, name):
    s = torch.randn(3, 21, dtype=torch.float64) * 2
    t = torch.randn(3, 21, dtype=torch.float64)
    t[1] = -INF
    t[1, 7] = 4.0
    kw = dict(divergence=name, temperature=1.5, beta=0.3, skew=0.2)
    loss, grad = _loss_and_grad(s, t, backend, **kw)
    s64 = s.clone().requires_grad_(True)
    oracle = reference.kd_loss(s64, t, reduction="none", **kw)
    if name == "reverse_kl":  # KL(q || p) with p = 0 where q > 0: +inf for that row only
        assert loss[1] == INF and torch.isfinite(loss[[0, 2]]).all()
        assert torch.isfinite(grad[[0, 2]]).all()
        return
    oracle.backward(torch.linspace(0.5, 1.5, 3, dtype=torch.float64))
    torch.testing.assert_close(loss, oracle.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, s64.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_hot_teacher_kl_is_cross_entropy(backend):
    """KL(onehot_k || q) = -log q_k: the CE of the tempered student on label k."""
    s = torch.randn(4, 19)
    t = torch.full((4, 19), -INF)
    k = torch.tensor([0, 18, 5, 9])
    t[torch.arange(4), k] = 1.0
    loss = fastkd.kd_loss(s, t, temperature=2.0, t2_scale=False, reduction="none", backend=backend)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(s / 2.0, k, reduction="none"))


# Rows with no distribution: all -inf (student, teacher or both), or holding NaN / +inf.

def _poison(which, s, t, row, value, column=None):
    for name, x in (("student", s), ("teacher", t)):
        if which in (name, "both"):
            if column is None:
                x[row] = value
            else:
                x[row, column] = value


CASES = [("student", -INF, None), ("teacher", -INF, None), ("both", -INF, None),
         ("student", NAN, 3), ("teacher", NAN, 20), ("student", INF, 0), ("teacher", INF, 5),
         ("both", NAN, 11)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("which,value,column", CASES)
def test_undefined_row_is_nan_and_stays_in_its_row(backend, name, which, value, column):
    s, t = torch.randn(4, 21) * 3, torch.randn(4, 21) * 3
    _poison(which, s, t, 2, value, column)
    loss, grad = _good_rows_unchanged(s, t, [2], backend, divergence=name, temperature=0.7, beta=0.4, skew=0.3)
    assert torch.isnan(loss[2]) and torch.isnan(grad[2]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
def test_undefined_row_under_a_reduction(backend, reduction):
    """The reduced loss is NaN (as in PyTorch: the failure shows), the other rows' gradients are exact."""
    s, t = torch.randn(5, 18), torch.randn(5, 18)
    t[1] = -INF
    s1 = s.clone().requires_grad_(True)
    loss = fastkd.kd_loss(s1, t, reduction=reduction, backend=backend)
    loss.backward()
    assert torch.isnan(loss)
    s2 = s.clone().requires_grad_(True)
    good = [0, 2, 3, 4]
    # A clean call on the same rows, with the same normaliser: the removed row is replaced by a copy
    # of row 0 and its gradient row is not compared.
    t2 = t.clone()
    t2[1] = t[0]
    fastkd.kd_loss(s2, t2, reduction=reduction, backend=backend).backward()
    assert torch.isnan(s1.grad[1]).all()
    torch.testing.assert_close(s1.grad[good], s2.grad[good], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_are_never_read(backend):
    """An ignored row may hold anything (NaN, inf, all -inf): loss 0, gradient 0, nothing leaks."""
    s, t = torch.randn(4, 20), torch.randn(4, 20)
    s[0], t[0] = NAN, INF
    s[3], t[3] = -INF, -INF
    labels = torch.tensor([-100, 4, 7, -100])
    loss, grad = _good_rows_unchanged(s, t, [0, 3], backend, labels=labels, hard_weight=0.5)
    assert (loss[[0, 3]] == 0).all() and (grad[[0, 3]] == 0).all()
    reduced = fastkd.kd_loss(s, t, labels=labels, hard_weight=0.5, backend=backend, check_finite=True)
    assert torch.isfinite(reduced)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocabulary_is_legal(backend):
    """-inf columns shared by student and teacher and a +inf loss where the math is infinite."""
    s, t = torch.randn(3, 17), torch.randn(3, 17)
    s[:, 4:9] = t[:, 4:9] = -INF
    loss, grad = _loss_and_grad(s, t, backend)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert (grad[:, 4:9] == 0).all()
    s[1, 0] = -INF  # teacher mass where the student has none: KL(p || q) = +inf in that row only
    loss, grad = _loss_and_grad(s, t, backend)
    assert loss[1] == INF and torch.isfinite(loss[[0, 2]]).all() and torch.isfinite(grad).all()


# Labels out of range for the hard CE.

@pytest.mark.parametrize("impl", [launch, torch_backend], ids=["triton", "torch"])
def test_label_out_of_range_is_a_nan_row_on_the_device_path(impl):
    """What a GPU call gets (no host sync to check): that row NaN, loss and whole gradient row."""
    s, t = torch.randn(4, 19), torch.randn(4, 19)
    labels = torch.tensor([3, 19, -5, -100])
    loss, grad = impl.kd_forward(s, t, labels, torch.ones(1), make_options(hard_weight=0.5))
    assert torch.isnan(loss[[1, 2]]).all() and torch.isnan(grad[[1, 2]]).all()
    assert torch.isfinite(loss[0]) and torch.isfinite(grad[0]).all()
    assert loss[3] == 0 and (grad[3] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_label_out_of_range_on_cpu_raises(backend):
    s, t = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    labels = torch.tensor([[0, 1, 2], [3, 11, -100]])
    with pytest.raises(ValueError, match=r"labels row 4 \(index \(1, 1\)\) is 11, outside \[0, 11\)"):
        fastkd.kd_loss(s, t, labels=labels, hard_weight=1.0, backend=backend)
    with pytest.raises(ValueError, match="labels"):
        reference.kd_loss(s, t, labels=labels, hard_weight=1.0)
    # Without the hard CE a label only masks: any value other than ignore_index keeps the row.
    assert torch.isfinite(fastkd.kd_loss(s, t, labels=labels, backend=backend))


@pytest.mark.gpu
def test_label_out_of_range_on_gpu_is_nan_and_check_finite_raises():
    s, t = torch.randn(3, 50, device="cuda"), torch.randn(3, 50, device="cuda")
    labels = torch.tensor([1, 50, 2], device="cuda")
    loss = fastkd.kd_loss(s, t, labels=labels, hard_weight=1.0, reduction="none")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    with pytest.raises(ValueError, match="labels row 1 is 50"):
        fastkd.kd_loss(s, t, labels=labels, hard_weight=1.0, check_finite=True)


# check_finite=True: a debug option that names the first bad row.

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which,value,column,message", [
    ("student", NAN, 2, "student_logits row 5 (index (1, 2)) contains NaN"),
    ("teacher", INF, 0, "teacher_logits row 5 (index (1, 2)) contains +inf"),
    ("teacher", -INF, None, "teacher_logits row 5 (index (1, 2)) is entirely -inf"),
    ("student", -INF, None, "student_logits row 5 (index (1, 2)) is entirely -inf"),
])
def test_check_finite_names_the_first_bad_row(backend, which, value, column, message):
    s, t = torch.randn(2, 3, 9), torch.randn(2, 3, 9)
    s2, t2 = s.view(6, 9), t.view(6, 9)
    _poison(which, s2, t2, 5, value, column)
    s2[4, 1:] = t2[4, 1:] = -INF  # legal: one finite logit left
    fastkd.kd_loss(s, t, backend=backend)  # no check by default: NaN row, no error
    with pytest.raises(ValueError, match="^check_finite: " + message.replace("(", r"\(").replace(")", r"\)")
                       .replace("+", r"\+")):
        fastkd.kd_loss(s, t, backend=backend, check_finite=True)
    _poison("both", s2, t2, 3, NAN, 0)  # an earlier bad row is the one reported
    with pytest.raises(ValueError, match=r"row 3 \(index \(1, 0\)\)"):
        fastkd.kd_loss(s, t, backend=backend, check_finite=True)


def test_check_finite_sees_overflow_after_the_temperature():
    s = torch.randn(2, 8)
    s[1, 3] = 3e38  # finite, but s / T overflows to +inf in float32
    with pytest.raises(ValueError, match="student_logits row 1 contains \\+inf"):
        fastkd.kd_loss(s, torch.randn(2, 8), temperature=0.1, check_finite=True)


def test_check_finite_out_of_range_label_and_type():
    s, t = torch.randn(3, 8), torch.randn(3, 8)
    with pytest.raises(TypeError, match="check_finite must be a bool"):
        fastkd.kd_loss(s, t, check_finite=1)
    labels = torch.tensor([1, -100, 2])
    assert torch.isfinite(fastkd.kd_loss(s, t, labels=labels, hard_weight=1.0, check_finite=True))


def test_kd_loss_module_takes_check_finite():
    s, t = torch.randn(3, 8), torch.randn(3, 8)
    s[2, 1] = NAN
    assert torch.isnan(fastkd.KDLoss()(s, t))
    with pytest.raises(ValueError, match="^check_finite: student_logits row 2 contains NaN"):
        fastkd.KDLoss(check_finite=True)(s, t)
    with pytest.raises(TypeError, match="check_finite must be a bool"):
        fastkd.KDLoss(check_finite="yes")


# Softmax and log-softmax: a row without a distribution is NaN, as in torch; other rows untouched.

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("log", [False, True])
def test_softmax_degenerate_rows(backend, log):
    x = torch.randn(5, 19)
    x[1] = -INF
    x[2, 4] = INF
    x[3, 0] = NAN
    x[4, 2:] = -INF
    fn = fastkd.log_softmax if log else fastkd.softmax
    ref = torch.log_softmax if log else torch.softmax
    x_leaf = x.clone().requires_grad_(True)
    y = fn(x_leaf, temperature=2.0, backend=backend)
    expected = ref(x / 2.0, -1)
    assert torch.isnan(y[1:4]).all()
    torch.testing.assert_close(y[[0, 4]], expected[[0, 4]])
    y[[0, 4]].sum().backward()
    assert torch.isfinite(x_leaf.grad[[0, 4]]).all()
