"""Every kernel variant compiles for an H200 (sm_90) with the installed Triton, without a GPU
(``tests/gpu_compile.py``): the interpreter alone would accept code the compiler rejects."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("gpu_compile.py")


def _compile_all(tmp_path, *flags):
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    done = subprocess.run([sys.executable, str(SCRIPT), *flags], env=env, capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "kernel variants for sm_90" in done.stdout, done.stdout[-2000:]
    return done.stdout


def test_every_kernel_and_flag_compiles_for_sm90(tmp_path):
    out = _compile_all(tmp_path, "--quick")
    for kernel in ("kd_forward_kernel", "kd_resident_kernel", "scale_rows_kernel", "softmax_forward_kernel",
                   "softmax_backward_kernel",
                   "teacher_topk_kernel", "topk_kd_forward_kernel", "partial_stats_kernel", "row_scalars_kernel",
                   "shard_finish_kernel"):
        assert f"ok {kernel} " in out, kernel


@pytest.mark.slow
def test_every_dtype_pair_and_block_width_compiles_for_sm90(tmp_path):
    _compile_all(tmp_path)
