"""What LLM distillation asks for next: several teachers, separate temperatures, padded vocabularies.

- A mixture of teachers p = sum_i w_i softmax(t_i / T_t): every divergence, both backends, the
  fused linear path, against the float64 oracle; one teacher is today's loss bit for bit.
- teacher_temperature beside temperature (T**2 is the student's), on every path that takes raw
  teacher logits; a top-k teacher (fastkd.TopK) carries the temperature it was taken at and a mismatch
  is refused unless declared.
- Vocabularies that differ in padding: a clear error that says which view to pass, and that view
  gives the loss over the shared columns.
"""
import pytest
import torch

import fastkd
from fastkd import reference

from helpers import DIVERGENCES

BACKENDS = ("triton", "torch")


def _grad(fn, student, **kw):
    x = student.detach().clone().requires_grad_()
    loss = fn(x, **kw)
    (g,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), g


def _teachers(N, V, gen, dtypes=(torch.float64, torch.float64)):
    return [(torch.randn(N, V, generator=gen, dtype=torch.float64) * (2 + i)).to(d) for i, d in enumerate(dtypes)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_mixture_of_teachers_matches_the_oracle(divergence, backend):
    gen = torch.Generator().manual_seed(0)
    N, V = 5, 37
    student = torch.randn(N, V, generator=gen, dtype=torch.float64) * 2
    teachers = _teachers(N, V, gen, (torch.float64, torch.float64, torch.float64))
    teachers[1][0, 3:9] = float("-inf")  # a masked column block in one teacher only
    labels = torch.tensor([3, -100, 36, 0, 7])
    kw = dict(divergence=divergence, temperature=1.7, teacher_temperature=2.3, beta=0.3, skew=0.2, labels=labels,
              hard_weight=0.4, teacher_weights=[0.5, 0.0, 2.0], reduction="none")
    expected, expected_grad = _grad(lambda s, **k: reference.kd_loss(s, teachers, **k), student, **kw)
    loss, grad = _grad(lambda s, **k: fastkd.kd_loss(s, teachers, backend=backend, **k), student, **kw)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)
    assert loss[1] == 0 and (grad[1] == 0).all()


@pytest.mark.parametrize("divergence", ["kl", "jsd", "skew_reverse_kl"])
def test_gradcheck_mixture_through_triton(divergence):
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(3, 21, generator=gen, dtype=torch.float64, requires_grad=True)
    teachers = _teachers(3, 21, gen)
    fn = lambda s: fastkd.kd_loss(s, teachers, teacher_weights=[0.25, 0.75], divergence=divergence,  # noqa: E731
                                  temperature=1.5, teacher_temperature=0.8, backend="triton", reduction="sum")
    assert torch.autograd.gradcheck(fn, (student,), fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_teacher_is_todays_loss_exactly(backend):
    gen = torch.Generator().manual_seed(2)
    student = torch.randn(4, 30, generator=gen).bfloat16()
    (teacher,) = _teachers(4, 30, gen, (torch.float32,))
    for divergence in DIVERGENCES:
        kw = dict(divergence=divergence, temperature=2.0, backend=backend, reduction="none")
        plain, plain_grad = _grad(lambda s, **k: fastkd.kd_loss(s, teacher, **k), student, **kw)
        listed, listed_grad = _grad(lambda s, **k: fastkd.kd_loss(s, [teacher], teacher_weights=[3.0], **k),
                                    student, **kw)
        assert torch.equal(plain, listed) and torch.equal(plain_grad, listed_grad), divergence


@pytest.mark.parametrize("backend", BACKENDS)
def test_teachers_of_different_dtypes(backend):
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(4, 26, generator=gen, dtype=torch.float64).float()
    teachers = _teachers(4, 26, gen, (torch.bfloat16, torch.float16))
    kw = dict(divergence="reverse_kl", temperature=2.0, teacher_weights=[1, 3])
    expected, expected_grad = _grad(lambda s, **k: reference.kd_loss(s.double(), [t.double() for t in teachers], **k),
                                    student, **kw)
    loss, grad = _grad(lambda s, **k: fastkd.kd_loss(s, teachers, backend=backend, **k), student, **kw)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("teacher_weights,error,match", [
    ([1.0], ValueError, "1 weights for 2 teachers"),
    ([1.0, -0.5], ValueError, ">= 0"),
    ([0.0, 0.0], ValueError, "not all be 0"),
    ([1.0, float("nan")], ValueError, r"teacher_weights\[1\] must be finite"),
    ([1.0, "2"], TypeError, r"teacher_weights\[1\] must be a real number"),
    (torch.tensor([0.5, 0.5]), TypeError, "list or tuple of numbers"),
])
def test_bad_teacher_weights_are_clear_errors(teacher_weights, error, match):
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(error, match=match):
        fastkd.kd_loss(s, [t, t], teacher_weights=teacher_weights)
    with pytest.raises(error, match=match):
        reference.kd_loss(s, [t, t], teacher_weights=teacher_weights)


def test_other_bad_teacher_lists():
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(ValueError, match="empty list"):
        fastkd.kd_loss(s, [])
    with pytest.raises(ValueError, match=r"teacher_logits\[1\] requires grad"):
        fastkd.kd_loss(s, [t, t.clone().requires_grad_()])
    with pytest.raises(ValueError, match=r"teacher_logits\[1\] shape \(2, 6\)"):
        fastkd.kd_loss(s, [t, torch.randn(2, 6)])
    with pytest.raises(ValueError, match="up to 4 teachers"):
        fastkd.kd_loss(s, [t] * 5, backend="triton")
    loss = fastkd.kd_loss(s, [t] * 5, backend="torch")  # no limit there; five equal teachers are one
    torch.testing.assert_close(loss, fastkd.kd_loss(s, t, backend="torch"))
    with pytest.raises(TypeError, match="one teacher_shard"):
        fastkd.vocab_parallel_kd_loss(s, [t, t])


def test_module_takes_a_list_of_teachers():
    gen = torch.Generator().manual_seed(4)
    s = torch.randn(3, 9, generator=gen)
    teachers = _teachers(3, 9, gen, (torch.float32, torch.float32))
    loss_fn = fastkd.KDLoss(teacher_weights=[1, 2], temperature=2.0, teacher_temperature=1.0, backend="torch")
    torch.testing.assert_close(loss_fn(s, teachers), reference.kd_loss(s, teachers, teacher_weights=[1, 2],
                                                                        temperature=2.0, teacher_temperature=1.0))
    assert "teacher_weights=[1, 2]" in repr(loss_fn)


# ---------------------------------------------------------------- fused linear + KD loss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["linear", "logits"])
def test_fused_linear_with_several_teachers(backend, kind):
    gen = torch.Generator().manual_seed(5)
    N, H, V = 7, 6, 19
    h = torch.randn(N, H, generator=gen, dtype=torch.float64)
    w = torch.randn(V, H, generator=gen, dtype=torch.float64)
    hts = [torch.randn(N, H + i, generator=gen, dtype=torch.float64) for i in range(2)]
    wts = [torch.randn(V, H + i, generator=gen, dtype=torch.float64) for i in range(2)]
    bts = [None, torch.randn(V, generator=gen, dtype=torch.float64)]
    logits = [ht @ wt.T + (0 if bt is None else bt) for ht, wt, bt in zip(hts, wts, bts)]
    labels = torch.tensor([1, -100, 3, 4, 18, 0, 7])
    kw = dict(divergence="jsd", temperature=2.0, teacher_temperature=1.5, teacher_weights=[2, 1], labels=labels,
              hard_weight=0.3)
    teacher = dict(teacher_hidden=hts, teacher_weight=wts, teacher_bias=bts) if kind == "linear" else \
        dict(teacher_logits=logits)

    def fused(hidden, weight):
        return fastkd.fused_linear_kd_loss(hidden, weight, chunk_size=3, backend=backend, **teacher, **kw)

    def oracle(hidden, weight):
        return reference.kd_loss(hidden @ weight.T, logits, **kw)

    leaves = [x.clone().requires_grad_() for x in (h, w)]
    loss = fused(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    leaves = [x.clone().requires_grad_() for x in (h, w)]
    expected = oracle(*leaves)
    expected_grads = torch.autograd.grad(expected, leaves)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_fused_linear_teacher_lists_must_match():
    h, w = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="give one of each per teacher"):
        fastkd.fused_linear_kd_loss(h, w, [h, h], [w])


# ---------------------------------------------------------------- separate temperatures


def test_t2_factor_is_the_students_temperature():
    gen = torch.Generator().manual_seed(6)
    s, t = torch.randn(3, 11, generator=gen, dtype=torch.float64), torch.randn(3, 11, generator=gen, dtype=torch.float64)
    unscaled = fastkd.kd_loss(s, t, temperature=3.0, teacher_temperature=0.5, t2_scale=False, backend="torch")
    scaled = fastkd.kd_loss(s, t, temperature=3.0, teacher_temperature=0.5, backend="torch")
    torch.testing.assert_close(scaled, 9.0 * unscaled)
    direct = torch.nn.functional.kl_div((s / 3.0).log_softmax(-1), (t / 0.5).softmax(-1), reduction="batchmean")
    torch.testing.assert_close(unscaled, direct)



@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_parallel_takes_the_teachers_temperature(backend, one_rank_group):
    gen = torch.Generator().manual_seed(7)
    s, t = torch.randn(4, 13, generator=gen, dtype=torch.float64), torch.randn(4, 13, generator=gen, dtype=torch.float64)
    kw = dict(temperature=2.0, teacher_temperature=0.7, divergence="tvd")
    torch.testing.assert_close(fastkd.vocab_parallel_kd_loss(s, t, backend=backend, **kw),
                               reference.kd_loss(s, t, **kw), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_refuses_a_temperature_mismatch_unless_declared(backend, tmp_path):
    gen = torch.Generator().manual_seed(8)
    s, t = torch.randn(4, 20, generator=gen), torch.randn(4, 20, generator=gen)
    topk = fastkd.teacher_topk(t, 5, temperature=2.0)
    assert topk.temperature == 2.0
    with pytest.raises(ValueError, match=r"taken at temperature 2.0 .* pass teacher_temperature=2.0"):
        fastkd.topk_kd_loss(s, topk, temperature=1.0, backend=backend)
    with pytest.raises(ValueError, match="taken at temperature 2.0"):
        fastkd.topk_kd_loss(s, topk, temperature=1.0, teacher_temperature=3.0, backend=backend)
    declared = fastkd.topk_kd_loss(s, topk, temperature=1.0, teacher_temperature=2.0, backend=backend)
    torch.testing.assert_close(declared, reference.topk_kd_loss(s, topk, temperature=1.0, teacher_temperature=2.0))
    fastkd.topk_kd_loss(s, topk, temperature=2.0, backend=backend)  # the same temperature: no declaration needed
    lp, idx = topk
    fastkd.topk_kd_loss(s, lp, idx, temperature=1.0, backend=backend)  # plain tensors are taken as declared

    with fastkd.TeacherCache.writer(tmp_path, k=5, vocab_size=20, temperature=2.0) as writer:
        writer.append(topk)
    cache = fastkd.TeacherCache(tmp_path)
    with pytest.raises(ValueError, match="taken at temperature 2.0"):
        fastkd.TopKKDLoss(temperature=1.0, backend=backend)(s, cache[0:4])
    fastkd.TopKKDLoss(temperature=1.0, teacher_temperature=cache.temperature, backend=backend)(s, cache[0:4])
    assert cache.read(0, 2, device="cpu").temperature == 2.0 and cache[1].temperature == 2.0


# ---------------------------------------------------------------- padded vocabularies


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_vocabularies_say_which_view_to_pass(backend):
    gen = torch.Generator().manual_seed(9)
    student = torch.randn(3, 24, generator=gen, dtype=torch.float64)
    teacher = torch.randn(3, 29, generator=gen, dtype=torch.float64)  # the same tokenizer, padded to 29
    with pytest.raises(ValueError, match=r"pass teacher_logits\[\.\.\., :24\]: a view, read without a copy"):
        fastkd.kd_loss(student, teacher, backend=backend)
    with pytest.raises(ValueError, match=r"pass student_logits\[\.\.\., :24\]"):
        fastkd.kd_loss(teacher, student, backend=backend)
    shared = teacher[..., :24]
    assert shared.data_ptr() == teacher.data_ptr() and not shared.is_contiguous()
    loss = fastkd.kd_loss(student, shared, temperature=2.0, backend=backend)
    # Each side renormalised over the shared columns: the loss of the first 24 columns alone.
    torch.testing.assert_close(loss, reference.kd_loss(student, teacher[:, :24].clone(), temperature=2.0))
    w, wt = torch.randn(24, 4, generator=gen), torch.randn(29, 4, generator=gen)
    with pytest.raises(ValueError, match=r"pass teacher_weight\[:24\]"):
        fastkd.fused_linear_kd_loss(torch.randn(3, 4), w, torch.randn(3, 4), wt, backend=backend)
    with pytest.raises(ValueError, match=r"pass student_weight\[:24\] \(and its bias likewise\)"):
        fastkd.fused_linear_kd_loss(torch.randn(3, 4), wt, torch.randn(3, 4), w, backend=backend)
    # A student head wider than the teacher's logits: the view is of the weight's rows, not of H.
    with pytest.raises(ValueError, match=r"pass student_weight\[:24\] \(and its bias likewise\)"):
        fastkd.fused_linear_kd_loss(torch.randn(3, 4), wt, teacher_logits=student, backend=backend)
