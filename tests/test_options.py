"""The one path of the options: KDOptions' derived scalars, the custom ops' pack and unpack, and
the one function that turns them into Triton kernel arguments (``backends.triton.option_args``)."""
import dataclasses
import inspect
import math

import pytest
import torch

import fastkd.backends.triton as launch
from fastkd.divergences import DIVERGENCES, lookup
from fastkd.ops import pack_kd_options, unpack_kd_options
from fastkd.options import OPTION_NAMES, make_options


def _kd_kernels():
    from fastkd.kernels import kd_loss, kd_resident, topk_kd_loss, vocab_parallel

    return (kd_loss.kd_forward_kernel, kd_resident.kd_resident_kernel, topk_kd_loss.topk_kd_forward_kernel,
            vocab_parallel.partial_stats_kernel, vocab_parallel.row_scalars_kernel,
            vocab_parallel.shard_finish_kernel)


def test_option_names_are_make_options_keywords():
    """make_options takes KDOptions' fields in their order: the entry points pass them by position."""
    keywords = tuple(inspect.signature(make_options).parameters)
    assert keywords == tuple(f.name for f in dataclasses.fields(make_options()))
    assert set(OPTION_NAMES) | {"teacher_weights"} == set(keywords)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_derived_scalars(name):
    opts = make_options(temperature=4.0, teacher_temperature=0.5, divergence=name, beta=0.25, skew=0.3,
                        soft_weight=0.5, hard_weight=0.2, teacher_weights=(0.75, 0.25))
    assert (opts.inv_temperature, opts.inv_teacher_temperature) == (0.25, 2.0)
    assert opts.soft_scale == 0.5 * 16 and opts.soft_grad_scale == 0.5 * 16 / 4
    assert opts.log_teacher_weights == (math.log(0.75), math.log(0.25))
    entry = lookup(name)
    assert opts.mixture_weights == entry.mixture_weights(entry.parameter_value(beta=0.25, skew=0.3))
    unscaled = make_options(temperature=4.0, t2_scale=False, soft_weight=0.5)
    assert (unscaled.soft_scale, unscaled.soft_grad_scale) == (0.5, 0.125)


def test_pack_then_unpack_is_the_same_options():
    opts = make_options(temperature=3.0, divergence="skew_kl", skew=0.2, hard_weight=0.5, soft_weight=2.0,
                        t2_scale=False, ignore_index=7, teacher_weights=(0.5, 0.5))
    back = unpack_kd_options(*pack_kd_options(opts))
    assert back == dataclasses.replace(opts, teacher_temperature=3.0)  # packed as teacher_T
    assert (back.teacher_T, back.mixture_weights, back.soft_grad_scale) == (
        opts.teacher_T, opts.mixture_weights, opts.soft_grad_scale)


@pytest.mark.parametrize("kernel", _kd_kernels(), ids=lambda k: k.fn.__name__)
def test_option_args_give_each_kernel_every_float_option_it_declares(kernel):
    """Every tl.float64 parameter of a KD kernel is an option, given by option_args (a kernel
    parameter renamed or added without it fails here, not in a launch on a GPU)."""
    import triton.language as tl

    params = inspect.signature(kernel.fn).parameters
    floats = {name for name, p in params.items() if p.annotation == tl.float64}
    args = launch.option_args(make_options(), kernel)
    assert floats and floats <= set(args)
    assert set(args) <= set(params)


def test_option_args_values():
    from fastkd.kernels import kd_loss

    opts = make_options(temperature=2.0, teacher_temperature=4.0, divergence="jsd", beta=0.3, hard_weight=0.5,
                        teacher_weights=(0.5, 0.5))
    args = launch.option_args(opts, kd_loss.kd_forward_kernel)
    mix, log_wp, log_wq = opts.mixture_weights
    assert args == dict(inv_temperature=0.5, inv_teacher_temperature=0.25, mix_weight=mix, log_weight_p=log_wp,
                        log_weight_q=log_wq, soft_scale=4.0, hard_weight=0.5,
                        log_teacher_weight_0=math.log(0.5), log_teacher_weight_1=math.log(0.5),
                        log_teacher_weight_2=0.0, log_teacher_weight_3=0.0, ignore_index=-100,
                        DIVERGENCE=DIVERGENCES.index("jsd"), HAS_CE=True, CE_FROM_STUDENT=False)
    at_one = launch.option_args(make_options(hard_weight=0.5), kd_loss.kd_forward_kernel)
    assert at_one["CE_FROM_STUDENT"] and at_one["HAS_CE"]


def test_a_call_reads_the_kernel_setting_at_launch(monkeypatch):
    """fastkd.config.kd_kernel, changed between two calls, changes the kernel the second runs; both
    give the loss of the float64 formula."""
    import fastkd.config

    monkeypatch.setattr(launch, "RESIDENT_BLOCK", 64)
    calls = []
    real = launch._resident_kd_forward
    monkeypatch.setattr(launch, "_resident_kd_forward", lambda *args: calls.append(1) or real(*args))
    s, t = torch.randn(3, 20), torch.randn(3, 20)
    log_p, log_q = torch.log_softmax(t.double(), -1), torch.log_softmax(s.double(), -1)
    expected = (log_p.exp() * (log_p - log_q)).sum(-1).float()
    for kernel, resident_calls in (("two_pass", 0), ("resident", 1)):
        monkeypatch.setattr(fastkd.config, "kd_kernel", kernel)
        loss, _ = launch.kd_forward(s, t, None, torch.ones(1), make_options(divergence="kl"))
        assert len(calls) == resident_calls
        torch.testing.assert_close(loss, expected)
