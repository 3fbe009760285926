"""Tempered softmax and log-softmax over the last dimension, forward and backward.

Math, per row x of length V at temperature T (s = x / T):

    forward      y_j  = softmax(s)_j     = exp(s_j - lse(s))
                 ly_j = log_softmax(s)_j = s_j - lse(s)
    backward     dx_j = y_j * (dy_j - sum_i dy_i * y_i) / T        (softmax)
                 dx_j = (dy_j - exp(ly_j) * sum_i dy_i) / T        (log_softmax)

lse(s) comes from an online max / sum-of-exps over vocabulary blocks, so any V works with one
program per row. Bytes per element: forward reads x twice (the second read usually hits cache when
a row fits in L2) and writes y once; backward reads y and dy twice and writes dx once.
"""
import triton
import triton.language as tl

from .row_stats import exp, online_logsumexp_update, store


@triton.jit
def softmax_forward_kernel(
    x_ptr, x_row_stride, y_ptr, y_row_stride, V, inv_temperature: tl.float64,
    LOG: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    inv_temperature = tl.full((), inv_temperature, ACC_DTYPE)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    y_row = y_ptr + row * y_row_stride
    cols = tl.arange(0, BLOCK_V)

    m = tl.full((), float("-inf"), ACC_DTYPE)
    d = tl.zeros((), ACC_DTYPE)
    for start in range(0, V, BLOCK_V):
        mask = start + cols < V
        s = tl.load(x_row + start + cols, mask=mask, other=float("-inf")).to(ACC_DTYPE) * inv_temperature
        m, d = online_logsumexp_update(m, d, s)
    lse = m + tl.log(d)

    for start in range(0, V, BLOCK_V):
        mask = start + cols < V
        s = tl.load(x_row + start + cols, mask=mask, other=float("-inf")).to(ACC_DTYPE) * inv_temperature
        out = s - lse
        if not LOG:
            out = exp(out)
        store(y_row + start + cols, out, mask=mask)


@triton.jit
def softmax_backward_kernel(
    y_ptr, y_row_stride, dy_ptr, dy_row_stride, dx_ptr, dx_row_stride, V, inv_temperature: tl.float64,
    LOG: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    inv_temperature = tl.full((), inv_temperature, ACC_DTYPE)
    row = tl.program_id(0).to(tl.int64)
    y_row = y_ptr + row * y_row_stride
    dy_row = dy_ptr + row * dy_row_stride
    dx_row = dx_ptr + row * dx_row_stride
    cols = tl.arange(0, BLOCK_V)

    acc = tl.zeros((BLOCK_V,), ACC_DTYPE)
    for start in range(0, V, BLOCK_V):
        mask = start + cols < V
        dy = tl.load(dy_row + start + cols, mask=mask, other=0.0).to(ACC_DTYPE)
        if LOG:
            acc += dy
        else:
            y = tl.load(y_row + start + cols, mask=mask, other=0.0).to(ACC_DTYPE)
            acc += dy * y
    total = tl.sum(acc, axis=0)

    for start in range(0, V, BLOCK_V):
        mask = start + cols < V
        dy = tl.load(dy_row + start + cols, mask=mask, other=0.0).to(ACC_DTYPE)
        y = tl.load(y_row + start + cols, mask=mask, other=0.0).to(ACC_DTYPE)
        if LOG:
            dx = dy - exp(y) * total
        else:
            dx = y * (dy - total)
        store(dx_row + start + cols, dx * inv_temperature, mask=mask)
