"""fused_linear_kd_loss against kd_loss on the full logits and the float64 reference: values and the
hidden / weight / bias gradients, every divergence and reduction, both backends, odd shapes."""
import os

import pytest
import torch

import fastkd
import fastkd.backends.torch as torch_backend
import fastkd.backends.triton
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


def test_backward_at_an_upstream_gradient_of_1_writes_nothing():
    """Counted by Triton's interpreter: the backward of a batchmean loss (its gradients computed in
    the forward) scales the hidden, weight and bias gradients with scale_rows, which at 1 reads the
    one value and writes nothing; at 2 it writes each gradient once."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("counts bytes through the Triton interpreter")
    from fastkd.audit.traffic import _count_launches

    x = make_inputs(6, 5, 11)
    for name in ("student_hidden", "student_weight", "student_bias"):
        x[name].requires_grad_(True)
    for upstream, stored in ((1.0, 0), (2.0, 4 * (6 * 5 + 11 * 5 + 11))):
        loss = fastkd.fused_linear_kd_loss(**x, temperature=2.0, backend="triton")
        launches = _count_launches(lambda: loss.backward(torch.tensor(upstream)))
        assert [name for name, _, _ in launches] == ["scale_rows_kernel"] * 3
        assert sum(written for _, _, written in launches) == stored


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
    real = torch_backend.kd_forward

    def spy(z, z_t, labels, grad_scale, opts, **options):
        seen.append((z.shape[0], z.untyped_storage().nbytes() // z.element_size()))
        return real(z, z_t, labels, grad_scale, opts, **options)

    monkeypatch.setattr(torch_backend, "kd_forward", spy)
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
    assert fused_linear.default_chunk_size(128256, 4096, blocks=3) == 512  # a student softcap's third block
    assert fused_linear.default_chunk_size(262144, 8192) == 512
    assert fused_linear.default_chunk_size(10, 3) == fused_linear.MATMUL_ROWS  # a small H: rows for the matmuls
    assert fused_linear.default_chunk_size(32000, 256) == 256
    assert fused_linear.default_chunk_size(2**24, 8192) == 16
    # On the CPU the blocks together stay within CPU_CHUNK_BYTES (128 MiB): V = 32000 keeps its rows.
    assert fused_linear.default_chunk_size(32000, 1024, device_type="cpu") == 256
    assert fused_linear.default_chunk_size(32000, 256, device_type="cpu") == 256
    assert fused_linear.default_chunk_size(128256, 2048, device_type="cpu") == 128
    assert fused_linear.default_chunk_size(128256, 2048, blocks=3, device_type="cpu") == 64
    for V, H in ((32000, 1024), (262144, 8192), (50257, 768), (128256, 4096), (32000, 256)):
        for blocks in (2, 3):
            rows = fused_linear.default_chunk_size(V, H, blocks)
            # the float32 blocks together: <= 1 GiB, and below the float32 [V, H] weight gradient
            # from H = 1024 on (a smaller H: 256 rows at most)
            assert blocks * rows * V * 4 <= min(fused_linear.MAX_CHUNK_BYTES, max(4 * V * H, blocks * 256 * V * 4))
            assert rows <= max(H // 4, 256)


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
        (dict(base, student_hidden=torch.randn(4, 0), student_weight=torch.randn(5, 0)), ValueError,
         r"student_hidden has an empty hidden dimension \(H = 0"),
        (dict(base, teacher_hidden=torch.randn(4, 0), teacher_weight=torch.randn(5, 0)), ValueError,
         r"teacher_hidden has an empty hidden dimension \(H = 0"),
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
        (dict(base, inplace=True), TypeError, "inplace"),  # no such option: the chunks are private buffers
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


# --- bf16 near convergence: the chunk logits are float32 -----------------------------------------


def near_converged_bf16(N, H, V, seed=0):
    """bf16 hidden states and weights, the teacher's weights those of the student plus 1 % noise."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=gen, dtype=torch.float64)
    W = torch.randn(V, H, generator=gen, dtype=torch.float64) * 3.0 / H**0.5
    W_t = W * (1 + 0.01 * torch.randn(V, H, generator=gen, dtype=torch.float64))
    return dict(student_hidden=h.bfloat16(), student_weight=W.bfloat16(), student_bias=None,
                teacher_hidden=h.bfloat16(), teacher_weight=W_t.bfloat16())


def relative_error(actual, oracle):
    return ((actual.double() - oracle).norm() / oracle.norm()).item()


@pytest.fixture
def interpreter_blocks(monkeypatch):
    """Vocabulary blocks of 128 rather than 16 (the interpreter's time), still several per row."""
    if not torch.cuda.is_available():
        monkeypatch.setattr(fastkd.backends.triton, "MAX_BLOCK_V", 128)


# N, H, V: the case measured in docs/fused_linear.md; smaller under the Triton interpreter (seconds
# per call at the first).
NEAR_CONVERGED_SHAPES = {"torch": (64, 64, 512), "triton": (32, 32, 256)}


# The chunk logits were bf16 before (hidden and weight gradients 44-86 % off here, the loss 8-27 %).
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_bf16_near_convergence_has_the_accuracy_of_float32_logits(backend, divergence, interpreter_blocks):
    """The gradients within 2 % of float64 ones from the same bf16 inputs (what bf16 rounding of
    the logits gradient costs is ~0.3 %)."""
    x = near_converged_bf16(*NEAR_CONVERGED_SHAPES[backend])
    kw = dict(divergence=divergence, temperature=1.0)
    loss, grads = value_and_grads(fused(backend=backend, chunk_size=16, **kw), x)
    loss64, grads64 = value_and_grads(unfused(reference.kd_loss, **kw), x, cast=torch.float64)
    for g, g64 in zip(grads, grads64):
        assert g.dtype == torch.bfloat16
        assert relative_error(g, g64) < 0.02
    assert abs(loss.item() - loss64.item()) <= 1e-3 * loss64.item()


# --- logit transforms (scale, tanh softcap) per side ---------------------------------------------


def apply_transform(z, scale, softcap):
    z = z * scale
    return z if softcap is None else softcap * torch.tanh(z / softcap)


TRANSFORMS = [  # student (scale, softcap), teacher (scale, softcap)
    ((1.0, 2.0), (1.0, None)),   # a Gemma 2-style softcap on the student only
    ((0.25, None), (1.5, 4.0)),  # a Cohere-style scale against a scaled and softcapped teacher
    ((1.7, 3.0), (1.0 / 3.0, None)),  # both; a Granite-style 1 / logits_scaling on the teacher
]


def transformed(loss_fn, student, teacher, **kw):
    """``loss_fn`` on the full logits with each side's transform applied (the oracle's way)."""
    def fn(inp):
        s, t = full_logits(inp)
        return loss_fn(apply_transform(s, *student), apply_transform(t, *teacher), **kw)
    return fn


def transform_kwargs(student, teacher):
    return dict(student_logit_scale=student[0], student_softcap=student[1], teacher_logit_scale=teacher[0],
                teacher_softcap=teacher[1])


# bf16 through the Triton interpreter for one pair only, for time.
@pytest.mark.parametrize("backend,student,teacher,dtype", [
    *[("torch", s, t, dt) for s, t in TRANSFORMS for dt in (torch.float32, torch.bfloat16)],
    *[("triton", s, t, torch.float32) for s, t in TRANSFORMS], ("triton", *TRANSFORMS[1], torch.bfloat16)])
def test_logit_transforms_match_oracle(backend, student, teacher, dtype):
    x = make_inputs(7, 6, 13, Ht=5, dtype=dtype)
    labels = torch.tensor([0, -100, 12, 5, 3, -100, 7])
    kw = dict(divergence="jsd", temperature=1.5, labels=labels, hard_weight=0.25)
    loss, grads = value_and_grads(fused(backend=backend, chunk_size=3, **transform_kwargs(student, teacher), **kw), x)
    loss64, grads64 = value_and_grads(transformed(reference.kd_loss, student, teacher, **kw), x, cast=torch.float64)
    loss_same, grads_same = value_and_grads(transformed(reference.kd_loss, student, teacher, **kw), x)
    assert_close_to_oracle(loss, loss64, loss_same, dtype=dtype, grows_with=13 * 7)
    for g, g64, g_same in zip(grads, grads64, grads_same):
        assert g.dtype == dtype
        assert_close_to_oracle(g, g64, g_same, dtype=dtype, grows_with=13 * 7)
    plain, _ = value_and_grads(fused(backend=backend, chunk_size=3, **kw), x)
    assert not torch.allclose(plain, loss, rtol=1e-2)  # the transforms matter here


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_logit_transforms_equal_kd_loss_on_the_transformed_logits(backend, reduction):
    """Float64, an upstream gradient, the backward's recomputation for "none", a teacher as logits."""
    x = make_inputs(8, 5, 11, dtype=torch.float64, lead=(2, 4))
    grad_out = torch.randn(2, 4) if reduction == "none" else torch.tensor(2.5)
    kw = dict(temperature=1.3, divergence="reverse_kl", reduction=reduction, backend=backend)
    student, teacher = (0.8, 1.5), (2.0, 3.0)
    loss, grads = value_and_grads(fused(chunk_size=3, **transform_kwargs(student, teacher), **kw), x, grad_out)
    loss_full, grads_full = value_and_grads(transformed(fastkd.kd_loss, student, teacher, **kw), x, grad_out)
    torch.testing.assert_close(loss, loss_full, rtol=1e-12, atol=1e-12)
    for g, g_full in zip(grads, grads_full):
        torch.testing.assert_close(g, g_full, rtol=1e-10, atol=1e-12)

    x_logits = make_inputs(8, 5, 11, dtype=torch.float64, teacher="logits")
    kw_s = dict(student_logit_scale=0.5, student_softcap=2.0)
    loss, grads = value_and_grads(fused(chunk_size=3, **kw_s, **kw), x_logits, grad_out.reshape(-1)[:8]
                                  if reduction == "none" else grad_out)
    loss_full, grads_full = value_and_grads(transformed(fastkd.kd_loss, (0.5, 2.0), (1.0, None), **kw), x_logits,
                                            grad_out.reshape(-1)[:8] if reduction == "none" else grad_out)
    torch.testing.assert_close(loss, loss_full, rtol=1e-12, atol=1e-12)
    for g, g_full in zip(grads, grads_full):
        torch.testing.assert_close(g, g_full, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend,divergence,reduction", [
    ("triton", "kl", "batchmean"), ("triton", "tvd", "none"), ("torch", "skew_kl", "batchmean"),
    ("torch", "jsd", "none")])
def test_logit_transforms_gradcheck_float64(backend, divergence, reduction):
    x = make_inputs(4, 3, 5, Ht=2, dtype=torch.float64)
    h, W, b = (x[k].clone().requires_grad_(True) for k in STUDENT)

    def fn(h, W, b):
        return fastkd.fused_linear_kd_loss(h, W, x["teacher_hidden"], x["teacher_weight"], student_bias=b,
                                           teacher_bias=x["teacher_bias"], temperature=1.5, divergence=divergence,
                                           reduction=reduction, chunk_size=3, backend=backend,
                                           student_logit_scale=1.3, student_softcap=1.2, teacher_logit_scale=0.7,
                                           teacher_softcap=2.0)

    assert torch.autograd.gradcheck(fn, (h, W, b), eps=1e-6, atol=1e-7, fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_near_convergence_with_softcaps(backend, interpreter_blocks):
    """The softcap's gradient is applied to the float32 logits gradient: still within 2 %."""
    x = near_converged_bf16(*NEAR_CONVERGED_SHAPES[backend], seed=1)
    student, teacher = (2.0, 5.0), (2.0, 5.0)  # logits up to ~20, capped at 5: the tanh saturates
    kw = dict(divergence="kl")
    _, grads = value_and_grads(fused(backend=backend, chunk_size=16, **transform_kwargs(student, teacher), **kw), x)
    _, grads64 = value_and_grads(transformed(reference.kd_loss, student, teacher, **kw), x, cast=torch.float64)
    for g, g64 in zip(grads, grads64):
        assert relative_error(g, g64) < 0.02


def test_chunk_buffers_stay_within_the_stated_bound(monkeypatch):
    """Two float32 [chunk, V] blocks at most (the bf16 copy of G reuses the teacher's), three with
    a student softcap; a teacher given as logits takes one float32 and one bf16 block."""
    V, rows = 13, 3
    allocated = []
    real_empty = fused_linear.empty

    def spy(shape, *, dtype, device):
        out = real_empty(shape, dtype=dtype, device=device)
        if len(shape) == 2 and shape[1] == V:
            allocated.append(out.untyped_storage().nbytes())
        return out

    monkeypatch.setattr(fused_linear, "empty", spy)
    for teacher, softcap, blocks in (("linear", None, 2), ("linear", 2.0, 3), ("logits", None, 1.5),
                                     ("logits", 2.0, 2.5)):
        x = make_inputs(7, 4, V, dtype=torch.bfloat16, teacher=teacher)
        allocated.clear()
        value_and_grads(fused(backend="torch", chunk_size=rows, student_softcap=softcap), x)
        assert sum(allocated) == blocks * rows * V * 4, (teacher, softcap)


def test_float32_products_without_a_float32_matmul(monkeypatch):
    """The CPU path (no float32-output bf16 matmul) takes the product from upcast tiles of the
    weight: exact products, float32 sums; the CUDA path's call is checked on meta tensors."""
    monkeypatch.setattr(fused_linear, "UPCAST_TILE_BYTES", 3 * 4 * 4)  # 3-row tiles of a [V, 4] weight
    x, w, b = (torch.randn(*shape, dtype=torch.float64).bfloat16() for shape in ((5, 4), (13, 4), (13,)))
    out = torch.full((5, 13), float("nan"))
    fused_linear._linear_into(out, x, w, b)
    torch.testing.assert_close(out, (x.double() @ w.double().T + b.double()).float(), rtol=1e-6, atol=1e-6)

    monkeypatch.setattr(fused_linear, "_mm_has_float32_output", lambda device_type, dtype: True)
    meta = [t.to("meta") for t in (x, w, b)]
    assert fused_linear._linear_into(torch.empty(5, 13, device="meta"), *meta).dtype == torch.float32


def test_linear_logits_is_the_fused_paths_logits():
    x = make_inputs(6, 4, 9, dtype=torch.bfloat16, lead=(2, 3))
    got = fused_linear.linear_logits(x["student_hidden"], x["student_weight"], x["student_bias"],
                                     logit_scale=0.5, softcap=1.5)
    s, _ = full_logits({k: v.double() for k, v in x.items()})
    assert got.dtype == torch.float32 and got.shape == (2, 3, 9)
    torch.testing.assert_close(got, apply_transform(s, 0.5, 1.5).float(), rtol=1e-6, atol=1e-6)


def _transform_error_cases():
    x = make_inputs(4, 3, 5)
    base = dict(student_hidden=x["student_hidden"], student_weight=x["student_weight"],
                teacher_hidden=x["teacher_hidden"], teacher_weight=x["teacher_weight"])
    cases = []
    for side in ("student", "teacher"):
        for value, error in ((0.0, ValueError), (-1.0, ValueError), (float("inf"), ValueError),
                             (float("nan"), ValueError), (True, TypeError), ("2", TypeError),
                             (torch.tensor(2.0), TypeError)):
            cases.append((dict(base, **{f"{side}_logit_scale": value}), error, f"{side}_logit_scale must be"))
            cases.append((dict(base, **{f"{side}_softcap": value}), error, f"{side}_softcap must be"))
        cases.append((dict(base, **{f"{side}_logit_scale": None}), TypeError, f"{side}_logit_scale must be a real"))
    with_logits = dict(student_hidden=x["student_hidden"], student_weight=x["student_weight"],
                       teacher_logits=torch.randn(4, 5))
    cases.append((dict(with_logits, teacher_softcap=3.0), ValueError, "teacher_logits are taken as they are"))
    cases.append((dict(with_logits, teacher_logit_scale=0.5), ValueError, "teacher_logits are taken as they are"))
    return cases


@pytest.mark.parametrize("kwargs,error,match", _transform_error_cases())
def test_bad_logit_transforms_raise_a_clear_error(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastkd.fused_linear_kd_loss(**kwargs)


def test_module_takes_and_checks_the_logit_transforms():
    with pytest.raises(ValueError, match="teacher_softcap must be finite and > 0"):
        fastkd.FusedLinearKDLoss(teacher_softcap=-2.0)
    x = make_inputs(5, 4, 9)
    loss_fn = fastkd.FusedLinearKDLoss(student_softcap=2.0, teacher_logit_scale=0.5, backend="torch")
    assert "student_softcap=2.0" in repr(loss_fn)
    loss = loss_fn(x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"],
                   student_bias=x["student_bias"], teacher_bias=x["teacher_bias"])
    s, t = full_logits(x)
    torch.testing.assert_close(loss, fastkd.kd_loss(2.0 * torch.tanh(s / 2.0), 0.5 * t), rtol=1e-5, atol=1e-6)


def test_under_cpu_autocast_the_products_of_the_cast_operands_stay_float32():
    """Autocast casts the float32 operands to bf16 as F.linear would; the chunk logits are those
    bf16 operands' products in float32 (not rounded to bf16 as autocast's F.linear rounds them)."""
    x = make_inputs(6, 8, 13, bias=False)
    h, w = x["student_hidden"].requires_grad_(True), x["student_weight"].requires_grad_(True)
    labels = torch.randint(0, 13, (6,))
    kw = dict(temperature=2.0, labels=labels, hard_weight=0.3, backend="torch")
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = fastkd.fused_linear_kd_loss(h, w, x["teacher_hidden"], x["teacher_weight"], chunk_size=4, **kw)
    assert loss.dtype == torch.float32
    grads = torch.autograd.grad(loss, (h, w))
    bf = {k: v.detach().bfloat16().float() for k, v in x.items() if v is not None}
    h2, w2 = bf["student_hidden"].requires_grad_(True), bf["student_weight"].requires_grad_(True)
    expected = fastkd.kd_loss(h2 @ w2.T, bf["teacher_hidden"] @ bf["teacher_weight"].T, **kw)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, torch.autograd.grad(expected, (h2, w2))):
        assert got.dtype == torch.float32  # the float32 leaves get float32 gradients
        torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-2 * want.abs().max().item())  # bf16 G matmuls


def _strided_view(v, name):
    """``v``'s values in a non-contiguous view: [V, H] weights transposed in memory, other 2-d
    tensors with a row stride of twice their width, 1-d ones with stride 2."""
    if v.dim() == 2 and name.endswith("weight"):
        view = v.T.contiguous().T
    elif v.dim() == 2:
        view = torch.cat([v, v], dim=1)[:, : v.shape[1]]
    else:
        view = torch.stack([v, v], dim=1)[:, 0]
    assert not view.is_contiguous() and torch.equal(view, v)
    return view


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_non_contiguous_views_give_the_contiguous_result(backend):
    """Strided hidden states, weights, biases and labels through the float32 product (upcast tiles
    on the CPU) with a softcap: bit for bit the result of contiguous copies."""
    x = make_inputs(7, 5, 13, Ht=4, dtype=torch.bfloat16)
    labels = torch.tensor([0, 5, 12, -100, 7, 4, 9])
    kw = dict(backend=backend, chunk_size=3, hard_weight=0.5, student_softcap=1.5, teacher_logit_scale=0.5)
    results = []
    for make in (lambda v, name: v.clone(), _strided_view):
        inputs = {k: make(v, k).requires_grad_(k in STUDENT) for k, v in x.items()}
        loss = fastkd.fused_linear_kd_loss(**inputs, labels=make(labels, "labels"), **kw)
        results.append((loss, torch.autograd.grad(loss, [inputs[k] for k in STUDENT])))
    (loss, grads), (loss_view, grads_view) = results
    assert torch.equal(loss, loss_view)
    for g, g_view in zip(grads, grads_view):
        assert torch.equal(g, g_view)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("student_dtype,teacher_dtype", [(torch.bfloat16, torch.float32),
                                                         (torch.float32, torch.bfloat16),
                                                         (torch.float16, torch.bfloat16)])
def test_mixed_student_and_teacher_dtypes(backend, student_dtype, teacher_dtype):
    x = make_inputs(7, 6, 13, Ht=5)
    x = {k: None if v is None else v.to(student_dtype if k.startswith("student") else teacher_dtype)
         for k, v in x.items()}
    kw = dict(divergence="skew_reverse_kl", temperature=1.5, teacher_softcap=2.5)
    loss, grads = value_and_grads(fused(backend=backend, chunk_size=3, **kw), x)
    oracle = transformed(reference.kd_loss, (1.0, None), (1.0, 2.5), divergence="skew_reverse_kl", temperature=1.5)
    loss64, grads64 = value_and_grads(oracle, x, cast=torch.float64)
    loss_same, grads_same = value_and_grads(oracle, x)
    assert_close_to_oracle(loss, loss64, loss_same, dtype=student_dtype, grows_with=13 * 7)
    for g, g64, g_same in zip(grads, grads64, grads_same):
        assert g.dtype == student_dtype
        assert_close_to_oracle(g, g64, g_same, dtype=student_dtype, grows_with=13 * 7)
