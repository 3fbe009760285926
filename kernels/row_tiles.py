"""Walking a row in whole 16-byte groups, whatever its length and row stride.

A row of V elements at element offset o = row * row_stride of its tensor starts on a 16-byte
boundary only when o is a multiple of VEC (16 bytes / the widest element size, the launcher's
``_vec``). So the row is split, in columns:
    head   [0, h)          h = (-o) mod VEC: fewer than VEC columns
    body   [h, h + n)      n = V - h rounded down to a multiple of VEC: whole aligned groups
    tail   [h + n, V)      fewer than VEC columns
The main loops walk the body in tiles [BLOCK_V / VEC, VEC], one aligned group per tile row (one
thread's vector load), masked by whole groups (``body_tile``), so Triton proves every load 16-byte
aligned and VEC wide, and nothing crosses threads inside a loop. The head and the tail go through
one edge tile beside the loop (``edge_tile``: tile row 0 the head's group, tile row 1 the tail's,
masked per element), the same code as a loop iteration, outside it. (kd_loss.py takes the edge of
a pass that accumulates before its loop and the gradient's after it, as a 2-row tile: where the
edge's registers add least to the loop's.)

Several tensors (student, teachers, gradient) share the split, which the launcher asserts with
ALIGNED when their row strides agree modulo VEC (then o_x + h is a multiple of VEC for each of
them). Without ALIGNED, h = 0 and nothing is claimed: the same walk with narrower loads.
Offsets below are relative to column h (``body_pointer``); a tile's columns are h + offsets.
"""
import triton
import triton.language as tl

from .row_stats import store


@triton.jit
def row_split(offset, V, VEC: tl.constexpr, ALIGNED: tl.constexpr):
    """(h, n): the head's length and the body's, for the row at element ``offset`` (above), as 32-bit
    integers like V, so that the tiles' offsets stay 32-bit (half the registers of 64-bit ones)."""
    head = tl.zeros((), tl.int32)
    if ALIGNED:
        head = ((VEC - offset % VEC) % VEC).to(tl.int32)
    return head, tl.maximum(V - head, 0) // VEC * VEC


@triton.jit
def body_pointer(ptr, offset, head, VEC: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointer to column ``head`` of the row at element ``offset`` of ``ptr``: a whole group when ALIGNED."""
    start = offset + head
    if ALIGNED:
        start = tl.multiple_of(start, VEC)
    return ptr + start


@triton.jit
def body_tile(start, n, BLOCK_V: tl.constexpr, VEC: tl.constexpr):
    """Offsets [BLOCK_V / VEC, VEC] of the body's tile at ``start`` and its mask, by whole groups."""
    groups = start + tl.arange(0, BLOCK_V // VEC)[:, None] * VEC
    return groups + tl.arange(0, VEC)[None, :], tl.broadcast_to(groups < n, (BLOCK_V // VEC, VEC))


@triton.jit
def edge_tile(head, n, V, BLOCK_V: tl.constexpr, VEC: tl.constexpr):
    """Offsets and mask of the tile holding the head (tile row 0) and the tail (tile row 1), of
    BLOCK_V / VEC tile rows like a body tile (to fold into per-tile-row accumulators), or of 2 rows
    (BLOCK_V = 2 VEC: fewer registers where nothing accumulates)."""
    tile_row = tl.arange(0, BLOCK_V // VEC)[:, None]
    lane = tl.arange(0, VEC)[None, :]
    offsets = tl.where(tile_row == 0, lane - VEC, n + lane)
    columns = head + offsets
    return offsets, (tile_row < 2) & (columns >= 0) & (columns < V)


@triton.jit
def load_tile(ptr, offsets, mask, scale, ACC_DTYPE: tl.constexpr, EVICTION: tl.constexpr):
    """One tile of a row at ``offsets`` (each tile row one thread's contiguous elements), times
    ``scale``, in the accumulation dtype; -inf where ``mask`` is false. ``EVICTION``: "evict_last" for
    a read that a later pass repeats, "evict_first" for the last, "" for the default."""
    x = tl.load(ptr + offsets, mask=mask, other=float("-inf"), eviction_policy=EVICTION)
    return x.to(ACC_DTYPE) * scale


@triton.jit
def load_teacher_tiles(t_rows, offsets, mask, inv_teacher_temperature, ACC_DTYPE: tl.constexpr,
                       EVICTION: tl.constexpr, NUM_TEACHERS: tl.constexpr):
    """``load_tile`` of each teacher's row: a tuple of t = teacher / T_t."""
    ts = ()
    for i in tl.static_range(NUM_TEACHERS):
        ts = ts + (load_tile(t_rows[i], offsets, mask, inv_teacher_temperature, ACC_DTYPE, EVICTION),)
    return ts


@triton.jit
def zero_row(ptr, head, n, V, ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr):
    """Store 0 in every column of a row (``ptr`` from ``body_pointer``, ``head`` and ``n`` from ``row_split``)."""
    zeros = tl.zeros((BLOCK_V // VEC, VEC), ACC_DTYPE)
    for start in range(0, n, BLOCK_V):
        offsets, mask = body_tile(start, n, BLOCK_V, VEC)
        store(ptr + offsets, zeros, mask=mask)
    edge, edge_mask = edge_tile(head, n, V, BLOCK_V, VEC)
    store(ptr + edge, zeros, mask=edge_mask)
