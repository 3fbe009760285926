"""The ``fastkd`` command line: help and version without importing torch (run in a subprocess, as the
console script runs), and one default output folder for ``fastkd bench`` and ``fastkd audit``."""
import os
import pathlib
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Runs the CLI as the console script does and reports, after it exits, whether torch was imported.
CLI = """
import sys
from fastkd.cli import main
try:
    status = main(sys.argv[1:])
except SystemExit as exit:
    status = exit.code
print("torch imported:", "torch" in sys.modules, "status:", status)
"""


def _cli(*argv):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", CLI, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"], ["audit", "--help"]], ids=" ".join)
def test_help_does_not_import_torch(argv):
    out = _cli(*argv)
    assert out.startswith(f"usage: fastkd{' ' + argv[0] if len(argv) > 1 else ''} ")
    assert out.rstrip().endswith("torch imported: False status: 0")


def test_bench_help_lists_the_presets_and_providers():
    out = "".join(_cli("bench", "--help").split())  # argparse wraps lines at hyphens too
    assert "cpu,small,headline,fused-linear" in out and "torch-eager,fastkd-triton" in out


def test_version():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert _cli("--version") == f"fastkd {version}\ntorch imported: False status: 0\n"


def test_bench_argument_names_are_the_registries():
    """fastkd.bench.arguments names, without torch, what cases.py, providers.py and runner.py define."""
    from fastkd.bench import arguments, cases, providers, runner

    assert arguments.PRESETS == tuple(cases.PRESETS)
    assert arguments.OPS == cases.OPS and arguments.MODES == cases.MODES
    assert arguments.DTYPES == tuple(cases.DTYPES)
    assert set(arguments.PROVIDERS) | set(cases.KERNEL_VARIANTS) == set(providers.PROVIDERS)
    assert arguments.MIN_ROUNDS == runner.MIN_ROUNDS


def test_audit_and_bench_write_to_one_default_folder():
    """Not the current folder: the checkout's bench/results/local/ (or the user's cache when installed)."""
    from fastkd.audit import command as audit_command
    from fastkd.bench import arguments
    from fastkd.bench import command as bench_command
    from fastkd.cli import build_parser

    assert audit_command.default_out is arguments.default_out and bench_command.default_out is arguments.default_out
    assert arguments.default_out() == ROOT / "bench" / "results" / "local"
    parser = build_parser()
    assert parser.parse_args(["audit"]).out is None and parser.parse_args(["bench"]).out is None
    assert "bench/results/local/ofthecheckout" in "".join(_cli("audit", "--help").split())
