"""Under torch.autocast the logits keep the dtype autocast gave them and the statistics stay float32.

A model under autocast hands the loss bf16 (CPU) or bf16/fp16 (CUDA) logits from its autocast
matmul; the loss must equal the same call outside autocast on those logits and be as close to the
float64 oracle as the same-dtype reference is.
"""
import pytest
import torch

import fastkd
from fastkd import reference
from helpers import assert_close_to_oracle, logits

V = 37


def _autocast_logits(device, dtype):
    h = logits(6, 8, scale=1.0, device=device)
    w = logits(8, V, scale=1.0, device=device).requires_grad_(True)
    w_t = logits(8, V, scale=1.0, device=device)
    with torch.autocast(device_type=device, dtype=dtype):
        return h @ w, (h @ w_t)


def _check(device, dtype, backend):
    labels = torch.randint(0, V, (6,), device=device)
    labels[2] = -100
    kw = dict(temperature=2.0, labels=labels, hard_weight=0.3, backend=backend)
    s, t = _autocast_logits(device, dtype)
    assert s.dtype == t.dtype == dtype
    with torch.autocast(device_type=device, dtype=dtype):
        loss = fastkd.kd_loss(s, t, **kw)
        (grad,) = torch.autograd.grad(loss, s)
        probs = fastkd.softmax(s.detach(), temperature=2.0, backend=backend)
    assert loss.dtype == torch.float32 and grad.dtype == dtype and probs.dtype == dtype

    s0 = s.detach().requires_grad_(True)
    outside = fastkd.kd_loss(s0, t, **kw)  # the same logits, autocast off
    (grad_outside,) = torch.autograd.grad(outside, s0)
    torch.testing.assert_close(loss, outside, rtol=0, atol=0)
    torch.testing.assert_close(grad, grad_outside, rtol=0, atol=0)
    torch.testing.assert_close(probs, fastkd.softmax(s.detach(), temperature=2.0, backend=backend), rtol=0, atol=0)

    s64 = s.detach().double().requires_grad_(True)
    oracle = reference.kd_loss(s64, t.double(), **{**kw, "backend": "auto"})
    (grad64,) = torch.autograd.grad(oracle, s64)
    s_same = s.detach().requires_grad_(True)
    same = reference.kd_loss(s_same, t, **{**kw, "backend": "auto"})
    (grad_same,) = torch.autograd.grad(same, s_same)
    assert_close_to_oracle(loss, oracle, same, dtype=dtype, grows_with=V)
    assert_close_to_oracle(grad, grad64, grad_same, dtype=dtype, grows_with=V)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cpu_bf16_autocast(backend):
    _check("cpu", torch.bfloat16, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast(dtype):
    _check("cuda", dtype, "triton")


def test_fused_linear_under_cpu_autocast_is_kd_loss_of_float32_products_of_bf16_operands():
    """Autocast casts the operands to bf16, as F.linear would; the fused path keeps their products'
    float32 sums (the logits are never rounded to bf16), so it equals kd_loss of those."""
    H, N = 8, 6
    h = logits(N, H, scale=1.0).requires_grad_(True)
    w, w_t, h_t = logits(V, H, scale=0.5).requires_grad_(True), logits(V, H, scale=0.5), logits(N, H, scale=1.0)
    labels = torch.randint(0, V, (N,))
    kw = dict(temperature=2.0, labels=labels, hard_weight=0.3)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        fused = fastkd.fused_linear_kd_loss(h, w, h_t, w_t, chunk_size=4, backend="torch", **kw)
    as_bf16 = lambda x: x.bfloat16().float()  # noqa: E731
    unfused = fastkd.kd_loss(torch.nn.functional.linear(as_bf16(h), as_bf16(w)),
                             torch.nn.functional.linear(as_bf16(h_t), as_bf16(w_t)), backend="torch", **kw)
    assert fused.dtype == torch.float32
    g_fused, g_unfused = torch.autograd.grad(fused, (h, w)), torch.autograd.grad(unfused, (h, w))
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_fused, g_unfused):
        assert a.dtype == b.dtype == torch.float32  # the float32 leaves get float32 gradients
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-3)  # bf16 products, summed in other orders
