"""The row-resident kernel (kernels/kd_resident.py): which kernel a call runs, and a representative
subset of the dense-loss tests through it (one CTA a row), with the bytes it requests.

The whole dense-loss suite runs through it with ``fastkd.config.kd_kernel`` set to resident from
the environment (about 30 s on 2 cores, left out of CI to keep its time):
    FASTKD_KD_KERNEL=resident python -m pytest -q tests/test_kd_loss.py tests/test_divergences.py \
        tests/test_degenerate_rows.py tests/test_views_and_dtypes.py tests/test_fuzz.py -k triton
"""
import pytest
import torch

import fastkd
import fastkd.backends.triton as launch
import fastkd.config
import test_degenerate_rows
import test_divergences
import test_fused_linear
import test_kd_loss
from helpers import DIVERGENCES

CPU = torch.device("cpu")


@pytest.fixture
def kernel(monkeypatch):
    """The resident kernel forced on, one CTA a row of up to 64 columns (the tests' rows: 13 to 53)."""
    monkeypatch.setattr(fastkd.config, "kd_kernel", "resident")
    monkeypatch.setattr(launch, "RESIDENT_BLOCK", 64)
    monkeypatch.setattr(launch, "RESIDENT_BLOCK_FLOAT64", 64)
    return "resident"


def _ran(kernel, V, dtype=torch.float32):
    """The resident kernel's launch of a row of V columns: checks that the test below runs it."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert launch.kd_kernel(V, acc) == kernel
    return launch._resident_launch(V, acc)


# ----------------------------------------------------------------------------------------- selection
@pytest.mark.parametrize("name", DIVERGENCES)
def test_auto_picks_by_the_model(monkeypatch, name):
    """auto: resident for the three-pass divergences up to RESIDENT_AUTO_V columns (one teacher),
    two_pass for kl and reverse_kl and every longer row (fastkd/backends/triton.py says why)."""
    monkeypatch.setattr(fastkd.config, "kd_kernel", "auto")
    monkeypatch.setattr(launch, "RESIDENT_BLOCK", 8192)  # the GPU's (conftest lowers it)
    three_pass = not fastkd.options.make_options(divergence=name).has_cross_term
    expected = "resident" if three_pass else "two_pass"
    assert launch.kd_kernel(launch.RESIDENT_AUTO_V, three_pass=three_pass) == expected
    assert launch.kd_kernel(launch.RESIDENT_AUTO_V + 1, three_pass=three_pass) == "two_pass"
    assert launch.kd_kernel(1000, three_pass=three_pass, num_teachers=2) == "two_pass"
    assert launch.kd_kernel(128256, three_pass=three_pass) == "two_pass"
    assert launch.kd_kernel(100, name="two_pass", three_pass=three_pass) == "two_pass"


def test_resident_launch_and_where_it_cannot_run(monkeypatch):
    monkeypatch.setattr(launch, "RESIDENT_BLOCK", 8192)
    assert launch._resident_launch(8192, torch.float32) == (8192, 16)
    assert launch._resident_launch(100, torch.float32) == (128, 4)
    assert launch.kd_kernel(8192, name="resident") == "resident"
    with pytest.raises(NotImplementedError, match="a row of 8193 columns is longer than the 8192 one CTA holds"):
        launch.kd_kernel(8193, name="resident")
    with pytest.raises(NotImplementedError, match="one teacher only"):
        launch.kd_kernel(100, name="resident", num_teachers=2)


def test_unknown_kernel_name_is_a_value_error(monkeypatch):
    message = "fastkd.config.kd_kernel='resident_please' is not one of auto, two_pass, resident"
    monkeypatch.setattr(fastkd.config, "kd_kernel", "two_pass")
    with pytest.raises(ValueError, match=message):
        with fastkd.config.override(kd_kernel="resident_please"):
            pass
    assert fastkd.config.kd_kernel == "two_pass"  # left as it was
    monkeypatch.setattr(fastkd.config, "kd_kernel", "resident_please")  # set directly: refused at the call
    with pytest.raises(ValueError, match=message):
        fastkd.kd_loss(torch.randn(2, 8), torch.randn(2, 8), backend="triton")


def test_override_sets_the_kernel_for_the_block_only(monkeypatch):
    monkeypatch.setattr(fastkd.config, "kd_kernel", "auto")
    with fastkd.config.override(kd_kernel="resident"):
        assert launch.kd_kernel(10, three_pass=False) == "resident"
    assert launch.kd_kernel(10, three_pass=False) == "two_pass"


# ------------------------------------------------------------------- the dense-loss tests, a subset
@pytest.mark.parametrize("name", DIVERGENCES)
def test_every_divergence_and_option_against_the_oracle(kernel, name):
    _ran(kernel, 37)
    test_divergences.test_every_option_against_the_oracle(name, "triton", torch.bfloat16)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_gradcheck_float64(kernel, name):
    _ran(kernel, 19, torch.float64)
    beta, skew = (0.3, 0.2) if name in ("jsd", "skew_kl", "skew_reverse_kl") else (0.5, 0.1)
    test_divergences.test_gradcheck_through_triton(name, beta, skew, 1.7, True)


@pytest.mark.parametrize("name", ["kl", "jsd", "tvd"])
def test_reductions_inplace_row_strided_and_empty(kernel, name):
    test_divergences.test_reductions_inplace_strided_and_empty(name, "triton")


def test_mixed_dtypes_views_labels_and_masked_columns(kernel):
    test_kd_loss.test_mixed_student_and_teacher_dtypes("triton", torch.bfloat16, torch.float32)
    test_kd_loss.test_row_strided_views_and_inplace_write_into_the_view("triton")
    test_kd_loss.test_masked_vocabulary_minus_inf("triton")
    test_kd_loss.test_labels_ignore_index_and_hard_ce("triton", True, 0.3, 0.7)
    test_kd_loss.test_odd_vocabulary_sizes("triton", 53)


@pytest.mark.parametrize("which,value,column", [("student", float("-inf"), None), ("teacher", float("nan"), 20),
                                                ("student", float("inf"), 0)])
def test_undefined_rows_ignored_rows_and_bad_labels(kernel, which, value, column):
    for name in ("kl", "skew_reverse_kl"):
        test_degenerate_rows.test_undefined_row_is_nan_and_stays_in_its_row("triton", name, which, value, column)
    test_degenerate_rows.test_ignored_rows_are_never_read("triton")
    test_degenerate_rows.test_label_out_of_range_is_a_nan_row_on_the_device_path(launch)


def test_fused_linear_chunks(kernel):
    _ran(kernel, 13)
    test_fused_linear.test_every_divergence_matches_oracle("triton", "jsd", torch.float32)


def test_accuracy_at_a_real_vocabulary_and_block(monkeypatch):
    """V = 8192 at the GPU's block (one CTA of 8192 columns): within the rule of test_accuracy."""
    from test_accuracy import test_no_less_accurate_than_float32_pytorch

    monkeypatch.setattr(launch, "RESIDENT_BLOCK", 8192)
    monkeypatch.setattr(fastkd.config, "kd_kernel", "resident")
    assert launch._resident_launch(8192, torch.float32) == (8192, 16)
    for name in ("kl", "jsd"):
        test_no_less_accurate_than_float32_pytorch(name, "triton", torch.bfloat16, 8192, monkeypatch, CPU)


# --------------------------------------------------------------------------------------------- bytes
def test_each_input_is_read_once_for_every_divergence(monkeypatch):
    """bf16 student and teacher read once, the gradient written once: 6 bytes an element, plus the
    per-row terms (the scale 4 B, the loss 4 B; the backward reads the upstream gradient, 4 B)."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("counts bytes through the Triton interpreter")
    from fastkd.audit import cases, traffic

    monkeypatch.setattr(launch, "RESIDENT_BLOCK", 64)
    V = 64
    ids = [cases.case_id(c) for c in cases.CASES if c.kd_kernel == "resident" and not c.options["hard_ce"]]
    counted = traffic.count(ids, torch.bfloat16, shape=(3, V))
    assert sorted(ids) == sorted(f"kd_loss {name} [resident]" for name in DIVERGENCES)
    for case_id in ids:
        (forward, fl, fs), (backward, bl, bs) = counted[case_id]
        assert (forward, backward) == ("kd_resident_kernel", "scale_rows_kernel")
        assert fl == pytest.approx(4 + 4 / V) and fs == pytest.approx(2 + 4 / V), case_id
        assert bl == pytest.approx(4 / V) and bs == 0
