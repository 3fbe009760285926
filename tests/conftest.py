"""Test setup: the Triton interpreter on machines without CUDA, a seed, markers, small blocks.

TRITON_INTERPRET must be set before any kernel module (or triton) is imported, so it is set here,
at the top of the first file pytest loads.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import threading

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # One torch thread: the background jobs (below) take the second core, where torch's ops on two
    # threads would wait for it at the end of every parallel region (the suite ran 9 min against 6).
    # The tests of the worker pool set two threads themselves (test_torch_backend.py).
    torch.set_num_threads(1)

import pytest  # noqa: E402

import fastkd.backends.torch  # noqa: E402
import fastkd.backends.triton  # noqa: E402


def _patch_triton_language_once_per_launch():
    """Speed of the interpreter, not behaviour. A launch patches triton.language (the modules tl
    and tl.core, shared by every kernel file) with the interpreter's builtins, and Triton 3.6-3.9
    patch the same modules again at every call of a @triton.jit helper in every program, listing
    the modules' members each time: 60 % of a small launch. Within a launch nothing undoes a patch
    before its end, so a helper's patch of modules already patched in that launch is skipped."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from triton.runtime import interpreter

    patch_lang = getattr(interpreter, "_patch_lang", None)
    executor = getattr(interpreter, "GridExecutor", None)
    if patch_lang is None or executor is None or not hasattr(interpreter, "_LangPatchScope"):
        return  # another interpreter than the one described above: leave it as it is
    import triton.language as tl

    launch = {"running": False, "patched": set()}  # ids of the modules patched in this launch

    def patch_lang_once(fn):
        wanted = {id(value) for value in fn.__globals__.values() if value is tl or value is tl.core}
        if launch["running"] and wanted <= launch["patched"]:
            return interpreter._LangPatchScope()  # nothing to undo
        scope = patch_lang(fn)
        if launch["running"]:
            launch["patched"] |= wanted
        return scope

    run_grid = executor.__call__

    def run_grid_patching_once(self, *args, **kwargs):
        launch.update(running=True, patched=set())
        try:
            return run_grid(self, *args, **kwargs)
        finally:
            launch.update(running=False, patched=set())

    interpreter._patch_lang = patch_lang_once
    executor.__call__ = run_grid_patching_once


_patch_triton_language_once_per_launch()


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
    items.sort(key=_uses_background_jobs)  # stable: the tests that wait for a background job last


# ------------------------------------------------------------------------------ background jobs
class BackgroundJob:
    """A check that runs in a subprocess (the sm_90 compiles: a minute of one core). The jobs of
    the selected tests start one after another when collection ends, on the second core while the
    interpreter tests keep the first busy, and the tests that wait for them run last. A test module
    declares its jobs in ``BACKGROUND_JOBS``: {name: function(dir) -> argv for python, or None
    where the check cannot run here}; its tests take the ``background_jobs`` fixture and call
    ``background_jobs[name].wait()``. Each job runs without TRITON_INTERPRET, in a temporary
    ``dir`` that holds its own Triton cache."""

    def __init__(self, argv_of):
        self.dir = tempfile.mkdtemp(prefix="fastkd-job-")
        self.argv = argv_of(self.dir)
        self.process, self.started = None, threading.Event()
        self.lock, self.stopped = threading.Lock(), False

    def run(self):
        """Run the command to its end (in the jobs' thread)."""
        with self.lock:
            if self.argv is not None and not self.stopped:
                env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
                env["TRITON_CACHE_DIR"] = os.path.join(self.dir, "triton-cache")
                self.output = open(os.path.join(self.dir, "output"), "w+")
                # From the checkout's root, whatever folder a test has moved to meanwhile (the docs'
                # tests do), so that ``-m fastkd...`` imports this checkout's fastkd.
                # At the lowest priority: a job (an audit compiles while a child counts bytes) may
                # want both cores, and would slow the tests it runs beside (the suite: 8.8 min against 6).
                self.process = subprocess.Popen([sys.executable, *self.argv], env=env, stdout=self.output,
                                                stderr=subprocess.STDOUT, text=True, preexec_fn=_lowest_priority,
                                                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            self.started.set()
        if self.process is not None:
            self.process.wait()

    def wait(self, timeout=1200):
        """(return code, output) of the finished command."""
        assert self.argv is not None, "this job cannot run here"
        assert self.started.wait(timeout), "the job did not start"
        self.process.wait(timeout)
        self.output.seek(0)
        return self.process.returncode, self.output.read()

    def stop(self):
        with self.lock:
            self.stopped = True
            self.started.set()
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self.output.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _lowest_priority():
    if hasattr(os, "nice"):
        os.nice(19)


_BACKGROUND = {}  # job name -> BackgroundJob, in the order they run


def _uses_background_jobs(item):
    return "background_jobs" in getattr(item, "fixturenames", ())


def _run_background_jobs(jobs):
    for job in jobs:
        job.run()


def pytest_collection_finish(session):
    for item in session.items:
        if _uses_background_jobs(item) and hasattr(item, "module"):
            for name, argv_of in getattr(item.module, "BACKGROUND_JOBS", {}).items():
                if name not in _BACKGROUND:
                    _BACKGROUND[name] = BackgroundJob(argv_of)
    if _BACKGROUND:
        threading.Thread(target=_run_background_jobs, args=(list(_BACKGROUND.values()),), daemon=True).start()


def pytest_sessionfinish(session):
    jobs = list(_BACKGROUND.values())
    _BACKGROUND.clear()
    for job in jobs:
        job.stop()


@pytest.fixture(scope="session")
def background_jobs():
    return _BACKGROUND


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
        # (auto) runs the two-pass kernel for them.
        monkeypatch.setattr(fastkd.backends.triton, "RESIDENT_BLOCK", 16)
        monkeypatch.setattr(fastkd.backends.triton, "RESIDENT_BLOCK_FLOAT64", 16)
    monkeypatch.setattr(fastkd.backends.torch, "CHUNK_BYTES", 4 * 64 * 3)
    monkeypatch.setattr(fastkd.backends.torch, "TOPK_CHUNK_FACTOR", 1)


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
