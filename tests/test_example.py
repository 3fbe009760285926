"""examples/distill_causal_lm.py in its --smoke mode: runs, and the fastkd and eager curves coincide;
by default it writes into a git-ignored folder, never into the working tree."""
import importlib.util
import os
import subprocess

import pytest

from helpers import load_example

pytest.importorskip("transformers", reason='transformers is not installed (pip install -e ".[hf]")')
pytest.importorskip("tokenizers", reason='tokenizers is not installed (pip install -e ".[hf]")')

EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "distill_causal_lm.py")


def test_smoke_run(tmp_path, monkeypatch):
    example = load_example("distill_causal_lm.py")
    monkeypatch.setattr(example.fastkd.backends.torch, "CHUNK_BYTES", 32 * 2**20)  # undo conftest's tiny chunks
    results = example.main(["--smoke", "--out", str(tmp_path), "--device", "cpu"])
    fastkd_losses, eager_losses = results["fastkd"]["losses"], results["eager"]["losses"]
    assert len(fastkd_losses) == len(eager_losses) == example.SMOKE["steps"]
    assert results["max_rel_difference"] < 1e-5, (fastkd_losses, eager_losses)
    assert eager_losses[-1] < eager_losses[0]  # it learns
    assert (tmp_path / "distill_causal_lm.json").exists()
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "distill_causal_lm.png").stat().st_size > 0


def test_default_output_folder_is_git_ignored():
    out = load_example("distill_causal_lm.py").parse_args([]).out
    root = os.path.dirname(os.path.dirname(os.path.abspath(EXAMPLE)))
    if not os.path.exists(os.path.join(root, ".git")):
        pytest.skip("not a git checkout")
    try:
        ignored = subprocess.run(["git", "-C", root, "check-ignore", "-q", os.path.join(out, "x.json")])
    except OSError:
        pytest.skip("git is not installed")
    assert os.path.commonpath([out, root]) == root and ignored.returncode == 0, out
