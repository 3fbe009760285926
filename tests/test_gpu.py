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
    x_same = s.cpu().requires_grad_(True)
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
