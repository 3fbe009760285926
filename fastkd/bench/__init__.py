"""The benchmark harness behind ``fastkd bench`` (also ``python -m fastkd.bench``), the one harness of
the project: dense ``kd_loss``, ``softmax`` / ``log_softmax``, the top-k loss and its extraction, and
the fused linear + KD loss are its cases.

cases.py is the table of cases and presets, providers.py the registry of implementations (with the
formula each runs), min_bytes.py the least traffic (and matmul work) of each case, runner.py the
timing, the one peak-memory measurement and the checks, report.py the CSV / JSON / tables / summary,
plots.py the optional PNGs, arguments.py the command line's arguments (torch-free, so that
``fastkd bench --help`` answers at once), command.py the run. Nothing optional (triton, matplotlib,
liger_kernel, torch.compile), nor torch itself, is imported before it is used.
"""


def main(argv=None, prog="fastkd bench"):
    """Run ``fastkd bench`` with ``argv``; returns the exit status."""
    from .command import main as run_main

    return run_main(argv, prog)


__all__ = ["main"]
