"""Compile what a launch compiles, for a GPU this machine does not have.

Inside ``compiling_for(arch)`` the launchers of ``fastkd.launch*`` run as usual on CPU tensors, and
Triton's own ``JITFunction.run`` binds the arguments and computes the specialisations a launch gets
(pointers and ints divisible by 16, ints equal to 1, constexprs), then compiles for the target. Two
things differ from a launch, both outside that code path: the active driver is a stand-in that names
the target (no device is queried), and ``run`` is called with ``warmup=True``, so Triton returns the
compiled kernel instead of launching it. Outputs are never written: the launchers' results hold
whatever ``torch.empty`` gave. Run without ``TRITON_INTERPRET=1`` (the interpreter compiles nothing).
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

STAND_IN_DEVICE = -1  # the device id the stand-in driver reports; no real device has it


@dataclass
class Compiled:
    """One kernel as a launch would have compiled it."""
    name: str
    fn: object        # the JITFunction
    kernel: object    # triton.compiler.CompiledKernel: .asm["cubin"], .asm["ptx"], .metadata
    constants: dict   # constexpr name -> value (specialised ints included)
    divisible: tuple  # parameters specialised as divisible by 16 (pointers and ints)

    @property
    def num_warps(self):
        return self.kernel.metadata.num_warps


class _TargetDriver:
    """The least a driver must answer for ``JITFunction.run`` to bind and compile for ``target``."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return STAND_IN_DEVICE

    def get_current_stream(self, device=None):
        return 0


def _describe(fn, kernel):
    names = [p.name for p in fn.params]
    constants = {names[path[0]]: value for path, value in kernel.src.constants.items() if len(path) == 1}
    divisible = tuple(names[path[0]] for path, attrs in kernel.src.attrs.items()
                      if len(path) == 1 and ["tt.divisibility", 16] in [list(a) for a in attrs])
    return Compiled(fn.__name__, fn, kernel, constants, divisible)


@contextlib.contextmanager
def compiling_for(arch):
    """While active, every kernel launch compiles for ``sm_<arch>`` and is recorded instead of run;
    yields the list of ``Compiled`` in launch order. ``backend="triton"`` is accepted for CPU
    tensors meanwhile, so the public API's launch path runs as on a GPU."""
    import fastkd.backends
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    launched = []
    used = set()
    original_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        used.add(self)
        try:
            kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        except Exception as error:
            raise RuntimeError(f"{self.__name__} does not compile for sm_{arch}") from error
        launched.append(_describe(self, kernel))
        return None

    previous = driver._active  # reading driver.active would create a CUDA driver, which needs a GPU
    driver.set_active(_TargetDriver(GPUTarget("cuda", arch, 32)))
    JITFunction.run = run
    can_run = fastkd.backends.triton_can_run
    fastkd.backends.triton_can_run = lambda tensor: True
    try:
        yield launched
    finally:
        fastkd.backends.triton_can_run = can_run
        JITFunction.run = original_run
        driver._active = previous
        for fn in used:  # their binders hold the stand-in target
            fn.device_caches.pop(STAND_IN_DEVICE, None)


def kernel_source(fn):
    """(source file, first line, ast.FunctionDef) of a JITFunction's Python function."""
    import ast
    import textwrap

    lines, first = inspect.getsourcelines(fn.fn)
    tree = ast.parse(textwrap.dedent("".join(lines)))
    return inspect.getsourcefile(fn.fn), first, tree.body[0]
