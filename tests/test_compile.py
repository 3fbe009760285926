"""torch.compile(fullgraph=True): no graph break, one graph for every temperature, same numbers.

The fused calls are custom operators (``fastkd.ops``), so dynamo keeps them whole. CPU tests use
the torch backend, and the Triton kernels in the interpreter; inductor where it matters (the
recompile count, the in-place backward), the cheaper ``aot_eager`` backend elsewhere.
"""
import os

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import fastkd
from helpers import logits

W_SHAPE = (6, 37)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _student_step(backend, **kw):
    """A tiny "model": logits = h @ w, then the KD loss (so the logits are a graph intermediate)."""
    def step(h, w, t, labels, T, hard_weight):
        return fastkd.kd_loss(h @ w, t, temperature=T, labels=labels, hard_weight=hard_weight,
                              backend=backend, **kw)
    return step


def _inputs(N=5, dtype=torch.float32):
    h = logits(N, W_SHAPE[0], dtype=dtype, scale=1.0)
    w = logits(*W_SHAPE, dtype=dtype, scale=1.0).requires_grad_(True)
    t = logits(N, W_SHAPE[1], dtype=dtype)
    labels = torch.randint(0, W_SHAPE[1], (N,))
    labels[1] = -100
    return h, w, t, labels


def _value_and_grad(fn, h, w, *args):
    loss = fn(h, w, *args)
    (grad,) = torch.autograd.grad(loss, w)
    return loss.detach(), grad


def test_kd_loss_one_graph_for_every_temperature_with_inductor():
    step = _student_step("torch")
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    h, w, t, labels = _inputs()
    schedule = [(2.0, 0.5), (3.0, 0.25), (0.7, 0.125)]  # annealed T and hard weight
    for T, hard_weight in schedule:
        loss, grad = _value_and_grad(compiled, h, w, t, labels, T, hard_weight)
        expected_loss, expected_grad = _value_and_grad(step, h, w, t, labels, T, hard_weight)
        torch.testing.assert_close(loss, expected_loss)
        torch.testing.assert_close(grad, expected_grad)
    # Dynamo compiles the first call with the floats as constants and, when they change, once more
    # with them symbolic (its automatic-dynamic rule); after that no value recompiles.
    assert counter.frame_count == 2


def test_dynamic_true_compiles_once_for_all_temperatures():
    step = _student_step("torch")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, backend=counter, dynamic=True)
    h, w, t, labels = _inputs()
    for T in (2.0, 3.0, 5.0):
        loss, _ = _value_and_grad(compiled, h, w, t, labels, T, 0.5)
        torch.testing.assert_close(loss, step(h, w, t, labels, T, 0.5).detach())
    assert counter.frame_count == 1


def test_explain_reports_no_graph_break():
    h, w, t, labels = _inputs()
    explanation = torch._dynamo.explain(_student_step("torch"))(h, w, t, labels, 2.0, 0.5)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    ops = [str(node.target) for graph in explanation.graphs for module in graph.modules()
           if isinstance(module, torch.fx.GraphModule) for node in module.graph.nodes]
    assert ops.count("fastkd.kd_forward") == 1  # one opaque op, not a trace of the backend


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_kd_loss_compiled_matches_eager(backend, inplace, reduction):
    kw = dict(divergence="jsd", beta=0.3, reduction=reduction, inplace=inplace)
    step = _student_step(backend, **kw)
    reduced = (lambda *a: step(*a).sum() * 3.0) if reduction == "none" else step  # upstream gradient != 1
    compiled = torch.compile(reduced, fullgraph=True, backend="aot_eager")
    h, w, t, labels = _inputs()
    loss, grad = _value_and_grad(compiled, h, w, t, labels, 1.5, 0.25)
    expected_loss, expected_grad = _value_and_grad(reduced, h, w, t, labels, 1.5, 0.25)
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(grad, expected_grad)


def test_num_items_in_batch_tensor_under_compile():
    def f(h, w, t, labels, n):
        return fastkd.kd_loss(h @ w, t, labels=labels, num_items_in_batch=n, backend="torch")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    h, w, t, labels = _inputs()
    loss, grad = _value_and_grad(compiled, h, w, t, labels, torch.tensor(11))
    expected_loss, expected_grad = _value_and_grad(
        lambda h, w: fastkd.kd_loss(h @ w, t, labels=labels, reduction="sum", backend="torch") / 11, h, w)
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("upstream", [1.0, 3.0])
def test_compiled_backward_has_no_pass_over_the_gradient(upstream):
    """The forward op holds the gradient and the backward's fastkd.take_grad scales it in place
    (fastkd.ops, "Held gradients"): inductor emits no kernel of its own in the backward, only the
    matmul of ``h @ w``'s gradient, whatever the upstream gradient; nothing stays held."""
    from torch._inductor.utils import run_and_get_code

    from fastkd import ops

    h, w, t, labels = _inputs()
    step = _student_step("torch")
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    (grad,), codes = run_and_get_code(lambda: torch.autograd.grad(compiled(h, w, t, labels, 2.0, 0.5) * upstream, w))
    backward = codes[-1]
    assert "fastkd.take_grad" in backward and "cpp_fused" not in backward and "extern_kernels.mm" in backward
    torch.testing.assert_close(grad, torch.autograd.grad(step(h, w, t, labels, 2.0, 0.5) * upstream, w)[0])
    assert not ops._HELD


@pytest.mark.parametrize("backend, dtype, N", [("triton", torch.bfloat16, 5), ("torch", torch.bfloat16, 5),
                                               ("triton", torch.float32, 0), ("torch", torch.float32, 0)])
def test_held_gradient_of_views_and_dtypes_matches_eager(backend, dtype, N):
    """The compiled backward's take_grad on row-strided and transposed views, bf16, N = 0, labels a
    strided view, an upstream gradient of 2: the eager gradient."""
    base, t = logits(N, 41, dtype=dtype).requires_grad_(True), logits(41, N).T
    labels = torch.randint(0, 37, (2 * N,))[::2]

    def f(base, t, labels):
        return fastkd.kd_loss(base[:, :37], t[:, :37], labels=labels, hard_weight=0.5, backend=backend) * 2.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    (grad,) = torch.autograd.grad(compiled(base, t, labels), base)
    (expected,) = torch.autograd.grad(f(base, t, labels), base)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad, expected)


def test_a_held_gradient_is_released_and_taken_once():
    """A compiled forward whose backward never runs releases its gradient; a second backward of a
    graph whose gradient was taken raises instead of returning a twice-scaled gradient."""
    import gc

    from fastkd import ops

    s, t = logits(4, 7).requires_grad_(True), logits(4, 7)
    compiled = torch.compile(lambda s, t: fastkd.kd_loss(s, t, backend="torch"), fullgraph=True, backend="aot_eager")
    loss = compiled(s, t)
    assert len(ops._HELD) == 1
    del loss
    gc.collect()
    assert not ops._HELD
    loss = compiled(s, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward already ran"):
        loss.backward()


def test_compiled_inplace_backward_reuses_the_saved_gradient():
    """With inplace=True the gradient is the student's storage, owned by the graph: inductor writes
    the scaled gradient over it (a donated buffer), no second [N, V]."""
    from torch._inductor.utils import run_and_get_code

    h, w, t, labels = _inputs()
    compiled = torch.compile(_student_step("torch", inplace=True), fullgraph=True, backend="inductor")
    _, codes = run_and_get_code(lambda: _value_and_grad(compiled, h, w, t, labels, 2.0, 0.5))
    assert "fastkd.kd_forward_inplace" in codes[0] and "# reuse" in codes[-1]


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_compiled_backward_bytes_counted_by_the_interpreter(reduction):
    """fp32, the Triton kernels under the interpreter: the compiled backward's only launch is
    scale_rows, which at an upstream gradient of 1 reads that value once a row and writes nothing
    (0 B/elt), and otherwise reads and writes the gradient once, in place (4 + 4 B/elt)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("counts bytes through the Triton interpreter")
    from fastkd.audit.traffic import _count_launches

    N, V = 3, 40
    s, t = logits(N, V).requires_grad_(True), logits(N, V)
    compiled = torch.compile(lambda s, t: fastkd.kd_loss(s, t, temperature=2.0, reduction=reduction, backend="triton"),
                             fullgraph=True, backend="inductor")
    for upstream, loaded, stored in ((1.0, 4 / V, 0.0), (3.0, 4 + 4 / V, 4.0)):
        loss = compiled(s, t)
        up = torch.full(loss.shape, upstream)
        ((kernel, bl, bs),) = _count_launches(lambda: loss.backward(up))
        assert kernel == "scale_rows_kernel"
        assert (bl / (N * V), bs / (N * V)) == pytest.approx((loaded, stored))
        expected = torch.autograd.grad(fastkd.kd_loss(s, t, temperature=2.0, reduction=reduction, backend="torch"),
                                       s, up)[0]
        torch.testing.assert_close(s.grad, expected)
        s.grad = None


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("log", [False, True])
def test_softmax_compiles_fullgraph(backend, log):
    fn = fastkd.log_softmax if log else fastkd.softmax

    def f(x, T, dy):
        return (fn(x, temperature=T, dim=0, backend=backend) * dy).sum()

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, fullgraph=True, backend=counter)
    x, dy = logits(9, 4).requires_grad_(True), torch.randn(9, 4)
    for T in (0.5, 2.0, 3.0):
        (g,) = torch.autograd.grad(compiled(x, T, dy), x)
        (g_eager,) = torch.autograd.grad(f(x, T, dy), x)
        torch.testing.assert_close(g, g_eager)
    assert counter.frame_count == 2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_on_gpu_with_triton_kernels(dtype):
    step = _student_step("triton")
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    h, w, t, labels = (x.cuda() for x in _inputs(N=64, dtype=dtype))
    w = w.detach().requires_grad_(True)
    for T in (1.0, 2.0, 4.0):
        loss, grad = _value_and_grad(compiled, h, w, t, labels, T, 0.5)
        expected_loss, expected_grad = _value_and_grad(step, h, w, t, labels, T, 0.5)
        torch.testing.assert_close(loss, expected_loss, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grad, expected_grad, rtol=2e-2 if dtype != torch.float32 else 1e-4,
                                   atol=1e-3 if dtype != torch.float32 else 1e-5)
    assert counter.frame_count == 2


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_fused_linear_compiles_fullgraph(reduction):
    H, V, N = 8, 37, 10
    w, b = logits(V, H, scale=0.5).requires_grad_(True), logits(V, scale=0.5).requires_grad_(True)
    w_t, h, h_t = logits(V, H, scale=0.5), logits(N, H, scale=1.0).requires_grad_(True), logits(N, H, scale=1.0)
    labels = torch.randint(0, V, (N,))
    labels[3] = -100

    def f(h, T):
        loss = fastkd.fused_linear_kd_loss(h, w, h_t, w_t, student_bias=b, labels=labels, temperature=T,
                                           hard_weight=0.5, reduction=reduction, chunk_size=4, backend="torch")
        return loss.sum() * 2.0 if reduction == "none" else loss

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, fullgraph=True, backend=counter)
    for T in (1.0, 2.0, 3.0):
        got = torch.autograd.grad(compiled(h, T), (h, w, b))
        expected = torch.autograd.grad(f(h, T), (h, w, b))
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e)
    assert counter.frame_count == 2


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_topk_kd_loss_compiles_fullgraph(backend):
    t = logits(6, W_SHAPE[1])
    lp, idx = fastkd.teacher_topk(t, 5, temperature=2.0, backend="torch")
    lp = lp.clone()  # a plain tensor: the temperature is declared below

    def step(h, w, labels, T, n):
        return fastkd.topk_kd_loss(h @ w, lp, idx, temperature=T, teacher_temperature=2.0, labels=labels,
                                   hard_weight=0.5, num_items_in_batch=n, validate_indices=False, backend=backend)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    h, w, _, labels = _inputs(N=6)
    for T in (1.0, 2.0, 3.0):
        loss, grad = _value_and_grad(compiled, h, w, labels, T, torch.tensor(9))
        expected_loss, expected_grad = _value_and_grad(step, h, w, labels, T, torch.tensor(9))
        torch.testing.assert_close(loss, expected_loss)
        torch.testing.assert_close(grad, expected_grad)
    assert counter.frame_count == 2



@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_vocab_parallel_compiles_fullgraph(backend, one_rank_group):
    def step(h, w, t, labels, T, n):
        return fastkd.vocab_parallel_kd_loss(h @ w, t, temperature=T, labels=labels, hard_weight=0.5,
                                             divergence="jsd", num_items_in_batch=n, backend=backend)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    h, w, t, labels = _inputs()
    for T in (1.0, 2.0, 3.0):
        loss, grad = _value_and_grad(compiled, h, w, t, labels, T, torch.tensor(7))
        expected_loss, expected_grad = _value_and_grad(step, h, w, t, labels, T, torch.tensor(7))
        torch.testing.assert_close(loss, expected_loss)
        torch.testing.assert_close(grad, expected_grad)
        torch.testing.assert_close(loss, fastkd.kd_loss(h @ w, t, temperature=T, labels=labels, hard_weight=0.5,
                                                        divergence="jsd", num_items_in_batch=7, backend="torch"))
    assert counter.frame_count == 2


def test_double_backward_of_a_compiled_loss_raises():
    """Eager raises at the create_graph call (tests/test_errors.py); compiled, the backward is traced
    ahead of time, so torch's own error comes when the gradient's graph is used."""
    compiled = torch.compile(_student_step("torch"), fullgraph=True, backend="aot_eager")
    h, w, t, labels = _inputs()
    (grad,) = torch.autograd.grad(compiled(h, w, t, labels, 2.0, 0.5), w, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.square().sum().backward()
