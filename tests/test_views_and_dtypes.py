"""Inputs as users really pass them, on every entry point and both backends:

- labels as non-contiguous views (a column of a 2-D tensor, a ``tensor_split`` chunk, the
  ``[..., 1:]`` shift of causal-LM code), 1-D and batched: the result must equal that of the
  contiguous copy (the Triton kernels once read ``labels_ptr + row`` whatever the stride);
- student and teacher in every pair of fp32, bf16, fp16 and float64, on every kernel (dense,
  top-k, vocab-parallel, fused linear with teacher logits): the float64 -> bf16 store once went
  through float32 in one kernel only, so a bf16 student with a float64 teacher got an all-zero
  gradient from the others.

The vocabulary-parallel loss runs on a one-rank gloo group in this process (one shard = the whole
vocabulary), which is enough to reach its label and store paths through the public function.
"""
import itertools

import pytest
import torch

import fastkd
from fastkd import reference
from fastkd import vocab_parallel_kd_loss


BACKENDS = ("triton", "torch")
FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)



def _label_views(B, S, V, gen):
    """(name, labels view [B', S'], slicer of the [B, S, ...] logits to its rows) for each view."""
    full = torch.randint(0, V, (B, S + 1), generator=gen)
    full[full % 3 == 0] = -100
    chunks = full.tensor_split(2, dim=1)
    return [
        ("column", full[:, 1], lambda x: x[:, 1]),
        ("tensor_split", chunks[1], lambda x: x[:, chunks[0].shape[1]:]),
        ("shift", full[..., 1:], lambda x: x[:, 1:]),
    ]


def _loss_and_grads(fn, inputs, **kw):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    loss = fn(*leaves, **kw)
    grads = torch.autograd.grad(loss.sum(), leaves)
    return loss.detach(), grads


def _same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _entry_points():
    """name -> fn(logits [B, S+1, V] float64, labels view, slicer, backend) -> (loss, grads)."""

    def dense(z, t, labels, rows, backend):
        kw = dict(labels=labels, hard_weight=0.5, temperature=2.0, reduction="sum", backend=backend)
        return _loss_and_grads(lambda s: fastkd.kd_loss(s, rows(t), **kw), [rows(z)])

    def module(z, t, labels, rows, backend):
        loss_fn = fastkd.KDLoss(hard_weight=0.5, divergence="jsd", backend=backend, reduction="none")
        return _loss_and_grads(lambda s: loss_fn(s, rows(t), labels), [rows(z)])

    def topk(z, t, labels, rows, backend):
        lp, idx = fastkd.teacher_topk(rows(t), 3, temperature=2.0, backend="torch")
        kw = dict(labels=labels, hard_weight=0.5, temperature=2.0, backend=backend)
        return _loss_and_grads(lambda s: fastkd.topk_kd_loss(s, lp, idx, **kw), [rows(z)])

    def topk_module(z, t, labels, rows, backend):
        lp, idx = fastkd.teacher_topk(rows(t), 3, backend="torch")
        loss_fn = fastkd.TopKKDLoss(hard_weight=0.5, tail="renormalize", backend=backend, reduction="none")
        return _loss_and_grads(lambda s: loss_fn(s, lp, idx, labels), [rows(z)])

    def fused_linear(z, t, labels, rows, backend):
        # Hidden states [B, S+1, H] stand in for the logits' rows; the LM heads map them to V.
        gen = torch.Generator().manual_seed(7)
        V, H = z.shape[-1], 6
        h = torch.randn(*z.shape[:-1], H, generator=gen, dtype=torch.float64)
        ht = torch.randn(*z.shape[:-1], H, generator=gen, dtype=torch.float64)
        w = torch.randn(V, H, generator=gen, dtype=torch.float64)
        wt = torch.randn(V, H, generator=gen, dtype=torch.float64)
        kw = dict(labels=labels, hard_weight=0.5, chunk_size=2, backend=backend)
        return _loss_and_grads(lambda hs, ws: fastkd.fused_linear_kd_loss(hs, ws, rows(ht), wt, **kw), [rows(h), w])

    return {"kd_loss": dense, "KDLoss": module, "topk_kd_loss": topk, "TopKKDLoss": topk_module,
            "fused_linear_kd_loss": fused_linear}


ENTRY_POINTS = _entry_points()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_label_views_equal_their_contiguous_copy(entry, backend):
    gen = torch.Generator().manual_seed(0)
    B, S, V = 3, 4, 7
    z = torch.randn(B, S + 1, V, generator=gen, dtype=torch.float64)
    t = torch.randn(B, S + 1, V, generator=gen, dtype=torch.float64)
    fn = ENTRY_POINTS[entry]
    for name, labels, rows in _label_views(B, S, V, gen):
        assert not labels.is_contiguous(), name
        loss, grads = fn(z, t, labels, rows, backend)
        expected_loss, expected_grads = fn(z, t, labels.contiguous(), rows, backend)
        _same(loss, expected_loss)
        for g, e in zip(grads, expected_grads):
            _same(g, e)


@pytest.mark.parametrize("backend", BACKENDS)
def test_label_views_in_the_vocab_parallel_loss(backend, one_rank_group):
    gen = torch.Generator().manual_seed(1)
    B, S, V = 3, 4, 7
    z = torch.randn(B, S + 1, V, generator=gen, dtype=torch.float64)
    t = torch.randn(B, S + 1, V, generator=gen, dtype=torch.float64)
    for name, labels, rows in _label_views(B, S, V, gen):
        kw = dict(labels=labels, hard_weight=0.5, divergence="tvd", backend=backend)
        loss, (grad,) = _loss_and_grads(lambda s: vocab_parallel_kd_loss(s, rows(t), **kw), [rows(z)])
        kw["labels"] = labels.contiguous()
        expected, (expected_grad,) = _loss_and_grads(lambda s: vocab_parallel_kd_loss(s, rows(t), **kw), [rows(z)])
        _same(loss, expected)
        _same(grad, expected_grad)
        oracle = reference.kd_loss(rows(z), rows(t), **kw)
        torch.testing.assert_close(loss, oracle, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- mixed student / teacher dtypes

def _assert_near(actual, expected, floor=0.0):
    """Within a few units of rounding of ``actual``'s dtype (float32 for float32 accumulation) of
    the float64 value, relative to the largest entry: the inputs are the same on both sides.
    ``floor``: the relative error of intermediate results the oracle computes exactly."""
    eps = 1e-5 if actual.dtype == torch.float32 else 1e-12 if actual.dtype == torch.float64 else \
        4 * torch.finfo(actual.dtype).eps
    eps = max(eps, floor)
    scale = expected.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(actual.double(), expected, rtol=eps, atol=eps * float(scale))


def _check_mixed(fn, oracle_fn, student, teacher_args, student_dtype):
    """The result and the student gradient against the float64 oracle on the same (rounded) inputs."""
    loss, (grad,) = _loss_and_grads(lambda s: fn(s, *teacher_args), [student])
    expected, (expected_grad,) = _loss_and_grads(
        lambda s: oracle_fn(s, *[a.double() if a.is_floating_point() else a for a in teacher_args]),
        [student.double()])
    assert grad.dtype == student_dtype
    assert expected_grad.abs().max() > 1e-3, "the test case has no gradient to lose"
    _assert_near(loss, expected)
    _assert_near(grad, expected_grad)


PAIRS = list(itertools.product(FLOATS, FLOATS))


def _pair_id(pair):
    return "-".join(str(d).replace("torch.", "") for d in pair)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("student_dtype,teacher_dtype", PAIRS, ids=[_pair_id(p) for p in PAIRS])
def test_every_kernel_takes_every_dtype_pair(student_dtype, teacher_dtype, backend, one_rank_group):
    gen = torch.Generator().manual_seed(2)
    N, V = 3, 20
    s = (torch.randn(N, V, generator=gen, dtype=torch.float64) * 2).to(student_dtype)
    t = (torch.randn(N, V, generator=gen, dtype=torch.float64) * 2).to(teacher_dtype)
    labels = torch.tensor([3, -100, 19])
    kw = dict(labels=labels, hard_weight=0.3, temperature=2.0, divergence="jsd")
    dense = dict(kw, backend=backend)
    _check_mixed(lambda a, b: fastkd.kd_loss(a, b, **dense), lambda a, b: reference.kd_loss(a, b, **kw),
                 s, [t], student_dtype)
    _check_mixed(lambda a, b: vocab_parallel_kd_loss(a, b, **dense), lambda a, b: reference.kd_loss(a, b, **kw),
                 s, [t], student_dtype)
    lp, idx = fastkd.teacher_topk(t, 4, temperature=2.0, backend="torch")
    lp = lp.to(teacher_dtype)
    _check_mixed(lambda a, b, i: fastkd.topk_kd_loss(a, b, i, **dense),
                 lambda a, b, i: reference.topk_kd_loss(a, b, i, **kw), s, [lp, idx], student_dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hidden_dtype,teacher_dtype", PAIRS, ids=[_pair_id(p) for p in PAIRS])
def test_fused_linear_takes_every_teacher_logits_dtype(hidden_dtype, teacher_dtype, backend):
    gen = torch.Generator().manual_seed(3)
    N, H, V = 4, 5, 11
    h = torch.randn(N, H, generator=gen, dtype=torch.float64).to(hidden_dtype)
    w = torch.randn(V, H, generator=gen, dtype=torch.float64).to(hidden_dtype)
    t = (torch.randn(N, V, generator=gen, dtype=torch.float64) * 2).to(teacher_dtype)
    kw = dict(divergence="skew_kl", temperature=2.0)
    loss, (grad_h, grad_w) = _loss_and_grads(
        lambda a, b: fastkd.fused_linear_kd_loss(a, b, teacher_logits=t, chunk_size=3, backend=backend, **kw),
        [h, w])
    expected, (eh, ew) = _loss_and_grads(
        lambda a, b: reference.kd_loss(a @ b.T, t.double(), **kw), [h.double(), w.double()])
    floor = 1e-5 if hidden_dtype != torch.float64 else 0.0  # the chunk logits are float32
    _assert_near(loss, expected, floor)
    _assert_near(grad_h, eh, floor)
    _assert_near(grad_w, ew, floor)
