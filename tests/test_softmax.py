"""Tempered softmax / log-softmax through the Triton kernels (interpreter on the CPU)."""
import pytest
import torch

import fastkd
from fastkd import reference
from helpers import DTYPES, assert_close_to_oracle, logits


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1, 16, 37])
def test_forward_and_backward_match_oracle(log, dtype, V, device):
    fn = fastkd.log_softmax if log else fastkd.softmax
    ref = reference.log_softmax if log else reference.softmax
    x = logits(5, V, dtype=dtype, device=device).requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    dy = torch.randn(5, V, dtype=torch.float64, device=device)

    y = fn(x, temperature=1.7, backend="triton")
    y64 = ref(x64, temperature=1.7)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close_to_oracle(y, y64, ref(x.detach(), temperature=1.7), dtype=dtype)

    (dx,) = torch.autograd.grad(y, x, dy.to(dtype))
    (dx64,) = torch.autograd.grad(y64, x64, dy)
    x_same = x.detach().requires_grad_(True)
    (dx_same,) = torch.autograd.grad(ref(x_same, temperature=1.7), x_same, dy.to(dtype))
    assert dx.dtype == dtype
    assert_close_to_oracle(dx, dx64, dx_same, dtype=dtype, grows_with=V)


@pytest.mark.parametrize("log", [False, True])
def test_gradcheck_float64(log):
    x = logits(2, 17, dtype=torch.float64).requires_grad_(True)  # rows of two blocks (conftest: 16 columns)
    fn = fastkd.log_softmax if log else fastkd.softmax
    assert torch.autograd.gradcheck(lambda x: fn(x, temperature=0.7, backend="triton"), (x,))


@pytest.mark.parametrize("dim", [0, 1, -2])
def test_other_dims_and_strided_input(dim):
    base = logits(6, 5, 40, dtype=torch.float32)
    x = base[:, :, 3:33]  # rows of stride 40 for the last dim; a transposed read for others
    got = fastkd.softmax(x, temperature=2.0, dim=dim, backend="triton")
    torch.testing.assert_close(got, torch.softmax(x / 2.0, dim=dim))


def test_rows_sum_to_one_and_shift_invariance():
    x = logits(4, 50, dtype=torch.float32, scale=20.0)
    y = fastkd.softmax(x, temperature=0.3, backend="triton")
    torch.testing.assert_close(y.sum(-1), torch.ones(4), rtol=1e-5, atol=1e-5)
    ly = fastkd.log_softmax(x, temperature=0.3, backend="triton")
    torch.testing.assert_close(ly.exp(), y, rtol=1e-5, atol=1e-6)
    x64 = x.double()  # shift invariance, in float64 so that x + 1e4 rounds nothing that matters
    torch.testing.assert_close(fastkd.softmax(x64 + 1e4, temperature=0.3, backend="triton"),
                               fastkd.softmax(x64, temperature=0.3, backend="triton"), rtol=1e-9, atol=1e-12)


def test_masked_entries_and_empty_input():
    x = logits(3, 20, dtype=torch.float32)
    x[:, 7:] = float("-inf")
    x.requires_grad_(True)
    y = fastkd.log_softmax(x, backend="triton")
    assert (y[:, 7:] == float("-inf")).all() and torch.isfinite(y[:, :7]).all()
    (dx,) = torch.autograd.grad(fastkd.softmax(x, backend="triton").pow(2).sum(), x)
    assert torch.isfinite(dx).all() and (dx[:, 7:] == 0).all()
    empty = torch.zeros(0, 9, requires_grad=True)
    out = fastkd.softmax(empty, backend="triton")
    assert out.shape == (0, 9)
    out.sum().backward()
    assert empty.grad.shape == (0, 9)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("shape, dim", [((0, 5), 0), ((2, 0, 3), 1), ((5, 0), -1), ((0, 5), -1)])
def test_empty_dimensions_as_pytorch(shape, dim, backend):
    """A softmax over a dimension of size 0, or over rows of which there are none: empty, as in PyTorch
    (the kernels' rows once reshaped to (-1, 0), which PyTorch refuses as ambiguous)."""
    x = torch.zeros(shape, requires_grad=True)
    for fn in (fastkd.softmax, fastkd.log_softmax):
        out = fn(x, 2.0, dim=dim, backend=backend)
        assert out.shape == shape
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert grad.shape == shape


def test_torch_backend_matches_triton():
    x = logits(4, 33, dtype=torch.bfloat16)
    torch.testing.assert_close(fastkd.softmax(x, 1.5, backend="torch"), fastkd.softmax(x, 1.5, backend="triton"))
