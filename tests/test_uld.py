"""fastkd.uld_loss (Universal Logit Distillation, exact and top-K) against its float64 reference,
TRL's GOLD ULD loss, and its own bound."""
import pytest
import torch

import fastkd
from fastkd import reference
from helpers import assert_close_to_oracle, logits

V_S, V_T = 13, 21  # two vocabularies, odd sizes


def _loss_and_grad(fn, s, t, **kw):
    s = s.detach().requires_grad_()
    loss = fn(s, t, **kw)
    (grad,) = torch.autograd.grad(loss.sum(), s)
    return loss, grad


@pytest.mark.parametrize("k", [None, 1, 5])
@pytest.mark.parametrize("v_s, v_t", [(V_S, V_T), (V_T, V_S), (V_S, V_S)])
def test_equals_reference_and_gradcheck(k, v_s, v_t):
    s, t = logits(3, 4, v_s, dtype=torch.float64), logits(3, 4, v_t, dtype=torch.float64)
    kw = dict(k=k, temperature=2.0, teacher_temperature=0.7)
    got, grad = _loss_and_grad(fastkd.uld_loss, s, t, **kw)
    want, want_grad = _loss_and_grad(reference.uld_loss, s, t, **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12)
    s_small = s[0, :2].clone().requires_grad_()  # random logits: no ties, so the loss is differentiable there
    for fn in (fastkd.uld_loss, reference.uld_loss):
        assert torch.autograd.gradcheck(lambda x: fn(x, t[0, :2], **kw), (s_small,), fast_mode=True)


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float16),
                                    (torch.float16, torch.float32)])
@pytest.mark.parametrize("k", [None, 4])
@pytest.mark.parametrize("near", [False, True])
def test_accuracy_rule(dtypes, k, near):
    """No value or gradient errs more than twice the plain float32 formula (the reference in float32)
    against float64; ``near``: a student close to its teacher (bf16 near convergence)."""
    s64 = logits(6, V_T, dtype=torch.float64)
    t64 = s64[:, :V_S] + 1e-2 * logits(6, V_S, dtype=torch.float64) if near else logits(6, V_S, dtype=torch.float64)
    s, t = s64.to(dtypes[0]), t64.to(dtypes[1])
    kw = dict(k=k, reduction="none", temperature=1.5)
    got, grad = _loss_and_grad(fastkd.uld_loss, s, t, **kw)
    oracle, oracle_grad = _loss_and_grad(reference.uld_loss, s.double(), t.double(), **kw)
    f32, f32_grad = _loss_and_grad(reference.uld_loss, s.float(), t.float(), **kw)
    assert got.dtype == torch.float32 and grad.dtype == s.dtype
    assert_close_to_oracle(got, oracle, 2 * f32.double() - oracle, dtype=torch.float32, grows_with=V_T)
    assert_close_to_oracle(grad.float(), oracle_grad, 2 * f32_grad.double() - oracle_grad.double(),
                           dtype=dtypes[0], grows_with=V_T)


@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
def test_labels_reductions_and_views(reduction):
    """Non-contiguous views of every tensor (labels too) give the contiguous copies' result."""
    s_big, t_big = logits(2, 7, 2 * V_S, dtype=torch.float64), logits(7, 2, V_T + 3, dtype=torch.float64)
    s, t = s_big[..., ::2], t_big.transpose(0, 1)[..., :V_T]
    labels = torch.randint(0, 5, (7, 2)).t()
    labels[0, 2] = labels[1, 5] = -100
    kw = dict(labels=labels, reduction=reduction, k=3)
    got, grad = _loss_and_grad(fastkd.uld_loss, s, t, **kw)
    want, want_grad = _loss_and_grad(reference.uld_loss, s.contiguous(), t.contiguous(),
                                     **dict(kw, labels=labels.contiguous()))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12)
    assert grad[0, 2].abs().sum() == 0 and grad[1, 5].abs().sum() == 0


def test_num_items_in_batch_and_empty_input():
    s, t = logits(4, V_S, dtype=torch.float64), logits(4, V_T, dtype=torch.float64)
    torch.testing.assert_close(fastkd.uld_loss(s, t, num_items_in_batch=8),
                               fastkd.uld_loss(s, t, reduction="sum") / 8)
    torch.testing.assert_close(fastkd.uld_loss(s, t, reduction="mean"),
                               fastkd.uld_loss(s, t, reduction="sum") / (4 * V_T))
    empty_s = torch.zeros(0, V_S, requires_grad=True)
    loss = fastkd.uld_loss(empty_s, torch.zeros(0, V_T))
    loss.backward()
    assert loss.item() == 0 and empty_s.grad.shape == (0, V_S)


def test_minus_inf_columns_and_dead_rows():
    s, t = logits(3, V_S), logits(3, V_T)
    s[:, 2] = t[:, :4] = float("-inf")
    got, grad = _loss_and_grad(fastkd.uld_loss, s, t)
    want, _ = _loss_and_grad(reference.uld_loss, s.double(), t.double())
    assert torch.isfinite(grad).all() and (grad[:, 2] == 0).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
    s[1] = float("-inf")  # no student distribution: that row is NaN, unless ignored
    assert fastkd.uld_loss(s, t, reduction="none").isnan().tolist() == [False, True, False]
    labels = torch.tensor([0, -100, 0])
    assert torch.isfinite(fastkd.uld_loss(s, t, labels=labels))


@pytest.mark.parametrize("k", [1, 3, 8])
def test_topk_error_within_its_bound(k):
    s, t = logits(16, V_S, dtype=torch.float64), logits(16, V_T, dtype=torch.float64)
    exact = fastkd.uld_loss(s, t, reduction="none")
    approx, bound = fastkd.uld_loss(s, t, k=k, reduction="none", return_bound=True)
    assert ((approx - exact).abs() <= bound + 1e-12).all()
    assert (approx <= exact + 1e-12).all()  # W_K + |R_s - R_t| is the lower end of the bracket
    total, total_bound = fastkd.uld_loss(s, t, k=k, return_bound=True)
    torch.testing.assert_close(total_bound, bound.mean())
    assert fastkd.uld_loss(s, t, k=V_S, reduction="none").sub(exact).abs().max() <= \
        fastkd.uld_loss(s, t, k=V_S, return_bound=True, reduction="none")[1].max() + 1e-12


def test_bad_input_names_the_argument():
    s, t = logits(2, 3, V_S), logits(2, 3, V_T)
    cases = [(dict(k=0), "k must"), (dict(k=V_S + 1), "k must"), (dict(temperature=0.0), "temperature"),
             (dict(teacher_temperature=-1.0), "teacher_temperature"), (dict(reduction="avg"), "reduction"),
             (dict(labels=torch.zeros(2, 4, dtype=torch.long)), "labels"), (dict(backend="cuda"), "backend")]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            fastkd.uld_loss(s, t, **kw)
    with pytest.raises(ValueError, match="every dimension but the last"):
        fastkd.uld_loss(s, t[:, :2])
    with pytest.raises(ValueError, match="teacher_logits requires grad"):
        fastkd.uld_loss(s, t.requires_grad_())
    with pytest.raises(TypeError, match="labels"):
        fastkd.uld_loss(s, t.detach(), labels=torch.zeros(2, 3))
    with pytest.raises(TypeError, match="k must"):
        fastkd.uld_loss(s, t.detach(), k=2.5)
    with pytest.raises(ValueError, match=r"student_hidden has an empty hidden dimension \(H = 0"):
        fastkd.fused_linear_uld_loss(torch.zeros(2, 0), torch.zeros(V_S, 0), t.detach())


def test_equals_trl_gold_uld():
    """TRL's ULDLoss (``use_extended_uld=False``, no EOS skipping): per sample, the L1 of the sorted
    probabilities over its answer rows divided by their count, averaged over samples; equal answer
    lengths make that ``uld_loss``'s batchmean over the labelled rows."""
    gold = pytest.importorskip("trl.experimental.gold.gold_trainer")
    from types import SimpleNamespace
    config = SimpleNamespace(uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=2.0,
                             uld_teacher_temperature=1.5, uld_skip_student_eos=False, uld_skip_teacher_eos=False,
                             use_extended_uld=False, uld_token_merge_strategy="observed")
    s, t = logits(2, 6, V_S, dtype=torch.float64), logits(2, 6, V_T, dtype=torch.float64)
    labels = torch.full((2, 6), -100)
    labels[0, 1:4] = 3
    labels[1, 2:5] = 5
    ids = torch.zeros(2, 6, dtype=torch.long)
    want, want_grad = _loss_and_grad(lambda x, y: gold.ULDLoss(config)(x, y, labels, labels, ids, ids), s, t)
    got, grad = _loss_and_grad(fastkd.uld_loss, s, t, labels=labels, temperature=2.0, teacher_temperature=1.5)
    torch.testing.assert_close(got, want.reshape(()), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("k", [None, 4])
def test_fused_linear_equals_uld_of_the_logits(reduction, k):
    """Chunks of 5 rows (several, one partial); hidden states, weight and bias all get their gradient."""
    h, w = logits(3, 4, 8, dtype=torch.float64, scale=1.0), logits(V_S, 8, dtype=torch.float64, scale=1.0)
    b, t = logits(V_S, dtype=torch.float64), logits(3, 4, V_T, dtype=torch.float64)
    labels = torch.randint(0, 5, (3, 4))
    labels[0, 1] = -100
    kw = dict(k=k, labels=labels, reduction=reduction, temperature=1.3, teacher_temperature=0.8)
    params = [x.clone().requires_grad_() for x in (h, w, b)]
    got = fastkd.fused_linear_uld_loss(*params[:2], t, student_bias=params[2], chunk_size=5, **kw)
    want = reference.uld_loss(params[0] @ params[1].T + params[2], t, **kw)
    upstream = torch.rand_like(got)
    for a, b_ in zip(torch.autograd.grad((got * upstream).sum(), params),
                     torch.autograd.grad((want * upstream).sum(), params)):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(lambda x, y: fastkd.fused_linear_uld_loss(x, y, t[0, :2], k=k, chunk_size=1),
                                    (params[0][0, :2].detach().requires_grad_(), params[1]), fast_mode=True)


def test_fused_linear_bf16_weights_keep_float32_logits():
    h, w = logits(6, 16, dtype=torch.bfloat16, scale=0.5), logits(V_S, 16, dtype=torch.bfloat16, scale=0.5)
    t = logits(6, V_T)
    params = [x.clone().requires_grad_() for x in (h, w)]
    got = fastkd.fused_linear_uld_loss(*params, t, k=5, chunk_size=4)
    grads = torch.autograd.grad(got, params)
    oracle = [x.double().requires_grad_() for x in (h, w)]
    want = reference.uld_loss(oracle[0] @ oracle[1].T, t.double(), k=5)
    want_grads = torch.autograd.grad(want, oracle)
    assert got.dtype == torch.float32 and [g.dtype for g in grads] == [torch.bfloat16] * 2
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    for g, g_want in zip(grads, want_grads):  # rounded once, to bf16, at the end
        torch.testing.assert_close(g.double(), g_want, rtol=2**-7, atol=1e-4 * g_want.abs().max().item())


def test_fused_linear_bad_shapes():
    h, w, t = logits(4, 8), logits(V_S, 8), logits(4, V_T)
    with pytest.raises(ValueError, match="student_weight"):
        fastkd.fused_linear_uld_loss(h, w[:, :7], t)
    with pytest.raises(ValueError, match="student_bias"):
        fastkd.fused_linear_uld_loss(h, w, t, student_bias=torch.zeros(V_S + 1))
    with pytest.raises(ValueError, match="every dimension but the last"):
        fastkd.fused_linear_uld_loss(h, w, t[:3])
    with pytest.raises(ValueError, match="chunk_size"):
        fastkd.fused_linear_uld_loss(h, w, t, chunk_size=0)


@pytest.mark.parametrize("k", [1, 5])
def test_triton_topk_equals_reference_and_gradcheck(k):
    """The top-K mode through the Triton kernels (interpreter), float64: value, gradient, gradcheck."""
    s, t = logits(2, 3, V_T, dtype=torch.float64), logits(2, 3, V_S, dtype=torch.float64)
    labels = torch.tensor([[0, -100, 1], [2, 3, -100]])
    kw = dict(k=k, temperature=1.7, teacher_temperature=0.9, labels=labels)
    got, grad = _loss_and_grad(fastkd.uld_loss, s, t, backend="triton", **kw)
    want, want_grad = _loss_and_grad(reference.uld_loss, s, t, **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-14)
    assert torch.autograd.gradcheck(lambda x: fastkd.uld_loss(x, t[0, :2], k=k, backend="triton"),
                                    (s[0, :2].clone().requires_grad_(),), fast_mode=True)


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16)])
def test_triton_topk_accuracy_rule_on_views(dtypes):
    """bf16 near convergence and non-contiguous views (a column slice, a transposed batch), with
    the Triton kernels' float32 statistics held to the accuracy rule."""
    s64 = logits(4, 3, V_T + 4, dtype=torch.float64)
    t64 = s64[..., :V_T] + 1e-2 * logits(4, 3, V_T, dtype=torch.float64)
    s, t = s64.to(dtypes[0]).transpose(0, 1)[..., :V_T], t64.to(dtypes[1]).transpose(0, 1)
    kw = dict(k=4, reduction="none", temperature=1.5)
    got, grad = _loss_and_grad(fastkd.uld_loss, s, t, backend="triton", **kw)
    oracle, oracle_grad = _loss_and_grad(reference.uld_loss, s.double(), t.double(), **kw)
    f32, f32_grad = _loss_and_grad(reference.uld_loss, s.float(), t.float(), **kw)
    assert grad.dtype == dtypes[0]
    assert_close_to_oracle(got, oracle, 2 * f32.double() - oracle, dtype=torch.float32, grows_with=V_T)
    assert_close_to_oracle(grad.float(), oracle_grad, 2 * f32_grad.double() - oracle_grad.double(),
                           dtype=dtypes[0], grows_with=V_T)


def test_triton_has_the_topk_mode_only():
    s, t = logits(2, V_S), logits(2, V_T)
    with pytest.raises(ValueError, match="top-K mode"):
        fastkd.uld_loss(s, t, backend="triton")
    assert torch.isfinite(fastkd.uld_loss(s, t))  # "auto" on the CPU: the torch backend


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_teacher_from_teacher_topk(backend):
    """A teacher given as ``teacher_topk``'s pair (wider than k) gives the top-K loss of its logits;
    its temperature must be the teacher's."""
    s, t = logits(2, 3, V_S, dtype=torch.float64), logits(2, 3, V_T, dtype=torch.float64)
    pair = fastkd.teacher_topk(t, 6, temperature=0.8)
    got, grad = _loss_and_grad(fastkd.uld_loss, s, pair, k=4, teacher_temperature=0.8, backend=backend)
    want, want_grad = _loss_and_grad(fastkd.uld_loss, s, t, k=4, teacher_temperature=0.8, backend="torch")
    oracle, _ = _loss_and_grad(reference.uld_loss, s, pair, k=4, teacher_temperature=0.8)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, oracle, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)
    assert fastkd.uld_loss(s, pair, teacher_temperature=0.8, return_bound=True)[1] > 0  # k defaults to 6
    with pytest.raises(ValueError, match="re-tempered"):
        fastkd.uld_loss(s, pair, k=4)
    with pytest.raises(ValueError, match="k must"):
        fastkd.uld_loss(s, pair, k=7, teacher_temperature=0.8)


@pytest.mark.parametrize("k", [None, 3])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_inplace_writes_the_gradient_into_the_logits(k, backend):
    if backend == "triton" and k is None:
        pytest.skip("the Triton backend has the top-K mode only")
    s, t = logits(5, V_T, dtype=torch.float64), logits(5, V_S, dtype=torch.float64)
    labels = torch.tensor([0, -100, 1, 2, 3])
    want, want_grad = _loss_and_grad(fastkd.uld_loss, s, t, k=k, labels=labels, backend=backend)
    student = s.clone().requires_grad_()
    loss = fastkd.uld_loss(student, t, k=k, labels=labels, backend=backend, inplace=True)
    (grad,) = torch.autograd.grad(loss, student)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12)
    assert grad.data_ptr() == student.data_ptr()
    with pytest.raises(ValueError, match="inplace=True needs student_logits"):
        fastkd.uld_loss(s[:1].expand(5, V_T), t, inplace=True)


def _peak_bytes(fn):
    """Peak bytes of the tensors that torch allocates while ``fn`` runs, on this thread."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                            if e.name() == "[memory]"):
        live += nbytes
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_memory_is_the_gradient_and_a_few_chunks(dtype, monkeypatch):
    """Forward + backward of the top-K mode on the torch backend holds no [N, V] buffer but the
    returned gradient (none with ``inplace=True``): the rest is chunks of rows (here 1/8 of N)."""
    from fastkd.backends import torch as torch_backend
    monkeypatch.setattr(torch_backend, "CHUNK_BYTES", 2**20)  # [64, 4096] float32 chunks of N = 512 rows
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the chunks on this thread, where the profiler sees them
    try:
        s, t = logits(512, 4096).to(dtype), logits(512, 3000).to(dtype)
        gradient = s.numel() * s.element_size()
        student = s.clone().requires_grad_()
        peak = _peak_bytes(lambda: torch.autograd.grad(fastkd.uld_loss(student, t, k=64), student))
        assert gradient <= peak <= gradient + 3 * 2**20
        peak = _peak_bytes(lambda: torch.autograd.grad(fastkd.uld_loss(student, t, k=64, inplace=True), student))
        assert peak <= 3 * 2**20
    finally:
        torch.set_num_threads(threads)
