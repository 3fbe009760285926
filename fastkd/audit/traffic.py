"""Bytes each kernel requests, counted on the real launch path by Triton's interpreter.

Under ``TRITON_INTERPRET=1`` every ``tl.load`` / ``tl.store`` of a kernel goes through the
interpreter's builder; wrapped here, each adds (element size x lanes its mask leaves on) to the
running kernel's count. The figure is what the kernel asks of the memory system: a GPU serves a
re-read from L2 when it hits (the model counts every requested byte as DRAM traffic).

The interpreter flag is read when the kernels are imported, so this runs in a child process:
``measure`` starts ``python -m fastkd.audit.traffic``, which prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

SHAPE = (4, 8192)  # N, V: two blocks of the launchers' widest BLOCK_V per row


def _count_launches(steps):
    """Run ``steps()`` counting bytes; returns [[kernel, loaded, stored], ...] in launch order."""
    from triton.runtime import interpreter

    launches = []
    builder, executor = interpreter.InterpreterBuilder, interpreter.GridExecutor
    original = builder.create_masked_load, builder.create_masked_store, executor.__call__

    def active_bytes(ptrs, mask):
        return int(mask.data.sum()) * (ptrs.get_element_ty().primitive_bitwidth // 8)

    def load(self, ptrs, mask, *rest, **kwargs):
        launches[-1][1] += active_bytes(ptrs, mask)
        return original[0](self, ptrs, mask, *rest, **kwargs)

    def store(self, ptrs, value, mask, *rest, **kwargs):
        launches[-1][2] += active_bytes(ptrs, mask)
        return original[1](self, ptrs, value, mask, *rest, **kwargs)

    def call(self, *args, **kwargs):
        launches.append([self.fn.__name__, 0, 0])
        return original[2](self, *args, **kwargs)

    builder.create_masked_load, builder.create_masked_store, executor.__call__ = load, store, call
    try:
        steps()
    finally:
        builder.create_masked_load, builder.create_masked_store, executor.__call__ = original
    return launches


def count(case_ids, dtype, shape=SHAPE):
    """{case id: [[kernel, bytes loaded per element, bytes stored per element], ...]} (in-process;
    needs TRITON_INTERPRET=1 before the kernels were imported)."""
    from . import cases

    n, v = shape
    result = {}
    for case in cases.CASES:
        if cases.case_id(case) in case_ids:
            inputs = cases.make_inputs(n, v, dtype)
            launches = _count_launches(lambda: cases.run_step(case, inputs))
            result[cases.case_id(case)] = [[name, loaded / (n * v), stored / (n * v)]
                                           for name, loaded, stored in launches]
    return result


def start(case_ids, dtype, shape=SHAPE):
    """Start ``count`` in a child process under the interpreter; ``finish`` collects its result."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    command = [sys.executable, "-m", "fastkd.audit.traffic", "--dtype", str(dtype).removeprefix("torch."),
               "--shape", f"{shape[0]},{shape[1]}", *case_ids]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(child):
    out, err = child.communicate()
    if child.returncode != 0:
        raise RuntimeError(f"counting bytes under the interpreter failed:\n{err[-4000:]}")
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description="bytes per element each kernel of the cases requests (interpreter)")
    parser.add_argument("case_ids", nargs="+")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--shape", default=f"{SHAPE[0]},{SHAPE[1]}")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1")
    shape = tuple(int(x) for x in args.shape.split(","))
    print(json.dumps(count(args.case_ids, getattr(torch, args.dtype), shape)))


if __name__ == "__main__":
    main()
