"""Every kernel variant compiles for an H200 (sm_90) with the installed Triton, without a GPU
(``tests/gpu_compile.py``): the interpreter alone would accept code the compiler rejects."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("gpu_compile.py")
HAS_NVIDIA_BACKEND = importlib.util.find_spec("triton.backends.nvidia") is not None
# The quick set runs beside the other tests (conftest.BackgroundJob).
BACKGROUND_JOBS = {"sm90 quick compile": lambda _: [str(SCRIPT), "--quick"] if HAS_NVIDIA_BACKEND else None}


def _checked(returncode, output):
    assert returncode == 0, output[-4000:]
    assert "kernel variants for sm_90" in output, output[-2000:]
    return output


def _compile_all(tmp_path, *flags):
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    done = subprocess.run([sys.executable, str(SCRIPT), *flags], env=env, capture_output=True, text=True,
                          timeout=1200)
    return _checked(done.returncode, done.stdout + done.stderr)


def test_every_kernel_and_flag_compiles_for_sm90(background_jobs):
    if not HAS_NVIDIA_BACKEND:
        pytest.skip("triton's NVIDIA backend is not installed")
    out = _checked(*background_jobs["sm90 quick compile"].wait())
    for kernel in ("kd_forward_kernel", "kd_resident_kernel", "scale_rows_kernel", "softmax_forward_kernel",
                   "softmax_backward_kernel",
                   "teacher_topk_kernel", "topk_kd_forward_kernel", "partial_stats_kernel", "row_scalars_kernel",
                   "shard_finish_kernel"):
        assert f"ok {kernel} " in out, kernel


@pytest.mark.slow
def test_every_dtype_pair_and_block_width_compiles_for_sm90(tmp_path):
    _compile_all(tmp_path)
