"""The ``uld`` cases of ``fastkd bench`` (preset ``uld``): every exact provider computes the same
loss and gradient as TRL's GOLD, the top-K provider errs against them by no more than its bound,
the in-place provider restores the logits it overwrites, and a tiny run reports the top-K error."""
import csv

import pytest
import torch

import fastkd
from fastkd.bench.cases import TEMPERATURE, Case, select_cases
from fastkd.bench.providers import PROVIDERS
from fastkd.bench.runner import make_inputs
from fastkd.cli import main as cli_main


def _value_and_grad(provider, case, inputs):
    s, t = inputs.args
    student = s.detach().clone().requires_grad_()
    loss = PROVIDERS[provider].make(case)(student, t)
    (grad,) = torch.autograd.grad(loss, student)
    return loss.reshape(()), grad.clone()


def test_the_preset_runs_exact_and_topk_at_two_vocabularies_outside_the_default_run():
    cases = select_cases("uld")
    assert {(c.op, c.v, c.k) for c in cases} == {("uld", 32000, 0), ("uld", 151936, 0), ("uld_topk", 32000, 64),
                                                 ("uld_topk", 151936, 64)}
    assert not [c for c in select_cases("cpu") if c.op.startswith("uld")]


def test_exact_providers_agree_with_gold_and_topk_stays_within_its_bound():
    pytest.importorskip("trl.experimental.gold.gold_trainer")
    exact, topk = Case("uld", "", "fp32", 6, 50, "fwd+bwd"), Case("uld_topk", "", "fp32", 6, 50, "fwd+bwd", k=5)
    inputs = make_inputs(exact, "cpu")
    gold, gold_grad = _value_and_grad("trl", exact, inputs)
    for name in ("torch-eager", "fastkd-torch", "fastkd-inplace"):
        loss, grad = _value_and_grad(name, exact, inputs)
        torch.testing.assert_close(loss, gold, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grad, gold_grad, rtol=1e-4, atol=1e-7)
    s, t = inputs.args
    approx, _ = _value_and_grad("fastkd-torch", topk, inputs)
    bound = fastkd.uld_loss(s.detach(), t, k=5, temperature=TEMPERATURE, return_bound=True)[1]
    assert 0 < (gold - approx).abs() <= bound + 1e-6


def test_inplace_provider_restores_the_logits_before_each_call():
    case = Case("uld_topk", "", "fp32", 4, 30, "fwd+bwd", k=3)
    s, t = make_inputs(case, "cpu").args
    want = fastkd.uld_loss(s.detach().clone(), t, k=3, temperature=TEMPERATURE)
    forward = PROVIDERS["fastkd-inplace"].make(case)
    for _ in range(2):
        loss = forward(s, t)
        torch.testing.assert_close(loss, want, rtol=0, atol=0)  # on the restored logits
        (grad,) = torch.autograd.grad(loss, s)
        assert grad.data_ptr() == s.data_ptr()  # the gradient took the logits' place


def test_a_tiny_run_reports_the_topk_error_beside_the_time(tmp_path):
    status = cli_main(["bench", "--preset", "uld", "--n", "8", "--v", "100", "--k", "4", "--quick", "--no-plots",
                       "--providers", "torch-eager", "fastkd-torch", "--out", str(tmp_path)])
    assert status == 0
    (csv_path,) = tmp_path.glob("*.csv")
    with open(csv_path) as f:
        rows = [r for r in csv.DictReader(f) if r["op"] == "uld_topk" and r["provider"] == "fastkd-torch"]
    assert len(rows) == 1 and float(rows[0]["diff_vs_eager"]) > 0
    (table,) = tmp_path.glob("*uld-custom.md")
    assert "top-K error vs exact" in table.read_text()
