"""Every fenced ```python block of README.md and docs/*.md runs, as a user would paste it.

The blocks of one file run in order in one namespace, so a later block may use what an earlier one
defined; each file's blocks make their own (small) tensors. A block preceded by the line
``<!-- doc-test: skip (reason) -->`` (a GPU, a download, torchrun, a long job) is skipped with that
reason. Shell blocks (indented commands, ```bash: ``pip install``, ``fastkd bench``, ``torchrun``)
are not run. The blocks run on the torch backend's CPU path (``backend="auto"`` on CPU tensors).
"""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
SKIP = re.compile(r"<!-- doc-test: skip \((.+)\) -->\s*\Z")


def python_blocks(text):
    """[(line number, code, skip reason or None)] of the ```python blocks of a Markdown ``text``."""
    blocks = []
    for match in BLOCK.finditer(text):
        before = text[:match.start()]
        skip = SKIP.search(before.rstrip("\n").rsplit("\n", 1)[-1] + "\n")
        blocks.append((before.count("\n") + 1, match.group(1), skip.group(1) if skip else None))
    return blocks


def test_block_finder():
    text = ("a\n```python\nx = 1\n```\n<!-- doc-test: skip (needs a GPU) -->\n```python\ny = 2\n```\n"
            "    pip install x\n```bash\nls\n```\n")
    assert python_blocks(text) == [(2, "x = 1\n", None), (6, "y = 2\n", "needs a GPU")]


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_doc_blocks_run(path, monkeypatch, tmp_path):
    blocks = python_blocks(path.read_text())
    if not blocks:
        pytest.skip(f"{path.name} has no python block")
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    namespace = {"__name__": f"doc_{path.stem}"}
    skipped = []
    for line, code, reason in blocks:
        if reason is not None:
            skipped.append(f"line {line}: {reason}")
            continue
        try:
            exec(compile(code, f"{path.relative_to(ROOT)}:{line}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"{path.relative_to(ROOT)}, the block at line {line} fails: "
                                 f"{type(error).__name__}: {error}") from error
    if skipped and len(skipped) == len(blocks):
        pytest.skip("every block is marked: " + "; ".join(skipped))
