"""The benchmark suite behind ``fastkd bench`` (also ``python -m fastkd.bench``).

cases.py is the table of cases and presets, providers.py the registry of implementations,
min_bytes.py the least traffic of each case, runner.py the timing and memory measurements,
report.py the CSV / JSON / table, plots.py the optional PNGs, command.py the command line.
Nothing optional (triton, matplotlib, liger_kernel, torch.compile) is imported before it is used.
"""
from .command import main

__all__ = ["main"]
