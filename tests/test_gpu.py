"""The compiled kernels on a real GPU against the float64 reference (skipped without CUDA).

The rest of the suite runs the same kernels through the interpreter on CPU tensors; this file is
what bench/gpu_check.sh adds on a GPU: real block sizes, real vocabularies, bf16 and fp32.
"""
import pytest
import torch

import fastkd
from fastkd import reference
from helpers import DIVERGENCES, assert_close_to_oracle, logits

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("V", [1, 4097, 32000, 128256])
def test_kd_loss_on_gpu(name, dtype, V):
    s, t = logits(6, V, dtype=dtype, device="cuda"), logits(6, V, dtype=dtype, device="cuda")
    labels = torch.randint(0, V, (6,), device="cuda")
    labels[2] = -100
    kw = dict(divergence=name, temperature=2.0, labels=labels, hard_weight=0.3, beta=0.4, skew=0.2)
    x = s.clone().requires_grad_(True)
    loss = fastkd.kd_loss(x, t, backend="triton", **kw)
    loss.backward()
    x64 = s.double().cpu().requires_grad_(True)
    kw64 = dict(kw, labels=labels.cpu())
    loss64 = reference.kd_loss(x64, t.double().cpu(), **kw64)
    loss64.backward()
    x_same = s.detach().cpu().requires_grad_(True)
    loss_same = reference.kd_loss(x_same, t.cpu(), **kw64)
    loss_same.backward()
    assert_close_to_oracle(loss.cpu(), loss64, loss_same, dtype=dtype, grows_with=V)
    assert_close_to_oracle(x.grad.cpu(), x64.grad, x_same.grad, dtype=dtype, grows_with=V)


@pytest.mark.parametrize("log", [False, True])
def test_softmax_on_gpu(log):
    x = logits(8, 50257, dtype=torch.bfloat16, device="cuda").requires_grad_(True)
    fn = fastkd.log_softmax if log else fastkd.softmax
    y = fn(x, temperature=1.5, backend="triton")
    expected = (torch.log_softmax if log else torch.softmax)(x.detach().float() / 1.5, -1)
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=2e-2 if log else 1e-4)


def test_inplace_and_strided_views_on_gpu():
    base = logits(4, 3, 32100, dtype=torch.bfloat16, device="cuda")
    s, t = base[..., :32000], logits(4, 3, 32000, dtype=torch.bfloat16, device="cuda")
    expected = fastkd.kd_loss(s.clone(), t, backend="triton")
    x = s.clone().requires_grad_(True)
    torch.testing.assert_close(fastkd.kd_loss(x, t, inplace=True, backend="triton"), expected)


def _linear_oracle(h, W, th, Wt, labels, **kw):
    """Float64 loss and (hidden, weight) gradients of kd_loss(h W^T, th Wt^T) on the CPU."""
    h64, W64 = h.detach().double().cpu().requires_grad_(True), W.detach().double().cpu().requires_grad_(True)
    loss = reference.kd_loss(h64 @ W64.T, (th.double() @ Wt.double().T).cpu(), labels=labels.cpu(), **kw)
    loss.backward()
    return loss.detach(), h64.grad, W64.grad


@pytest.mark.parametrize("divergence", ["kl", "jsd", "tvd"])
def test_fused_linear_on_gpu(divergence):
    """Chunks that do not divide N, ignored rows; fp32 against the float64 oracle, bf16 against the
    unfused bf16 path."""
    N, H, V = 300, 256, 32000
    gen = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(N, H, device="cuda", generator=gen) / H**0.5
    W = torch.randn(V, H, device="cuda", generator=gen) * 0.5
    th, Wt = torch.randn(N, 128, device="cuda", generator=gen) / 128**0.5, torch.randn(V, 128, device="cuda")
    labels = torch.randint(0, V, (N,), device="cuda", generator=gen)
    labels[::7] = -100
    kw = dict(divergence=divergence, temperature=2.0, hard_weight=0.25)
    for dtype in (torch.float32, torch.bfloat16):
        x, w = (a.to(dtype).detach().clone().requires_grad_(True) for a in (h, W))
        loss = fastkd.fused_linear_kd_loss(x, w, th.to(dtype), Wt.to(dtype), labels=labels, chunk_size=128,
                                           backend="triton", **kw)
        loss.backward()
        assert w.grad.dtype == dtype and x.grad.dtype == dtype
        if dtype == torch.float32:
            loss64, gh64, gW64 = _linear_oracle(x, w, th, Wt, labels, **kw)
            torch.testing.assert_close(loss.double().cpu(), loss64, rtol=1e-3, atol=1e-5)
            torch.testing.assert_close(x.grad.double().cpu(), gh64, rtol=1e-3, atol=1e-3 * gh64.abs().max().item())
            torch.testing.assert_close(w.grad.double().cpu(), gW64, rtol=1e-3, atol=1e-3 * gW64.abs().max().item())
        else:
            x2, w2 = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
            unfused = fastkd.kd_loss(x2 @ w2.T, th.to(dtype) @ Wt.to(dtype).T, labels=labels, backend="triton", **kw)
            unfused.backward()
            torch.testing.assert_close(loss, unfused, rtol=2e-2, atol=1e-3)
            for got, want in ((x.grad, x2.grad), (w.grad, w2.grad)):
                torch.testing.assert_close(got.float(), want.float(), rtol=5e-2, atol=2e-2 * want.abs().max().item())


@pytest.mark.parametrize("k", [1, 64, 1024])
def test_topk_on_gpu_real_vocabulary(k):
    N, V, T = 6, 128256, 2.0
    t = logits(N, V, device="cuda")
    s = logits(N, V, dtype=torch.bfloat16, device="cuda")
    lp, idx = fastkd.teacher_topk(t, k, temperature=T, backend="triton")
    x = t.double() / T
    values = torch.topk(x, k, dim=-1).values
    torch.testing.assert_close(lp.double(), values - torch.logsumexp(x, -1, keepdim=True), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.gather(1, idx.long()), values)  # the listed columns hold the top-k values
    labels = torch.randint(0, V, (N,), device="cuda")
    labels[1] = -100
    for tail in ("bucket", "renormalize", "ignore"):
        kw = dict(tail=tail, temperature=T, labels=labels, hard_weight=0.5, reduction="none")
        x = s.clone().requires_grad_(True)
        loss = fastkd.topk_kd_loss(x, lp, idx, backend="triton", **kw)
        loss.sum().backward()
        x64 = s.double().cpu().requires_grad_(True)
        kw64 = dict(kw, labels=labels.cpu())
        loss64 = reference.topk_kd_loss(x64, lp.double().cpu(), idx.cpu(), **kw64)
        loss64.sum().backward()
        x_same = s.detach().cpu().requires_grad_(True)
        loss_same = reference.topk_kd_loss(x_same, lp.cpu(), idx.cpu(), **kw64)
        loss_same.sum().backward()
        assert_close_to_oracle(loss.cpu(), loss64, loss_same, dtype=torch.bfloat16, grows_with=k)
        assert_close_to_oracle(x.grad.cpu(), x64.grad, x_same.grad, dtype=torch.bfloat16, grows_with=k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_vocab_parallel_shards_on_gpu(name, dtype):
    """Three shards of a 128256 vocabulary driven in one process (tests/test_distributed.py's
    ``simulate``), compiled kernels, against the float64 oracle."""
    from test_distributed import make_case, oracle_rows, simulate
    from fastkd.options import make_options

    widths = (40000, 50000, 38256)
    student, teacher, labels, starts = make_case(widths, seed=7, n_rows=6, dtype=dtype)
    student, teacher, labels = student.cuda(), teacher.cuda(), labels.cuda()
    kw = dict(divergence=name, temperature=2.0, beta=0.3, skew=0.2, hard_weight=0.5)
    results, _ = simulate(student, teacher, labels, starts, widths, make_options(**kw), "triton")
    rows, grad = oracle_rows(student.cpu(), teacher.cpu(), labels.cpu(), **kw)  # same rounded inputs
    grad_rtol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    for row_loss, _, V in results:
        assert V == sum(widths)
        torch.testing.assert_close(row_loss.double().cpu(), rows, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat([g for _, g, _ in results], 1).double().cpu(), grad, rtol=grad_rtol,
                               atol=grad_rtol * grad.abs().max().item())
