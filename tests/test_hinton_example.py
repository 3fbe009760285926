"""examples/hinton_mnist.py on a tiny configuration (seconds), and the README's table of its committed run."""
import importlib.util
import json
import os

import pytest

from helpers import load_example

pytest.importorskip("mlxtend", reason='mlxtend is not installed (pip install -e ".[examples]")')

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
COMMITTED = os.path.join(ROOT, "docs", "hinton_mnist.json")
TINY = ["--seeds", "2", "--teachers", "2", "--teacher-epochs", "2", "--student-epochs", "1",
        "--train-images", "1000", "--test-images", "300", "--temperatures", "1", "20"]


def test_tiny_run_writes_sane_test_errors(tmp_path, monkeypatch):
    example, out = load_example("hinton_mnist.py"), tmp_path / "run.json"
    monkeypatch.setattr(example.fastkd.backends.torch, "CHUNK_BYTES", 32 * 2**20)  # undo conftest's tiny chunks
    returned = example.main(TINY + ["--out", str(out)])
    results = json.loads(out.read_text())
    assert results == json.loads(json.dumps(returned))
    assert {"teacher", "hard", "distilled", "omitted_3"} <= set(results)
    n, threes = results["test_images"], results["test_3s"]
    assert n == 300 and 0 < threes < n
    assert 0 <= results["teacher"] < 0.5 * n  # it learns: chance makes 0.9 * n errors
    assert len(results["teachers"]) == 2 and all(0 <= e < 0.5 * n for e in results["teachers"])
    assert list(results["distilled"]) == ["1", "20"]
    for errors in [results["hard"], *results["distilled"].values()]:
        assert len(errors) == 2 and all(isinstance(e, int) and 0 <= e < 0.5 * n for e in errors)
    assert len(results["omitted_3"]) == 2
    for seed in results["omitted_3"]:
        assert 0 <= seed["errors_on_3s"] <= min(threes, seed["errors"]) <= n
        assert 0 <= seed["errors_on_3s_after_shift"] <= min(threes, seed["errors_after_shift"]) <= n
        assert 0 <= seed["bias_shift"] <= 20
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "run.png").stat().st_size > 0


def test_readme_quotes_the_committed_run():
    with open(COMMITTED) as f:
        results = json.load(f)
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert set(results["distilled"]) == {"1", "2", "5", "10", "20"} and len(results["hard"]) >= 3
    assert load_example("hinton_mnist.py").table(results) in readme
