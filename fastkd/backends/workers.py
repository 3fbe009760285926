"""The CPU worker pool of the torch backend: threads whose torch ops each run on one thread.

The torch backend's chunk loop (``fastkd.backends.torch.for_each_chunk``) hands its chunks to as
many workers as torch has intra-op threads (at most MAX_WORKERS). A chunk is some twenty short
passes over memory; run on torch's own threads, each pass is a parallel region whose threads
wait for each other at its end, and on a machine shared with other work a waiting thread waits
for the scheduler; the workers never wait for each other (the measurement: docs/benchmarks.md,
"Sizes of the torch backend").
"""
import ctypes
import functools
import os
import queue
import threading

import torch


def _loaded_libraries(prefixes):
    """Those of the shared libraries loaded in this process whose names start with one of
    ``prefixes``, torch's own first ([] without /proc/self/maps: not Linux)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:
        return []
    torch_dir = os.path.dirname(torch.__file__)
    found = [path for path in paths if os.path.basename(path).startswith(prefixes)]
    return sorted(found, key=lambda path: not path.startswith(torch_dir))


def _first_symbol(paths, name):
    """The function ``name`` of the first library of ``paths`` that exports it, through ctypes, or None."""
    for path in paths:
        try:
            return getattr(ctypes.CDLL(path), name)
        except (OSError, AttributeError):
            continue
    return None


@functools.lru_cache(maxsize=None)
def _omp_set_num_threads():
    """``omp_set_num_threads`` (the calling thread's OpenMP thread count) of the OpenMP runtime that
    torch's CPU ops run on, or None: torch built without OpenMP, or no /proc/self/maps to find the
    loaded library in (not Linux)."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    return _first_symbol(_loaded_libraries(("libgomp", "libiomp", "libomp")), "omp_set_num_threads")


@functools.lru_cache(maxsize=None)
def _mkl_set_num_threads_local():
    """MKL's ``MKL_Set_Num_Threads_Local`` (the thread count of the calling thread's MKL calls),
    from the library that holds torch's MKL (libtorch_cpu, or libmkl_rt where it is linked
    dynamically), or None: torch built without MKL, or not found."""
    if not torch.backends.mkl.is_available():
        return None
    return _first_symbol(_loaded_libraries(("libtorch_cpu", "libmkl_rt")), "MKL_Set_Num_Threads_Local")


class _Workers:
    """``count`` daemon threads whose torch ops run on one thread each. OpenMP's thread count is a
    setting of each thread, set here in the runtime itself: torch.set_num_threads would also change
    settings that all threads share (torch's default for threads started later, MKL's), and after
    it the calling thread's small ops were measured 2000 times slower. MKL keeps a count of its own,
    which torch sets for all threads: its vector math (torch's exp and log on the CPU) would start
    an OpenMP team of torch's thread count on each worker, and with more OpenMP threads than cores
    the runtime stops spinning between parallel regions, so that every parallel op of every thread,
    the caller's too, waits for a woken thread (a 32 x 1024 sum on the calling thread went from 4
    to 60 µs, 2 cores, once a worker had run an exp). So each worker sets MKL's count for its own
    thread to 1 as well."""

    def __init__(self, count, omp_threads, mkl_threads):
        self.tasks = queue.SimpleQueue()
        ready = threading.Barrier(count + 1)

        def serve():
            torch.get_num_threads()  # torch's set-up of this thread first: it sets the thread count
            omp_threads(1)
            if mkl_threads is not None:
                mkl_threads(1)
            # Grad mode is a setting of each thread, on by default: off here, as on the calling thread
            # inside an autograd Function's forward (the backend's gradients never come from autograd).
            torch.set_grad_enabled(False)
            ready.wait()
            while True:
                task, done = self.tasks.get()
                error = None
                try:
                    task()
                except BaseException as raised:  # noqa: BLE001 - raised in the caller
                    error = raised
                del task  # it holds the call's tensors: nothing of a call may outlive it here
                done.put(error)

        for _ in range(count):
            threading.Thread(target=serve, name="fastkd-chunks", daemon=True).start()
        ready.wait()

    def run(self, tasks):
        """Run every task of ``tasks`` on the workers; wait for all; raise the first error."""
        done = queue.SimpleQueue()
        for task in tasks:
            self.tasks.put((task, done))
        errors = [done.get() for _ in tasks]
        for error in errors:
            if error is not None:
                raise error


# Each worker holds its own buffers (ten at most): this bounds them, whatever the core count.
MAX_WORKERS = 8
_WORKERS = {}  # worker count -> _Workers
_WORKERS_LOCK = threading.Lock()
os.register_at_fork(after_in_child=_WORKERS.clear)  # threads do not survive a fork


def _workers(count):
    with _WORKERS_LOCK:
        if count not in _WORKERS:
            _WORKERS[count] = _Workers(count, _omp_set_num_threads(), _mkl_set_num_threads_local())
        return _WORKERS[count]


def count(device):
    """How many workers run the chunks of a call on ``device``: 1 (the calling thread) off the CPU,
    with one intra-op thread, or without an OpenMP runtime to give each worker one thread."""
    wanted = min(torch.get_num_threads(), MAX_WORKERS)
    if device.type != "cpu" or wanted == 1 or _omp_set_num_threads() is None:
        return 1
    return wanted


def run(task, workers):
    """``task()`` on ``workers`` workers at once; wait for all; raise the first error."""
    _workers(workers).run([task] * workers)
