"""The README tells what a new user can reproduce: its test command is what CI runs, its CPU figures
are a committed run's summary, unchanged, and it points at nothing outside the repository."""
import re
from pathlib import Path

import pytest

from readme_figures import readme_block

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
OUR_DOCS = [ROOT / "README.md", ROOT / "bench" / "results" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OUR_CODE = sorted(p for folder in ("fastkd", "kernels", "tests", "bench", "examples") for p in (ROOT / folder).rglob("*.py"))


def _command(prefix):
    (line,) = [line.strip() for line in README.splitlines() if line.strip().startswith(prefix)]
    return line


def test_ci_runs_exactly_the_readme_test_command():
    test = _command('pip install torch==2.13.0 && pip install -e ".[test]"')
    assert test.endswith("python -m pytest -q --benchmark-disable")
    assert test in [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert _command('pip install torch==2.13.0 && pip install -e ".[bench]"').endswith("&& fastkd bench")


def test_the_test_extra_brings_the_peers_the_tests_compare_with():
    tomllib = pytest.importorskip("tomllib", reason="needs Python 3.11 to read pyproject.toml")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[<>=\[ ;]", requirement)[0] for requirement in extras["test"]}
    assert {"trl", "transformers", "accelerate", "tokenizers", "pytest-benchmark"} <= names
    assert not any(requirement.startswith("torch") for requirement in extras["test"])  # torch is pinned first


def test_cpu_figures_are_a_committed_summary_unchanged():
    block = readme_block(README)
    assert block is not None, "README.md has no fastkd bench summary block"
    path, body = block
    summary = ROOT / path
    assert summary.is_file() and summary.parent == ROOT / "bench" / "results", path
    assert body == summary.read_text()
    assert "**kd_loss/kl, fp32, fwd+bwd, N=4096 V=32000, T = 2**" in body  # the headline case of the cpu preset
    assert "torch.compile" in body and "load average" in body


OUTSIDE = (r"SPEC\.md", r"STYLE\.md", r"\.\./shared", r"\bissues? \d", r"pip install fastkd\[")


def test_code_points_at_nothing_outside_the_repository():
    for path in OUR_CODE:
        if path.name == "test_readme.py":
            continue
        text = path.read_text()
        for pattern in OUTSIDE:
            assert not re.search(pattern, text), (str(path.relative_to(ROOT)), pattern)


@pytest.mark.parametrize("doc", OUR_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_point_at_nothing_outside_the_repository(doc):
    text = doc.read_text()
    for pattern in OUTSIDE:
        assert not re.search(pattern, text), (doc.name, pattern)
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if not re.match(r"[a-z]+://", target):
            assert (doc.parent / target).exists(), (doc.name, target)
