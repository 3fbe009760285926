"""The row-resident kernel (kernels/kd_resident.py): which kernel a call runs, and a representative
subset of the dense-loss tests through it, in one CTA a row ("resident") and in its clustered tiles
("cluster": an ``[NC, BLOCK_V]`` tile with NC > 1; the interpreter ignores ``num_ctas``, so the
cluster's code path runs on the CPU), with the bytes it requests.

The whole dense-loss suite runs through either kernel with the variable set to resident or cluster
(about 30 s each on 2 cores, left out of CI to keep its time):
    FASTKD_KD_KERNEL=resident python -m pytest -q tests/test_kd_loss.py tests/test_divergences.py \
        tests/test_degenerate_rows.py tests/test_views_and_dtypes.py tests/test_fuzz.py -k triton
"""
import pytest
import torch

import fastkd
import fastkd.backends.triton as launch
import test_degenerate_rows
import test_divergences
import test_fused_linear
import test_kd_loss
from helpers import DIVERGENCES

KD_KERNEL = "FASTKD_KD_KERNEL"
CPU = torch.device("cpu")


@pytest.fixture(params=["resident", "cluster"])
def kernel(request, monkeypatch):
    """The resident kernel forced on: one CTA a row of up to 64 columns, or clustered tiles of 16
    columns a CTA (the tests' rows of 17 to 53 columns: 2 to 4 CTAs)."""
    monkeypatch.setenv(KD_KERNEL, request.param)
    if request.param == "resident":
        monkeypatch.setattr(launch, "RESIDENT_BLOCK", 64)
        monkeypatch.setattr(launch, "RESIDENT_BLOCK_FLOAT64", 64)
    return request.param


def _ran(kernel, V, dtype=torch.float32):
    """The kernel and tiling a row of V columns runs under the fixture's setting: checks that the
    test below exercises what its name says."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    chosen = launch.kd_kernel(V, CPU, acc)
    assert chosen == kernel
    return launch._resident_launch(V, acc, chosen == "cluster")


# ----------------------------------------------------------------------------------------- selection
def test_auto_picks_resident_where_a_row_fits_one_cta(monkeypatch):
    monkeypatch.delenv(KD_KERNEL, raising=False)
    monkeypatch.setattr(launch, "RESIDENT_BLOCK", 8192)
    monkeypatch.setattr(launch, "RESIDENT_BLOCK_FLOAT64", 1024)
    assert launch.kd_kernel(8192, CPU) == "resident" and launch.kd_kernel(8193, CPU) == "two_pass"
    assert launch.kd_kernel(1024, CPU, torch.float64) == "resident"
    assert launch.kd_kernel(1025, CPU, torch.float64) == "two_pass"
    assert launch.kd_kernel(128256, CPU) == "two_pass"  # never the cluster unless asked for
    assert launch.kd_kernel(128256, CPU, name="two_pass") == "two_pass"
    assert launch._resident_launch(8192, torch.float32, False) == (1, 8192, 16)
    assert launch._resident_launch(100, torch.float32, False) == (1, 128, 4)


def test_forced_resident_becomes_the_cluster_beyond_one_cta(monkeypatch):
    monkeypatch.setattr(launch, "RESIDENT_BLOCK", 8192)
    assert launch.kd_kernel(8192, CPU, name="resident") == "resident"
    assert launch.kd_kernel(8193, CPU, name="resident") == "cluster"
    assert launch.kd_kernel(100, CPU, name="cluster") == "cluster"  # at least 2 CTAs, even for short rows
    assert launch._resident_launch(100, torch.float32, True) == (2, 64, 4)
    assert launch._resident_launch(128256, torch.float32, True) == (16, 8192, 16)
    with pytest.raises(NotImplementedError, match="needs 32 CTAs of 8192 columns; a cluster has at most 16"):
        launch.kd_kernel(262144, CPU, name="resident")


def test_cluster_unavailable_is_not_implemented(monkeypatch):
    import triton

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a compiled launch (the interpreter runs anything)
    monkeypatch.setattr(triton, "__version__", "3.8.1")
    with pytest.raises(NotImplementedError, match=r"needs Triton >= 3\.9.*this is Triton 3\.8\.1"):
        launch.kd_kernel(100, CPU, name="cluster")
    assert launch.kd_kernel(10, CPU, name="resident") == "resident"  # one CTA needs no cluster
    monkeypatch.setattr(triton, "__version__", "3.9.0")
    monkeypatch.setattr(launch, "_capability", lambda device: (8, 0))
    with pytest.raises(NotImplementedError, match=r"compute capability >= 9\.0; cuda:0 has 8\.0"):
        launch.kd_kernel(100, torch.device("cuda", 0), name="cluster")
    monkeypatch.setattr(launch, "_capability", lambda device: (9, 0))
    assert launch.kd_kernel(100, torch.device("cuda", 0), name="cluster") == "cluster"


def test_unknown_kernel_name_is_a_value_error(monkeypatch):
    monkeypatch.setenv(KD_KERNEL, "resident_please")
    with pytest.raises(ValueError, match="FASTKD_KD_KERNEL='resident_please' is not one of auto, two_pass"):
        fastkd.kd_loss(torch.randn(2, 8), torch.randn(2, 8), backend="triton")


# ------------------------------------------------------------------- the dense-loss tests, a subset
@pytest.mark.parametrize("name", DIVERGENCES)
def test_every_divergence_and_option_against_the_oracle(kernel, name):
    assert _ran(kernel, 37)[0] == (1 if kernel == "resident" else 4)
    test_divergences.test_every_option_against_the_oracle(name, "triton", torch.bfloat16)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_gradcheck_float64(kernel, name):
    assert _ran(kernel, 19, torch.float64)[0] == (1 if kernel == "resident" else 2)
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
    assert _ran(kernel, 13)[0] == (1 if kernel == "resident" else 2)
    test_fused_linear.test_every_divergence_matches_oracle("triton", "jsd", torch.float32)


def test_accuracy_at_a_real_vocabulary_and_block(monkeypatch):
    """V = 32000 at the GPU's block (4 CTAs of 8192 columns): within the rule of test_accuracy."""
    from test_accuracy import test_no_less_accurate_than_float32_pytorch

    monkeypatch.setattr(launch, "RESIDENT_BLOCK", 8192)
    monkeypatch.setenv(KD_KERNEL, "resident")
    assert launch._resident_launch(32000, torch.float32, launch.kd_kernel(32000, CPU) == "cluster")[:2] == (4, 8192)
    for name in ("kl", "jsd"):
        test_no_less_accurate_than_float32_pytorch(name, "triton", torch.bfloat16, 32000, monkeypatch, CPU)


# --------------------------------------------------------------------------------------------- bytes
@pytest.mark.parametrize("blocks", [64, 16], ids=["one CTA", "4 CTAs"])
def test_each_input_is_read_once_for_every_divergence(monkeypatch, blocks):
    """bf16 student and teacher read once, the gradient written once: 6 bytes an element, plus the
    per-row terms (the scale 4 B, the loss 4 B; the backward reads the upstream gradient, 4 B)."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("counts bytes through the Triton interpreter")
    from fastkd.audit import cases, traffic

    monkeypatch.setattr(launch, "RESIDENT_BLOCK", blocks)
    V = 64
    ids = [cases.case_id(c) for c in cases.CASES if c.env.get(KD_KERNEL) == "resident" and not c.options["hard_ce"]]
    counted = traffic.count(ids, torch.bfloat16, shape=(3, V))
    assert sorted(ids) == sorted(f"kd_loss {name} [resident]" for name in DIVERGENCES)
    for case_id in ids:
        (forward, fl, fs), (backward, bl, bs) = counted[case_id]
        assert (forward, backward) == ("kd_resident_kernel", "scale_rows_kernel")
        assert fl == pytest.approx(4 + 4 / V) and fs == pytest.approx(2 + 4 / V), case_id
        assert bl == pytest.approx(4 / V) and bs == 0
