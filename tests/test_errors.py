"""Bad input gets a clear ValueError / TypeError that names the argument (the contract's list, plus labels
out of range for the hard CE, tensors on different devices and 0-d tensors), from the functional
API, the module and the reference alike."""
import pytest
import torch

import fastkd
from fastkd import backends, reference

S, T = torch.randn(4, 10), torch.randn(4, 10)
LABELS = torch.tensor([1, 2, -100, 9])

# (keyword overrides or positional replacements, exception, message fragment)
KD_ERRORS = [
    (dict(teacher_logits=torch.randn(4, 11)), ValueError,
     r"student_logits shape \(4, 10\) and teacher_logits shape \(4, 11\)"),
    (dict(student_logits=torch.randn(2, 2, 10)), ValueError, "teacher_logits shape"),
    (dict(student_logits=torch.randint(0, 5, (4, 10))), TypeError, "student_logits must be float16"),
    (dict(teacher_logits=torch.randint(0, 5, (4, 10))), TypeError, "teacher_logits must be float16"),
    (dict(student_logits=S.tolist()), TypeError, "student_logits must be a torch.Tensor"),
    (dict(teacher_logits=None), TypeError, "teacher_logits must be a torch.Tensor"),
    (dict(student_logits=torch.tensor(1.0), teacher_logits=torch.tensor(1.0)), ValueError,
     "student_logits must have a vocabulary dimension, got a 0-d tensor"),
    (dict(teacher_logits=torch.tensor(1.0)), ValueError, "teacher_logits must have a vocabulary dimension"),
    (dict(student_logits=torch.randn(4, 0), teacher_logits=torch.randn(4, 0)), ValueError, r"V = 0"),
    (dict(teacher_logits=T.clone().requires_grad_(True)), ValueError, r"teacher_logits requires grad.*detach"),
    (dict(labels=torch.tensor([1, 2, 3])), ValueError, r"labels shape \(3,\) does not match"),
    (dict(labels=torch.tensor(1)), ValueError, r"labels shape \(\) does not match"),
    (dict(labels=LABELS.float()), TypeError, "labels must be int64"),
    (dict(labels=[1, 2, 3, 4]), TypeError, "labels must be a torch.Tensor or None"),
    (dict(labels=torch.tensor([1, 10, 0, 0]), hard_weight=1.0), ValueError, r"labels row 1 is 10, outside \[0, 10\)"),
    (dict(labels=torch.tensor([1, -1, 0, 0]), hard_weight=1.0), ValueError, "labels row 1 is -1"),
    (dict(hard_weight=0.5), ValueError, "hard_weight=0.5 needs labels"),
    (dict(hard_weight=-1.0, labels=LABELS), ValueError, "hard_weight and soft_weight must be >= 0"),
    (dict(soft_weight=-0.1), ValueError, "soft_weight must be >= 0"),
    (dict(soft_weight="1"), TypeError, "soft_weight must be a real number"),
    (dict(temperature=0.0), ValueError, "temperature must be > 0"),
    (dict(temperature=-2.0), ValueError, "temperature must be > 0"),
    (dict(temperature=float("inf")), ValueError, "temperature must be finite"),
    (dict(temperature=float("nan")), ValueError, "temperature must be finite"),
    (dict(temperature="2"), TypeError, "temperature must be a real number"),
    (dict(temperature=True), TypeError, "temperature must be a real number"),
    (dict(divergence="kld"), ValueError, "unknown divergence 'kld'"),
    (dict(reduction="avg"), ValueError, "unknown reduction 'avg'"),
    (dict(backend="cuda"), ValueError, "unknown backend 'cuda'"),
    (dict(divergence="jsd", beta=0.0), ValueError, "beta=0.0.*divergence='kl'"),
    (dict(divergence="jsd", beta=1.0), ValueError, "beta=1.0.*divergence='reverse_kl'"),
    (dict(divergence="jsd", beta=1.5), ValueError, r"beta must be in \(0, 1\)"),
    (dict(divergence="jsd", beta=float("nan")), ValueError, "beta must be finite"),
    (dict(divergence="skew_kl", skew=1.0), ValueError, r"skew must be in \[0, 1\)"),
    (dict(divergence="skew_reverse_kl", skew=-0.1), ValueError, r"skew must be in \[0, 1\)"),
    (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
    (dict(t2_scale=1), TypeError, "t2_scale must be a bool"),
    (dict(inplace="yes"), TypeError, "inplace must be a bool"),
    (dict(check_finite=None), TypeError, "check_finite must be a bool"),
]


def _call(fn, overrides):
    kw = dict(student_logits=S, teacher_logits=T)
    kw.update(overrides)
    s, t = kw.pop("student_logits"), kw.pop("teacher_logits")
    return fn(s, t, **kw)


@pytest.mark.parametrize("overrides,error,message", KD_ERRORS, ids=[m for _, _, m in KD_ERRORS])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_kd_loss_errors(overrides, error, message, backend):
    overrides = {"backend": backend, **overrides}
    with pytest.raises(error, match=message):
        _call(fastkd.kd_loss, overrides)


REFERENCE_ERRORS = [case for case in KD_ERRORS if not {"inplace", "backend"} & set(case[0])]  # ignored there


@pytest.mark.parametrize("overrides,error,message", REFERENCE_ERRORS, ids=[m for _, _, m in REFERENCE_ERRORS])
def test_reference_raises_the_same_errors(overrides, error, message):
    with pytest.raises(error, match=message):
        _call(reference.kd_loss, overrides)


MODULE_OPTION_ERRORS = [
    (dict(temperature=0), ValueError, "temperature"), (dict(divergence="x"), ValueError, "divergence"),
    (dict(reduction="x"), ValueError, "reduction"), (dict(backend="x"), ValueError, "backend"),
    (dict(divergence="jsd", beta=2.0), ValueError, "beta"), (dict(skew=1.0, divergence="skew_kl"), ValueError, "skew"),
    (dict(ignore_index="a"), TypeError, "ignore_index"), (dict(hard_weight=-1), ValueError, "hard_weight"),
]


@pytest.mark.parametrize("options,error,message", MODULE_OPTION_ERRORS)
def test_kdloss_module_checks_options_at_construction(options, error, message):
    with pytest.raises(error, match=message):
        fastkd.KDLoss(**options)


def test_kdloss_module_checks_tensors_at_call():
    with pytest.raises(ValueError, match="teacher_logits shape"):
        fastkd.KDLoss()(S, torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"labels row 0 is 99"):
        fastkd.KDLoss(hard_weight=1.0)(S, T, torch.tensor([99, 0, 0, 0]))


SOFTMAX_ERRORS = [
    (dict(x=[1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.arange(5)), TypeError, "x must be float16"),
    (dict(x=torch.tensor(2.0)), ValueError, "x must have a vocabulary dimension, got a 0-d tensor"),
    (dict(temperature=0), ValueError, "temperature must be > 0"),
    (dict(temperature=float("inf")), ValueError, "temperature must be finite"),
    (dict(temperature=None), TypeError, "temperature must be a real number"),
    (dict(dim=2), ValueError, r"dim=2 is not a dimension of a 2-d tensor"),
    (dict(dim=-3), ValueError, r"dim=-3"),
    (dict(dim=0.5), ValueError, r"dim=0.5"),
    (dict(backend="gpu"), ValueError, "unknown backend 'gpu'"),
]


@pytest.mark.parametrize("fn", [fastkd.softmax, fastkd.log_softmax, reference.softmax, reference.log_softmax])
@pytest.mark.parametrize("overrides,error,message", SOFTMAX_ERRORS, ids=[m for _, _, m in SOFTMAX_ERRORS])
def test_softmax_errors(fn, overrides, error, message):
    kw = dict(x=S, temperature=1.0, dim=-1, backend="torch")
    kw.update(overrides)
    if fn in (reference.softmax, reference.log_softmax) and "backend" in overrides:
        pytest.skip("the reference accepts and ignores backend")
    with pytest.raises(error, match=message):
        fn(kw.pop("x"), **kw)


def test_triton_backend_where_it_cannot_run(monkeypatch):
    monkeypatch.setattr(backends, "interpreter_enabled", lambda: False)
    with pytest.raises(RuntimeError, match="backend='triton' cannot run here"):
        fastkd.kd_loss(S, T, backend="triton")
    with pytest.raises(RuntimeError, match="backend='triton' cannot run here"):
        fastkd.softmax(S, backend="triton")


@pytest.mark.gpu
def test_tensors_on_different_devices():
    s, t = torch.randn(4, 10, device="cuda"), torch.randn(4, 10)
    with pytest.raises(ValueError, match="student_logits is on cuda:0 and teacher_logits on cpu"):
        fastkd.kd_loss(s, t)
    with pytest.raises(ValueError, match="labels is on cpu and student_logits on cuda:0"):
        fastkd.kd_loss(s, t.cuda(), labels=LABELS)
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices for the cuda:0 / cuda:1 case")
    with pytest.raises(ValueError, match="student_logits is on cuda:0 and teacher_logits on cuda:1"):
        fastkd.kd_loss(s, t.to("cuda:1"))


def _overlapping_students():
    base = torch.randn(1, 50)
    return {"expand": base.expand(4, 50),                                  # every row one row
            "as_strided": torch.randn(60).as_strided((4, 50), (3, 1)),     # rows that share columns
            "expand 3-d": torch.randn(2, 1, 50).expand(2, 3, 50)}


INPLACE_CALLS = {
    "kd_loss": lambda s, backend: fastkd.kd_loss(s, torch.randn(s.shape), inplace=True, backend=backend),
    "KDLoss": lambda s, backend: fastkd.KDLoss(inplace=True, backend=backend)(s, torch.randn(s.shape)),
    "topk_kd_loss": lambda s, backend: fastkd.topk_kd_loss(s, *fastkd.teacher_topk(torch.randn(s.shape), 4),
                                                           inplace=True, backend=backend),
    "TopKKDLoss": lambda s, backend: fastkd.TopKKDLoss(inplace=True, backend=backend)(
        s, *fastkd.teacher_topk(torch.randn(s.shape), 4)),
    "vocab_parallel_kd_loss": lambda s, backend: fastkd.vocab_parallel_kd_loss(
        s, torch.randn(s.shape), inplace=True, backend=backend),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("entry", list(INPLACE_CALLS))
@pytest.mark.parametrize("view", list(_overlapping_students()))
def test_inplace_on_an_overlapping_student_is_refused(entry, view, backend):
    student = _overlapping_students()[view].requires_grad_(False)
    name = "student_shard" if entry == "vocab_parallel_kd_loss" else "student_logits"
    with pytest.raises(ValueError, match=rf"inplace=True needs {name} whose elements do not overlap"):
        INPLACE_CALLS[entry](student, backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("entry", list(INPLACE_CALLS))
def test_inplace_on_an_empty_student(entry, backend, request):
    """No rows, no two elements to overlap, whatever the strides (an expand of an empty tensor has a
    0 stride): inplace=True is taken, and the loss of no rows is 0."""
    if entry == "vocab_parallel_kd_loss":
        request.getfixturevalue("one_rank_group")
    student = torch.randn(1, 0, 8).expand(2, 0, 8)
    assert student.stride()[0] == 0
    assert INPLACE_CALLS[entry](student, backend).item() == 0


NON_OVERLAPPING = {"row-strided": lambda base: base[:, :10], "every other column": lambda base: base[:, ::2],
                   "transposed": lambda base: base[:, :4].t(), "a new size-1 dim": lambda base: base[0].expand(1, 20)}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("view", list(NON_OVERLAPPING))
def test_inplace_on_views_that_do_not_overlap(view, backend):
    """Views whose elements are distinct take ``inplace=True``: the loss and gradient of eager PyTorch."""
    base = torch.randn(10, 20, dtype=torch.float64, requires_grad=True)
    base_copy = base.detach().clone().requires_grad_(True)
    teacher = torch.randn(NON_OVERLAPPING[view](base).shape, dtype=torch.float64)
    expected = reference.kd_loss(NON_OVERLAPPING[view](base_copy * 1), teacher, temperature=2.0)
    expected.backward()
    loss = fastkd.kd_loss(NON_OVERLAPPING[view](base * 1), teacher, temperature=2.0, inplace=True, backend=backend)
    loss.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(base.grad, base_copy.grad)


def _fused_linear(reduction):
    def call(h, backend):
        w = torch.randn(10, h.shape[-1], dtype=h.dtype)
        return fastkd.fused_linear_kd_loss(h, w, teacher_logits=torch.randn(h.shape[0], 10, dtype=h.dtype),
                                           reduction=reduction, backend=backend).sum()
    return call


ONCE_DIFFERENTIABLE = {
    "kd_loss": lambda s, backend: fastkd.kd_loss(s, torch.randn(s.shape, dtype=s.dtype), backend=backend),
    "kd_loss none": lambda s, backend: fastkd.kd_loss(s, torch.randn(s.shape, dtype=s.dtype), reduction="none",
                                                      backend=backend).sum(),
    "topk_kd_loss": lambda s, backend: fastkd.topk_kd_loss(s, *fastkd.teacher_topk(torch.randn(s.shape), 3),
                                                           backend=backend),
    "fused_linear_kd_loss": _fused_linear("batchmean"),
    "fused_linear_kd_loss none": _fused_linear("none"),
    "softmax (triton)": lambda s, backend: (fastkd.softmax(s, 2.0, backend="triton") ** 2).sum(),
    "log_softmax (triton)": lambda s, backend: (fastkd.log_softmax(s, 2.0, backend="triton") ** 2).sum(),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("entry", list(ONCE_DIFFERENTIABLE))
def test_double_backward_raises_at_the_call(entry, backend):
    x = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    loss = ONCE_DIFFERENTIABLE[entry](x, backend)
    with pytest.raises(RuntimeError, match="differentiable once.*create_graph=True"):
        torch.autograd.grad(loss, x, create_graph=True)
    # Once differentiable is still differentiable: the same graph, without create_graph.
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.shape == x.shape and torch.isfinite(grad).all()


def test_every_function_backward_is_once_differentiable():
    """vocab_parallel_kd_loss's Function included (its call needs a process group)."""
    functions = [f for f in vars(fastkd.autograd).values()
                 if isinstance(f, type) and issubclass(f, torch.autograd.Function) and f is not torch.autograd.Function]
    assert fastkd.autograd.VocabParallelKDLossFunction in functions
    for function in functions:
        assert function.backward.__code__ is fastkd.autograd.once_differentiable(lambda: None).__code__, function


def test_cached_options_still_check_types():
    """kd_loss checks its options once per distinct set (a cache keyed by value and type): after a
    call with t2_scale=True, t2_scale=1 (equal, and of the same hash) still raises, and an
    unhashable option gets make_options' own error."""
    fastkd.kd_loss(S, T, t2_scale=True)
    with pytest.raises(TypeError, match="t2_scale must be a bool"):
        fastkd.kd_loss(S, T, t2_scale=1)
    with pytest.raises(TypeError, match="beta must be a real number"):
        fastkd.kd_loss(S, T, beta=[0.5])
