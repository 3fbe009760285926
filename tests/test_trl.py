"""fastkd.integrations.trl.generalized_jsd_loss against TRL's GKDTrainer.generalized_jsd_loss.

Checked twice: against a transcription of TRL's definition written out below (so CI checks the
semantics without trl installed), and against TRL's own staticmethod when trl is importable.
"""
import functools
import importlib
import math
import os

import pytest
import torch

from fastkd.integrations.trl import generalized_jsd_loss
from helpers import logits

B, S, V = 2, 5, 33
BETAS = (0.0, 0.3, 0.5, 1.0)
REDUCTIONS = ("batchmean", "sum", "mean", "none")


def transcribed_generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                                     reduction="batchmean", num_items_in_batch=None):
    """TRL's definition, term by term: q = softmax(s / T), p = softmax(t / T); per element
    beta = 0: p log(p / q); beta = 1: q log(q / p); otherwise, with m = beta p + (1 - beta) q,
    beta p log(p / m) + (1 - beta) q log(q / m); no T**2. Ignored tokens (label -100) are dropped;
    sum / num_items_in_batch when given, else "batchmean": sum / kept tokens (at least 1), or
    sum / size(0) without labels; "sum"; "mean": mean over the kept elements; else the elements."""
    log_q = torch.log_softmax(student_logits.double() / temperature, -1)
    log_p = torch.log_softmax(teacher_logits.double() / temperature, -1)
    q, p = log_q.exp(), log_p.exp()
    if beta == 0:
        terms = p * (log_p - log_q)
    elif beta == 1:
        terms = q * (log_q - log_p)
    else:
        log_m = torch.log(beta * p + (1 - beta) * q)
        terms = beta * p * (log_p - log_m) + (1 - beta) * q * (log_q - log_m)
    if labels is not None:
        mask = labels != -100
        terms = terms[mask]
    if num_items_in_batch is not None:
        return terms.sum() / num_items_in_batch
    if reduction == "batchmean":
        return terms.sum() / (mask.sum().clamp_min(1) if labels is not None else max(terms.size(0), 1))
    if reduction == "sum":
        return terms.sum()
    if reduction == "mean":
        return terms.mean()
    return terms


def _inputs(dtype=torch.float32):
    s, t = logits(B, S, V, dtype=dtype), logits(B, S, V, dtype=dtype)
    labels = torch.randint(0, V, (B, S))
    labels[0, :2] = labels[1, 4] = -100
    return s, t, labels


def _value_and_grad(fn, s, t, **kw):
    s = s.detach().clone().requires_grad_(True)
    loss = fn(s, t, **kw)
    weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).view(loss.shape)  # upstream != 1
    (grad,) = torch.autograd.grad((loss * weights).sum(), s)
    return loss.detach(), grad


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_labels", [True, False])
def test_matches_the_transcribed_definition(beta, reduction, with_labels):
    s, t, labels = _inputs()
    kw = dict(labels=labels if with_labels else None, beta=beta, temperature=2.0, reduction=reduction)
    ours, ours_grad = _value_and_grad(generalized_jsd_loss, s, t, **kw)
    ref, ref_grad = _value_and_grad(transcribed_generalized_jsd_loss, s, t, **kw)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    torch.testing.assert_close(ours, ref.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_grad, ref_grad.float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("num_items", [7, torch.tensor(7)])
def test_num_items_in_batch_overrides_the_reduction(num_items):
    s, t, labels = _inputs()
    for reduction in ("batchmean", "none"):
        kw = dict(labels=labels, beta=0.5, reduction=reduction, num_items_in_batch=num_items)
        torch.testing.assert_close(generalized_jsd_loss(s, t, **kw),
                                   transcribed_generalized_jsd_loss(s, t, **kw).float())


def test_bf16_logits_give_a_bf16_loss_close_to_float64():
    s, t, labels = _inputs(torch.bfloat16)
    loss = generalized_jsd_loss(s, t, labels=labels, beta=0.3)
    assert loss.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), transcribed_generalized_jsd_loss(s, t, labels=labels, beta=0.3),
                               rtol=1e-2, atol=1e-3)


def _trl_generalized_jsd_loss():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # GKDTrainer lives in trl.experimental
    for module in ("trl.experimental.gkd", "trl"):
        try:
            return importlib.import_module(module).GKDTrainer.generalized_jsd_loss
        except (ImportError, AttributeError):
            continue
    pytest.skip("trl is not installed (pip install trl): TRL's own GKDTrainer.generalized_jsd_loss is "
                "unavailable; the transcription tests above still check the semantics")


@pytest.mark.parametrize("beta", BETAS)
def test_matches_trl(beta):
    trl_loss = _trl_generalized_jsd_loss()
    s, t, labels = _inputs()
    for reduction in REDUCTIONS:
        for kw in (dict(labels=labels), dict(labels=None), dict(labels=labels, num_items_in_batch=torch.tensor(9))):
            kw.update(beta=beta, temperature=1.5, reduction=reduction)
            ours, ours_grad = _value_and_grad(generalized_jsd_loss, s, t, **kw)
            theirs, theirs_grad = _value_and_grad(trl_loss, s, t, **kw)
            assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-4, atol=1e-6)


# --- trl.DistillationTrainer's chunked divergence -------------------------------------------------

from fastkd import reference  # noqa: E402
from fastkd.integrations.trl import (chunked_divergence_loss, fused_divergence_loss,  # noqa: E402
                                     server_forward_kl_loss, server_top_1_loss)
from helpers import assert_close_to_oracle  # noqa: E402

H, HT = 16, 12
GRADS = ("student_hidden_states", "student_lm_head_weight", "student_lm_head_bias")


def _trl(module, name):
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    pytest.importorskip("trl", reason="trl is not installed (pip install trl)")
    return getattr(importlib.import_module(module), name)


def _chunked_inputs(dtype=torch.float32, near=None, views=False, teacher_dtype=None, vocab=V):
    """Student and teacher hidden states [B, S, H] / [B, S, HT], heads [vocab, H] / [vocab, HT] and
    biases, a completion mask with masked positions; ``near``: the teacher is the student plus that
    much noise (HT = H); ``views``: every tensor a non-contiguous view; ``teacher_dtype``: the
    teacher's (default ``dtype``)."""
    f = lambda *shape, scale=1.0: (torch.randn(*shape, dtype=torch.float64) * scale)  # noqa: E731
    ht = H if near is not None else HT
    x = dict(student_hidden_states=f(B, S, H), teacher_hidden_states=f(B, S, ht),
             student_lm_head_weight=f(vocab, H, scale=3 / H**0.5),
             teacher_lm_head_weight=f(vocab, ht, scale=3 / ht**0.5),
             student_lm_head_bias=f(vocab, scale=0.5), teacher_lm_head_bias=f(vocab, scale=0.5))
    if near is not None:
        for part in ("hidden_states", "lm_head_weight", "lm_head_bias"):
            x["teacher_" + part] = x["student_" + part] + near * f(*x["student_" + part].shape)
    x = {k: v.to(teacher_dtype or dtype if k.startswith("teacher") else dtype) for k, v in x.items()}
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, 3:] = mask[1, 0] = 0
    x["completion_mask"] = mask
    if views:  # each tensor the even columns of one twice as wide
        x = {k: torch.stack([v, v], -1).flatten(-2)[..., ::2] for k, v in x.items()}
        assert not any(v.is_contiguous() for v in x.values())
    return x


def _loss_and_grads(fn, x, **kw):
    x = {k: v.detach().clone().requires_grad_(k in GRADS) for k, v in x.items()}
    loss, entropy, count = fn(**x, **kw)
    grads = torch.autograd.grad(loss * 1.5, [x[k] for k in GRADS])  # an upstream gradient other than 1
    return (loss.detach(), entropy, count), grads


TRANSFORMS = (dict(), dict(student_final_logit_softcapping=4.0, teacher_logit_scale=0.7, temperature=2.0),
              dict(student_logit_scale=1.3, teacher_final_logit_softcapping=3.0, temperature=0.5))


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("transform", range(len(TRANSFORMS)))
@pytest.mark.parametrize("num_items", [None, 11, torch.tensor(11)])
def test_chunked_divergence_loss_equals_trls(beta, transform, num_items):
    trl_loss = _trl("trl.trainer.distillation_trainer", "_chunked_divergence_loss")
    x = _chunked_inputs(views=transform == 1)
    kw = dict(beta=beta, num_items_in_batch=num_items, **TRANSFORMS[transform])
    (loss, entropy, count), grads = _loss_and_grads(chunked_divergence_loss, x, **kw)
    (t_loss, t_entropy, t_count), t_grads = _loss_and_grads(trl_loss, x, **kw)
    assert loss.dtype == t_loss.dtype and not entropy.requires_grad and count.equal(t_count)
    torch.testing.assert_close(loss, t_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(entropy, t_entropy, rtol=1e-5, atol=1e-5)
    for g, t_g in zip(grads, t_grads):  # float32 roundings, relative to the gradient's scale
        torch.testing.assert_close(g, t_g, rtol=1e-4, atol=1e-5 * t_g.abs().max().item())


def test_chunked_divergence_loss_without_biases_and_with_no_valid_position():
    trl_loss = _trl("trl.trainer.distillation_trainer", "_chunked_divergence_loss")
    x = _chunked_inputs()
    x["student_lm_head_bias"] = x["teacher_lm_head_bias"] = None
    ours, theirs = chunked_divergence_loss(**x, beta=0.5), trl_loss(**x, beta=0.5)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    x["completion_mask"] = torch.zeros_like(x["completion_mask"])
    h = x["student_hidden_states"].requires_grad_()
    loss, entropy, count = chunked_divergence_loss(**x, beta=0.5)
    (grad,) = torch.autograd.grad(loss, h)
    assert loss.item() == entropy.item() == count.item() == 0 and not grad.any()


def test_chunked_divergence_loss_names_bad_arguments():
    x = _chunked_inputs()
    with pytest.raises(ValueError, match="beta"):
        chunked_divergence_loss(**x, beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        chunked_divergence_loss(**x, beta=0.5, temperature=0.0)
    with pytest.raises(ValueError, match="teacher_weight"):
        chunked_divergence_loss(**dict(x, teacher_lm_head_weight=x["teacher_lm_head_weight"][:-1]), beta=0.5)
    with pytest.raises(ValueError, match="softcap"):
        chunked_divergence_loss(**x, beta=0.5, student_final_logit_softcapping=-1.0)


def _oracle(x, beta, temperature=1.0, cast=torch.float64):
    """The divergence (TRL's beta convention) and entropy in plain autograd through
    ``fastkd.reference``, in ``cast`` (float64: the oracle; float32: plain PyTorch's own error)."""
    x = {k: v.detach().to(cast if v.is_floating_point() else v.dtype).requires_grad_(k in GRADS)
         for k, v in x.items()}
    valid = x["completion_mask"] != 0
    z_s = x["student_hidden_states"] @ x["student_lm_head_weight"].T + x["student_lm_head_bias"]
    z_t = x["teacher_hidden_states"] @ x["teacher_lm_head_weight"].T + x["teacher_lm_head_bias"]
    divergence = dict(divergence="kl") if beta == 0 else dict(divergence="reverse_kl") if beta == 1 else \
        dict(divergence="jsd", beta=beta)
    loss = reference.kd_loss(z_s[valid], z_t[valid], temperature=temperature, t2_scale=False, **divergence)
    q = torch.softmax(z_s[valid] / temperature, -1)
    entropy = -(q * q.log()).sum()
    return (loss.detach(), entropy.detach()), torch.autograd.grad(loss * 1.5, [x[k] for k in GRADS])


@pytest.mark.parametrize("dtype,near,teacher_dtype", [
    (torch.float32, None, None), (torch.bfloat16, None, None), (torch.bfloat16, 0.01, None),
    (torch.float32, 0.01, None), (torch.bfloat16, None, torch.float32)])
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_chunked_divergence_loss_is_as_accurate_as_pytorch_and_trl(dtype, near, teacher_dtype, beta):
    trl_loss = _trl("trl.trainer.distillation_trainer", "_chunked_divergence_loss")
    x = _chunked_inputs(dtype, near=near, teacher_dtype=teacher_dtype)
    (loss, entropy, _), grads = _loss_and_grads(chunked_divergence_loss, x, beta=beta, temperature=1.5)
    (t_loss, _, _), t_grads = _loss_and_grads(trl_loss, x, beta=beta, temperature=1.5)
    (loss64, entropy64), grads64 = _oracle(x, beta, 1.5)
    (loss32, entropy32), grads32 = _oracle(x, beta, 1.5, cast=torch.float32)
    n = B * S * V
    assert_close_to_oracle(loss, loss64, loss32, dtype=dtype, grows_with=n)
    assert_close_to_oracle(loss, loss64, t_loss, dtype=dtype, grows_with=n)
    assert_close_to_oracle(entropy, entropy64, entropy32, dtype=dtype, grows_with=n)
    for g, t_g, g64, g32 in zip(grads, t_grads, grads64, grads32):
        assert g.dtype == dtype
        assert_close_to_oracle(g, g64, g32, dtype=dtype, grows_with=n)
        # At least as accurate as TRL's (with the same per-dtype slack).
        assert_close_to_oracle(g, g64, t_g, dtype=dtype, grows_with=n)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_jsd_near_convergence_is_more_accurate_than_trls(backend, monkeypatch):
    """A float32 student at its teacher (the teacher's hidden states, head and bias the student's
    plus 1e-3 noise), where the JSD is ~3e-6 a token: on the torch backend the loss value errs
    against float64 at least ten times less than TRL's (jsd's log-ratios from ls - lt; from log M,
    fastkd erred as much as TRL and float32 PyTorch); the Triton kernels, from log M, no more than
    TRL's; the gradients no more than TRL's or float32 PyTorch's."""
    import fastkd.integrations.trl_losses as trl_losses

    trl_loss = _trl("trl.trainer.distillation_trainer", "_chunked_divergence_loss")
    monkeypatch.setattr(trl_losses, "fused_linear_kd_loss",
                        functools.partial(trl_losses.fused_linear_kd_loss, backend=backend))
    vocab = 1000
    x = _chunked_inputs(near=1e-3, vocab=vocab)
    (loss, _, _), grads = _loss_and_grads(chunked_divergence_loss, x, beta=0.5)
    (t_loss, _, _), t_grads = _loss_and_grads(trl_loss, x, beta=0.5)
    (loss64, _), grads64 = _oracle(x, 0.5)
    (loss32, _), grads32 = _oracle(x, 0.5, cast=torch.float32)
    assert 0 < loss64 < 1e-5
    err, t_err, eager_err = ((v.double() - loss64).abs().item() for v in (loss, t_loss, loss32))
    if backend == "torch":
        assert err <= t_err / 10 and err <= eager_err, (err, t_err, eager_err)
    else:  # the kernels take jsd against log M, as TRL and float32 PyTorch do (kernels/divergences.py)
        assert err <= t_err, (err, t_err, eager_err)
    n = B * S * vocab
    for g, t_g, g64, g32 in zip(grads, t_grads, grads64, grads32):
        assert_close_to_oracle(g, g64, t_g, dtype=torch.float32, grows_with=n)
        assert_close_to_oracle(g, g64, g32, dtype=torch.float32, grows_with=n)


def test_fused_divergence_loss_mixes_teachers_with_fastkd_options():
    x = _chunked_inputs()
    y = _chunked_inputs()
    teachers = [(d["teacher_hidden_states"], d["teacher_lm_head_weight"], d["teacher_lm_head_bias"]) for d in (x, y)]
    ids = torch.randint(0, V, (B, S))
    kw = dict(divergence="skew_kl", skew=0.2, temperature=2.0, teacher_temperature=1.5, hard_weight=0.3,
              teacher_weights=[0.7, 0.3])
    loss, entropy, count = fused_divergence_loss(x["student_hidden_states"], x["student_lm_head_weight"], teachers,
                                                 x["completion_mask"], student_lm_head_bias=x["student_lm_head_bias"],
                                                 completion_ids=ids, **kw)
    valid = x["completion_mask"] != 0
    z_s = x["student_hidden_states"] @ x["student_lm_head_weight"].T + x["student_lm_head_bias"]
    z_ts = [(h @ w.T + b)[valid] for h, w, b in teachers]
    expected = reference.kd_loss(z_s[valid].double(), [z.double() for z in z_ts], labels=ids[valid], t2_scale=False,
                                 **kw)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert count == valid.sum()


# --- trl.experimental.server_distillation's sparse losses ------------------------------------------

K = 4


def _server_inputs():
    """Student logits [B, S, V]; the teacher's sorted top-K log-probs and ids; labels with -100
    rows, where the teacher's log-probs are -inf (past its window), as the server returns them."""
    s = logits(B, S, V)
    teacher = torch.log_softmax(logits(B, S, V), -1)
    lps, ids = teacher.topk(K, -1)
    labels = torch.randint(0, V, (B, S))
    labels[0, -2:] = -100
    lps[0, -2:] = float("-inf")
    return s, lps, ids, labels, teacher


def _server_trainer(beta, add_tail):
    trainer = _trl("trl.experimental.server_distillation", "ServerDistillationTrainer")
    import types
    return trainer, types.SimpleNamespace(beta=beta, loss_add_tail=add_tail,
                                          _reduce_divergence_loss=trainer._reduce_divergence_loss)


def _grad_of(fn, s):
    s = s.detach().clone().requires_grad_()
    loss = fn(s)
    return loss.detach(), torch.autograd.grad(loss * 1.5, s)[0]


@pytest.mark.parametrize("add_tail", [True, False])
def test_server_forward_kl_loss_equals_trls(add_tail):
    trainer, self = _server_trainer(0.0, add_tail)
    s, lps, ids, labels, _ = _server_inputs()
    T = 1.5
    result = dict(topk_logprobs=lps, topk_token_ids=ids)
    ours = _grad_of(lambda z: server_forward_kl_loss(z, lps, ids, labels, temperature=T, add_tail=add_tail), s)
    theirs = _grad_of(lambda z: trainer._compute_server_forward_kl_loss(
        self, result, torch.log_softmax(z / T, -1), labels), s)
    assert torch.isfinite(ours[0])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("beta", [0.5, 1.0])
@pytest.mark.parametrize("add_tail", [True, False])
def test_server_top_1_loss_equals_trls(beta, add_tail):
    trainer, self = _server_trainer(beta, add_tail)
    s, lps, ids, labels, teacher = _server_inputs()
    top1_ids, top1_lps = ids[..., 0], lps[..., 0].masked_fill(labels == -100, 0.0)
    reverse_ids = torch.where(torch.arange(S) % 2 == 0, top1_ids, torch.randint(0, V, (B, S)))  # some the same
    reverse_lps = teacher.gather(-1, reverse_ids.unsqueeze(-1)).squeeze(-1)
    args = (top1_ids, top1_lps, reverse_ids, reverse_lps, labels)
    T = 1.5
    ours = _grad_of(lambda z: server_top_1_loss(z, *args, beta=beta, temperature=T, add_tail=add_tail), s)
    theirs = _grad_of(lambda z: trainer._compute_sparse_top_1_divergence_loss(
        self, torch.log_softmax(z / T, -1), *args), s)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bench_report_gives_fastkd_against_trl():
    """The bench's table and summary give each fastkd row's speed-up against TRL's row of its case
    (TRL's time / fastkd's, median and range over the rounds) and its memory as a multiple of TRL's."""
    from fastkd.bench.report import summary_markdown, table_rows

    def row(provider, rounds, peak_mib):
        return dict(op="fused_linear_kd", divergence="jsd", dtype="fp32", mode="fwd+bwd", n=2048, v=32000, k="",
                    h=1024, provider=provider, ms_p50=sorted(rounds)[1], ms_p20=min(rounds), ms_p80=max(rounds),
                    round_ms=" ".join(map(str, rounds)), speedup_p50=math.nan, speedup_min=math.nan,
                    speedup_max=math.nan, gbps=math.nan, frac_of_copy_bw=math.nan, tflops=1.0,
                    peak_mem_bytes=peak_mib * 2**20, diff_vs_eager=math.nan, note="", check="")

    rows = [row("fastkd-torch", [10, 12, 8], 200), row("trl", [40, 30, 40], 2000)]
    header, body = table_rows(rows)
    columns = [dict(zip(header, line)) for line in body]
    assert [(c["speed-up vs TRL"], c["memory vs TRL"]) for c in columns] == [("4.00× (2.50–5.00)", "0.10×"),
                                                                              ("", "")]
    env = dict(device="cpu x", torch="2", triton="3", commit="abc", date="2026-01-01T00:00:00Z")
    text = summary_markdown(rows, env, dict(load_average_start=1.0, load_average_end=2.0), [])
    assert "| fused_linear_kd/jsd fp32 fwd+bwd N=2048 V=32000 H=1024 | 40 ms | 2000 MiB | 10 ms (fastkd-torch) " \
           "| 200 MiB | 4.00× (2.50–5.00) | 0.10× |" in text
    assert "speed-up vs TRL" not in table_rows(rows[:1])[0]  # no TRL row, no TRL columns
