"""The accuracy rule: no value or gradient of either backend is less accurate against a float64
truth than twice the error of a plain float32 PyTorch evaluation of the same formula on the same
inputs, plus a few units of rounding of the result's dtype at the result's scale.

The float32 evaluation is ``fastkd.reference`` run in float32 (its textbook formula per divergence,
autograd for the gradient); the truth is the same reference in float64. Compared on the per-row
values (``reduction="none"``) and on the gradient, as the largest error over all rows (one lucky
row of the float32 evaluation, whose rounding errors can cancel exactly when student and teacher
share most of their logits, is not the yardstick), at real vocabulary sizes, for random logits
and for a student close to its teacher (late in distillation, where q - p cancels). The result's
scale is 1 for a row value (a probability-weighted sum: the weights sum to 1) and, for a gradient,
the largest probability (p or q) of the rows, times the soft-loss factor. Torch's TVD once summed |p - q| through ``torch.linalg.vector_norm(..., 1)``, ten
times less accurate than ``(p - q).abs().sum()``; this pins the rule for every divergence.
"""
import pytest
import torch

import fastkd
import fastkd.backends.torch
import fastkd.backends.triton
import fastkd.config
from fastkd import reference

from helpers import DIVERGENCES

ULPS = 4


def _rows_and_grads(fn, student, teacher, **kw):
    x = student.detach().clone().requires_grad_()
    rows = fn(x, teacher, reduction="none", **kw)
    (grad,) = torch.autograd.grad(rows.sum(), x)
    return rows.detach().double(), grad.double()


def _cases(V, dtype, rows=2):
    gen = torch.Generator().manual_seed(V)
    student = torch.randn(rows, V, generator=gen, dtype=torch.float64) * 4
    teacher = torch.randn(rows, V, generator=gen, dtype=torch.float64) * 4
    near = student + 0.01 * torch.randn(rows, V, generator=gen, dtype=torch.float64)
    return {"random": (student.to(dtype), teacher.to(dtype)), "converged": (student.to(dtype), near.to(dtype))}


def _check(actual, truth, eager, scale, out_dtype, what):
    """max |actual - truth| <= 2 max |eager - truth| + ULPS eps(out_dtype) scale."""
    err = (actual - truth).abs().max()
    allowed = 2 * (eager - truth).abs().max() + ULPS * torch.finfo(out_dtype).eps * scale
    assert err <= allowed, f"{what}: error {err:.3g} > allowed {allowed:.3g} (float32 PyTorch: " \
                           f"{(eager - truth).abs().max():.3g})"


@pytest.mark.parametrize("V", [32000, 128256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["triton", "torch", "torch-small"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_no_less_accurate_than_float32_pytorch(divergence, backend, dtype, V, monkeypatch, device):
    """On a GPU (the GPU check) this runs the compiled kernels: their exp and log on the hardware
    units are held to the same rule. ``torch-small``: the torch backend's path for small calls
    (one chunk by fused ops, ``SMALL_ELEMENTS``), made to take these rows."""
    if device.type == "cpu":
        monkeypatch.setattr(fastkd.backends.triton, "MAX_BLOCK_V", 32768)  # few interpreter steps
    if backend == "torch-small":
        monkeypatch.setattr(fastkd.backends.torch, "CHUNK_BYTES", 2**30)
        monkeypatch.setattr(fastkd.backends.torch, "SMALL_ELEMENTS", 2**30)
        backend = "torch"
    T = 1.5
    kw = dict(divergence=divergence, temperature=T, beta=0.3, skew=0.2)
    for case, (student, teacher) in _cases(V, dtype).items():
        student, teacher = student.to(device), teacher.to(device)
        truth, truth_grad = _rows_and_grads(reference.kd_loss, student.double(), teacher.double(), **kw)
        eager, eager_grad = _rows_and_grads(reference.kd_loss, student.float(), teacher.float(), **kw)
        rows, grad = _rows_and_grads(fastkd.kd_loss, student, teacher, backend=backend, **kw)
        largest_probability = max(float(torch.softmax(x.double() / T, -1).max()) for x in (student, teacher))
        _check(rows, truth, eager, T**2, torch.float32, f"{case} value")
        _check(grad, truth_grad, eager_grad, T * largest_probability, dtype, f"{case} gradient")


# Logits where a value formed as sum p (t - s) - (lse(s) - lse(t)) cancels two terms of size |z / T|
# A teacher or a student of scale 1e4, a teacher of scale 3 at T_t = 0.05; both of scale 1e4 (q and
# p one-hot: reverse_kl's gradient at the student's argmax is 0 up to the other columns' mass; the
# seed sweep of tests/test_divergences.py covers it), a teacher of scale 3 or 1e4 at T_t = 0.05, 50.
LARGE_LOGITS = {"teacher 1e4": (1.0, 1e4, {}), "student 1e4": (1e4, 1.0, {}),
                "teacher T_t 0.05": (1.0, 3.0, {"teacher_temperature": 0.05}), "both 1e4": (1e4, 1e4, {}),
                "teacher T_t 50": (1.0, 3.0, {"teacher_temperature": 50.0}),
                "teacher 1e4 T_t 0.05": (1.0, 1e4, {"teacher_temperature": 0.05}),
                "teacher 1e4 T_t 50": (1.0, 1e4, {"teacher_temperature": 50.0})}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kernel", ["torch", "two_pass", "resident"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_large_logits_no_less_accurate_than_float32_pytorch(divergence, kernel, dtype, monkeypatch, device):
    """Every kernel (two-pass with several blocks per row) at the logit scales of LARGE_LOGITS."""
    if kernel == "two_pass":
        monkeypatch.setattr(fastkd.backends.triton, "MAX_BLOCK_V", 16)
    if kernel == "resident":
        monkeypatch.setattr(fastkd.backends.triton, "RESIDENT_BLOCK", 64)  # one CTA holds the row
    monkeypatch.setattr(fastkd.config, "kd_kernel", "auto" if kernel == "torch" else kernel)
    backend = "torch" if kernel == "torch" else "triton"
    gen = torch.Generator().manual_seed(21)
    # The cases of one teacher temperature run as one call of 3 rows each (fewer interpreter launches).
    by_options = {}
    for case, (student_scale, teacher_scale, kw) in LARGE_LOGITS.items():
        student = torch.randn(3, 61, generator=gen, dtype=torch.float64) * student_scale
        teacher = torch.randn(3, 61, generator=gen, dtype=torch.float64) * teacher_scale
        by_options.setdefault(tuple(kw.items()), []).append((case, student, teacher))
    for options, cases in by_options.items():
        kw = dict(divergence=divergence, beta=0.3, skew=0.2, **dict(options))
        student = torch.cat([s for _, s, _ in cases]).to(dtype).to(device)
        teacher = torch.cat([t for _, _, t in cases]).to(dtype).to(device)
        truth, truth_grad = _rows_and_grads(reference.kd_loss, student.double(), teacher.double(), **kw)
        eager, eager_grad = _rows_and_grads(reference.kd_loss, student.float(), teacher.float(), **kw)
        rows, grad = _rows_and_grads(fastkd.kd_loss, student, teacher, backend=backend, **kw)
        for i, (case, _, _) in enumerate(cases):
            r = slice(3 * i, 3 * i + 3)
            _check(rows[r], truth[r], eager[r], truth[r].abs().max(), torch.float32, f"{case} value")
            # The gradient's scale: reverse_kl's q (ls - lt - D) reaches |lt| q, far above a probability.
            largest_probability = max(float(torch.softmax(x[r].double(), -1).max()) for x in (student, teacher))
            _check(grad[r], truth_grad[r], eager_grad[r], max(largest_probability, truth_grad[r].abs().max()), dtype,
                   f"{case} gradient")


# Logits offset far above their spread (z + 500, a model's logits need not be centred) and a student
# close to its teacher: a log-probability near 0 formed as z - lse(z) errs by eps |lse(z)| (~500),
# not eps |log-probability|, and so do the gradients built on it; every kernel forms (z - max) - log d
# (row_stats.log_prob). Softmax, the hard CE, a mixture of teachers and the top-k loss here; the
# vocabulary-parallel shards in tests/test_distributed.py.
def _offset_case(seed, rows=3, V=61, offset=500.0):
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(rows, V, generator=gen, dtype=torch.float64) * 30 + offset
    student = teacher + 0.01 * torch.randn(rows, V, generator=gen, dtype=torch.float64)
    return student, teacher, teacher.argmax(-1)


def _offset_checks(fn, fastkd_fn, student, others, scale_value, grad_scale, **kw):
    """Values and gradients of ``fastkd_fn`` against ``fn`` in float64 (truth) and float32 (eager),
    all on the same float32 inputs; ``grad_scale`` None: the truth's largest gradient element."""
    student, others = student.float(), [o.float() if o.is_floating_point() else o for o in others]
    results = {}
    for name, f, x in (("truth", fn, student.double()), ("eager", fn, student), ("fastkd", fastkd_fn, student)):
        x = x.clone().requires_grad_()
        out = f(x, *[o.to(x.dtype) if o.is_floating_point() else o for o in others], **kw)
        upstream = torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view(out.shape)
        (grad,) = torch.autograd.grad(out, x, upstream)
        results[name] = out.detach().double(), grad.double()
    (truth, truth_grad), (eager, eager_grad), (out, grad) = results["truth"], results["eager"], results["fastkd"]
    _check(out, truth, eager, scale_value, torch.float32, "value")
    grad_scale = truth_grad.abs().max() if grad_scale is None else grad_scale
    _check(grad, truth_grad, eager_grad, grad_scale, torch.float32, "gradient")


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_offset_logits_softmax(log, backend, device):
    student, _, _ = _offset_case(1)
    plain = torch.log_softmax if log else torch.softmax
    fn = (lambda x, T: plain(x / T, -1))
    mine = (lambda x, T: (fastkd.log_softmax if log else fastkd.softmax)(x, T, backend=backend))
    _offset_checks(fn, mine, student.to(device), (), 1.0, 2.0, T=0.5)


@pytest.mark.parametrize("kernel", ["torch", "two_pass", "resident"])
@pytest.mark.parametrize("teachers", [1, 2])
def test_offset_logits_hard_ce_and_mixture(teachers, kernel, monkeypatch, device):
    if kernel == "resident" and teachers > 1:
        pytest.skip("the resident kernel takes one teacher")
    if kernel == "resident":
        monkeypatch.setattr(fastkd.backends.triton, "RESIDENT_BLOCK", 64)  # one CTA holds the row
    monkeypatch.setattr(fastkd.config, "kd_kernel", "auto" if kernel == "torch" else kernel)
    backend = "torch" if kernel == "torch" else "triton"
    student, teacher, labels = (x.to(device) for x in _offset_case(2))
    others = [teacher] if teachers == 1 else [teacher, teacher.flip(-1)]
    kw = dict(labels=labels, hard_weight=0.5, reduction="none", temperature=1.0)

    def fn(x, *t, **kw):
        return reference.kd_loss(x, list(t), **kw)

    def mine(x, *t, **kw):
        return fastkd.kd_loss(x, list(t), backend=backend, **kw)

    _offset_checks(fn, mine, student, others, 1.0, 1.0, **kw)


@pytest.mark.parametrize("tail", ["bucket", "renormalize", "ignore"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_offset_logits_topk(tail, backend, device):
    student, teacher, labels = (x.to(device) for x in _offset_case(3))
    logprobs, indices = fastkd.teacher_topk(teacher, 8, backend="torch")
    kw = dict(tail=tail, labels=labels, hard_weight=0.3, reduction="none")

    def fn(x, lp, **kw):
        return reference.topk_kd_loss(x, lp, indices, **kw)

    def mine(x, lp, **kw):
        return fastkd.topk_kd_loss(x, lp.float(), indices, backend=backend, **kw)

    _offset_checks(fn, mine, student, [logprobs], 1.0, 1.0, **kw)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_offset_logits_uld_topk(backend, device):
    """The top-K ULD loss's gradient outside the student's top K, coef * q_j, at flat rows offset by
    500 (where those columns hold most of the mass): q_j = exp((s - m) - log d), not exp(s - lse)."""
    gen = torch.Generator().manual_seed(4)
    student = (torch.randn(4, 64, generator=gen, dtype=torch.float64) + 500).to(device)
    teacher = torch.randn(4, 40, generator=gen, dtype=torch.float64).to(device)

    def fn(x, t, **kw):
        return reference.uld_loss(x, t, **kw)

    def mine(x, t, **kw):
        return fastkd.uld_loss(x, t, backend=backend, **kw)

    _offset_checks(fn, mine, student, [teacher], 1.0, None, k=8, reduction="none")
