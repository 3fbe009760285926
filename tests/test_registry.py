"""The divergence registry (``fastkd.divergences``): every layer knows each of its entries.

Each layer is asked for every registered divergence: the options accept it (and check its
parameter), the reference, the torch backend and the Triton kernels (dense, top-k, vocabulary
parallel) compute it (a branch table missing it would compute another one: the values differ),
the bench and the audit have its cases, the tests' list and the README's table name it.
"""
import re
from pathlib import Path

import pytest
import torch

import fastkd
import helpers
from fastkd import reference
from fastkd.audit import cases as audit_cases
from fastkd.bench import cases as bench_cases
from fastkd.bench import providers
from fastkd.divergences import DIVERGENCES, REGISTRY, lookup
from fastkd.options import make_options

README = Path(__file__).resolve().parents[1] / "README.md"
PARAMETERS = dict(beta=0.3, skew=0.2)  # not the defaults: a parameter read from the wrong option shows


def _inputs(n=5, v=24, masked=True):
    g = torch.Generator().manual_seed(1)
    s = 2 * torch.randn(n, v, generator=g, dtype=torch.float64)
    t = 2 * torch.randn(n, v, generator=g, dtype=torch.float64)
    if masked:  # a masked column (which the eager idioms, F.kl_div, turn into NaN)
        s[0, 3] = t[0, 3] = float("-inf")
    return s, t


def _loss_and_grad(fn, s, *args, **kw):
    leaf = s.detach().requires_grad_()
    loss = fn(leaf, *args, **kw)
    loss.backward()
    return loss.detach(), leaf.grad


def test_the_registry_is_one_entry_per_name():
    assert DIVERGENCES == tuple(entry.name for entry in REGISTRY)
    assert len(set(DIVERGENCES)) == len(DIVERGENCES)
    assert all(lookup(entry.name) is entry for entry in REGISTRY)
    with pytest.raises(ValueError, match="unknown divergence 'kl2'; expected one of 'kl'"):
        lookup("kl2")


@pytest.mark.parametrize("name", DIVERGENCES)
def test_the_options_take_the_divergence_and_check_its_parameter(name):
    entry = lookup(name)
    opts = make_options(divergence=name, **PARAMETERS)
    assert opts.divergence_code == REGISTRY.index(entry)
    assert opts.cross_term_side == entry.cross_term
    mix, log_wp, log_wq = opts.mixture_weights
    if entry.mixture is None:
        assert (mix, log_wp, log_wq) == (0.0, 0.0, 0.0)
    else:
        a = PARAMETERS[entry.parameter.name]
        assert mix == a
        assert torch.tensor([log_wp, log_wq]).exp().sum().item() == pytest.approx(1.0)
    if entry.parameter is not None:
        with pytest.raises(ValueError, match=f"{entry.parameter.name} must be in"):
            make_options(divergence=name, **{**PARAMETERS, entry.parameter.name: 1.5})


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_each_backend_computes_the_registry_formula(name, backend):
    """Float64 inputs, so the kernels and the torch peers compute in float64: a tight tolerance."""
    s, t = _inputs()
    labels = torch.tensor([1, -100, 4, 0, 7])
    kw = dict(divergence=name, temperature=1.5, labels=labels, hard_weight=0.25, **PARAMETERS)
    expected = _loss_and_grad(reference.kd_loss, s, t, **kw)
    actual = _loss_and_grad(fastkd.kd_loss, s, t, backend=backend, **kw)
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_the_top_k_and_vocab_parallel_losses_compute_it(name, backend, one_rank_group):
    """The top-k loss's point derivatives (k = V with a bucket tail is the dense loss) and the
    vocabulary-parallel loss on one rank (its first-pass cross term or its third exchange)."""
    s, t = _inputs(v=12)
    kw = dict(divergence=name, temperature=1.5, **PARAMETERS)
    expected = _loss_and_grad(reference.kd_loss, s, t, **kw)
    topk = fastkd.teacher_topk(t, t.shape[-1], temperature=1.5, backend="torch")
    for loss in (fastkd.topk_kd_loss, fastkd.vocab_parallel_kd_loss):
        teacher = (topk,) if loss is fastkd.topk_kd_loss else (t,)
        actual = _loss_and_grad(loss, s, *teacher, backend=backend, **kw)
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12, msg=lambda m: f"{loss.__name__}: {m}")


@pytest.mark.parametrize("name", DIVERGENCES)
def test_the_bench_has_the_divergence(name):
    entry = lookup(name)
    assert name in {case.divergence for case in bench_cases.select_cases("cpu") if case.op == "kd_loss"}
    case = bench_cases.Case("kd_loss", name, "fp32", 4, 24, "fwd")
    if entry.eager is not None:
        assert providers.describe_eager(case) == entry.eager_formula
    s, t = _inputs(masked=False)
    expected = reference.kd_loss(s, t, divergence=name, temperature=bench_cases.TEMPERATURE, beta=bench_cases.BETA,
                                 skew=bench_cases.SKEW, t2_scale=providers.t2_scale(name))
    torch.testing.assert_close(providers.eager_forward(case)(s, t), expected)
    torch.testing.assert_close(providers.PROVIDERS["fastkd-torch"].make(case)(s, t), expected)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_the_audit_has_the_divergence_on_each_dense_kernel(name):
    cases = [c for c in audit_cases.CASES if c.step is audit_cases.kd_step and c.options["divergence"] == name]
    kernels = {c.kd_kernel for c in cases}
    assert {"two_pass", "resident"} <= kernels, kernels
    two_pass = [c for c in cases if c.kd_kernel == "two_pass" and "teachers" not in c.options]
    # two reads of both inputs with a first-pass cross term, three without (and the gradient's write)
    assert {c.budget for c in two_pass} == {(10, 0) if lookup(name).cross_term else (14, 0)}


def test_the_tests_list_is_the_registry():
    assert helpers.DIVERGENCES == DIVERGENCES


def test_the_readme_table_has_each_divergence_and_its_formula():
    """The table under "Math conventions": a row per divergence, in the registry's order."""
    text = README.read_text()
    table = text[text.index("\n| divergence | D |"):].split("\n\n")[0]
    rows = re.findall(r"^\| `(\w+)`[^|]*\| ([^|]+) \|", table, flags=re.M)
    assert rows == [(entry.name, entry.formula) for entry in REGISTRY]
