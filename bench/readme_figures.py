"""Put a ``fastkd bench`` summary into the README's CPU figures, unchanged.

    python bench/readme_figures.py bench/results/<machine>_<date>_cpu_summary.md

Replaces the block between the README's ``fastkd bench summary`` markers with that file, and names
the file in the opening marker (bench/test_readme.py checks that the two stay equal). Copy the run's
other files (CSV, JSON, table, plots) from ``bench/results/local/`` next to it first.
"""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"<!-- fastkd bench summary: (?P<path>\S+) -->\n(?P<body>.*?)<!-- end of fastkd bench summary -->\n",
                   re.S)


def readme_block(text):
    """(summary file named by the README, the block's text), or None without a block."""
    match = BLOCK.search(text)
    return (match["path"], match["body"]) if match else None


def main(argv=None):
    (summary,) = argv if argv is not None else sys.argv[1:]
    path = Path(summary).resolve()
    relative = path.relative_to(ROOT).as_posix()
    text = README.read_text()
    if readme_block(text) is None:
        raise SystemExit("README.md has no fastkd bench summary block")
    block = f"<!-- fastkd bench summary: {relative} -->\n{path.read_text()}<!-- end of fastkd bench summary -->\n"
    README.write_text(BLOCK.sub(lambda m: block, text, count=1))
    print(f"README.md: figures from {relative}")


if __name__ == "__main__":
    main()
