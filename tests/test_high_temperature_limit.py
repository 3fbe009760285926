"""Hinton, Vinyals and Dean (2015), equation 4: at high temperature, distillation is logit matching.

With zero-mean logits z_s (student) and z_t (teacher) over V classes, the gradient of the T²-scaled
soft loss, T² KL(p_T || q_T), with respect to z_s is T (q − p), and expanding softmax(z / T) in 1 / T,
    softmax(z / T)_i = (1 + z_i / T + (z_i² − mean(z²)) / (2 T²) + O(T⁻³)) / V,
gives
    T (q − p) = (z_s − z_t) / V + c1 / T + O(T⁻²),   c1 = ((z_s² − mean(z_s²)) − (z_t² − mean(z_t²))) / (2 V):
the paper's limit (its N is the number of classes, V here) is reached at the rate 1 / T, and once its
first correction c1 / T is taken off, what remains shrinks like 1 / T². Both rates are checked on
both backends, by doubling T.
"""
import pytest
import torch

import fastkd

TEMPERATURES = (16.0, 32.0, 64.0, 128.0, 256.0)


def t2_gradient(student, teacher, temperature, backend):
    """T² times the gradient of KL(p_T || q_T) per row: the gradient of kd_loss with reduction="sum"."""
    student = student.clone().requires_grad_()
    fastkd.kd_loss(student, teacher, temperature=temperature, reduction="sum", backend=backend).backward()
    return student.grad


@pytest.mark.parametrize("backend", ("torch", "triton"))
@pytest.mark.parametrize("V", (10, 33))
def test_t2_gradient_tends_to_logit_matching(backend, V):
    student, teacher = torch.randn(2, 4, V, dtype=torch.float64).mul(2).unbind()
    student, teacher = student - student.mean(-1, keepdim=True), teacher - teacher.mean(-1, keepdim=True)
    limit = (student - teacher) / V
    c1 = ((student**2 - student.pow(2).mean(-1, keepdim=True)) - (teacher**2 - teacher.pow(2).mean(-1, keepdim=True))) / (2 * V)

    first, second = [], []   # the largest error against the limit, and against the limit + c1 / T
    for T in TEMPERATURES:
        gradient = t2_gradient(student, teacher, T, backend)
        first.append((gradient - limit).abs().max().item())
        second.append((gradient - limit - c1 / T).abs().max().item())

    for T, a, b, a2, b2 in zip(TEMPERATURES, first, second, first[1:], second[1:]):
        assert 1.8 < a / a2 < 2.2, (T, first)     # doubling T halves the error: 1 / T
        assert 3.5 < b / b2 < 4.5, (T, second)    # ... and quarters the remainder: 1 / T²
    assert first[-1] * TEMPERATURES[-1] == pytest.approx(c1.abs().max().item(), rel=0.05)
