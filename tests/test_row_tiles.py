"""Rows walked in whole 16-byte groups (kernels/row_tiles.py): a head before the row's first aligned
group and a tail after its last go through an edge tile after each loop. Odd V puts a head of 1 to
VEC - 1 columns on most rows of a contiguous tensor; a slice ``x[:, :V]`` of a wider tensor gives row
strides that agree with the gradient's modulo VEC (width V + 8: the aligned walk) or not (V + 3: the
plain walk). Blocks of 16 columns (conftest) make several loop iterations; -inf columns sit in a
head and a tail, and one row is ignored. Every kernel that walks rows is reached: two-pass kd_loss
(and the backward's scale_rows), the vocabulary-parallel kernels, softmax, topk_kd_loss, teacher_topk.
"""
import pytest
import torch

import fastkd
from fastkd import reference
from helpers import assert_close_to_oracle, logits

N = 5
LAYOUTS = {"contiguous": 0, "slice, strides agree": 8, "slice, strides differ": 3}


def _view(x, extra):
    """``x`` as the first columns of a tensor ``extra`` columns wider (a copy when extra is 0)."""
    if extra == 0:
        return x.clone()
    wide = torch.zeros(x.shape[0], x.shape[1] + extra, dtype=x.dtype)
    wide[:, :x.shape[1]] = x
    return wide[:, :x.shape[1]]


def _inputs(V, dtype, extra):
    torch.manual_seed(V + extra)
    s, t = logits(N, V, dtype=dtype), logits(N, V, dtype=dtype)
    for x in (s, t):
        x[:, 1] = float("-inf")       # in the head of every row that has one
        x[:, V - 1] = float("-inf")   # in the tail
    labels = torch.randint(2, V - 1, (N,))
    labels[2] = -100
    return _view(s, extra), _view(t, extra), labels


def _loss_and_grad(fn, s, t, labels, kw):
    """The loss and its gradient for an upstream gradient of 3 (the backward's scale_rows walks the row too)."""
    leaf = s.detach().requires_grad_()
    loss = fn(leaf, t, labels=labels, **kw)
    (3 * loss).backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("V", [37, 53])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("divergence", ["kl", "jsd"])
@pytest.mark.parametrize("loss_fn", ["kd_loss", "vocab_parallel_kd_loss"])
def test_odd_widths_and_strides_match_the_oracle(loss_fn, divergence, dtype, V, layout, monkeypatch,
                                                 one_rank_group):
    monkeypatch.setenv("FASTKD_KD_KERNEL", "two_pass")
    s, t, labels = _inputs(V, dtype, LAYOUTS[layout])
    assert s.stride(0) == V + LAYOUTS[layout]
    kw = dict(divergence=divergence, temperature=2.0, hard_weight=0.5)
    loss, grad = _loss_and_grad(getattr(fastkd, loss_fn), s, t, labels, dict(kw, backend="triton"))
    oracle, oracle_grad = _loss_and_grad(reference.kd_loss, s.double(), t.double(), labels, kw)
    f32, f32_grad = _loss_and_grad(reference.kd_loss, s.float(), t.float(), labels, kw)
    assert grad.dtype == dtype and torch.isfinite(grad).all()
    assert_close_to_oracle(loss, oracle, f32, dtype=dtype, grows_with=V)
    assert_close_to_oracle(grad, oracle_grad, f32_grad, dtype=dtype)


def _grads(fn, x, *args, upstream=None, **kw):
    leaf = x.detach().requires_grad_()
    out = fn(leaf, *args, **kw)
    out.backward(upstream if upstream is not None else torch.ones_like(out))
    return out.detach(), leaf.grad


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_softmax_at_odd_widths_and_strides(name, dtype, layout):
    V = 53
    s, _, _ = _inputs(V, dtype, LAYOUTS[layout])
    s[:, 1] = 0.5  # a softmax row of -inf is undefined
    dy = _view(logits(N, V, dtype=dtype), LAYOUTS[layout])
    y, grad = _grads(getattr(fastkd, name), s, 2.0, upstream=dy, backend="triton")
    oracle, oracle_grad = _grads(getattr(reference, name), s.double(), 2.0, upstream=dy.double())
    f32, f32_grad = _grads(getattr(reference, name), s.float(), 2.0, upstream=dy.float())
    finite = torch.isfinite(oracle)
    assert_close_to_oracle(y[finite], oracle[finite], f32[finite], dtype=dtype)
    assert_close_to_oracle(grad, oracle_grad, f32_grad, dtype=dtype, grows_with=V)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tail", ["bucket", "ignore"])
def test_topk_kd_loss_at_odd_widths_and_strides(tail, dtype, layout):
    V, k = 53, 6
    s, t, labels = _inputs(V, dtype, LAYOUTS[layout])
    logprobs, indices = torch.log_softmax(t.double() / 2.0, dim=-1).topk(k, dim=-1)
    kw = dict(tail=tail, temperature=2.0, hard_weight=0.5, labels=labels)
    loss, grad = _grads(fastkd.topk_kd_loss, s, logprobs.float(), indices, backend="triton", **kw)
    oracle, oracle_grad = _grads(reference.topk_kd_loss, s.double(), logprobs, indices, **kw)
    f32, f32_grad = _grads(reference.topk_kd_loss, s.float(), logprobs.float(), indices, **kw)
    assert_close_to_oracle(loss, oracle, f32, dtype=dtype, grows_with=V)
    assert_close_to_oracle(grad, oracle_grad, f32_grad, dtype=dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("V, k", [(53, 6), (37, 20)])
def test_teacher_topk_at_odd_widths_and_strides(V, k, dtype, layout):
    """The top k of float64 log_softmax, ties lowest column first: three columns share each row's
    largest value (bf16 ties many more), -inf sits in the head and the tail, and the last row has
    fewer finite columns than k (its -inf columns are listed, lowest first). Blocks of 16 columns
    (32 for k = 20) make several merges; the edge tile holds the head's tie."""
    _, t, _ = _inputs(V, dtype, LAYOUTS[layout])
    t[:, [2, 20, V - 3]] = 9.0
    t[N - 1, 4:] = float("-inf")
    lp, idx = fastkd.teacher_topk(t, k, temperature=2.0, backend="triton")
    x = torch.log_softmax(t.double() / 2.0, dim=-1)
    order = torch.sort(-x, dim=-1, stable=True).indices[:, :k]
    assert torch.equal(idx.long(), order)
    oracle = x.gather(1, order)
    assert torch.equal(oracle, torch.topk(x, k, dim=-1).values)
    f32 = torch.log_softmax(t.float() / 2.0, dim=-1).gather(1, order)
    assert_close_to_oracle(lp, oracle, f32, dtype=dtype)


def test_teacher_topk_of_nan_rows_and_no_rows():
    """A row of NaN, or with one NaN, has NaN log-probabilities and lists k distinct columns of the row
    (a NaN tile is merged, never skipped: the list never keeps a column-less key); N = 0 is empty."""
    t = _view(logits(3, 53), 3)
    t[0] = float("nan")
    t[1, 40] = float("nan")
    lp, idx = fastkd.teacher_topk(t, 6, backend="triton")
    assert torch.isnan(lp[:2]).all() and torch.isfinite(lp[2]).all()
    assert ((idx >= 0) & (idx < 53)).all() and all(len(set(row.tolist())) == 6 for row in idx)
    lp, idx = fastkd.teacher_topk(torch.empty(0, 53), 6, backend="triton")
    assert lp.shape == idx.shape == (0, 6)
