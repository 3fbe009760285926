"""Sparse top-k teacher: ``teacher_topk`` and ``topk_kd_loss`` (Triton path in the interpreter, and
the torch backend) against the dense float64 reference ``fastkd.reference.topk_kd_loss``."""
import math
import pickle

import pytest
import torch

import fastkd
import fastkd.backends.triton
from fastkd import reference
from fastkd.checks import check_topk_values
from fastkd.options import make_options

from helpers import DIVERGENCES, assert_close_to_oracle, logits

TAILS = ("bucket", "renormalize", "ignore")
BACKENDS = ("triton", "torch")


@pytest.fixture(autouse=True)
def small_k_blocks(monkeypatch):
    """Force the kernel's loops over the k listed points to take several blocks."""
    if not torch.cuda.is_available():
        monkeypatch.setattr(fastkd.backends.triton, "MAX_BLOCK_K", 2)


def sparse_teacher(N, V, k, *, temperature=1.0, dtype=torch.float64, device="cpu"):
    """Top-k log-probabilities of a random teacher at ``temperature``, listed in a random order
    (the loss must not depend on it), and the teacher logits."""
    t = logits(N, V, dtype=torch.float64, device=device)
    lp, idx = fastkd.teacher_topk(t, k, temperature=temperature, backend="torch")
    order = torch.argsort(torch.rand(N, k, device=device), dim=-1)
    return lp.gather(1, order).to(dtype), idx.gather(1, order), t


def loss_and_grad(fn, student, *args, upstream=None, **kw):
    x = student.detach().clone().requires_grad_()
    loss = fn(x, *args, **kw)
    (grad,) = torch.autograd.grad(loss, x, upstream if upstream is not None else torch.ones_like(loss))
    return loss.detach(), grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_matches_dense_reference(device, backend, tail, divergence):
    """Every tail mode and divergence, with T != 1, hard CE and one ignored row, float64."""
    N, V, k = 3, 23, 5
    lp, idx, _ = sparse_teacher(N, V, k, temperature=2.0, device=device)
    s = logits(N, V, dtype=torch.float64, device=device)
    labels = torch.tensor([22, -100, 0], device=device)
    kw = dict(tail=tail, divergence=divergence, temperature=2.0, labels=labels, hard_weight=0.3, reduction="none")
    upstream = torch.rand(N, dtype=torch.float64, device=device)
    expected, expected_grad = loss_and_grad(reference.topk_kd_loss, s, lp, idx, upstream=upstream, **kw)
    loss, grad = loss_and_grad(fastkd.topk_kd_loss, s, lp, idx, upstream=upstream, backend=backend, **kw)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)
    assert loss[1] == 0 and grad[1].eq(0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_k_equal_to_v_bucket_is_dense_kd_loss(device, backend, divergence):
    N, V = 2, 10
    s, t = logits(N, V, dtype=torch.float64, device=device), logits(N, V, dtype=torch.float64, device=device)
    lp, idx = fastkd.teacher_topk(t, V, temperature=1.5, backend="torch")
    kw = dict(divergence=divergence, temperature=1.5)
    expected, expected_grad = loss_and_grad(reference.kd_loss, s, t, **kw)
    loss, grad = loss_and_grad(fastkd.topk_kd_loss, s, lp, idx, tail="bucket", backend=backend, **kw)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", TAILS)
def test_k_equal_to_one(device, backend, tail):
    N, V = 3, 20
    lp, idx, _ = sparse_teacher(N, V, 1, device=device)
    s = logits(N, V, dtype=torch.float64, device=device)
    expected, expected_grad = loss_and_grad(reference.topk_kd_loss, s, lp, idx, tail=tail)
    loss, grad = loss_and_grad(fastkd.topk_kd_loss, s, lp, idx, tail=tail, backend=backend)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradcheck_triton_bucket(device, divergence):
    lp, idx, _ = sparse_teacher(2, 7, 3, temperature=1.7, device=device)
    s = logits(2, 7, dtype=torch.float64, device=device).requires_grad_()
    fn = lambda x: fastkd.topk_kd_loss(x, lp, idx, divergence=divergence, temperature=1.7,  # noqa: E731
                                       reduction="sum", backend="triton")
    assert torch.autograd.gradcheck(fn, (s,), fast_mode=True)


@pytest.mark.parametrize("tail", ("renormalize", "ignore"))
@pytest.mark.parametrize("divergence", ("reverse_kl", "skew_reverse_kl"))
def test_gradcheck_triton_unnormalised_student(device, tail, divergence):
    """The k-point student is not normalised here: the gradient is not the dense table's."""
    lp, idx, _ = sparse_teacher(2, 7, 3, device=device)
    s = logits(2, 7, dtype=torch.float64, device=device).requires_grad_()
    fn = lambda x: fastkd.topk_kd_loss(x, lp, idx, tail=tail, divergence=divergence, backend="triton")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (s,), fast_mode=True)


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradcheck_torch(device, tail, divergence):
    lp, idx, _ = sparse_teacher(3, 9, 4, temperature=0.7, device=device)
    s = logits(3, 9, dtype=torch.float64, device=device).requires_grad_()
    labels = torch.tensor([1, -100, 8], device=device)
    fn = lambda x: fastkd.topk_kd_loss(x, lp, idx, tail=tail, divergence=divergence, temperature=0.7,  # noqa: E731
                                       labels=labels, hard_weight=0.5, backend="torch")
    assert torch.autograd.gradcheck(fn, (s,))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_close_to_oracle(device, backend, dtype):
    N, V, k = 3, 40, 6
    lp, idx, _ = sparse_teacher(N, V, k, dtype=dtype, device=device)  # teacher log-probs in that dtype too
    s = logits(N, V, dtype=dtype, device=device)
    kw = dict(divergence="jsd", temperature=2.0, reduction="none")
    oracle, oracle_grad = loss_and_grad(reference.topk_kd_loss, s.double(), lp.double(), idx, **kw)
    same, same_grad = loss_and_grad(reference.topk_kd_loss, s, lp, idx, **kw)
    loss, grad = loss_and_grad(fastkd.topk_kd_loss, s, lp, idx, backend=backend, **kw)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert_close_to_oracle(loss, oracle, same, dtype=dtype, grows_with=V)
    assert_close_to_oracle(grad, oracle_grad, same_grad, dtype=dtype, grows_with=V)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tail_survives_a_student_confident_on_the_listed_tokens(device, backend):
    """Student mass outside the listed tokens ~1e-9 (below float32's resolution of 1 - sum q) and a
    teacher tail of ~1e-3: forward KL stays finite and close to the float64 value."""
    V, k = 40, 4
    s = torch.zeros(2, V, device=device)
    s[:, :k] = torch.tensor([24.0, 2.0, 1.0, 0.5], device=device)
    idx = torch.arange(k, device=device).expand(2, k).contiguous()
    p = torch.tensor([0.9, 0.05, 0.03, 0.019], dtype=torch.float64, device=device)  # tail 1e-3
    lp = p.log().float().expand(2, k).contiguous()
    oracle = reference.topk_kd_loss(s.double(), lp.double(), idx, reduction="none")
    loss = fastkd.topk_kd_loss(s, lp, idx, reduction="none", backend=backend)
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss.double(), oracle, rtol=1e-4, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions_and_module(device, backend):
    N, V, k = 4, 18, 3
    lp, idx, _ = sparse_teacher(N, V, k, device=device)
    s = logits(N, V, dtype=torch.float64, device=device)
    labels = torch.tensor([-100, 2, 5, 7], device=device)
    for reduction in ("batchmean", "sum", "mean"):
        kw = dict(tail="renormalize", reduction=reduction, labels=labels)
        expected, expected_grad = loss_and_grad(reference.topk_kd_loss, s, lp, idx, **kw)
        loss, grad = loss_and_grad(fastkd.topk_kd_loss, s, lp, idx, backend=backend, **kw)
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(grad, expected_grad)
    module = fastkd.TopKKDLoss(tail="renormalize", reduction="mean", backend=backend)
    torch.testing.assert_close(module(s, lp, idx, labels), expected)
    # gradient accumulation: num_items_in_batch replaces the kept-row count of "batchmean"
    summed = reference.topk_kd_loss(s, lp, idx, labels=labels, reduction="sum")
    accumulated = fastkd.topk_kd_loss(s, lp, idx, labels=labels, num_items_in_batch=torch.tensor(7, device=device),
                                      backend=backend)
    torch.testing.assert_close(accumulated, summed / 7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_calls_and_retained_graph(device, backend):
    lp, idx, _ = sparse_teacher(3, 21, 4, device=device)
    s = logits(3, 21, device=device).requires_grad_()
    first = fastkd.topk_kd_loss(s, lp, idx, backend=backend)
    (2 * first).backward(retain_graph=True)
    grad_once = s.grad.clone()
    (2 * first).backward()
    torch.testing.assert_close(s.grad, 2 * grad_once)
    again = fastkd.topk_kd_loss(s, lp, idx, backend=backend)
    assert torch.equal(again, first.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_may_hold_anything(device, backend):
    """Ignored rows get loss 0 and gradient 0, and their (invalid) indices are never read."""
    N, V, k = 3, 17, 4
    lp, idx, _ = sparse_teacher(N, V, k, device=device)
    idx[0] = torch.tensor([-7, 3, 3, 99], device=device)
    s = logits(N, V, dtype=torch.float64, device=device)
    labels = torch.tensor([-100, 4, -100], device=device)
    expected, expected_grad = loss_and_grad(reference.topk_kd_loss, s, lp, idx, labels=labels, reduction="sum")
    loss, grad = loss_and_grad(fastkd.topk_kd_loss, s, lp, idx, labels=labels, reduction="sum", backend=backend)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)
    assert grad[0].eq(0).all() and grad[2].eq(0).all() and grad[1].ne(0).any()
    none_kept = torch.full((N,), -100, device=device)
    loss, grad = loss_and_grad(fastkd.topk_kd_loss, s, lp, idx, labels=none_kept, backend=backend)
    assert loss == 0 and grad.eq(0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_and_strided_student(device, backend):
    N, V, k = 3, 20, 4
    lp, idx, _ = sparse_teacher(N, V, k, device=device)
    s = logits(N, V, device=device)
    expected, expected_grad = loss_and_grad(reference.topk_kd_loss, s, lp, idx, divergence="tvd")
    wide = torch.cat([s, logits(N, 5, device=device)], 1).requires_grad_()
    strided = wide[:, :V]  # row stride V + 5, passed without a copy
    assert strided.stride(0) == V + 5
    loss = fastkd.topk_kd_loss(strided, lp, idx, divergence="tvd", backend=backend)
    loss.backward()
    torch.testing.assert_close(loss.detach(), expected)
    torch.testing.assert_close(wide.grad[:, :V], expected_grad)
    assert wide.grad[:, V:].eq(0).all()
    labels = torch.tensor([2, -100, 19], device=device)
    kw = dict(divergence="tvd", labels=labels, hard_weight=0.5)
    _, expected_grad = loss_and_grad(reference.topk_kd_loss, s, lp, idx, **kw)
    x = s.clone().requires_grad_()  # the gradient overwrites x's storage; the hard CE reads x first
    fastkd.topk_kd_loss(x, lp, idx, inplace=True, backend=backend, **kw).backward()
    torch.testing.assert_close(x.grad, expected_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_student_logits_and_empty_input(device, backend):
    N, V, k = 2, 16, 3
    lp, idx, _ = sparse_teacher(N, V, k, device=device)
    s = logits(N, V, dtype=torch.float64, device=device)
    unlisted = [j for j in range(V) if j not in idx[0].tolist()][:4]
    s[0, unlisted] = float("-inf")
    for divergence in ("kl", "reverse_kl"):
        expected, expected_grad = loss_and_grad(reference.topk_kd_loss, s, lp, idx, divergence=divergence)
        loss, grad = loss_and_grad(fastkd.topk_kd_loss, s, lp, idx, divergence=divergence, backend=backend)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(grad, expected_grad)
    empty = fastkd.topk_kd_loss(s[:0], lp[:0], idx[:0], reduction="none", backend=backend)
    assert empty.shape == (0,)


@pytest.mark.parametrize("backend", ("triton", "torch"))
def test_out_of_range_index_unchecked_is_a_nan_row(device, monkeypatch, backend):
    monkeypatch.delenv("FASTKD_DEBUG", raising=False)
    lp, idx, _ = sparse_teacher(3, 12, 3, device=device)
    idx[1, 2] = 12
    s = logits(3, 12, dtype=torch.float64, device=device)
    loss, grad = loss_and_grad(fastkd.topk_kd_loss, s, lp, idx, reduction="none", backend=backend,
                               validate_indices=False)
    assert torch.isnan(loss[1]) and torch.isnan(grad[1]).all()
    assert torch.isfinite(loss[[0, 2]]).all() and torch.isfinite(grad[[0, 2]]).all()


@pytest.mark.parametrize("backend", ("triton", "torch"))
@pytest.mark.parametrize("tail", ("bucket", "renormalize", "ignore"))
def test_repeated_index_unchecked_is_a_nan_row(device, monkeypatch, backend, tail):
    monkeypatch.delenv("FASTKD_DEBUG", raising=False)
    lp, idx, _ = sparse_teacher(3, 12, 3, device=device)
    idx[1, 2] = idx[1, 0]
    s = logits(3, 12, dtype=torch.float64, device=device)
    loss, grad = loss_and_grad(fastkd.topk_kd_loss, s, lp, idx, tail=tail, reduction="none", backend=backend,
                               validate_indices=False)
    assert torch.isnan(loss[1]) and torch.isnan(grad[1]).all()
    assert torch.isfinite(loss[[0, 2]]).all() and torch.isfinite(grad[[0, 2]]).all()
    expected, expected_grad = loss_and_grad(reference.topk_kd_loss, s[[0, 2]], lp[[0, 2]], idx[[0, 2]], tail=tail,
                                            reduction="none")
    torch.testing.assert_close(loss[[0, 2]], expected)
    torch.testing.assert_close(grad[[0, 2]], expected_grad)


@pytest.mark.parametrize("how", ("torch_backend", "argument", "environment"))
@pytest.mark.parametrize("problem", ("out_of_range", "repeated"))
def test_index_validation(device, monkeypatch, how, problem):
    lp, idx, _ = sparse_teacher(3, 12, 3, device=device)
    idx[2, 1] = -1 if problem == "out_of_range" else idx[2, 0]
    s = logits(3, 12, device=device)
    kw = {"torch_backend": dict(backend="torch"), "argument": dict(backend="triton", validate_indices=True),
          "environment": dict(backend="triton")}[how]
    if how == "environment":
        monkeypatch.setenv("FASTKD_DEBUG", "1")
    message = "outside" if problem == "out_of_range" else "more than once"
    with pytest.raises(ValueError, match=f"teacher_indices row 2 .*{message}"):
        fastkd.topk_kd_loss(s, lp, idx, **kw)


def test_argument_errors(device):
    lp, idx, _ = sparse_teacher(2, 10, 3, device=device)
    s = logits(2, 10, device=device)
    cases = [
        ((s, lp, idx), dict(tail="drop"), ValueError, "unknown tail"),
        ((s, lp, idx.float()), {}, TypeError, "teacher_indices must be int32 or int64"),
        ((s, lp, idx[:, :2]), {}, ValueError, "teacher_indices shape"),
        ((s, lp[:1], idx[:1]), {}, ValueError, "leading dims"),
        ((s, lp.clone().requires_grad_(), idx), {}, ValueError, "detach"),
        ((s, torch.zeros(2, 11, device=device), torch.arange(11, device=device).expand(2, 11)), {}, ValueError,
         "k must be in"),
        ((s, lp, idx), dict(labels=torch.zeros(3, dtype=torch.long, device=device)), ValueError, "labels shape"),
        ((s, lp, idx), dict(hard_weight=1.0), ValueError, "needs labels"),
        ((s, lp, idx), dict(validate_indices="yes"), TypeError, "validate_indices must be a bool"),
        ((s, lp, idx), dict(divergence="jsd", beta=1.0), ValueError, "beta"),
    ]
    for args, kw, error, match in cases:
        with pytest.raises(error, match=match):
            fastkd.topk_kd_loss(*args, **kw)


@pytest.mark.parametrize("k, dtype", [(1, torch.float32), (5, torch.bfloat16), (20, torch.float32),
                                      (20, torch.float64)])
def test_teacher_topk_matches_torch_topk(device, k, dtype):
    """Multi-block rows (V = 37 > 16), k above and below the block, -inf entries, T != 1."""
    N, V = 2, 37
    t = logits(N, V, dtype=dtype, device=device)
    t[0, :10] = float("-inf")
    lp, idx = fastkd.teacher_topk(t, k, temperature=0.5, backend="triton")
    x = t.double() / 0.5
    values, expected_idx = torch.topk(x, k, dim=-1)  # tie-free input (bf16: few distinct values, see below)
    expected = values - torch.logsumexp(x, -1, keepdim=True)
    assert lp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and idx.dtype == torch.int32
    assert lp.shape == idx.shape == (N, k)
    if dtype == torch.bfloat16:  # bfloat16 has ties: same values, ties lowest index first
        order = torch.sort(-x, dim=-1, stable=True).indices[:, :k]
        assert torch.equal(idx.long(), order)
    else:
        assert torch.equal(idx.long(), expected_idx)
    torch.testing.assert_close(lp.double(), expected, rtol=1e-6, atol=1e-6)
    torch_lp, torch_idx = fastkd.teacher_topk(t, k, temperature=0.5, backend="torch")
    torch.testing.assert_close(torch_lp, lp)
    if dtype != torch.bfloat16:  # with ties the two may pick different, equal-valued columns
        assert torch.equal(torch_idx, idx)


def test_teacher_topk_ties_lowest_index_first_and_shapes(device):
    t = torch.tensor([[0.0, 1.0, 1.0, 0.5, 1.0, 0.5]] * 2, device=device).reshape(2, 1, 6)
    lp, idx = fastkd.teacher_topk(t, 4, backend="triton")
    assert lp.shape == idx.shape == (2, 1, 4)
    assert idx[0, 0].tolist() == [1, 2, 4, 3]
    assert (lp[..., :-1] >= lp[..., 1:]).all()
    with pytest.raises(ValueError, match="k must be in"):
        fastkd.teacher_topk(t, 7)
    with pytest.raises(TypeError, match="k must be an int"):
        fastkd.teacher_topk(t, 2.0)


def test_teacher_topk_above_the_kernels_k_uses_torch_topk(device, monkeypatch):
    monkeypatch.setattr(fastkd.backends.triton, "MAX_TOPK_K", 4)
    t = logits(2, 30, device=device)
    lp, idx = fastkd.teacher_topk(t, 6, backend="triton")
    values, expected_idx = torch.topk(t, 6)
    assert torch.equal(idx.long(), expected_idx)
    torch.testing.assert_close(lp, values - t.logsumexp(-1, keepdim=True))


def test_teacher_topk_then_loss_round_trip(device):
    """teacher_topk's output is what topk_kd_loss takes: k = V reproduces kd_loss from the logits."""
    s, t = logits(2, 13, device=device), logits(2, 13, device=device)
    lp, idx = fastkd.teacher_topk(t, 13, temperature=3.0, backend="triton")
    loss = fastkd.topk_kd_loss(s, lp, idx, temperature=3.0, backend="triton")
    torch.testing.assert_close(loss, reference.kd_loss(s, t, temperature=3.0), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- fastkd.TopK, the top-k teacher as one value

def test_topk_value_keeps_its_temperature_through_reshaping(device):
    """teacher_topk returns a fastkd.TopK; its own reshaping and moves apply to both tensors and keep
    the temperature, so each still refuses a loss at another temperature, and each gives the loss
    of the plain tensors it holds."""
    s = logits(6, 11, device=device)
    topk = fastkd.teacher_topk(logits(2, 3, 11, device=device), 4, temperature=2.0)
    assert isinstance(topk, fastkd.TopK) and topk.temperature == 2.0 and topk.logprobs.shape == (2, 3, 4)
    lp, idx = topk  # unpacks as the pair
    assert lp is topk.logprobs and idx is topk.indices
    forms = {"view": topk.view(-1, 4), "reshape": topk.reshape(6, 4), "flatten": topk.flatten(),
             "contiguous": topk.contiguous().view(6, 4), "to": topk.to(device).to(torch.float64).view(6, 4),
             "rows": topk.rows((slice(None), slice(0, 3))).flatten(),
             "pickle": pickle.loads(pickle.dumps(topk.view(6, 4)))}
    for name, form in forms.items():
        assert isinstance(form, fastkd.TopK) and form.temperature == 2.0, name
        assert form.logprobs.shape == form.indices.shape == (6, 4) and form.indices.dtype == torch.int32, name
        with pytest.raises(ValueError, match=r"taken at temperature 2.0 .* pass teacher_temperature=2.0"):
            fastkd.topk_kd_loss(s, form, temperature=1.0)
        expected = fastkd.topk_kd_loss(s, lp.reshape(6, 4).to(form.logprobs.dtype), idx.reshape(6, 4), temperature=2.0)
        assert torch.equal(fastkd.topk_kd_loss(s, form, temperature=2.0), expected), name
        assert torch.equal(fastkd.topk_kd_loss(s, form, temperature=1.0, teacher_temperature=2.0),
                           fastkd.topk_kd_loss(s, *form, temperature=1.0, teacher_temperature=2.0)), name
    with pytest.raises(ValueError, match="taken at temperature 2.0"):
        fastkd.TopKKDLoss(temperature=1.0)(s, topk.view(6, 4))
    row = topk.rows(1)
    assert row.logprobs.shape == (3, 4) and row.temperature == 2.0
    unknown = fastkd.TopK(lp.view(6, 4), idx.view(6, 4))  # no temperature: taken to be at the loss's, as plain tensors
    assert unknown.temperature is None
    assert torch.equal(fastkd.topk_kd_loss(s, unknown, temperature=1.0),
                       fastkd.topk_kd_loss(s, *unknown, temperature=1.0))


def test_topk_value_errors():
    lp, idx = fastkd.teacher_topk(logits(2, 9), 3)
    s = logits(2, 9)
    cases = [(lambda: fastkd.TopK(lp, idx[:, :2]), ValueError, "logprobs shape"),
             (lambda: fastkd.TopK(lp[0, 0], idx[0, 0]), ValueError, r"must be the same \[..., k\]"),
             (lambda: fastkd.TopK(lp.tolist(), idx), TypeError, "TopK takes tensors"),
             (lambda: fastkd.TopK(lp, idx, 0.0), ValueError, "temperature must be > 0"),
             (lambda: fastkd.TopK(lp, idx, float("inf")), ValueError, "temperature must be finite"),
             (lambda: fastkd.TopK(lp, idx, 1.0).flatten(0, -1), ValueError, "end_dim must leave the last dim"),
             (lambda: fastkd.topk_kd_loss(s, fastkd.TopK(lp, idx), idx), TypeError, "without teacher_indices"),
             (lambda: fastkd.topk_kd_loss(s, lp), TypeError, "teacher_indices is required")]
    for make, error, match in cases:
        with pytest.raises(error, match=match):
            make()


# ---------------------------------------------------------------- log-probability values

@pytest.mark.parametrize("backend", BACKENDS)
def test_probabilities_or_shifted_values_are_refused_on_cpu(backend):
    """Values that are not log-probabilities (a value above 0, or a row whose probabilities sum to
    more than 1) are a ValueError naming the argument and row, on CPU tensors whatever the backend;
    ignored rows may hold anything; -inf entries and rounding to bf16 / fp16 are fine."""
    s = logits(4, 50)
    lp, idx = fastkd.teacher_topk(logits(4, 50), 8, temperature=2.0)
    positive = lp.clone()
    positive[0, 3] = 1e-2
    for bad, row, match in ((lp.exp(), 0, "above 0"), (lp + 1, 0, "above 0"), (positive, 0, "a value above 0"),
                            (lp - lp.amax(-1, keepdim=True), 0, "a log-sum-exp above 0"),
                            (torch.where(torch.arange(4)[:, None] == 2, lp.exp(), lp), 2, "above 0")):
        with pytest.raises(ValueError, match=f"teacher_logprobs row {row} .*{match}"):
            fastkd.topk_kd_loss(s, bad, idx, temperature=2.0, backend=backend)
    strided = torch.cat([lp.exp(), lp], -1)[:, :8]  # a non-contiguous view of probabilities, then of log-probs
    with pytest.raises(ValueError, match="teacher_logprobs row 0 .*above 0"):
        fastkd.topk_kd_loss(s, strided, idx, temperature=2.0, backend=backend)
    fastkd.topk_kd_loss(s, torch.cat([lp.exp(), lp], -1)[:, 8:], idx.t().contiguous().t(), temperature=2.0,
                        backend=backend)
    empty = fastkd.teacher_topk(logits(0, 50), 8, temperature=2.0)  # N = 0
    assert fastkd.topk_kd_loss(logits(0, 50), empty, temperature=2.0, backend=backend) == 0
    ignored = torch.tensor([0, -100, 0, 0])
    fastkd.topk_kd_loss(s, torch.where(ignored[:, None] == -100, lp.exp(), lp), idx, labels=ignored,
                        temperature=2.0, backend=backend)
    masked = lp.clone()
    masked[1, 4:] = float("-inf")
    fastkd.topk_kd_loss(s, masked, idx, temperature=2.0, backend=backend)
    # The textbook t - logsumexp(t) in float32 rounds at the scale of t = logits / T: this row of
    # logits around 3000 sums to a log-sum-exp of 6.2e-5 (an ulp of 3000 is 2.4e-4), which is
    # rounding, not a wrong input (teacher_topk subtracts the row's maximum first: exact here).
    t = 3000 - torch.tensor([[0.0, 2.0, 3.5, 7.0, 8.0, 9.0, 12.0, 20.0] + [40.0] * 42]).expand(4, 50)
    naive = t - t.logsumexp(-1, keepdim=True)
    assert float(naive.logsumexp(-1).max()) > 1e-5
    fastkd.topk_kd_loss(s, *naive.topk(8, -1), temperature=1.0, backend=backend)
    assert float(fastkd.teacher_topk(t, 50, backend=backend)[0].logsumexp(-1).max()) <= 1e-6
    # k = V of a uniform teacher: log(1/3072) = -8.030 rounds to -8.0 in bf16, which makes the row's
    # log-sum-exp 0.030 (4 eps of bf16); rounding is not refused (the checks run before the backend)
    V = 3072
    uniform = torch.full((1, V), -math.log(V)).to(torch.bfloat16)
    assert 0.03 < float(uniform.float().logsumexp(-1)) < 0.031
    fastkd.topk_kd_loss(torch.randn(1, V), uniform, torch.arange(V)[None], backend="torch")


def test_value_checks_read_device_tensors_only_under_check_finite():
    """Off the CPU the values are read (a synchronisation) only under check_finite: the check skips
    meta tensors, which cannot be read, unless asked; check_finite also names a NaN."""
    opts = make_options(temperature=1.0)
    s, lp = torch.empty(3, 10, device="meta"), torch.empty(3, 4, device="meta")
    check_topk_values(s, lp, None, opts, check_finite=False)
    with pytest.raises((RuntimeError, NotImplementedError)):
        check_topk_values(s, lp, None, opts, check_finite=True)
    lp, idx = fastkd.teacher_topk(logits(3, 10), 4)
    lp[1, 2] = float("nan")
    fastkd.topk_kd_loss(logits(3, 10), lp, idx)  # without check_finite a NaN makes its row NaN, as in kd_loss
    with pytest.raises(ValueError, match="teacher_logprobs row 1 contains NaN"):
        fastkd.topk_kd_loss(logits(3, 10), lp, idx, check_finite=True)
    with pytest.raises(ValueError, match="teacher_logprobs row 1 contains NaN"):
        fastkd.TopKKDLoss(check_finite=True)(logits(3, 10), lp, idx)
