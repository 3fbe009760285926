"""The checkout's top-level ``kernels/`` folder never shadows an installed package named ``kernels``
(Hugging Face's, which transformers imports), and ``fastkd.kernels`` still imports."""
import importlib.util
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_kernels_folder_is_no_regular_package():
    assert os.path.isdir(os.path.join(ROOT, "kernels"))
    assert not os.path.exists(os.path.join(ROOT, "kernels", "__init__.py"))


def test_import_kernels_from_the_checkout_root_finds_the_installed_package():
    where = _run("import kernels; print(getattr(kernels, '__file__', None) or list(kernels.__path__))", ROOT)
    ours = os.path.join(ROOT, "kernels")
    spec = importlib.util.find_spec("kernels")
    installed = spec is not None and spec.origin not in (None, "namespace") and not spec.origin.startswith(ours)
    if installed:  # Hugging Face's kernels (transformers >= 5.25 installs it): it must win
        assert not where.startswith(ours), where
    else:  # nothing installed: our folder is at most an empty namespace, with no module in it
        assert _run("import kernels; print(hasattr(kernels, 'kd_loss'))", ROOT) == "False"


def test_fastkd_kernels_imports_from_anywhere(tmp_path):
    for cwd in (ROOT, str(tmp_path)):
        where = _run("import fastkd.kernels.kd_loss as m; print(m.__file__)", cwd)
        assert where.endswith(os.path.join("kernels", "kd_loss.py")), where
