"""The benchmark tests run the Triton kernels through the interpreter where there is no GPU, as the
tests in tests/ do: TRITON_INTERPRET must be set before triton or a kernel module is imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
