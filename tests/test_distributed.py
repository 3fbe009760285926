"""fastkd.distributed: the vocabulary-parallel KD loss.

Two layers of tests:
- in this process, without torch.distributed: ``forward_steps`` of several shards driven together,
  all-reducing by hand (both backends; Triton in the interpreter), against the float64 oracle,
  plus the exact collectives and floats exchanged per divergence;
- gloo on loopback: groups of 2, 3 and 4 processes, many cases per group, each compared with
  single-process ``kd_loss`` on the full logits and the float64 oracle. The processes come from a
  forkserver that imports torch once (see ``_start_method``), so a group starts in well under a second.
"""
import dataclasses
import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastkd
import fastkd.buffers
import fastkd.backends.torch
import fastkd.backends.triton
from fastkd import vocab_parallel_kd_loss
from fastkd.distributed import forward_steps, mixture_steps, vocab_shard_layout
from fastkd.options import make_options
from helpers import DIVERGENCES, assert_close_to_oracle, run_rank_cases

REDUCTIONS = ("batchmean", "sum", "mean", "none")
JOIN_TIMEOUT_S = 120  # a bound for a hang only; each group takes a few seconds


# ---------------------------------------------------------------- inputs shared by both layers

def make_case(widths, *, seed, n_rows=7, dtype=torch.float32, ignored=(1,)):
    """Full logits [n_rows, V] with masked (-inf) entries, and labels with a target in every shard,
    on its first or last column (where an off-by-one in the owner test shows), and ``ignored`` rows."""
    V = sum(widths)
    starts = [sum(widths[:r]) for r in range(len(widths))]
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(n_rows, V, generator=gen, dtype=torch.float64) * 3
    teacher = torch.randn(n_rows, V, generator=gen, dtype=torch.float64) * 3
    masked = torch.rand(n_rows, V, generator=gen) < 0.1
    masked[:, starts] = masked[:, [a + w - 1 for a, w in zip(starts, widths)]] = False
    if n_rows > 2 and len(widths) > 1:  # one row whose first shard is entirely masked
        masked[2, : widths[0]] = True
    student[masked] = teacher[masked] = float("-inf")
    labels = torch.empty(n_rows, dtype=torch.int64)
    for i in range(n_rows):
        shard = (i + (i == 2)) % len(widths)  # row 2's first shard is masked: no target there
        labels[i] = starts[shard] + (0 if (i // len(widths)) % 2 else widths[shard] - 1)
    for i in ignored:
        if i < n_rows:
            labels[i] = -100
    return student.to(dtype), teacher.to(dtype), labels, starts


def options_for(index, divergence):
    """A spread of kd_loss options over the cases (hard CE on in most)."""
    return dict(divergence=divergence, temperature=(2.0, 1.0, 0.7)[index % 3], beta=0.3, skew=0.2,
                hard_weight=(0.5, 0.0, 1.0)[index % 3], t2_scale=index % 2 == 0,
                reduction=REDUCTIONS[index % len(REDUCTIONS)])


# ---------------------------------------------------------------- single process: the stage math

def simulate(student, teacher, labels, starts, widths, opts, backend):
    """Run one ``forward_steps`` per shard in this process, all-reducing by hand. Returns the
    per-rank results and the exchanges as (op, number of floats)."""
    results, exchanges = drive_by_hand([forward_steps(student[:, a: a + w].contiguous(),
                                                      teacher[:, a: a + w].contiguous(), labels, opts, backend, a)
                                        for a, w in zip(starts, widths)])
    return [r[:3] for r in results], exchanges  # (row_loss, grad, V); the normaliser is 1 here


def drive_by_hand(steps):
    """Drive one generator of exchanges per rank (``forward_steps``, ``mixture_steps``) together,
    all-reducing by hand: their results and the exchanges as (op, number of floats)."""
    messages = [next(s) for s in steps]
    exchanges = []
    while True:
        op = messages[0][1]
        assert all(m[1] == op for m in messages), "ranks disagree on the collective"
        stacked = torch.stack([m[0] for m in messages])
        reduced = stacked.amax(0) if op == "max" else stacked.sum(0)
        exchanges.append((op, reduced.numel()))
        for tensor, _ in messages:
            tensor.copy_(reduced)
        results, messages = [], []
        for s in steps:
            try:
                messages.append(s.send(None))
            except StopIteration as done:
                results.append(done.value)
        if results:
            assert len(results) == len(steps), "ranks ran different numbers of collectives"
            return results, exchanges


def oracle_rows(student, teacher, labels, **kw):
    """Float64 reference per-row loss and its gradient (upstream gradient 1 per row)."""
    leaf = student.double().requires_grad_()
    rows = fastkd.reference.kd_loss(leaf, teacher.double(), labels=labels, **{**kw, "reduction": "none"})
    rows.sum().backward()
    return rows.detach(), leaf.grad


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    """Fresh outputs start as NaN, so a read of an unwritten element cannot pass by luck."""
    monkeypatch.setattr(fastkd.buffers, "POISON_ALLOCATIONS", True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_simulated_shards_match_oracle(divergence, backend, monkeypatch):
    monkeypatch.setattr(fastkd.backends.triton, "MAX_BLOCK_V", 4)  # shards of 5 and 7: multi-block loops
    widths = (7, 5, 7)
    student, teacher, labels, starts = make_case(widths, seed=1, n_rows=6, dtype=torch.float64)
    kw = dict(divergence=divergence, temperature=2.0, beta=0.3, skew=0.2, hard_weight=0.5)
    results, _ = simulate(student, teacher, labels, starts, widths, make_options(**kw), backend)
    rows, grad = oracle_rows(student, teacher, labels, **kw)
    for row_loss, _, V in results:
        assert V == sum(widths)
        torch.testing.assert_close(row_loss, rows, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.cat([g for _, g, _ in results], 1), grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("hard_weight", [0.0, 0.5])
def test_collectives_and_floats_per_row(divergence, hard_weight):
    N, widths = 5, (4, 3)
    student, teacher, labels, starts = make_case(widths, seed=2, n_rows=N)
    opts = make_options(divergence=divergence, hard_weight=hard_weight)
    _, exchanges = simulate(student, teacher, labels, starts, widths, opts, "torch")
    ce = 2 if hard_weight else 0
    cross = 1 if divergence in ("kl", "reverse_kl") else 0  # their loss comes from an exchanged cross term
    expected = [("max", 2 * N + 2), ("sum", (2 + cross + ce) * N + 1)]
    if divergence != "kl":  # every gradient but kl's reads A1, A2 (KDOptions.grad_reads_row_scalars)
        expected.append(("sum", 2 * N))
    assert exchanges == expected


@pytest.mark.parametrize("divergence", ["kl", "jsd"])
def test_simulated_mixture_of_teachers(divergence):
    """Several teachers: ``mixture_steps`` (2 exchanges of [N, teachers]) gives each shard its
    columns of the mixture's log p, then ``forward_steps`` the loss of that one teacher at T_t = 1:
    kd_loss's mixture, its degenerate rows NaN as there (a teacher with no distribution over all V),
    a teacher of weight 0 included."""
    widths = (5, 6, 4)
    student, teacher, labels, starts = make_case(widths, seed=7, n_rows=8, dtype=torch.float64, ignored=(7,))
    others = [make_case(widths, seed=8 + i, n_rows=8, dtype=torch.float64)[1].masked_fill(student.isneginf(),
                                                                                       float("-inf")) for i in range(2)]
    others[0][0] = float("-inf")  # teacher 1 has no distribution in row 0 (weight 0 or not)
    teacher[1, 6] = float("nan")  # a NaN in teacher 0's second shard
    others[1][2, :5] = float("-inf")  # entirely -inf in one shard only: fine
    teacher[7] = float("nan")  # an ignored row is never read
    teachers = [teacher, *others]
    kw = dict(divergence=divergence, temperature=2.0, teacher_temperature=1.5, hard_weight=0.5)
    weights = (0.0, 0.3, 0.7)
    opts = make_options(**kw, teacher_weights=weights)
    log_ps, exchanges = drive_by_hand([mixture_steps([t[:, a: a + w] for t in teachers], opts, torch.float64)
                                       for a, w in zip(starts, widths)])
    assert exchanges == [("max", 8 * 3), ("sum", 8 * 3)]
    one_teacher = dataclasses.replace(opts, teacher_temperature=1.0, teacher_weights=(1.0,))
    results, _ = drive_by_hand([forward_steps(student[:, a: a + w], log_p, labels, one_teacher, "torch", a)
                                for log_p, a, w in zip(log_ps, starts, widths)])
    good = torch.tensor([False, False] + [True] * 5 + [False])
    leaf = student[good].requires_grad_()
    rows = fastkd.reference.kd_loss(leaf, [t[good] for t in teachers], labels=labels[good], reduction="none",
                                    teacher_weights=weights, **kw)
    rows.sum().backward()
    for row_loss, shard_grad, _, _ in results:
        assert row_loss[:2].isnan().all() and shard_grad[:2].isnan().all()
        assert row_loss[7] == 0 and (shard_grad[7] == 0).all()
        torch.testing.assert_close(row_loss[good], rows.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.cat([g[good] for _, g, _, _ in results], 1), leaf.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("starts", [[0, 7, 13], [1, 8, 12]], ids=["past_V", "not_from_0"])
def test_bad_layout_gives_nan_not_a_wrong_number(starts):
    widths = (7, 5, 7)
    student, teacher, labels, _ = make_case(widths, seed=3, n_rows=4)
    results, _ = simulate(student, teacher, labels, starts, widths, make_options(hard_weight=0.5), "torch")
    kept = labels != -100
    for row_loss, grad, _ in results:
        assert row_loss[kept].isnan().all() and (row_loss[~kept] == 0).all()
        assert grad[kept].isnan().all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_degenerate_rows_are_nan_as_in_kd_loss(divergence, backend, monkeypatch):
    monkeypatch.setattr(fastkd.backends.triton, "MAX_BLOCK_V", 4)
    widths = (5, 6, 4)
    V = sum(widths)
    student, teacher, labels, starts = make_case(widths, seed=5, n_rows=8, dtype=torch.float64, ignored=(7,))
    student[0] = float("-inf")  # no student distribution
    teacher[1, 6] = float("nan")  # a NaN in the second shard
    student[2, 12] = float("inf")  # a +inf in the third shard
    labels[3] = V  # a label that no shard owns
    student[7] = float("nan")  # an ignored row is never read
    kw = dict(divergence=divergence, temperature=2.0, hard_weight=0.5)
    results, _ = simulate(student, teacher, labels, starts, widths, make_options(**kw), backend)
    good = torch.tensor([False] * 4 + [True] * 3 + [False])
    rows, grad = oracle_rows(student[good], teacher[good], labels[good], **kw)
    for row_loss, shard_grad, _ in results:
        assert row_loss[:4].isnan().all() and shard_grad[:4].isnan().all()
        assert row_loss[7] == 0 and (shard_grad[7] == 0).all()
        torch.testing.assert_close(row_loss[good], rows, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.cat([g[good] for _, g, _ in results], 1), grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("divergence, skew", [("skew_kl", 1e-300), ("skew_reverse_kl", 0.0)])
def test_underflowed_probabilities_with_extreme_skews(divergence, skew, backend, monkeypatch):
    """float32 at T = 0.05: q underflows to 0 at columns whose log q is finite. There skew_kl's
    r = p q / M tends to p / (1 - a) when a << q (a one-hot teacher on the student's least likely
    column), and skew_reverse_kl's a q / M at a = 0 must stay 0, never 0 * inf."""
    monkeypatch.setattr(fastkd.backends.triton, "MAX_BLOCK_V", 4)
    widths = (6, 5)
    student, teacher, labels, starts = make_case(widths, seed=6, n_rows=5)
    if divergence == "skew_kl":
        least = student.masked_fill(student == float("-inf"), float("inf")).argmin(1)
        teacher = torch.full_like(teacher, float("-inf")).scatter_(1, least[:, None], 0.0)
    kw = dict(divergence=divergence, temperature=0.05, skew=skew, hard_weight=0.5)
    log_q = (student.double() / 0.05).log_softmax(-1)
    assert ((log_q > -700) & (log_q.exp().float() == 0)).any(), "no q underflowed"
    results, _ = simulate(student, teacher, labels, starts, widths, make_options(**kw), backend)
    rows, grad = oracle_rows(student, teacher, labels, **kw)
    assert rows.isfinite().all() and grad.isfinite().all()
    for row_loss, _, _ in results:
        torch.testing.assert_close(row_loss.double(), rows, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat([g for _, g, _ in results], 1).double(), grad, rtol=1e-4, atol=1e-4)


def test_partial_stats_kernel_matches_torch_peer(monkeypatch):
    monkeypatch.setattr(fastkd.backends.triton, "MAX_BLOCK_V", 4)
    student, teacher, labels, _ = make_case((6, 9), seed=4, n_rows=6)
    labels[0] = 2  # a target outside the shard [5, 11)
    shard = (student[:, 5:11], teacher[:, 5:11])  # row-strided views, no copy
    for divergence in ("kl", "reverse_kl", "jsd"):
        opts = make_options(divergence=divergence, temperature=1.5, hard_weight=1.0)
        kernel = fastkd.backends.triton.partial_stats(*shard, labels, opts, 5)
        peer = fastkd.backends.torch.partial_stats(*shard, labels, opts, 5)
        torch.testing.assert_close(kernel, peer, rtol=1e-5, atol=1e-6)
        assert (kernel[1, :3] == float("-inf")).all() and (kernel[1, 3:] == 0).all(), "ignored row not neutral"
        assert kernel[0, 7] == 0, "a target outside the shard contributed a logit"


def test_argument_errors():
    s, t = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="init_process_group"):
        vocab_parallel_kd_loss(s, t)
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_kd_loss(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="teacher_logits"):
        vocab_parallel_kd_loss(s, t.clone().requires_grad_())
    with pytest.raises(TypeError):
        vocab_parallel_kd_loss(s, t, kl_weight=1.0)
    with pytest.raises(TypeError, match="vocab_start"):
        vocab_parallel_kd_loss(s, t, vocab_start=True)
    with pytest.raises(ValueError, match="vocab_start"):
        vocab_parallel_kd_loss(s, t, vocab_start=-4)
    with pytest.raises(ValueError, match="width"):
        vocab_shard_layout(0)


# ---------------------------------------------------------------- gloo on loopback

def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_method():
    """"forkserver" where it exists: a fresh process (no pytest state, no threads) imports torch and
    fastkd once, and every rank of every test is forked from it, in milliseconds instead of the
    seconds a "spawn" start costs in importing torch. Otherwise "spawn"."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    multiprocessing.get_context("forkserver").set_forkserver_preload(["torch", "torch._dynamo", __name__])
    return "forkserver"


def spawn(worker, world_size):
    """Run ``worker(rank, world_size, port)`` in ``world_size`` processes; fail after the timeout."""
    context = mp.start_processes(worker, args=(world_size, _free_port()), nprocs=world_size, join=False,
                                 start_method=_start_method())
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{worker.__name__} did not finish within {JOIN_TIMEOUT_S} s")


def _init(rank, world_size, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    fastkd.backends.triton.MAX_BLOCK_V = 4  # the autouse fixtures do not reach spawned processes
    fastkd.backends.torch.CHUNK_BYTES = 4 * 64 * 3
    fastkd.buffers.POISON_ALLOCATIONS = True
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=JOIN_TIMEOUT_S))


def _backward(loss, x, reduction):
    """Backpropagate ``loss`` into the leaf ``x`` with an upstream gradient other than 1."""
    if reduction == "none":
        (loss * torch.arange(1.0, loss.numel() + 1).reshape(loss.shape)).sum().backward()
    else:
        (2.0 * loss).backward()
    return x.grad


def check_against_single_process(widths, *, seed, dtype, backend="torch", group=None,
                                 pass_vocab_start=True, n_rows=7, ignored=(1,), inplace=False, **kw):
    """This rank's loss and shard gradient equal single-process kd_loss on the full logits (to
    rounding) and are as close to the float64 oracle as it is."""
    student, teacher, labels, starts = make_case(widths, seed=seed, n_rows=n_rows, dtype=dtype, ignored=ignored)
    rank_in_group = dist.get_rank(group)
    a, w = starts[rank_in_group], widths[rank_in_group]
    labels = labels if kw.get("hard_weight") or seed % 2 else None
    reduction = kw.get("reduction", "batchmean")

    leaf = student[:, a: a + w].clone().requires_grad_()
    shard = leaf * 1 if inplace else leaf
    loss = vocab_parallel_kd_loss(shard, teacher[:, a: a + w], group=group, labels=labels, backend=backend,
                                  vocab_start=a if pass_vocab_start else None, inplace=inplace, **kw)
    grad = _backward(loss, leaf, reduction)

    full = student.clone().requires_grad_()
    single = fastkd.kd_loss(full, teacher, labels=labels, backend=backend, **kw)
    single_grad = _backward(single, full, reduction)[:, a: a + w]

    exact = student.double().requires_grad_()
    oracle = fastkd.reference.kd_loss(exact, teacher.double(), labels=labels, **kw)
    oracle_grad = _backward(oracle, exact, reduction)[:, a: a + w]

    V = sum(widths)
    assert loss.dtype == single.dtype and grad.dtype == dtype
    torch.testing.assert_close(loss, single, rtol=1e-5, atol=1e-6)
    grad, single_grad = grad.float(), single_grad.float()
    scale = single_grad.abs().max().item() if single_grad.numel() else 1.0
    rtol = 2.0**-7 if dtype == torch.bfloat16 else 1e-5  # one bf16 rounding either way
    torch.testing.assert_close(grad, single_grad, rtol=rtol, atol=1e-5 * scale)
    assert_close_to_oracle(loss, oracle.detach(), single.detach(), dtype=dtype, grows_with=V)
    assert_close_to_oracle(grad / scale, oracle_grad / scale, single_grad / scale, dtype=dtype, grows_with=V)


def _run_cases(rank, cases):
    run_rank_cases(rank, [(name, check_against_single_process, kwargs) for name, kwargs in cases])


def _two_ranks(rank, world_size, port):
    _init(rank, world_size, port)
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        for i, divergence in enumerate(DIVERGENCES):
            kw = options_for(i + (dtype == torch.bfloat16), divergence)
            cases.append((f"{divergence}-{dtype}-{kw['reduction']}",
                          dict(widths=(8, 8), seed=10 + i, dtype=dtype, pass_vocab_start=i % 2 == 1, **kw)))
    cases += [
        ("all-rows-ignored", dict(widths=(8, 8), seed=30, dtype=torch.float32, n_rows=3, ignored=(0, 1, 2),
                                  hard_weight=0.5)),
        ("no-rows", dict(widths=(5, 5), seed=31, dtype=torch.float32, n_rows=0, divergence="jsd")),
        ("inplace", dict(widths=(8, 8), seed=32, dtype=torch.bfloat16, inplace=True, hard_weight=0.5,
                         divergence="reverse_kl")),
    ]
    _run_cases(rank, cases)

    s, t, labels, starts = make_case((8, 8), seed=33, n_rows=6)
    s, t = s[:, starts[rank]: starts[rank] + 8], t[:, starts[rank]: starts[rank] + 8]
    # Leading dims [2, 3]: the per-row losses keep their shape and equal the flat call's.
    flat = vocab_parallel_kd_loss(s, t, labels=labels, hard_weight=1.0, reduction="none", backend="torch")
    nested = vocab_parallel_kd_loss(s.reshape(2, 3, 8), t.reshape(2, 3, 8), labels=labels.reshape(2, 3),
                                    hard_weight=1.0, reduction="none", backend="torch")
    assert nested.shape == (2, 3) and torch.equal(nested.reshape(-1), flat)
    # CPU labels outside [0, V) raise on every rank, as kd_loss (V is known after the exchange).
    labels[4] = 16
    with pytest.raises(ValueError, match="labels"):
        vocab_parallel_kd_loss(s, t, labels=labels, hard_weight=1.0, backend="torch")
    dist.destroy_process_group()


def _three_ranks(rank, world_size, port):
    _init(rank, world_size, port)
    widths = (5, 8, 6)  # unequal: vocab_start given
    cases = [(f"unequal-{d}", dict(widths=widths, seed=40 + i, dtype=torch.float32, **options_for(i, d)))
             for i, d in enumerate(DIVERGENCES)]
    cases.append(("unequal-bf16-tvd", dict(widths=widths, seed=47, dtype=torch.bfloat16, divergence="tvd",
                                           hard_weight=0.5)))
    for i, d in enumerate(("kl", "skew_reverse_kl")):  # the fused kernels, in Triton's interpreter
        cases.append((f"triton-{d}", dict(widths=widths, seed=50 + i, dtype=torch.float32, backend="triton",
                                          **options_for(i, d))))
    _run_cases(rank, cases)

    # A vocab group smaller than the world: ranks 0 and 1 shard V between them, rank 2 holds it all.
    pair, single = dist.new_group([0, 1]), dist.new_group([2])
    group, group_widths = (pair, (7, 7)) if rank < 2 else (single, (14,))
    check_against_single_process(group_widths, seed=60, dtype=torch.float32, group=group, pass_vocab_start=False,
                                 divergence="jsd", hard_weight=0.5)  # vocab_start from the rank in group

    # Unequal widths without vocab_start: a NaN loss from the device-side check, a ValueError here.
    s, t, labels, starts = make_case(widths, seed=61)
    a, w = starts[rank], widths[rank]
    assert vocab_parallel_kd_loss(s[:, a: a + w], t[:, a: a + w], backend="torch").isnan()
    with pytest.raises(ValueError, match="shard"):
        vocab_shard_layout(w)
    assert vocab_shard_layout(w, a) == [(0, 5), (5, 8), (13, 6)]
    dist.destroy_process_group()


def _data_and_vocab_parallel(rank, world_size, port):
    """2 x 2 ranks: vocab groups {0, 1} and {2, 3}, DDP over the data groups {0, 2} and {1, 3}."""
    _init(rank, world_size, port)
    vocab_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    data_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    replica, vocab_rank = divmod(rank, 2)
    N, H, widths = 6, 5, (7, 4)
    starts = (0, 7)
    gen = torch.Generator().manual_seed(70)
    weight = torch.randn(sum(widths), H, generator=gen, dtype=torch.float64)
    inputs = [torch.randn(N, H, generator=gen, dtype=torch.float64) for _ in range(2)]
    teachers = [torch.randn(N, sum(widths), generator=gen, dtype=torch.float64) * 2 for _ in range(2)]
    labels = [torch.randint(0, sum(widths), (N,), generator=gen) for _ in range(2)]
    kw = dict(divergence="kl", temperature=2.0, hard_weight=0.5)

    a, w = starts[vocab_rank], widths[vocab_rank]
    head = torch.nn.Linear(H, w, bias=False, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(weight[a: a + w])
    model = torch.nn.parallel.DistributedDataParallel(head, process_group=data_groups[vocab_rank])
    x = inputs[replica].clone().requires_grad_()
    loss = vocab_parallel_kd_loss(model(x), teachers[replica][:, a: a + w], labels=labels[replica],
                                  group=vocab_groups[replica], vocab_start=a, backend="torch", **kw)
    loss.backward()
    dist.all_reduce(x.grad, group=vocab_groups[replica])  # the column-parallel head's input gradient

    expected_weight_grad = torch.zeros_like(weight)
    for r in range(2):  # the oracle on the unsharded head, both data replicas
        full = weight.clone().requires_grad_()
        xr = inputs[r].clone().requires_grad_()
        single = fastkd.reference.kd_loss(xr @ full.T, teachers[r], labels=labels[r], **kw)
        single.backward()
        expected_weight_grad += full.grad / 2  # DDP averages over the data replicas
        if r == replica:
            torch.testing.assert_close(loss, single, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(x.grad, xr.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(head.weight.grad, expected_weight_grad[a: a + w], rtol=1e-12, atol=1e-12)
    dist.destroy_process_group()


def test_two_ranks_every_divergence_fp32_bf16():
    spawn(_two_ranks, 2)


def test_three_ranks_unequal_shards_triton_and_subgroups():
    spawn(_three_ranks, 3)


def test_ddp_over_vocab_parallel_groups():
    spawn(_data_and_vocab_parallel, 4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl"])
def test_large_logits_value_does_not_cancel(divergence, backend, monkeypatch):
    """A teacher of scale 1e4 (kl) or a student of scale 1e4 (reverse_kl): the shards' cross terms,
    re-centred on the global maxima, keep the value within 2x of float32 PyTorch's error."""
    monkeypatch.setattr(fastkd.backends.triton, "MAX_BLOCK_V", 16)
    widths = (40, 23, 40)
    gen = torch.Generator().manual_seed(3)
    student, teacher = (torch.randn(4, sum(widths), generator=gen, dtype=torch.float64) for _ in range(2))
    if divergence == "kl":
        teacher = teacher * 1e4
    else:
        student = student * 1e4
    student, teacher = student.float(), teacher.float()
    kw = dict(divergence=divergence, reduction="none")
    results, _ = simulate(student, teacher, None, (0, 40, 63), widths, make_options(divergence=divergence), backend)
    truth = fastkd.reference.kd_loss(student.double(), teacher.double(), **kw)
    eager = fastkd.reference.kd_loss(student, teacher, **kw).double()
    allowed = 2 * (eager - truth).abs().max() + 4 * torch.finfo(torch.float32).eps * truth.abs().max()
    for row_loss, _, _ in results:
        assert (row_loss.double() - truth).abs().max() <= allowed


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_large_logits_reverse_kl_gradient(backend, monkeypatch):
    """Student and teacher of scale 1e4 (q one-hot), 12 seeds: the gradient at the student's
    argmax is 0 up to the other columns' mass, as float32 PyTorch's. A cross term re-centred on the
    teacher's global maximum erred there by eps |t - max t| ~ 1e4 eps; reverse_kl takes A1, A2 from
    their own exchange (KDOptions.exchanges_cross_term), whose terms round as the gradient's."""
    monkeypatch.setattr(fastkd.backends.triton, "MAX_BLOCK_V", 16)
    widths, starts = (40, 23, 40), (0, 40, 63)
    for seed in range(12):
        gen = torch.Generator().manual_seed(seed)
        student, teacher = ((torch.randn(4, 103, generator=gen, dtype=torch.float64) * 1e4).float() for _ in range(2))
        results, _ = simulate(student, teacher, None, starts, widths, make_options(divergence="reverse_kl"), backend)
        grad = torch.cat([g for _, g, _ in results], 1).double()
        grads = []
        for x in (student.double(), student):
            x = x.clone().requires_grad_()
            fastkd.reference.kd_loss(x, teacher.to(x.dtype), divergence="reverse_kl", reduction="sum").backward()
            grads.append(x.grad.double())
        truth, eager = grads
        allowed = 2 * (eager - truth).abs().max() + 4 * torch.finfo(torch.float32).eps
        assert (grad - truth).abs().max() <= allowed, f"seed {seed}"


@pytest.mark.parametrize("temperatures", [(1.0, None), (0.5, 3.0)], ids=["T=1", "T=0.5,T_t=3"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_offset_logits_near_convergence_no_less_accurate_than_float32_pytorch(divergence, backend, temperatures,
                                                                              monkeypatch):
    """Logits offset far above their spread (z + 500) and a student close to its teacher, with the hard
    CE: the shards take log-probabilities as (s - M_s) - log d_s from the row's maxima and sums, where
    s - lse(s) rounded at |lse| ~ 500 (gradients 50 to 300 times float32 PyTorch's error); and the
    log-ratio centred on the maxima, where s - t rounded at the offsets, which differ at T != T_t."""
    monkeypatch.setattr(fastkd.backends.triton, "MAX_BLOCK_V", 16)
    widths, starts = (40, 23, 40), (0, 40, 63)
    gen = torch.Generator().manual_seed(4)
    teacher = torch.randn(4, sum(widths), generator=gen, dtype=torch.float64) * 30 + 500
    student = (teacher + 0.01 * torch.randn(teacher.shape, generator=gen, dtype=torch.float64)).float()
    teacher, labels = teacher.float(), teacher.argmax(-1)
    T, T_t = temperatures
    kw = dict(divergence=divergence, beta=0.3, skew=0.2, hard_weight=0.5, temperature=T, teacher_temperature=T_t)
    results, _ = simulate(student, teacher, labels, starts, widths, make_options(**kw), backend)
    rows, grad = results[0][0].double(), torch.cat([g for _, g, _ in results], 1).double()
    truth, truth_grad = oracle_rows(student, teacher, labels, **kw)
    leaf = student.clone().requires_grad_()  # float32 PyTorch: the reference's formula in float32
    eager = fastkd.reference.kd_loss(leaf, teacher, labels=labels, reduction="none", **kw)
    (eager_grad,) = torch.autograd.grad(eager.sum(), leaf)
    eager, eager_grad = eager.detach().double(), eager_grad.double()
    eps = torch.finfo(torch.float32).eps
    assert (rows - truth).abs().max() <= 2 * (eager - truth).abs().max() + 4 * eps * truth.abs().max()
    assert (grad - truth_grad).abs().max() <= 2 * (eager_grad - truth_grad).abs().max() + 4 * eps


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("widths", [(5, 0, 4), (0, 9), (9, 0)], ids=["middle", "first", "last"])
def test_a_rank_with_no_columns(widths, backend):
    """A rank whose shard is empty (an uneven split of a small vocabulary): neutral statistics, no
    label owned, an empty gradient; the loss and the other shards' gradients those of kd_loss."""
    starts = [sum(widths[:r]) for r in range(len(widths))]
    gen = torch.Generator().manual_seed(5)
    student, teacher = (torch.randn(3, 9, generator=gen, dtype=torch.float64) for _ in range(2))
    labels = torch.tensor([1, 8, -100])
    for divergence in ("kl", "jsd"):
        kw = dict(divergence=divergence, hard_weight=0.5)
        results, _ = simulate(student, teacher, labels, starts, widths, make_options(**kw), backend)
        rows, grad = oracle_rows(student.clone(), teacher, labels, **kw)
        for row_loss, _, V in results:
            assert V == 9
            torch.testing.assert_close(row_loss, rows, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(torch.cat([g for _, g, _ in results], 1), grad, rtol=1e-10, atol=1e-12)
