"""Shared test helpers: the per-dtype tolerance rule, input makers, the examples as modules."""
import importlib.util
import os

import torch

from fastkd.divergences import DIVERGENCES  # noqa: F401 - the tests' list is the registry's

# Relative tolerance per dtype on top of the same-dtype reference's own error.
RTOL = {torch.float64: 1e-7, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def assert_close_to_oracle(actual, oracle, same_dtype=None, *, dtype, grows_with=1):
    """``actual`` passes when its error against the float64 ``oracle`` is no worse than the
    same-dtype reference's error plus RTOL[dtype] * (|oracle| + 1) * sqrt(grows_with).

    ``grows_with`` is the length of the sums behind each value (V for a row loss)."""
    actual, oracle = actual.double(), oracle.double()
    assert actual.shape == oracle.shape, (actual.shape, oracle.shape)
    assert torch.isfinite(actual).eq(torch.isfinite(oracle)).all(), "finite pattern differs from the oracle"
    finite = torch.isfinite(oracle)
    assert actual[~finite].equal(oracle[~finite]) or torch.isnan(oracle[~finite]).all()
    err = (actual - oracle)[finite].abs()
    allowed = RTOL[dtype] * (oracle[finite].abs() + 1) * max(1, grows_with) ** 0.5
    if same_dtype is not None:
        allowed = allowed + (same_dtype.double() - oracle)[finite].abs()
    worst = (err - allowed).max() if err.numel() else torch.tensor(-1.0)
    assert worst <= 0, f"error {err.max():.3g} exceeds allowance by {worst:.3g} ({dtype})"


def logits(*shape, dtype=torch.float32, scale=3.0, device="cpu"):
    return (torch.randn(*shape, dtype=torch.float64, device=device) * scale).to(dtype)


def load_example(file_name):
    """``examples/<file_name>`` imported as a module (its ``main`` runs it in this process)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples", file_name)
    spec = importlib.util.spec_from_file_location(os.path.splitext(file_name)[0], path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def run_rank_cases(rank, cases):
    """Run ``(name, check, kwargs)`` cases on one process of a distributed test: ``check(**kwargs)``
    each, a failure re-raised naming the rank and the case."""
    for name, check, kwargs in cases:
        try:
            check(**kwargs)
        except Exception as error:
            raise AssertionError(f"rank {rank}, case {name}: {error}") from error
