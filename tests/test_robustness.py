"""Determinism, memory safety and 64-bit offsets.

- the same inputs give bitwise-identical losses and gradients, call after call;
- launcher outputs come from ``fastkd.buffers.empty``, which NaN-poisons them when asked, so a read
  of memory no kernel wrote shows up (test_fuzz.py runs every case poisoned);
- no memory grows across many calls, and ``inplace=True`` keeps no reference to the logits it
  overwrote once backward is done;
- no public op modifies its inputs (or the upstream gradient) unless ``inplace=True``;
- row offsets past 2**31 elements are right on the Triton path.
"""
import gc
import weakref

import pytest
import torch

import fastkd
from fastkd import buffers, reference
from fastkd.backends import torch as torch_backend
from fastkd.backends import triton as launch
from fastkd.options import make_options
from helpers import DIVERGENCES

BACKENDS = ("triton", "torch")


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setattr(buffers, "POISON_ALLOCATIONS", True)


# Determinism

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", DIVERGENCES)
def test_repeated_calls_are_bitwise_identical(backend, name):
    s, t = torch.randn(2, 3, 37), torch.randn(2, 3, 37)
    labels = torch.tensor([[1, -100, 5], [36, 0, 2]])
    kw = dict(divergence=name, temperature=1.7, labels=labels, hard_weight=0.4, beta=0.3, skew=0.2, backend=backend)
    results = []
    for _ in range(3):
        x = s.clone().requires_grad_(True)
        loss = fastkd.kd_loss(x, t, **kw)
        loss.backward()
        row = fastkd.kd_loss(s, t, reduction="none", **kw)
        results.append((loss.detach(), x.grad, row))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("log", [False, True])
def test_softmax_is_bitwise_deterministic(backend, log):
    x, dy = torch.randn(4, 45), torch.randn(4, 45)
    fn = fastkd.log_softmax if log else fastkd.softmax
    runs = []
    for _ in range(3):
        xi = x.clone().requires_grad_(True)
        y = fn(xi, temperature=0.8, backend=backend)
        y.backward(dy)
        runs.append((y.detach(), xi.grad))
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run))


# Poisoned allocations

def test_poisoning_switch_fills_nan(poisoned):
    assert torch.isnan(buffers.empty((3, 4), dtype=torch.bfloat16, device="cpu")).all()
    assert (buffers.empty(5, dtype=torch.int64, device="cpu") == torch.iinfo(torch.int64).min).all()
    s = torch.randn(2, 8)
    assert torch.isnan(buffers.gradient_buffer(s, False, True)).all()
    assert buffers.gradient_buffer(s, True, True) is s and buffers.gradient_buffer(s, False, False) is None


@pytest.mark.parametrize("impl", [launch, torch_backend], ids=["triton", "torch"])
def test_every_launcher_output_comes_from_the_poisonable_helper(monkeypatch, impl):
    made = []
    real_empty = buffers.empty

    def recording_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        made.append(out.data_ptr())
        return out

    monkeypatch.setattr(buffers, "empty", recording_empty)
    monkeypatch.setattr(impl, "empty", recording_empty, raising=False)
    s, t = torch.randn(3, 20), torch.randn(3, 20)
    # Buffers that are filled piecewise (by kernels, or chunk by chunk); a plain torch op's result,
    # such as the torch backend's scale_rows or the row losses of its small calls, is written whole
    # by torch (so the torch backend runs its chunk loop here).
    monkeypatch.setattr(torch_backend, "SMALL_ELEMENTS", 0)
    outputs = list(impl.kd_forward(s, t, torch.tensor([1, -100, 3]), torch.ones(1), make_options(hard_weight=0.5)))
    if impl is launch:
        outputs.append(launch.scale_rows(outputs[1], torch.full((3,), 0.5)))
        y = launch.softmax_forward(s, 1.3, log=False)
        outputs += [y, launch.softmax_backward(y, t, 1.3, log=False)]
    for out in outputs:
        assert out.data_ptr() in made, "an output was allocated outside fastkd.buffers.empty"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "batchmean"])
def test_poisoned_buffers_never_reach_results(poisoned, backend, reduction):
    """Odd shapes where a kernel might skip a write: V = 1, V = block + 1, ignored rows, strided
    rows, no gradient, N = 0, inplace, softmax; every result is finite and matches the reference."""
    for N, V in [(3, 1), (2, 17), (4, 33), (0, 5)]:
        wide = torch.randn(N, V + 3)
        s, t = wide[:, :V], torch.randn(N, V)
        labels = torch.where(torch.arange(N) % 2 == 1, -100, torch.arange(N) % V)  # every other row ignored
        kw = dict(labels=labels, hard_weight=0.5, reduction=reduction, temperature=1.5)
        for inplace in (False, True):
            x = s.clone().requires_grad_(True)
            loss = fastkd.kd_loss(x * 1, t, backend=backend, inplace=inplace, **kw)
            loss.backward(torch.ones_like(loss))
            x64 = s.double().requires_grad_(True)
            expected = reference.kd_loss(x64, t.double(), **kw)
            expected.backward(torch.ones_like(expected))
            torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)
        no_grad = fastkd.kd_loss(s, t, backend=backend, **kw)
        assert torch.isfinite(no_grad).all()
        y = fastkd.softmax(s.clone().requires_grad_(True), backend=backend)
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_poisoned_buffers_never_reach_fused_linear_or_topk_results(poisoned, backend):
    """The same for the fused linear loss (chunks that do not divide N, ignored rows, the teacher as
    hidden + weight and as logits) and the top-k ops (k = V, k = 1, the three tails)."""
    hidden, weight, bias = torch.randn(7, 8).requires_grad_(True), torch.randn(21, 8), torch.randn(21)
    t_hidden, t_weight = torch.randn(7, 6), torch.randn(21, 6)
    labels = torch.tensor([0, -100, 20, 5, -100, 6, 7])
    for teacher in (dict(teacher_hidden=t_hidden, teacher_weight=t_weight),
                    dict(teacher_logits=t_hidden @ t_weight.T)):
        for reduction in ("none", "batchmean"):
            kw = dict(labels=labels, hard_weight=0.5, reduction=reduction, temperature=1.5)
            w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
            loss = fastkd.fused_linear_kd_loss(hidden, w, student_bias=b, backend=backend, chunk_size=3,
                                               **teacher, **kw)
            grads = torch.autograd.grad(loss.sum(), (hidden, w, b))
            logits = (hidden.double() @ w.double().T + b.double()).detach().requires_grad_(True)
            t_logits = (t_hidden @ t_weight.T).double()
            expected = reference.kd_loss(logits, t_logits, **kw)
            (g_logits,) = torch.autograd.grad(expected.sum(), logits)
            torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-5)
            for got, want in zip(grads, (g_logits @ w.double(), g_logits.T @ hidden.double(), g_logits.sum(0))):
                torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    s, t = torch.randn(3, 23), torch.randn(3, 23)
    for k in (1, 5, 23):
        logprobs, indices = fastkd.teacher_topk(t, k, temperature=2.0, backend=backend)
        assert torch.isfinite(logprobs).all() and ((indices >= 0) & (indices < 23)).all()
        for tail in ("bucket", "renormalize", "ignore"):
            x = s.clone().requires_grad_(True)
            loss = fastkd.topk_kd_loss(x, logprobs, indices, tail=tail, temperature=2.0, labels=labels[:3],
                                       hard_weight=0.5, reduction="none", backend=backend)
            loss.sum().backward()
            assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all(), (k, tail)
            assert (loss[1] == 0) and (x.grad[1] == 0).all(), "an ignored row"


# Memory

def _live_tensors():
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def _rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.parametrize("backend,calls", [("torch", 1000), ("triton", 16)])
def test_no_leak_across_many_calls(backend, calls):
    """Forward + backward ``calls`` times (in place every other call; a softmax every tenth): the
    number of live tensors is unchanged and the resident memory flat."""
    s, t = torch.randn(4, 33), torch.randn(4, 33)
    labels = torch.tensor([1, -100, 7, 32])

    def step(i):
        x = (s * 1).requires_grad_(True)
        loss = fastkd.kd_loss(x, t, labels=labels, hard_weight=0.3, inplace=bool(i % 2), backend=backend)
        loss.backward()
        if i % 10 == 0 or backend == "triton":
            y = fastkd.softmax(s.clone().requires_grad_(True), temperature=2.0, backend=backend)
            y.sum().backward()

    for i in range(4):  # warm caches (kernel specialisations, allocator pools)
        step(i)
    tensors, rss = _live_tensors(), _rss_mib()
    for i in range(calls):
        step(i)
    assert _live_tensors() == tensors
    assert _rss_mib() - rss < 16, f"RSS grew by {_rss_mib() - rss:.1f} MiB over {calls} calls"


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_keeps_no_reference_to_the_overwritten_logits(backend):
    hidden = torch.randn(4, 8, requires_grad=True)
    head, teacher = torch.randn(8, 29), torch.randn(4, 29)
    (expected,) = torch.autograd.grad(fastkd.kd_loss(hidden @ head, teacher, backend=backend), hidden)
    logits = hidden @ head  # a model output: the buffer inplace=True overwrites
    original, ptr = logits.detach().clone(), logits.untyped_storage().data_ptr()
    loss = fastkd.kd_loss(logits, teacher, inplace=True, backend=backend)
    assert not torch.equal(logits, original)  # it did overwrite them
    loss.backward()
    torch.testing.assert_close(hidden.grad, expected)
    ref = weakref.ref(logits)
    del logits, loss
    gc.collect()
    assert ref() is None
    assert not any(_storage_ptr(o) == ptr for o in gc.get_objects()), \
        "a tensor still holds the overwritten logits' storage"


def _storage_ptr(obj):
    """The data pointer of a real tensor's storage; None for anything else (fake tensors that
    other tests' torch.compile runs leave behind have none)."""
    if not issubclass(type(obj), torch.Tensor) or type(obj).__name__ == "FakeTensor":
        return None
    try:
        return obj.untyped_storage().data_ptr()
    except RuntimeError:
        return None


@pytest.mark.gpu
def test_inplace_frees_the_logits_on_gpu():
    hidden = torch.randn(256, 64, device="cuda", requires_grad=True)
    head = torch.randn(64, 4096, device="cuda")
    teacher = torch.randn(256, 4096, device="cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    logits = hidden @ head
    fastkd.kd_loss(logits, teacher, inplace=True).backward()
    del logits
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before <= hidden.numel() * 4  # at most hidden.grad


# Inputs are never modified unless inplace=True (every public op, forward and backward)

def _snapshot(*tensors):
    return [x.detach().clone() for x in tensors]


def _assert_unchanged(before, tensors):
    for i, (a, b) in enumerate(zip(before, tensors)):
        assert torch.equal(a, b.detach()), f"input {i} was modified"


def _kd_inputs():
    s, t = torch.randn(2, 3, 21), torch.randn(2, 3, 21)
    return s.requires_grad_(True), t, torch.tensor([[0, -100, 20], [5, 6, 7]])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["none", "batchmean"])
def test_kd_loss_leaves_inputs_alone(backend, name, reduction):
    s, t, labels = _kd_inputs()
    for fn in (lambda: fastkd.kd_loss(s, t, labels=labels, hard_weight=0.5, divergence=name, reduction=reduction,
                                      backend=backend, check_finite=True),
               lambda: fastkd.KDLoss(hard_weight=0.5, divergence=name, reduction=reduction,
                                     backend=backend)(s, t, labels),
               lambda: reference.kd_loss(s, t, labels=labels, hard_weight=0.5, divergence=name, reduction=reduction)):
        loss = fn()
        upstream = torch.rand_like(loss)
        before = _snapshot(s, t, labels, upstream)
        loss.backward(upstream)
        _assert_unchanged(before, (s, t, labels, upstream))


@pytest.mark.parametrize("backend", BACKENDS)
def test_kd_loss_inplace_writes_only_the_student(backend):
    s, t, labels = _kd_inputs()
    logits = s * 1
    before = _snapshot(logits, t, labels)
    loss = fastkd.kd_loss(logits, t, labels=labels, hard_weight=0.5, inplace=True, backend=backend)
    assert not torch.equal(before[0], logits)  # the documented overwrite
    _assert_unchanged(before[1:], (t, labels))
    loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", [fastkd.softmax, fastkd.log_softmax, reference.softmax, reference.log_softmax])
def test_softmax_leaves_inputs_alone(backend, fn):
    x = torch.randn(3, 4, 19).requires_grad_(True)
    y = fn(x, temperature=1.3, dim=1, backend=backend)
    dy = torch.randn_like(y)
    before = _snapshot(x, y, dy)
    y.backward(dy)
    _assert_unchanged(before, (x, y, dy))


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_ops_leave_inputs_alone(backend):
    s = torch.randn(3, 23).requires_grad_(True)
    t = torch.randn(3, 23)
    before_t = _snapshot(t)
    logprobs, indices = fastkd.teacher_topk(t, 5, temperature=2.0, backend=backend)
    _assert_unchanged(before_t, (t,))
    labels = torch.tensor([1, -100, 22])
    for loss_fn in (lambda: fastkd.topk_kd_loss(s, logprobs, indices, temperature=2.0, labels=labels,
                                                hard_weight=0.5, reduction="none", backend=backend),
                    lambda: fastkd.TopKKDLoss(temperature=2.0, hard_weight=0.5, reduction="none",
                                              backend=backend)(s, logprobs, indices, labels)):
        loss = loss_fn()
        upstream = torch.rand_like(loss)
        before = _snapshot(s, logprobs, indices, labels, upstream)
        loss.backward(upstream)
        _assert_unchanged(before, (s, logprobs, indices, labels, upstream))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("teacher_kind", ["linear", "logits"])
def test_fused_linear_leaves_inputs_alone(backend, teacher_kind):
    hidden = torch.randn(2, 3, 8).requires_grad_(True)
    weight = torch.randn(21, 8).requires_grad_(True)
    bias = torch.randn(21).requires_grad_(True)
    t_hidden, t_weight = torch.randn(2, 3, 6), torch.randn(21, 6)
    t_logits = torch.randn(2, 3, 21)
    labels = torch.tensor([[0, -100, 20], [5, 6, 7]])
    teacher = dict(teacher_hidden=t_hidden, teacher_weight=t_weight) if teacher_kind == "linear" else \
        dict(teacher_logits=t_logits)
    inputs = (hidden, weight, bias, t_hidden, t_weight, t_logits, labels)
    for reduction in ("none", "batchmean"):
        loss = fastkd.fused_linear_kd_loss(hidden, weight, student_bias=bias, labels=labels, hard_weight=0.5,
                                           reduction=reduction, backend=backend, chunk_size=2, **teacher)
        upstream = torch.rand_like(loss)
        before = _snapshot(*inputs, upstream)
        loss.backward(upstream)
        _assert_unchanged(before, (*inputs, upstream))


# 64-bit offsets: row offset = row x stride past 2**31 (and 2**32) elements while the stride itself
# fits in 32 bits, so only the kernels' int64 row index keeps the address right (in 32-bit
# arithmetic the interpreter reads out of bounds and crashes). The rows are views on a buffer of
# ~8.6 GB of address space whose untouched pages are never materialised: it costs a few pages.

@pytest.fixture
def huge_rows():
    V, stride, N = 24, 2**30 + 64, 5
    try:
        storage = torch.empty((N - 1) * stride + 2 * V, dtype=torch.float16)
    except RuntimeError as err:  # the address space is refused (e.g. a ulimit)
        pytest.skip(f"cannot reserve {(N - 1) * stride * 2 / 2**30:.1f} GiB of address space: {err}")
    student = storage.as_strided((N, V), (stride, 1))
    teacher = storage.as_strided((N, V), (stride, 1), V)
    student.copy_(torch.randn(N, V) * 3)
    teacher.copy_(torch.randn(N, V) * 3)
    yield student, teacher
    del storage


def test_row_offsets_past_2_to_the_31(huge_rows):
    student, teacher = huge_rows
    assert student.stride(0) < 2**31 and student.stride(0) * 4 > 2**32
    s64, t64 = student.double().requires_grad_(True), teacher.double()
    labels = torch.tensor([0, 5, 23, -100, 7])
    kw = dict(temperature=1.5, labels=labels, hard_weight=0.5, reduction="none")
    expected = reference.kd_loss(s64, t64, **kw)
    expected.sum().backward()

    for inplace in (False, True):  # inplace: the gradient is written, then scaled, at the offsets
        teacher_before = teacher.clone()
        x = student.detach().requires_grad_(True)  # a view: no copy of the huge buffer
        loss = fastkd.kd_loss(x, teacher, backend="triton", inplace=inplace, **kw)
        loss.sum().backward()
        torch.testing.assert_close(loss.double(), expected, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(x.grad.double(), s64.grad, rtol=1e-2, atol=2e-3)
        assert torch.equal(teacher, teacher_before)  # the columns next to the student's
        if inplace:
            assert torch.equal(x.detach(), x.grad)
            student.copy_(s64.detach())

    y = fastkd.softmax(student, temperature=1.5, backend="triton")
    torch.testing.assert_close(y.double(), torch.softmax(s64.detach() / 1.5, -1), rtol=1e-2, atol=1e-3)


def test_host_label_range_sees_writes_and_new_tensors():
    """The one-slot cache of CPU label ranges: a write to the labels (or to a view of them) and a
    new tensor, even one at the freed address of the last, are read afresh."""
    labels = torch.tensor([3, 1, 4])
    assert buffers.host_label_range(labels) == (1, 4)
    assert buffers.host_label_range(labels.view(-1)) == (1, 4)
    labels[:1] = 9  # through a view: the version counter is shared
    assert buffers.host_label_range(labels) == (1, 9)
    for value in range(5):  # fresh tensors, often at the same address
        assert buffers.host_label_range(torch.full((3,), value)) == (value, value)
    assert buffers.host_label_range(torch.empty(0, dtype=torch.long)) is None


def test_small_call_with_out_of_range_label_after_a_cached_read():
    """A label changed in place after a call must be checked again, not taken from the last read."""
    s, t, labels = torch.randn(4, 8), torch.randn(4, 8), torch.tensor([0, 1, 2, 3])
    fastkd.kd_loss(s, t, labels=labels, hard_weight=1.0, backend="torch")
    labels[2] = 8
    with pytest.raises(ValueError, match="labels"):
        fastkd.kd_loss(s, t, labels=labels, hard_weight=1.0, backend="torch")
