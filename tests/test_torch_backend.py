"""The torch backend's own machinery: the single-threaded chunk workers on the CPU (same results as
the calling thread's loop, no setting of the caller's changed, nothing of a call kept alive, errors
raised in the caller), the reused chunk buffers, and the torch table's conventions that differ in
form from the kernels' (``sign`` of NaN, the masked products at -inf columns)."""
import gc
import os
import threading
import weakref

import pytest
import torch

import fastkd
from fastkd.backends import torch as torch_backend
from fastkd.backends import workers as worker_pool
from fastkd.backends import torch_divergences as div
from fastkd.options import make_options
from helpers import DIVERGENCES

needs_workers = pytest.mark.skipif(worker_pool._omp_set_num_threads() is None,
                                   reason="the workers need torch built with OpenMP, on Linux")


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _forward(student, teachers, labels, opts, workers, monkeypatch, **kw):
    with monkeypatch.context() as patch:
        if not workers:
            patch.setattr(worker_pool, "_omp_set_num_threads", lambda: None)
        return torch_backend.kd_forward(student, teachers, labels, torch.tensor([0.25]), opts, **kw)


@needs_workers
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_workers_give_the_calling_threads_results(divergence, two_threads, monkeypatch):
    """Bit for bit, with -inf columns, an undefined row, ignored rows, the hard CE, a bf16 student,
    in place, and a mixture of two teachers."""
    gen = torch.Generator().manual_seed(3)
    s, t = torch.randn(37, 50, generator=gen) * 3, torch.randn(37, 50, generator=gen) * 3
    s[:, 7], t[:, 7] = -float("inf"), -float("inf")
    t[5] = float("nan")
    labels = torch.randint(0, 50, (37,), generator=gen)
    labels[::4] = -100
    cases = [
        (s, t, None, make_options(divergence=divergence, temperature=1.5, beta=0.3, skew=0.2), {}),
        (s, t, labels, make_options(divergence=divergence, hard_weight=0.5), {}),
        (s.bfloat16(), t, labels, make_options(divergence=divergence), {}),
        (s, (t, torch.randn(37, 50, generator=gen)), None,
         make_options(divergence=divergence, teacher_weights=(0.3, 0.7)), {}),
    ]
    for student, teachers, labels_, opts, kw in cases:
        loss, grad = _forward(student, teachers, labels_, opts, True, monkeypatch, chunk_bytes=4 * 50 * 3)
        loss0, grad0 = _forward(student, teachers, labels_, opts, False, monkeypatch, chunk_bytes=4 * 50 * 3)
        torch.testing.assert_close(loss, loss0, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(grad, grad0, rtol=0, atol=0, equal_nan=True)
    inplace = s.clone()
    _forward(inplace, t, labels, make_options(divergence=divergence), True, monkeypatch, inplace=True,
             chunk_bytes=4 * 50 * 3)
    torch.testing.assert_close(inplace, _forward(s, t, labels, make_options(divergence=divergence), False,
                                                 monkeypatch, chunk_bytes=4 * 50 * 3)[1],
                               rtol=0, atol=0, equal_nan=True)


@needs_workers
def test_workers_take_a_student_that_requires_grad(two_threads, monkeypatch):
    """The public entry points with the chunk loop on the workers (grad mode is a setting of each
    thread; the workers turn theirs off): a student that requires grad is read as a constant there
    (no autograd op, no "out=... don't support automatic differentiation"), in place too, and every
    gradient is the calling thread's."""
    monkeypatch.setattr(torch_backend, "SMALL_ELEMENTS", 0)
    monkeypatch.setattr(torch_backend, "CHUNK_BYTES", 4 * 64 * 4)
    monkeypatch.setattr(torch_backend, "TOPK_CHUNK_FACTOR", 1)
    gen = torch.Generator().manual_seed(4)
    s, t = torch.randn(40, 64, generator=gen), torch.randn(40, 64, generator=gen)
    labels = torch.randint(0, 64, (40,), generator=gen)
    topk = fastkd.teacher_topk(t, 8, backend="torch")
    calls = [lambda x: fastkd.kd_loss(x, t, temperature=2.0, labels=labels, hard_weight=0.5, backend="torch"),
             lambda x: fastkd.kd_loss(x, [t, t.flip(0)], divergence="jsd", backend="torch"),
             lambda x: fastkd.topk_kd_loss(x, topk, labels=labels, hard_weight=0.5, backend="torch"),
             lambda x: fastkd.kd_loss(x, t, divergence="reverse_kl", inplace=True, backend="torch")]
    for call in calls:
        grads = []
        for workers in (True, False):
            with monkeypatch.context() as patch:
                if not workers:
                    patch.setattr(worker_pool, "_omp_set_num_threads", lambda: None)
                x = s.clone().requires_grad_()
                grads.append(torch.autograd.grad(call(x), x)[0])
        torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.parametrize("short_rows", [False, True], ids=["log_softmax", "short-rows"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_small_calls_give_the_chunk_loops_results(divergence, short_rows, monkeypatch):
    """The path of a small call (one chunk by fused ops, SMALL_ELEMENTS) against the chunk loop: the
    same values to float32 rounding and the same NaN rows, with -inf columns, an undefined row, a
    label out of range, ignored rows, the hard CE, a bf16 student, views, and in place; with
    torch's log_softmax and with its steps as separate ops (many short rows, forced here)."""
    if short_rows:
        monkeypatch.setattr(torch_backend, "SHORT_ROW", 10**6)
        monkeypatch.setattr(torch_backend, "FEW_ROWS", 0)
    gen = torch.Generator().manual_seed(5)
    s, t = torch.randn(9, 13, generator=gen) * 3, torch.randn(9, 13, generator=gen) * 3
    s[:, 4], t[:, 4] = -float("inf"), -float("inf")
    t[:, 6] = -float("inf")  # the teacher alone masks a column
    s[2] = float("nan")
    labels = torch.randint(0, 13, (9,), generator=gen)
    labels[::4], labels[5] = -100, 13
    wide = torch.randn(9, 20, generator=gen)
    wide[2] = float("nan")
    cases = [
        (s, t, None, make_options(divergence=divergence, temperature=1.5, beta=0.3, skew=0.2)),
        (s, t, labels, make_options(divergence=divergence, hard_weight=0.5)),
        (s.bfloat16(), t, labels, make_options(divergence=divergence, teacher_temperature=0.7)),
        (wide[:, 3:16], t, labels[::1], make_options(divergence=divergence, soft_weight=0.3, t2_scale=False)),
    ]

    def forward(student, teacher, labels_, opts, small, **kw):
        monkeypatch.setattr(torch_backend, "SMALL_ELEMENTS", 2**20 if small else 0)
        return torch_backend.kd_forward(student, teacher, labels_, torch.tensor([0.25]), opts, chunk_bytes=2**20,
                                        **kw)

    for student, teacher, labels_, opts in cases:
        loss, grad = forward(student, teacher, labels_, opts, True)
        loss0, grad0 = forward(student, teacher, labels_, opts, False)
        torch.testing.assert_close(loss, loss0, equal_nan=True)
        torch.testing.assert_close(grad, grad0, equal_nan=True)
        assert torch.isnan(loss).any()  # the undefined row (and, with labels, the label out of range)
    inplace = s.clone()
    forward(inplace, t, labels, make_options(divergence=divergence), True, inplace=True)
    torch.testing.assert_close(inplace, forward(s, t, labels, make_options(divergence=divergence), False)[1],
                               equal_nan=True)


@needs_workers
def test_workers_leave_the_callers_thread_settings_alone(two_threads, monkeypatch):
    """Each worker sets OpenMP's thread count of its own thread only: the caller, and threads
    started later, keep torch's setting."""
    s, t = torch.randn(64, 40), torch.randn(64, 40)
    torch_backend.kd_forward(s, t, None, torch.ones(1), make_options(), chunk_bytes=4 * 40 * 8)
    assert torch.get_num_threads() == 2
    seen = []
    later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    later.start()
    later.join()
    assert seen == [2]


@needs_workers
def test_workers_start_no_threads_of_their_own(two_threads):
    """A worker's ops run on its own thread, MKL's vector math (exp, log) included: no OpenMP team
    starts there. Were one to, the runtime (more OpenMP threads than cores) would stop spinning
    between parallel regions, and every parallel op of the process would wait for a woken thread."""
    pool = worker_pool._workers(2)
    threads = lambda: len(os.listdir("/proc/self/task"))
    before = threads()
    x = torch.randn(16, 4096)
    pool.run([lambda: x.exp().log_()] * 4)
    assert threads() == before


@needs_workers
def test_nothing_of_a_call_outlives_it(two_threads):
    """The workers drop their task once it is done: the call's gradient and inputs are freed."""
    s, t = torch.randn(64, 40), torch.randn(64, 40)
    loss, grad = torch_backend.kd_forward(s, t, None, torch.ones(1), make_options(divergence="jsd"),
                                          chunk_bytes=4 * 40 * 8)
    refs = [weakref.ref(x) for x in (s, t, loss, grad)]
    del s, t, loss, grad
    gc.collect()
    assert all(ref() is None for ref in refs)


@needs_workers
def test_an_error_in_a_chunk_is_raised_in_the_caller(two_threads, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("chunk failed")

    monkeypatch.setattr(div, "divergence_grad", broken)
    with pytest.raises(RuntimeError, match="chunk failed"):
        torch_backend.kd_forward(torch.randn(64, 40), torch.randn(64, 40), None, torch.ones(1), make_options(),
                                 chunk_bytes=4 * 40 * 8)
    monkeypatch.undo()
    loss, _ = torch_backend.kd_forward(torch.zeros(64, 40), torch.zeros(64, 40), None, torch.ones(1),
                                       make_options(), chunk_bytes=4 * 40 * 8)
    assert (loss == 0).all()  # the workers still serve


def test_workspace_hands_out_each_buffer_once_per_chunk_and_reuses_them():
    work = torch_backend.Workspace([(0, 4), (4, 7)], 5, torch.float32, torch.device("cpu"))
    work.next_chunk(4)
    a, b = work.take(), work.take()
    assert a.shape == (4, 5) and a.data_ptr() != b.data_ptr()
    work.give_back(a)
    assert work.take().data_ptr() == a.data_ptr()
    work.next_chunk(3)
    c, d = work.take(), work.take()
    assert {c.data_ptr(), d.data_ptr()} == {a.data_ptr(), b.data_ptr()} and c.shape == (3, 5)
    assert len(work.buffers) == 2


def test_sign_is_zero_at_nan_as_the_kernels():
    x = torch.tensor([float("nan"), -2.0, 0.0, 3.0, -float("inf")])
    assert div.sign(x).tolist() == [0.0, -1.0, 0.0, 1.0, -1.0]


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_masked_vocabulary_gives_zero_terms_and_gradient(divergence):
    """Columns where both distributions are 0 (-inf logits): every element term and the gradient
    there are 0, not the NaN of 0 * inf, for every divergence (the masked products)."""
    s, t = torch.randn(3, 17), torch.randn(3, 17)
    s[:, 4:9] = t[:, 4:9] = -float("inf")
    opts = make_options(divergence=divergence, beta=0.3, skew=0.2)
    loss, grad = torch_backend.kd_forward(s, t, None, torch.ones(1), opts)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert (grad[:, 4:9] == 0).all()
