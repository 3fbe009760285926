"""Test setup: the Triton interpreter on machines without CUDA, a seed, markers, small blocks.

TRITON_INTERPRET must be set before any kernel module (or triton) is imported, so it is set here,
at the top of the first file pytest loads.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastkd.backends.torch  # noqa: E402
import fastkd.backends.triton  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_slow = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if torch.cuda.is_available() and "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.gpu)  # runs on CUDA tensors there: part of the GPU check
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Force the multi-block kernel loops and multi-chunk torch backend at tiny V (GPU: real sizes)."""
    if not torch.cuda.is_available():
        monkeypatch.setattr(fastkd.backends.triton, "MAX_BLOCK_V", 16)
        # Rows of more than 16 columns do not fit one CTA of the resident kernel: the default
        # (auto) runs the two-pass kernel for them, and forcing the resident kernel runs its
        # clustered tiles.
        monkeypatch.setattr(fastkd.backends.triton, "RESIDENT_BLOCK", 16)
        monkeypatch.setattr(fastkd.backends.triton, "RESIDENT_BLOCK_FLOAT64", 16)
    monkeypatch.setattr(fastkd.backends.torch, "CHUNK_BYTES", 4 * 64 * 3)


@pytest.fixture
def one_rank_group():
    """A one-process gloo group, so the vocabulary-parallel loss runs in this process (one shard: the
    whole vocabulary); destroyed afterwards."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()
