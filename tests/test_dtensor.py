"""DTensor inputs (``fastkd.dtensor``): gloo on loopback, 2 and 4 processes, many cases per group.

Each case builds the full tensors on every rank (same seed), distributes them with the placements
under test, and checks that the loss and the gradients equal single-process ``kd_loss`` /
``topk_kd_loss`` / ``fused_linear_kd_loss`` on the full tensors (to rounding) and are as close to
the float64 oracle as they are; and, where anything is sharded, that no process made a tensor as
large as the full ``[N, V]`` logits (the fused linear loss: nor as large as the ``[V, H]`` head),
counted by ``LargestTensor`` over every aten op of the call, forward and backward.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fastkd
from fastkd.dtensor import has_dtensor
from helpers import DIVERGENCES, assert_close_to_oracle, run_rank_cases
from test_distributed import _backward, _init, make_case, options_for, spawn


class LargestTensor(TorchDispatchMode):
    """The most elements of any plain tensor an aten op returned while active (its own thread).
    It sees the backends' own ops because fastkd calls them directly outside torch.compile
    (``fastkd.ops.traced``): the ops inside a custom op's implementation do not reach the mode."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if type(t) is torch.Tensor:
                self.numel = max(self.numel, t.numel())
        return out


def _weights(loss):
    """Per-row upstream gradients for ``reduction="none"`` (as ``_backward`` uses), placed as ``loss``."""
    weights = torch.arange(1.0, loss.numel() + 1).reshape(loss.shape)
    return distribute_tensor(weights, loss.device_mesh, loss.placements)


def _backward_dtensor(loss, reduction):
    (loss * _weights(loss)).sum().backward() if reduction == "none" else (2.0 * loss).backward()


def _strided(d, requires_grad=False):
    """``d`` again, its local tensor a non-contiguous view (every other element of a wider tensor)."""
    local = d.to_local()
    view = torch.stack([local, local], -1)[..., 0]
    assert not view.is_contiguous() or view.numel() <= 1
    out = DTensor.from_local(view, d.device_mesh, d.placements, run_check=False, shape=d.shape, stride=d.stride())
    return out.detach().requires_grad_(requires_grad)


def check_kd(mesh, placements, widths, *, seed, dtype=torch.float32, n_rows=7, teachers=1, dtensor_labels=True,
             topk=None, items=None, views=False, converged=False, batch=None, **kw):
    """kd_loss (or topk_kd_loss with ``topk`` = k) of DTensors against the single-process call;
    ``views``: their local tensors non-contiguous views; ``converged``: every teacher the student
    plus noise of 0.01 (small losses, where cancellation shows); ``batch``: the logits
    ``[batch, n_rows / batch, V]`` (placements of the vocabulary: Shard(-1))."""
    student, teacher, labels, _ = make_case(widths, seed=seed, n_rows=n_rows, dtype=dtype)
    others = [make_case(widths, seed=seed + 100 + i, n_rows=n_rows, dtype=torch.bfloat16)[1] for i in range(teachers - 1)]
    if converged:
        gen = torch.Generator().manual_seed(seed)
        teacher, *others = [(student.double() + 0.01 * torch.randn(student.shape, generator=gen, dtype=torch.float64))
                            .to(t.dtype) for t in (teacher, *others)]
    V, reduction = sum(widths), kw.get("reduction", "batchmean")
    if batch is not None:
        student, teacher, labels, *others = (x.unflatten(0, (batch, -1)) for x in (student, teacher, labels, *others))
    labels = labels if kw.get("hard_weight") or seed % 2 else None
    if topk is not None:  # the oracle's top-k formula backpropagates NaN through -inf logits: none here
        student, teacher = student.clamp(min=-8), teacher.clamp(min=-8)
    if items is not None:
        kw["num_items_in_batch"] = items
    if topk is None:
        teacher_args = [teacher, *others] if teachers > 1 else teacher
    else:
        logprobs, indices = fastkd.teacher_topk(teacher, topk, temperature=kw.get("temperature", 1.0))
        teacher_args = (logprobs, indices)
    call = ((lambda s, t, **a: fastkd.kd_loss(s, t, **a)) if topk is None else
            (lambda s, t, **a: fastkd.topk_kd_loss(s, *t, **a)))

    full = student.clone().requires_grad_()
    with LargestTensor() as single_count:
        single = call(full, teacher_args, labels=labels, **kw)
        single_grad = _backward(single, full, reduction)

    row_placements = [Replicate() if p in (Shard(1), Shard(-1)) else p for p in placements]
    d_student = distribute_tensor(student, mesh, placements).requires_grad_()
    t_placements = placements if topk is None else row_placements
    d_teacher = [distribute_tensor(t, mesh, t_placements) for t in
                 ([teacher_args] if torch.is_tensor(teacher_args) else teacher_args)]
    d_labels = None if labels is None else distribute_tensor(labels, mesh, row_placements)
    if views:
        d_student, d_teacher = _strided(d_student, True), [_strided(t) for t in d_teacher]
        d_labels = None if d_labels is None else _strided(d_labels)
    if d_labels is not None and not dtensor_labels:
        local = d_labels.to_local()
        d_labels = torch.stack([local, local], -1)[..., 0]  # a plain, non-contiguous local view
    with LargestTensor() as count:
        loss = call(d_student, (d_teacher if teachers > 1 else d_teacher[0]) if topk is None else tuple(d_teacher),
                    labels=d_labels, **kw)
        _backward_dtensor(loss, reduction)
    assert has_dtensor(loss) and has_dtensor(d_student.grad)
    assert tuple(d_student.grad.placements) == tuple(d_student.placements)
    if reduction != "none":
        assert all(p.is_replicate() for p in loss.placements), loss.placements
    loss, grad = loss.full_tensor(), d_student.grad.full_tensor()

    exact = student.double().requires_grad_()
    oracle_teachers = [t.double() for t in ([teacher, *others])]
    if topk is None:
        oracle = fastkd.reference.kd_loss(exact, oracle_teachers if teachers > 1 else oracle_teachers[0],
                                          labels=labels, **kw)
    else:
        oracle = fastkd.reference.topk_kd_loss(exact, logprobs.double(), indices, labels=labels, **kw)
    oracle_grad = _backward(oracle, exact, reduction)

    torch.testing.assert_close(loss, single.detach(), rtol=1e-5, atol=1e-6)
    scale = single_grad.abs().max().item() if single_grad.numel() else 1.0
    rtol = 2.0**-7 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(grad.float(), single_grad.float(), rtol=rtol, atol=1e-5 * scale)
    assert_close_to_oracle(loss, oracle.detach(), single.detach(), dtype=dtype, grows_with=V)
    assert_close_to_oracle(grad / scale, oracle_grad / scale, single_grad / scale, dtype=dtype, grows_with=V)
    if any(not p.is_replicate() for p in placements) and n_rows > 1:
        assert single_count.numel >= n_rows * V, "the counter missed the single-process [N, V] gradient"
        assert count.numel < n_rows * V, f"a process made a tensor of {count.numel} elements (N V = {n_rows * V})"


def _each(f, x):
    """``f(x)``, or ``[f(y) for y in x]`` for a list (the arguments of several teachers)."""
    return [f(y) for y in x] if isinstance(x, list) else f(x)


def check_fused_tp(mesh, hidden_placements, weight_placements, widths, *, seed, n_rows=8, H=6, bias=True,
                   teacher_dtensor=True, teacher_logits=False, dtype=torch.float32, teachers=1, **kw):
    """fused_linear_kd_loss of a head sharded by vocabulary rows (tensor parallel) against the
    single-process call on the whole head (student hidden states, head and bias in ``dtype``);
    ``teachers`` > 1: lists of teacher arguments, of hidden sizes H + 1, H + 2, ..."""
    V, reduction = sum(widths), kw.get("reduction", "batchmean")
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_rows, H, generator=gen)
    weight, t_weight = torch.randn(V, H, generator=gen), torch.randn(V, H + 1, generator=gen)
    b, t_bias = torch.randn(V, generator=gen), torch.randn(V, generator=gen)
    t_hidden = torch.randn(n_rows, H + 1, generator=gen)
    labels = torch.randint(0, V, (n_rows,), generator=gen)
    labels[1] = -100
    t_hidden, t_weight, t_bias = [t_hidden], [t_weight], [t_bias]
    for i in range(1, teachers):  # teacher i: hidden size H + 1 + i
        t_hidden.append(torch.randn(n_rows, H + 1 + i, generator=gen))
        t_weight.append(torch.randn(V, H + 1 + i, generator=gen))
        t_bias.append(torch.randn(V, generator=gen))
    t_logits = [h @ w.T + tb for h, w, tb in zip(t_hidden, t_weight, t_bias)]
    if teachers == 1:
        t_hidden, t_weight, t_bias, t_logits = t_hidden[0], t_weight[0], t_bias[0], t_logits[0]
    hidden, weight, b = (x.to(dtype) for x in (hidden, weight, b))
    teacher = dict(teacher_logits=t_logits) if teacher_logits else dict(teacher_hidden=t_hidden, teacher_weight=t_weight,
                                                                       teacher_bias=t_bias)
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, b)]
    single = fastkd.fused_linear_kd_loss(leaves[0], leaves[1], student_bias=leaves[2] if bias else None,
                                         labels=labels, chunk_size=3, **teacher, **kw)
    _backward(single, leaves[0], reduction)
    # The float64 yardstick: the same call in float64 (the fused loss is checked against the oracle elsewhere).
    exact = [x.double().requires_grad_() for x in (hidden, weight, b)]
    exact_teacher = {name: _each(torch.Tensor.double, x) for name, x in teacher.items()}
    oracle = fastkd.fused_linear_kd_loss(exact[0], exact[1], student_bias=exact[2] if bias else None, labels=labels,
                                         chunk_size=3, **exact_teacher, **kw)
    _backward(oracle, exact[0], reduction)

    d_hidden = distribute_tensor(hidden, mesh, hidden_placements).requires_grad_()
    d_weight = distribute_tensor(weight, mesh, weight_placements).requires_grad_()
    d_bias = distribute_tensor(b, mesh, weight_placements).requires_grad_()
    d_labels = distribute_tensor(labels, mesh, hidden_placements)
    if teacher_logits:
        logit_placements = [Shard(1) if p == Shard(0) else r for p, r in zip(weight_placements, hidden_placements)]
        d_teacher = dict(teacher_logits=_each(lambda z: distribute_tensor(z, mesh, logit_placements), t_logits))
    elif teacher_dtensor:
        d_teacher = dict(teacher_hidden=_each(lambda x: distribute_tensor(x, mesh, hidden_placements), t_hidden),
                         teacher_weight=_each(lambda x: distribute_tensor(x, mesh, weight_placements), t_weight),
                         teacher_bias=_each(lambda x: distribute_tensor(x, mesh, weight_placements), t_bias))
    else:
        d_teacher = dict(teacher_hidden=_each(lambda x: distribute_tensor(x, mesh, hidden_placements), t_hidden),
                         teacher_weight=_each(lambda x: x[:, None, :][:, 0], t_weight),  # plain, strided
                         teacher_bias=t_bias)
    with LargestTensor() as count:
        loss = fastkd.fused_linear_kd_loss(d_hidden, d_weight, student_bias=d_bias if bias else None,
                                           labels=d_labels, chunk_size=3, **d_teacher, **kw)
        _backward_dtensor(loss, reduction)
    if kw.get("backend") != "triton":  # Triton's interpreter copies its arguments' storages; a launch does not
        assert count.numel < min(n_rows * V, V * H), f"a process made a tensor of {count.numel} elements"
    torch.testing.assert_close(loss.full_tensor(), single.detach(), rtol=1e-5, atol=1e-6)
    assert_close_to_oracle(loss.full_tensor(), oracle.detach(), single.detach(), dtype=dtype, grows_with=V)
    for d, leaf, truth in zip((d_hidden, d_weight, d_bias), leaves, exact):
        if d is d_bias and not bias:
            continue
        assert tuple(d.grad.placements) == tuple(d.placements)
        scale = leaf.grad.abs().max().item()
        grad = d.grad.full_tensor()
        if dtype == torch.float32:
            torch.testing.assert_close(grad, leaf.grad, rtol=1e-5, atol=1e-5 * scale)
        assert_close_to_oracle(grad / scale, truth.grad / scale, leaf.grad / scale, dtype=dtype, grows_with=V)


def check_fsdp_head(mesh, *, seed, rank, world_size, n_rows=6, H=5, V=11, chunk_size=3, **kw):
    """An FSDP2-sharded head (fully_shard), each rank with its own rows: the loss is this rank's
    single-process loss and the head's gradient (Shard(0), as FSDP2 keeps it) the mean over the
    ranks of theirs. ``chunk_size`` below ``n_rows``: a chunk of the default size (at least 256
    rows) holds all of a few rows, its ``[chunk, V]`` logits the whole ``[N, V]`` the count looks for."""
    assert chunk_size < n_rows
    kw["chunk_size"] = chunk_size
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=gen))
    weight, t_weight = head.weight.detach().clone(), torch.randn(V, H, generator=gen)
    data = [(torch.randn(n_rows, H, generator=gen), torch.randn(n_rows, H, generator=gen),
             torch.randint(0, V, (n_rows,), generator=gen)) for _ in range(world_size)]
    fully_shard(head, mesh=mesh)
    d_teacher = fully_shard(torch.nn.Linear(H, V, bias=False), mesh=mesh)
    with torch.no_grad():
        d_teacher.weight.copy_(distribute_tensor(t_weight, mesh, d_teacher.weight.placements))

    expected = torch.zeros_like(weight)
    for r, (h, th, labels) in enumerate(data):
        w = weight.clone().requires_grad_()
        x = h.clone().requires_grad_()
        single = fastkd.fused_linear_kd_loss(x, w, th, t_weight, labels=labels, **kw)
        single.backward()
        expected += w.grad / world_size
        if r == rank:
            single_loss, single_hidden_grad = single.detach(), x.grad
    h, th, labels = data[rank]
    x = h.clone().requires_grad_()
    with LargestTensor() as count:
        loss = fastkd.fused_linear_kd_loss(x, head.weight, th, d_teacher.weight.detach(), labels=labels, **kw)
        loss.backward()
    assert count.numel < n_rows * V, f"a process made a tensor of {count.numel} elements (N V = {n_rows * V})"
    assert not has_dtensor(loss) and has_dtensor(head.weight.grad)
    assert tuple(head.weight.grad.placements) == tuple(head.weight.placements)
    torch.testing.assert_close(loss, single_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x.grad, single_hidden_grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(head.weight.grad.full_tensor(), expected, rtol=1e-5, atol=1e-6)


def _run(rank, cases):
    # The torch backend's small-input path stacks up to three tiny [rows, V] inputs into one
    # log-softmax (at most 3 STACK_ELEMENTS elements); at these shapes that would pass for a
    # gathered [N, V], so it is off here and the largest-tensor checks keep their meaning.
    fastkd.backends.torch.STACK_ELEMENTS = 0
    run_rank_cases(rank, cases)


def _two_ranks(rank, world_size, port):
    _init(rank, world_size, port)
    mesh = init_device_mesh("cpu", (world_size,))
    cases = []
    for i, divergence in enumerate(DIVERGENCES):
        # Several teachers everywhere (a single one: the dp-tp cases of _four_ranks); by the vocabulary,
        # 2 or 3 teachers, equal weights or given ones (one of them 0).
        teachers = 2 + i % 2
        weights = (None, [0.7, 0.3, 1.0][:teachers], [1.0, 0.0, 2.0][:teachers])[i % 3]
        for j, (name, placement) in enumerate((("vocab", Shard(-1)), ("rows", Shard(0)), ("replicate", Replicate()))):
            kw = options_for(i + j, divergence)
            if j == 0:
                kw = dict(kw, teachers=teachers, teacher_weights=weights)
            cases.append((f"{name}-{divergence}-{kw['reduction']}", check_kd,
                          dict(mesh=mesh, placements=[placement], widths=(7, 6), seed=10 + i, dtensor_labels=j != 1,
                               **{"teachers": 2, **kw})))
    cases += [
        ("vocab-bf16-converged-mixture", check_kd, dict(mesh=mesh, placements=[Shard(1)], widths=(8, 8), seed=37,
                                                        dtype=torch.bfloat16, teachers=2, converged=True,
                                                        divergence="kl", temperature=2.0)),
        ("vocab-bf16", check_kd, dict(mesh=mesh, placements=[Shard(1)], widths=(8, 8), seed=20, dtype=torch.bfloat16,
                                      divergence="jsd", hard_weight=0.5)),
        ("rows-bf16-items", check_kd, dict(mesh=mesh, placements=[Shard(0)], widths=(8, 8), seed=21,
                                           dtype=torch.bfloat16, hard_weight=0.5, items=torch.tensor(9.0))),
        ("vocab-items", check_kd, dict(mesh=mesh, placements=[Shard(1)], widths=(7, 6), seed=22, hard_weight=0.5,
                                       items=11, reduction="mean", teachers=2, teacher_temperature=1.5)),
        ("rows-no-rows", check_kd, dict(mesh=mesh, placements=[Shard(0)], widths=(7, 6), seed=23, n_rows=0)),
        ("vocab-no-rows", check_kd, dict(mesh=mesh, placements=[Shard(1)], widths=(7, 6), seed=26, n_rows=0,
                                         divergence="jsd", hard_weight=0.5, teachers=2)),
        ("vocab-3d-mixture", check_kd, dict(mesh=mesh, placements=[Shard(-1)], widths=(7, 6), seed=38, n_rows=8,
                                             batch=2, teachers=2, divergence="tvd", hard_weight=0.5,
                                             reduction="none", views=True)),
        ("vocab-views", check_kd, dict(mesh=mesh, placements=[Shard(1)], widths=(7, 6), seed=27, views=True,
                                       divergence="skew_reverse_kl", hard_weight=0.5, temperature=0.7, teachers=2)),
        ("rows-views-bf16", check_kd, dict(mesh=mesh, placements=[Shard(0)], widths=(7, 6), seed=28, views=True,
                                           dtype=torch.bfloat16, teachers=2, divergence="kl", hard_weight=0.5)),
        ("rows-topk", check_kd, dict(mesh=mesh, placements=[Shard(0)], widths=(7, 6), seed=24, topk=3,
                                     hard_weight=0.5, temperature=2.0)),
        ("replicate-topk-none", check_kd, dict(mesh=mesh, placements=[Replicate()], widths=(7, 6), seed=25, topk=3,
                                               divergence="reverse_kl", reduction="none")),
    ]
    for i, divergence in enumerate(("kl", "jsd", "tvd")):
        kw = dict(divergence=divergence, temperature=2.0, hard_weight=0.5, reduction=("batchmean", "none", "sum")[i])
        cases.append((f"fused-tp-{divergence}", check_fused_tp,
                      dict(mesh=mesh, hidden_placements=[Replicate()], weight_placements=[Shard(0)], widths=(5, 5),
                           seed=30 + i, teacher_dtensor=i != 1, teacher_logits=i == 2, bias=i != 2, **kw)))
    cases.append(("fused-tp-uneven-softcap-mixture", check_fused_tp,
                  dict(mesh=mesh, hidden_placements=[Replicate()], weight_placements=[Shard(0)], widths=(6, 5),
                       seed=33, divergence="reverse_kl", student_softcap=5.0, teacher_logit_scale=0.5,
                       num_items_in_batch=5, backend="triton", teachers=2, teacher_weights=[1.0, 2.0])))
    cases.append(("fused-tp-bf16", check_fused_tp,
                  dict(mesh=mesh, hidden_placements=[Replicate()], weight_placements=[Shard(0)], widths=(16, 16),
                       seed=34, H=16, n_rows=12, dtype=torch.bfloat16, divergence="kl", hard_weight=0.5,
                       temperature=2.0)))
    cases.append(("fused-tp-mixture-none", check_fused_tp,
                  dict(mesh=mesh, hidden_placements=[Replicate()], weight_placements=[Shard(0)], widths=(7, 5),
                       seed=35, teachers=2, teacher_dtensor=False, divergence="skew_kl", reduction="none",
                       teacher_weights=[0.25, 0.75])))
    cases.append(("fused-tp-mixture-logits", check_fused_tp,
                  dict(mesh=mesh, hidden_placements=[Replicate()], weight_placements=[Shard(0)], widths=(5, 5),
                       seed=36, teachers=3, teacher_logits=True, divergence="kl", hard_weight=0.5, temperature=2.0,
                       teacher_temperature=1.5, num_items_in_batch=5)))
    cases.append(("fsdp-head", check_fsdp_head, dict(mesh=mesh, seed=40, rank=rank, world_size=world_size,
                                                     divergence="skew_kl", hard_weight=0.5, temperature=2.0)))
    _run(rank, cases)
    _errors(mesh)
    _check_finite(mesh)
    dist.destroy_process_group()


def _errors(mesh):
    """Placements that cannot be served raise, naming them."""
    student, teacher, labels, _ = make_case((4, 4), seed=50, n_rows=4)
    vocab = distribute_tensor(student, mesh, [Shard(1)])
    with pytest.raises(ValueError, match="placements"):
        fastkd.kd_loss(vocab, distribute_tensor(teacher, mesh, [Shard(0)]))
    with pytest.raises(TypeError, match="student_logits must be a DTensor"):
        fastkd.kd_loss(student, distribute_tensor(teacher, mesh, [Shard(1)]))
    partial = DTensor.from_local(student, mesh, [Partial()])
    with pytest.raises(ValueError, match="P\\(sum\\)"):
        fastkd.kd_loss(partial, DTensor.from_local(teacher, mesh, [Partial()]))
    with pytest.raises(ValueError, match="cannot serve student_logits placements"):
        fastkd.topk_kd_loss(vocab, *fastkd.teacher_topk(teacher, 2))
    with pytest.raises(ValueError, match="teacher_weights has 3 weights for 2 teachers"):
        fastkd.kd_loss(vocab, [distribute_tensor(teacher, mesh, [Shard(1)])] * 2, teacher_weights=[1, 1, 1])
    with pytest.raises(ValueError, match=r"teacher_logits\[1\] shape \(4, 3\)"):
        fastkd.kd_loss(vocab, [distribute_tensor(teacher, mesh, [Shard(1)]), torch.zeros(4, 3)])
    with pytest.raises(ValueError, match="labels has placements"):
        fastkd.kd_loss(vocab, distribute_tensor(teacher, mesh, [Shard(1)]),
                       labels=distribute_tensor(labels, mesh, [Shard(0)]),
                       hard_weight=0.5)
    hidden = distribute_tensor(torch.randn(4, 3), mesh, [Replicate()])
    head = distribute_tensor(torch.randn(8, 3), mesh, [Shard(0)])
    with pytest.raises(ValueError, match="teacher_weights has 1 weights for 2 teachers"):
        fastkd.fused_linear_kd_loss(hidden, head, teacher_logits=[teacher, teacher], teacher_weights=[1.0])
    with pytest.raises(ValueError, match="return_entropy is not available"):
        fastkd.fused_linear_kd_loss(hidden, head, teacher_logits=teacher, return_entropy=True)
    with pytest.raises(ValueError, match="teacher_weight has placements"):
        fastkd.fused_linear_kd_loss(hidden, head, hidden, distribute_tensor(torch.randn(8, 3), mesh, [Replicate()]))
    with pytest.raises(ValueError, match="student_weight placements"):
        fastkd.fused_linear_kd_loss(distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)]),
                                    distribute_tensor(torch.randn(8, 3), mesh, [Shard(0)]),
                                    teacher_logits=teacher)


def _check_finite(mesh):
    """``check_finite=True`` with the vocabulary sharded: the error ``kd_loss`` gives on the whole
    logits, on every rank (the rows are judged over all V), and none for a row entirely -inf in one
    shard only or a label outside one shard but inside [0, V)."""
    student, teacher, labels, _ = make_case((4, 4), seed=51, n_rows=4)
    other = teacher.flip(-1)

    def call(s=student, t=other, y=labels):
        d = [distribute_tensor(x, mesh, [Shard(1)]) for x in (s, teacher, t)]
        return fastkd.kd_loss(d[0], d[1:], labels=distribute_tensor(y, mesh, [Replicate()]), hard_weight=0.5,
                               check_finite=True)

    one_shard = other.clone()
    one_shard[3, :4] = float("-inf")  # rank 0's part of row 3
    label_in_range = labels.clone()
    label_in_range[0] = 5  # outside rank 0's columns, inside [0, 8)
    for args in (dict(t=one_shard), dict(y=label_in_range)):
        torch.testing.assert_close(call(**args).full_tensor(), fastkd.kd_loss(
            student, [teacher, args.get("t", other)], labels=args.get("y", labels), hard_weight=0.5))
    all_masked = other.clone()
    all_masked[3] = float("-inf")
    nan = student.clone()
    nan[2, 6] = float("nan")  # in rank 1's shard only
    ignored = nan.clone()
    ignored[1, 0] = float("nan")  # row 1 is ignored: never checked
    outside = labels.clone()
    outside[3] = 8
    for args, message in ((dict(t=all_masked), r"teacher_logits\[1\] row 3 is entirely -inf"),
                          (dict(s=nan), "student_logits row 2 contains NaN"),
                          (dict(s=ignored), "student_logits row 2 contains NaN"),
                          (dict(y=outside), r"labels row 3 is 8, outside \[0, 8\)")):
        with pytest.raises(ValueError, match=message):
            call(**args)


def _four_ranks(rank, world_size, port):
    """A 2 x 2 mesh (rows over "dp", vocabulary over "tp"), and a 1-D mesh of 4 with uneven shards."""
    _init(rank, world_size, port)
    mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    mesh1 = init_device_mesh("cpu", (4,))
    cases = []
    for i, divergence in enumerate(DIVERGENCES):
        kw = options_for(i, divergence)
        cases.append((f"dp-tp-{divergence}-{kw['reduction']}", check_kd,
                      dict(mesh=mesh2, placements=[Shard(0), Shard(1)], widths=(7, 6), seed=60 + i, n_rows=9, **kw)))
    cases += [
        ("tp4-uneven", check_kd, dict(mesh=mesh1, placements=[Shard(1)], widths=(4, 4, 4, 3), seed=70,
                                      divergence="kl", hard_weight=0.5, temperature=2.0)),
        ("tp4-uneven-mixture", check_kd, dict(mesh=mesh1, placements=[Shard(1)], widths=(4, 4, 4, 3), seed=75,
                                              teachers=2, divergence="reverse_kl", teacher_weights=[3.0, 1.0])),
        ("dp-tp-mixture", check_kd, dict(mesh=mesh2, placements=[Shard(0), Shard(1)], widths=(7, 6), seed=76,
                                         n_rows=9, teachers=3, divergence="jsd", hard_weight=0.5, reduction="mean")),
        ("sequence-dim", check_kd, dict(mesh=mesh2, placements=[Replicate(), Shard(0)], widths=(7, 6), seed=71,
                                        divergence="tvd", hard_weight=1.0)),
        ("dp-tp-fused", check_fused_tp, dict(mesh=mesh2, hidden_placements=[Shard(0), Replicate()],
                                             weight_placements=[Replicate(), Shard(0)], widths=(5, 5), seed=72,
                                             divergence="jsd", hard_weight=0.5)),
        ("dp-tp-fused-mixture", check_fused_tp, dict(mesh=mesh2, hidden_placements=[Shard(0), Replicate()],
                                                     weight_placements=[Replicate(), Shard(0)], widths=(5, 5),
                                                     seed=77, teachers=2, divergence="tvd", hard_weight=0.5)),
        ("fused-tp4", check_fused_tp, dict(mesh=mesh1, hidden_placements=[Replicate()], weight_placements=[Shard(0)],
                                           widths=(4, 4, 4, 4), seed=73, divergence="kl", reduction="none")),
        ("fsdp4-head", check_fsdp_head, dict(mesh=mesh1, seed=74, rank=rank, world_size=world_size,
                                             divergence="kl", hard_weight=0.5)),
    ]
    _run(rank, cases)
    dist.destroy_process_group()


def test_two_ranks():
    spawn(_two_ranks, 2)


def test_four_ranks():
    spawn(_four_ranks, 4)


def test_the_dispatch_check_imports_nothing(monkeypatch):
    """``has_dtensor`` on plain tensors (the check every call makes) imports no DTensor code."""
    monkeypatch.delitem(sys.modules, "torch.distributed.tensor", raising=False)
    assert not has_dtensor(torch.ones(1), [torch.ones(1)], None)
    assert "torch.distributed.tensor" not in sys.modules


def test_example_under_torchrun(tmp_path):
    """examples/distill_dtensor.py as users run it (``torchrun --nproc-per-node 2``), tensor-parallel
    heads and a mixture of 2 teachers: it runs, checks its loss against gathered logits, and
    all-reduces exactly the bytes docs/distributed.md counts: 2 k N (the mixture, k = 2 teachers)
    + (2 N + 2) + (5 N + 1) float32 per step for kl with the hard CE, in 4 all-reduces."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "tp.json"
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    os.path.join(root, "examples", "distill_dtensor.py"), "--mode", "tp", "--teachers", "2",
                    "--steps", "2", "--json", str(out)], check=True, env=env, capture_output=True, timeout=120)
    result = json.loads(out.read_text())
    N = result["tokens"]
    for step in result["history"]:
        assert step["forward_all_reduce_bytes"] == 4 * (2 * 2 * N + (2 * N + 2) + (5 * N + 1))
        assert step["forward_all_reduces"] == 4 and step["backward_all_reduce_bytes"] == 0
        assert 0 < step["loss"] < 20
