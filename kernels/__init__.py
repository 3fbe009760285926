"""Triton kernels of fastkd (``@triton.jit`` code only; installed as ``fastkd.kernels``).

Host code never lives here: launchers in ``fastkd.launch`` pick block sizes and grids. Float
scalars (1 / T, mixture and loss weights) are ``tl.float64`` parameters, cast to the accumulation
dtype at the top of each kernel: Triton would pass an unannotated Python float as float32, which
the float64 path (gradcheck) cannot afford.
"""
