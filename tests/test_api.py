"""The public surface: backend choice, the module form, and importing without triton."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastkd
from fastkd.backends import resolve_backend
from helpers import logits


def test_auto_backend_uses_torch_on_cpu_and_triton_on_request():
    x = torch.zeros(2, 3)
    assert resolve_backend("auto", x) == "torch"
    assert resolve_backend("torch", x) == "torch"
    assert resolve_backend("triton", x) == "triton"  # the interpreter is on in the test session


def test_triton_backend_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend='triton' cannot run here"):
        fastkd.kd_loss(logits(2, 4), logits(2, 4), backend="triton")


def test_module_matches_functional_and_checks_options_at_construction():
    s, t = logits(2, 3, 9), logits(2, 3, 9)
    labels = torch.randint(0, 9, (2, 3))
    module = fastkd.KDLoss(temperature=2.0, divergence="jsd", beta=0.3, hard_weight=0.5, backend="triton")
    torch.testing.assert_close(
        module(s, t, labels),
        fastkd.kd_loss(s, t, temperature=2.0, divergence="jsd", beta=0.3, labels=labels, hard_weight=0.5,
                       backend="triton"))
    assert "divergence='jsd'" in repr(module)
    with pytest.raises(ValueError, match="temperature"):
        fastkd.KDLoss(temperature=0.0)
    with pytest.raises(ValueError, match="backend"):
        fastkd.KDLoss(backend="cuda")


def test_backends_agree_on_a_3d_batch():
    s, t = logits(2, 5, 40, dtype=torch.bfloat16), logits(2, 5, 40, dtype=torch.bfloat16)
    labels = torch.randint(0, 40, (2, 5))
    labels[1, 3:] = -100
    kw = dict(temperature=1.5, labels=labels, hard_weight=0.2, reduction="none")
    a = fastkd.kd_loss(s, t, backend="triton", **kw)
    b = fastkd.kd_loss(s, t, backend="torch", **kw)
    assert a.shape == (2, 5) and a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_import_without_triton_and_without_a_gpu():
    """A machine without triton still imports fastkd and runs the torch backend."""
    code = textwrap.dedent("""
        import sys
        class NoTriton:
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ImportError("triton is blocked for this test")
        sys.meta_path.insert(0, NoTriton())
        import torch, fastkd
        from fastkd.backends import triton_installed
        assert "triton" not in sys.modules and "torch._dynamo" not in sys.modules  # nothing heavy at import
        s, t = torch.randn(3, 7), torch.randn(3, 7)
        print(float(fastkd.kd_loss(s, t)), float(fastkd.reference.kd_loss(s, t)))
        try:
            fastkd.kd_loss(s, t, backend="triton")
        except RuntimeError as e:
            print("refused:", e)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    ours, ref = map(float, out.stdout.splitlines()[0].split())
    assert ours == pytest.approx(ref, rel=1e-5)
    assert "refused:" in out.stdout and "backend='triton' cannot run here" in out.stdout
