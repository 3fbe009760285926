"""fused_linear_kd_loss against kd_loss on the full logits and the float64 reference: values and the
hidden / weight / bias gradients, every divergence and reduction, both backends, odd shapes."""
import pytest
import torch

import fastkd
import fastkd.fused_linear as fused_linear
from fastkd import reference
from helpers import DIVERGENCES, assert_close_to_oracle

BACKENDS = ("triton", "torch")


def make_inputs(N, H, V, *, Ht=None, dtype=torch.float32, bias=True, teacher="linear", lead=None):
    """Student hidden/weight/bias and a teacher (as hidden + weight + bias, or as logits)."""
    lead = (N,) if lead is None else lead
    Ht = Ht or H
    f = lambda *shape, scale=1.0: (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype)  # noqa: E731
    x = dict(student_hidden=f(*lead, H), student_weight=f(V, H, scale=3.0 / H**0.5),
             student_bias=f(V) if bias else None)
    if teacher == "linear":
        x.update(teacher_hidden=f(*lead, Ht), teacher_weight=f(V, Ht, scale=3.0 / Ht**0.5),
                 teacher_bias=f(V) if bias else None)
    else:
        x.update(teacher_logits=f(*lead, V, scale=3.0))
    return x


def full_logits(x):
    """The student and teacher logits the fused path never builds."""
    s = x["student_hidden"] @ x["student_weight"].T
    if x.get("student_bias") is not None:
        s = s + x["student_bias"]
    if "teacher_logits" in x:
        return s, x["teacher_logits"]
    t = x["teacher_hidden"] @ x["teacher_weight"].T
    return s, t if x.get("teacher_bias") is None else t + x["teacher_bias"]


STUDENT = ("student_hidden", "student_weight", "student_bias")


def value_and_grads(fn, x, grad_out=None, *, cast=None):
    """Loss and gradients of (hidden, weight, bias) for ``fn(x)``; ``cast`` converts the inputs first."""
    x = {k: (v if v is None or cast is None else v.to(cast)) for k, v in x.items()}
    x = {k: (v.detach().clone().requires_grad_(k in STUDENT) if v is not None else None) for k, v in x.items()}
    loss = fn(x)
    wrt = [x[k] for k in STUDENT if x[k] is not None]
    grads = torch.autograd.grad(loss, wrt, None if grad_out is None else grad_out.to(loss.dtype))
    return loss.detach(), list(grads)


def fused(**kw):
    return lambda inp: fastkd.fused_linear_kd_loss(**{k: v for k, v in inp.items() if v is not None}, **kw)


def unfused(loss_fn, **kw):
    return lambda inp: loss_fn(*full_logits(inp), **kw)


def check_against_oracle(x, backend, grad_out=None, chunk_size=3, **kw):
    """The fused loss and gradients vs the float64 oracle on the full logits, with the plain
    reference in the inputs' dtype as the yardstick."""
    dtype = x["student_hidden"].dtype
    V, H = x["student_weight"].shape
    N = x["student_hidden"].numel() // H
    loss, grads = value_and_grads(fused(backend=backend, chunk_size=chunk_size, **kw), x, grad_out)
    loss64, grads64 = value_and_grads(unfused(reference.kd_loss, **kw), x, grad_out, cast=torch.float64)
    loss_same, grads_same = value_and_grads(unfused(reference.kd_loss, **kw), x, grad_out)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_to_oracle(loss, loss64, loss_same, dtype=dtype, grows_with=V * N)
    for name, g, g64, g_same in zip(STUDENT, grads, grads64, grads_same):
        assert g.dtype == dtype and g.shape == x[name].shape, name
        assert_close_to_oracle(g, g64, g_same, dtype=dtype, grows_with=V * N)
    return loss, grads


# --- values and gradients ------------------------------------------------------------------------


# bf16 through the Triton interpreter only for kl and jsd, to stay within the time budget.
@pytest.mark.parametrize("backend,divergence,dtype", [
    *[("torch", d, dt) for d in DIVERGENCES for dt in (torch.float32, torch.bfloat16)],
    *[("triton", d, torch.float32) for d in DIVERGENCES],
    ("triton", "kl", torch.bfloat16), ("triton", "jsd", torch.bfloat16)])
def test_every_divergence_matches_oracle(backend, divergence, dtype):
    x = make_inputs(7, 6, 13, Ht=5, dtype=dtype)  # 3 chunks of 3, 3, 1 rows; V prime; H != Ht
    labels = torch.randint(0, 13, (7,))
    labels[[1, 5]] = -100
    check_against_oracle(x, backend, divergence=divergence, temperature=2.0, labels=labels,
                         hard_weight=0.25, soft_weight=0.75)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_reductions_with_upstream_gradient_equal_kd_loss(backend, reduction):
    """Float64 through both paths: the fused result is kd_loss on the full logits to rounding."""
    x = make_inputs(2 * 4, 5, 11, dtype=torch.float64, lead=(2, 4), bias=False)
    labels = torch.randint(0, 11, (2, 4))
    labels[0, 1] = labels[1, 3] = 7  # ignore_index=7 also drops rows whose label is a real class
    grad_out = torch.randn(2, 4) if reduction == "none" else torch.tensor(2.5)
    kw = dict(temperature=1.7, divergence="reverse_kl", labels=labels, ignore_index=7, hard_weight=0.5,
              t2_scale=False, reduction=reduction, backend=backend)
    loss, grads = value_and_grads(fused(chunk_size=3, **kw), x, grad_out)
    loss_full, grads_full = value_and_grads(unfused(fastkd.kd_loss, **kw), x, grad_out)
    assert loss.shape == ((2, 4) if reduction == "none" else ())
    torch.testing.assert_close(loss, loss_full, rtol=1e-12, atol=1e-12)
    for g, g_full in zip(grads, grads_full):
        torch.testing.assert_close(g, g_full, rtol=1e-10, atol=1e-12)
    if reduction == "none":
        assert (loss[0, 1] == 0) and (loss[1, 3] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_teacher_as_logits_without_bias(backend, dtype):
    x = make_inputs(9, 4, 17, dtype=dtype, bias=False, teacher="logits")
    check_against_oracle(x, backend, chunk_size=4, temperature=0.8, divergence="skew_kl", skew=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_logits_as_strided_view_and_mixed_dtypes(backend):
    """bf16 student, fp32 teacher logits that are a column-strided view (copied chunk by chunk)."""
    x = make_inputs(6, 4, 19, dtype=torch.bfloat16)
    wide = torch.randn(19, 6) * 3
    x = {k: v for k, v in x.items() if not k.startswith("teacher")}
    x["teacher_logits"] = wide.T  # [6, 19] with column stride 6
    loss, grads = value_and_grads(fused(backend=backend, chunk_size=4), x)
    loss64, grads64 = value_and_grads(unfused(reference.kd_loss), x, cast=torch.float64)
    loss_same, grads_same = value_and_grads(unfused(reference.kd_loss), x)
    assert_close_to_oracle(loss, loss64, loss_same, dtype=torch.bfloat16, grows_with=19 * 6)
    for g, g64, g_same in zip(grads, grads64, grads_same):
        assert g.dtype == torch.bfloat16
        assert_close_to_oracle(g, g64, g_same, dtype=torch.bfloat16, grows_with=19 * 6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_all_rows_ignored_gives_zero_not_nan(backend, reduction):
    x = make_inputs(5, 3, 7)
    labels = torch.full((5,), -100)
    loss, grads = value_and_grads(fused(backend=backend, chunk_size=2, labels=labels, reduction=reduction,
                                        hard_weight=1.0), x, torch.ones(5) if reduction == "none" else None)
    assert torch.equal(loss, torch.zeros_like(loss))
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_input(backend):
    x = make_inputs(0, 4, 9)
    loss, grads = value_and_grads(fused(backend=backend), x)
    assert loss.item() == 0.0
    assert [g.shape for g in grads] == [(0, 4), (9, 4), (9,)]
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_chunk_size_does_not_change_the_result_and_bounds_the_chunk(monkeypatch):
    x = make_inputs(7, 5, 23, dtype=torch.float64)
    seen = []
    real = fused_linear._kd_forward

    def spy(backend, z, z_t, labels, opts, need_grad):
        seen.append((z.shape[0], z.untyped_storage().nbytes() // z.element_size()))
        return real(backend, z, z_t, labels, opts, need_grad)

    monkeypatch.setattr(fused_linear, "_kd_forward", spy)
    results = {}
    for chunk in (1, 2, 3, 7, 100, None):
        seen.clear()
        results[chunk] = value_and_grads(fused(backend="torch", chunk_size=chunk, divergence="tvd"), x)
        rows = min(chunk or fused_linear.default_chunk_size(23, 5), 7)
        assert [r for r, _ in seen] == [rows] * (7 // rows) + ([7 % rows] if 7 % rows else [])
        assert all(elements == rows * 23 for _, elements in seen)  # one reused [chunk, V] buffer
    loss1, grads1 = results[1]
    for loss, grads in results.values():
        torch.testing.assert_close(loss, loss1, rtol=1e-12, atol=1e-14)
        for g, g1 in zip(grads, grads1):
            torch.testing.assert_close(g, g1, rtol=1e-12, atol=1e-14)


def test_bf16_weight_gradient_is_summed_over_chunks_in_float32():
    """256 one-row chunks: summing the bf16 per-chunk products in bf16 would be off by ~4% of the
    largest entry here; in float32 the error stays that of one bf16 matmul (~0.2%)."""
    x = make_inputs(256, 4, 8, dtype=torch.bfloat16, bias=False)
    _, grads = value_and_grads(fused(backend="torch", chunk_size=1, reduction="sum"), x)
    _, grads64 = value_and_grads(unfused(reference.kd_loss, reduction="sum"), x, cast=torch.float64)
    assert grads[1].dtype == torch.bfloat16
    assert (grads[1].double() - grads64[1]).abs().max() <= 1e-2 * grads64[1].abs().max()


def test_default_chunk_size_rule():
    assert fused_linear.default_chunk_size(32000, 1024) == 256
    assert fused_linear.default_chunk_size(128256, 4096) == 1024
    assert fused_linear.default_chunk_size(10, 3) == fused_linear.MIN_CHUNK_ROWS
    assert fused_linear.default_chunk_size(2**24, 8192) == 16  # a [chunk, V] fp32 block stays <= 1 GiB
    for V, H in ((32000, 1024), (262144, 8192), (50257, 768)):
        rows = fused_linear.default_chunk_size(V, H)
        assert rows * V * 4 <= fused_linear.MAX_CHUNK_LOGITS_BYTES and rows <= max(H // 4, 16)


def test_three_dim_hidden_module_and_retain_graph():
    """[B, T, H] input through the module; backward twice (retain_graph) accumulates, not rescales."""
    x = make_inputs(6, 4, 10, lead=(2, 3))
    labels = torch.randint(0, 10, (2, 3))
    loss_fn = fastkd.FusedLinearKDLoss(temperature=2.0, hard_weight=0.5, backend="torch", chunk_size=4)
    assert "chunk_size=4" in repr(loss_fn)
    h = x["student_hidden"].clone().requires_grad_(True)
    W = x["student_weight"].clone().requires_grad_(True)
    loss = loss_fn(h, W, x["teacher_hidden"], x["teacher_weight"], labels, student_bias=x["student_bias"],
                   teacher_bias=x["teacher_bias"])
    loss.backward(retain_graph=True)
    g_h, g_W = h.grad.clone(), W.grad.clone()
    loss.backward()
    torch.testing.assert_close(h.grad, 2 * g_h)
    torch.testing.assert_close(W.grad, 2 * g_W)
    expected = fastkd.kd_loss(*full_logits(x), labels=labels, temperature=2.0, hard_weight=0.5)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_gradients_and_no_grad(backend):
    """Frozen head (only the hidden gradient), and a forward with nothing to differentiate."""
    x = make_inputs(5, 4, 9)
    h = x["student_hidden"].clone().requires_grad_(True)
    kw = {k: v for k, v in x.items() if k != "student_hidden"}
    loss = fastkd.fused_linear_kd_loss(h, chunk_size=2, backend=backend, **kw)
    (g_h,) = torch.autograd.grad(loss, h)
    _, grads = value_and_grads(unfused(fastkd.kd_loss), x)
    torch.testing.assert_close(g_h, grads[0], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        value = fastkd.fused_linear_kd_loss(h, chunk_size=2, backend=backend, **kw)
    assert not value.requires_grad
    torch.testing.assert_close(value, loss.detach())


# --- gradcheck in float64 --------------------------------------------------------------------------


@pytest.mark.parametrize("backend,divergence,reduction", [
    ("triton", "kl", "batchmean"), ("triton", "skew_reverse_kl", "none"), ("triton", "tvd", "mean"),
    *[("torch", d, "batchmean") for d in DIVERGENCES], ("torch", "jsd", "none")])
def test_gradcheck_float64(backend, divergence, reduction):
    x = make_inputs(4, 3, 5, Ht=2, dtype=torch.float64)
    labels = torch.tensor([1, -100, 4, 0])
    h, W, b = (x[k].clone().requires_grad_(True) for k in STUDENT)

    def fn(h, W, b):
        return fastkd.fused_linear_kd_loss(h, W, x["teacher_hidden"], x["teacher_weight"], student_bias=b,
                                           teacher_bias=x["teacher_bias"], labels=labels, hard_weight=0.3,
                                           temperature=1.5, divergence=divergence, reduction=reduction,
                                           chunk_size=3, backend=backend)

    full = backend == "torch" and divergence == "kl"  # full Jacobians once; random projections elsewhere
    assert torch.autograd.gradcheck(fn, (h, W, b), eps=1e-6, atol=1e-7, fast_mode=not full)


# --- errors --------------------------------------------------------------------------------------


def _error_cases():
    x = make_inputs(4, 3, 5)
    s_h, s_W, s_b = x["student_hidden"], x["student_weight"], x["student_bias"]
    t_h, t_W, t_b = x["teacher_hidden"], x["teacher_weight"], x["teacher_bias"]
    t_z = torch.randn(4, 5)
    base = dict(student_hidden=s_h, student_weight=s_W, teacher_hidden=t_h, teacher_weight=t_W)
    with_logits = dict(student_hidden=s_h, student_weight=s_W, teacher_logits=t_z)
    cases = [
        (dict(base, teacher_hidden=None, teacher_weight=None), ValueError, "no teacher"),
        (dict(base, teacher_weight=None), ValueError, "teacher_weight is missing"),
        (dict(base, teacher_hidden=None), ValueError, "teacher_hidden is missing"),
        (dict(base, teacher_logits=t_z), ValueError, "not both"),
        (dict(with_logits, teacher_bias=t_b), ValueError, "not both"),
        (dict(base, student_weight=torch.randn(5, 4)), ValueError, r"student_weight shape \(5, 4\) is not \[V, H\]"),
        (dict(base, student_weight=torch.randn(5)), ValueError, "student_weight must be 2-d"),
        (dict(base, student_weight=torch.randn(0, 3)), ValueError, "V = 0"),
        (dict(base, student_hidden=torch.randn(())), ValueError, "student_hidden must have a hidden dimension"),
        (dict(base, student_hidden=s_h.long()), TypeError, "student_hidden must be float16"),
        (dict(base, student_hidden=s_h.tolist()), TypeError, "student_hidden must be a torch.Tensor"),
        (dict(base, student_weight=s_W.double()), TypeError, "student_weight is torch.float64 but student_hidden"),
        (dict(base, student_bias=s_b[:4]), ValueError, r"student_bias shape \(4,\) does not match V = 5"),
        (dict(base, student_bias=s_b.half()), TypeError, "student_bias is torch.float16"),
        (dict(base, student_weight=s_W.to("meta")), ValueError, "student_weight is on meta"),
        (dict(base, teacher_weight=torch.randn(6, 3)), ValueError, "same vocabulary"),
        (dict(base, teacher_weight=torch.randn(5, 2)), ValueError, r"teacher_weight shape \(5, 2\) is not \[V, H\]"),
        (dict(base, teacher_hidden=torch.randn(3, 3)), ValueError, "leading"),
        (dict(base, teacher_bias=t_b.double()), TypeError, "teacher_bias is torch.float64"),
        (dict(base, teacher_hidden=t_h.to("meta")), ValueError, "teacher_hidden is on meta"),
        (dict(with_logits, teacher_logits=torch.randn(4, 6)), ValueError, "teacher_logits shape"),
        (dict(with_logits, teacher_logits=t_z.long()), TypeError, "teacher_logits must be float16"),
        (dict(with_logits, teacher_logits=t_z.to("meta")), ValueError, "teacher_logits is on meta"),
        (dict(base, labels=torch.zeros(3, dtype=torch.long)), ValueError, "labels shape"),
        (dict(base, labels=torch.zeros(4)), TypeError, "labels must be int64"),
        (dict(base, labels=torch.zeros(4, dtype=torch.long, device="meta")), ValueError, "labels is on meta"),
        (dict(base, hard_weight=0.5), ValueError, "needs labels"),
        (dict(base, chunk_size=0), ValueError, "chunk_size must be >= 1"),
        (dict(base, chunk_size=2.0), TypeError, "chunk_size must be an int"),
        (dict(base, chunk_size=True), TypeError, "chunk_size must be an int"),
        (dict(base, inplace=1), TypeError, "inplace must be a bool"),
        (dict(base, divergence="kld"), ValueError, "unknown divergence"),
        (dict(base, temperature=0.0), ValueError, "temperature must be > 0"),
        (dict(base, backend="cuda"), ValueError, "unknown backend"),
    ]
    for name, value in (("teacher_hidden", t_h), ("teacher_weight", t_W), ("teacher_bias", t_b)):
        cases.append(({**base, "teacher_bias": t_b, name: value.clone().requires_grad_(True)}, ValueError,
                      rf"{name} requires grad.*{name}\.detach\(\)"))
    cases.append((dict(with_logits, teacher_logits=t_z.clone().requires_grad_(True)), ValueError,
                  r"teacher_logits\.detach\(\)"))
    return cases


@pytest.mark.parametrize("kwargs,error,match", _error_cases())
def test_bad_input_raises_a_clear_error(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastkd.fused_linear_kd_loss(**kwargs)


def test_module_checks_its_options_once():
    with pytest.raises(ValueError, match="unknown reduction"):
        fastkd.FusedLinearKDLoss(reduction="avg")
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        fastkd.FusedLinearKDLoss(chunk_size=-1)
    with pytest.raises(ValueError, match="unknown backend"):
        fastkd.FusedLinearKDLoss(backend="gpu")
