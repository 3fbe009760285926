"""Triton kernels of fastkd (``@triton.jit`` code only; installed as ``fastkd.kernels``).

Host code never lives here: launchers in ``fastkd.launch`` pick block sizes and grids.
"""
