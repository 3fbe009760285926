"""The one place that launches Triton kernels: allocates outputs, picks block sizes and grids.

Every launcher takes 2-D tensors whose last dimension is contiguous (any row stride), labels
``[N]`` of any stride; the block width is at most MAX_BLOCK_V (tests lower it to force the
multi-block paths at tiny V). ``fastkd.backends.torch`` has the same functions with the same results. Triton
and the kernels are imported on first use, never at ``import fastkd``. ``KDOptions`` become kernel
arguments in ``option_args`` only; ``_launch`` adds the grid, block width and warps.
"""
import functools
import math

import torch

from .. import config
from ..buffers import accumulation_dtype, empty, gradient_buffer
from ..config import check_kd_kernel
from ..options import TAILS, KDOptions, as_teachers

MAX_BLOCK_V = 4096
MAX_TEACHERS = 4  # the dense kernel's mixture of teachers (kernels/kd_loss.py has as many weight slots)
MAX_TOPK_K = 1024  # teacher_topk keeps k keys on chip; larger k uses torch.topk (fastkd.functional)
MAX_BLOCK_K = 1024
# teacher_topk's tile and warps (and the MAX_REGISTERS cap): 8 columns a thread, the fewest that
# load 16 bytes of bf16, keep its merge at 112 registers without a spill (k = 64 and 1024, sm_90); a
# tile of 4096 spills under the cap, and at 16 warps a tile models slower (more merge instructions).
# float64 runs uncapped (182 registers; capped, it spills 164 B).
TOPK_BLOCK_V = 2048
TOPK_WARPS = 8
# ptxas's ceiling on registers a thread (the `maxnreg` launch option) for the resident kernel (which
# would use up to 141) and teacher_topk (184 at k = 64): 112 leaves 2 CTAs of 8 warps an SM (1 of 16
# with room to spare). The audit gate (tests/test_audit.py) fails a gated kernel above it or with any
# spill.
MAX_REGISTERS = 112


def _tl_dtype(dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def _pow2(n):
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _block_and_warps(V):
    block = max(min(MAX_BLOCK_V, _pow2(V)), 16)
    warps = 16 if block >= 4096 else 8 if block >= 2048 else 4
    return block, warps


def _vec(*tensors):
    """Elements per thread of a tile row: one 16-byte load of the widest input."""
    return 16 // max(t.element_size() for t in tensors)


def _row_walk(*tensors):
    """VEC and ALIGNED of a kernel walking the rows of ``tensors`` (None: absent) in 16-byte groups
    (kernels/row_tiles.py): the elements of one 16-byte load of the widest, and whether their row
    strides agree modulo VEC, so that every row's aligned groups start at the same column."""
    tensors = [t for t in tensors if t is not None]
    vec = _vec(*tensors)
    return dict(VEC=vec, ALIGNED=len({t.stride(0) % vec for t in tensors}) == 1)


def _labels(labels, stand_in):
    """The labels pointer and stride for a kernel (any tensor stands in when there are none)."""
    return (stand_in, 0) if labels is None else (labels, labels.stride(0))


# Columns of a row one CTA of the resident kernel keeps in registers: 16 a thread of 16 warps
# (512 threads, capped at MAX_REGISTERS each); float64 (gradcheck) 1024 columns of 4 warps.
RESIDENT_BLOCK = 8192
RESIDENT_BLOCK_FLOAT64 = 1024
# auto runs the resident kernel up to this V, for the divergences whose two-pass kernel reads the
# row three times: there the model (`fastkd audit`, sm_90, N = 8192, bf16) times it at 0.09 ms
# against 0.12 (jsd, V = 4096); at V = 8192 it holds one CTA an SM at 108-112 registers and models
# slower (0.38 ms against 0.24), and for kl (two reads) the two-pass kernel models faster at every
# V (0.05 ms against 0.06 at V = 4096); reverse_kl's two-pass kernel, which finds the student's
# argmax in its first pass, models level with the resident one at V = 4096 (0.065 ms each).
RESIDENT_AUTO_V = 4096


def resident_capacity(acc_dtype):
    """Columns of a row one CTA of the resident kernel holds when accumulating in ``acc_dtype``."""
    return RESIDENT_BLOCK_FLOAT64 if acc_dtype == torch.float64 else RESIDENT_BLOCK


def kd_kernel(V, acc_dtype=torch.float32, name=None, num_teachers=1, three_pass=True):
    """The dense kernel a call on rows of ``V`` columns runs, accumulating in ``acc_dtype``:
    "two_pass" or "resident". ``name``: one of ``fastkd.config.KD_KERNELS``, by default
    ``fastkd.config.kd_kernel`` (read here, and nowhere else); ``three_pass``: the divergence has
    no cross term, so two_pass reads the row three times. A kernel that cannot run the call raises
    NotImplementedError."""
    name = check_kd_kernel(config.kd_kernel if name is None else name)
    fits = V <= resident_capacity(acc_dtype)
    if name == "auto":
        return "resident" if three_pass and num_teachers == 1 and fits and V <= RESIDENT_AUTO_V else "two_pass"
    if name == "resident" and num_teachers > 1:
        raise NotImplementedError("resident kernel: one teacher only; a mixture of teachers runs the two-pass kernel")
    if name == "resident" and not fits:
        raise NotImplementedError(f"resident kernel: a row of {V} columns is longer than the "
                                  f"{resident_capacity(acc_dtype)} one CTA holds")
    return name


def _resident_launch(V, acc_dtype):
    """(BLOCK_V, num_warps) of the resident kernel: one CTA of BLOCK_V >= V columns."""
    block = max(16, _pow2(V))
    warps = min(16, max(4, block // 512))  # 16 columns a thread at RESIDENT_BLOCK (8 for float64)
    return block, warps


@functools.lru_cache(maxsize=256)
def option_args(opts: KDOptions, kernel):
    """The options as ``kernel``'s arguments, by name: of the scalars and constexprs below, those
    its signature declares (the KD kernels share these names). The one place options become kernel
    arguments; every value is a field or cached property of ``opts``. Cached per (options, kernel):
    a training loop passes the same options at every step, and hashing them costs less than this."""
    mix_weight, log_weight_p, log_weight_q = opts.mixture_weights
    log_teacher_weights = opts.log_teacher_weights + (0.0,) * (MAX_TEACHERS - opts.num_teachers)
    args = dict(
        inv_temperature=opts.inv_temperature, inv_teacher_temperature=opts.inv_teacher_temperature,
        mix_weight=mix_weight, log_weight_p=log_weight_p, log_weight_q=log_weight_q, soft_scale=opts.soft_scale,
        hard_weight=opts.hard_weight, ignore_index=opts.ignore_index,
        **{f"log_teacher_weight_{i}": w for i, w in enumerate(log_teacher_weights)},
        DIVERGENCE=opts.divergence_code, HAS_CE=opts.hard_weight != 0,
        CE_FROM_STUDENT=opts.hard_weight != 0 and opts.temperature == 1.0,
    )
    return {name: args[name] for name in kernel.arg_names if name in args}


# ---------------------------------------------------------------------------------------------- dense


def kd_forward(student, teachers, labels, grad_scale, opts: KDOptions, *, inplace=False, need_grad=True):
    """Per-row loss ``[N]`` (float32; float64 for float64 input) and the student gradient ``[N, V]``
    (student dtype, times ``grad_scale`` ``[1]``; None unless ``need_grad``), written into
    ``student``'s storage with ``inplace``. ``teachers``: a teacher ``[N, V]``, or up to
    MAX_TEACHERS of them, mixed with ``opts.teacher_weights``."""
    from ..kernels import kd_loss

    teachers = as_teachers(teachers)
    N, V = student.shape
    acc = accumulation_dtype(student.dtype, *[t.dtype for t in teachers])
    loss = empty(N, dtype=acc, device=student.device)
    grad = gradient_buffer(student, inplace, need_grad)
    choice = kd_kernel(V, acc, num_teachers=len(teachers), three_pass=not opts.has_cross_term)
    if N == 0:
        return loss, grad
    if choice == "resident":
        return _resident_kd_forward(student, teachers[0], labels, grad_scale, opts, loss, grad)
    _launch(kd_loss.kd_forward_kernel, N, V,
            student, student.stride(0), teachers, tuple(t.stride(0) for t in teachers), *_labels(labels, loss),
            loss if grad is None else grad, 0 if grad is None else grad.stride(0), grad_scale, loss, V, opts=opts,
            NUM_TEACHERS=len(teachers), HAS_LABELS=labels is not None, WRITE_GRAD=grad is not None,
            ACC_DTYPE=_tl_dtype(acc), **_row_walk(student, grad, *teachers))
    return loss, grad


def _resident_kd_forward(student, teacher, labels, grad_scale, opts, loss, grad):
    """kd_forward through kernels/kd_resident.py: one program (one CTA) a row."""
    from ..kernels import kd_resident

    N, V = student.shape
    acc = accumulation_dtype(student.dtype, teacher.dtype)
    block, warps = _resident_launch(V, acc)
    kernel = kd_resident.kd_resident_kernel
    kernel[(N,)](
        student, student.stride(0), teacher, teacher.stride(0), *_labels(labels, loss),
        loss if grad is None else grad, 0 if grad is None else grad.stride(0), grad_scale, loss, V,
        **option_args(opts, kernel), HAS_LABELS=labels is not None, WRITE_GRAD=grad is not None,
        ACC_DTYPE=_tl_dtype(acc), BLOCK_V=block, num_warps=warps, maxnreg=MAX_REGISTERS,
    )
    return loss, grad


def _launch(kernel, N, V, *args, opts=None, **meta):
    """``kernel(*args, **meta)`` on one program a row of ``N`` rows (nothing when N = 0), with the
    block width and warps of rows of ``V`` columns and, given ``opts``, the options' arguments
    (``option_args``)."""
    if N:
        block, warps = _block_and_warps(V)
        options = {} if opts is None else option_args(opts, kernel)
        kernel[(N,)](*args, **options, **meta, BLOCK_V=block, num_warps=warps)


def scale_rows(grad, scale, *, out=None):
    """``grad * scale`` row by row (``scale``: one value per row, or one value, any shape, read on the
    device), written to ``out``, which may be ``grad`` itself: then an upstream gradient of 1 costs nothing."""
    from ..kernels import scale as scale_kernels

    N, V = grad.shape
    scale = scale.reshape(-1)
    out = empty((N, V), dtype=grad.dtype, device=grad.device) if out is None else out
    if V == 0:
        return out
    _launch(scale_kernels.scale_rows_kernel, N, V, grad, grad.stride(0), out, out.stride(0), scale,
            0 if scale.numel() == 1 else scale.stride(0), V, IN_PLACE=out is grad,
            ACC_DTYPE=_tl_dtype(accumulation_dtype(grad.dtype)), **_row_walk(grad, out))
    return out


# -------------------------------------------------------------------------------------------- softmax


def softmax_forward(x, temperature, *, log):
    from ..kernels import softmax

    N, V = x.shape
    y = empty((N, V), dtype=x.dtype, device=x.device)
    _launch(softmax.softmax_forward_kernel, N, V, x, x.stride(0), y, y.stride(0), V, 1.0 / temperature, LOG=log,
            ACC_DTYPE=_tl_dtype(accumulation_dtype(x.dtype)), **_row_walk(x, y))
    return y


def softmax_backward(y, dy, temperature, *, log):
    from ..kernels import softmax

    N, V = y.shape
    dx = empty((N, V), dtype=y.dtype, device=y.device)
    _launch(softmax.softmax_backward_kernel, N, V, y, y.stride(0), dy, dy.stride(0), dx, dx.stride(0), V,
            1.0 / temperature, LOG=log, ACC_DTYPE=_tl_dtype(accumulation_dtype(y.dtype, dy.dtype)),
            **_row_walk(y, dy, dx))
    return dx


# ---------------------------------------------------------------------------------------------- top-k


def teacher_topk(logits, k, temperature):
    """Top-k log-probabilities of softmax(logits / T) ``[N, k]`` (float32; float64 for float64
    logits), sorted descending, and their columns ``[N, k]`` int32. Needs k <= ``MAX_TOPK_K``."""
    from ..kernels import topk

    N, V = logits.shape
    acc = accumulation_dtype(logits.dtype)
    logprobs = empty((N, k), dtype=acc, device=logits.device)
    indices = empty((N, k), dtype=torch.int32, device=logits.device)
    if N == 0:
        return logprobs, indices
    if k > MAX_TOPK_K:
        raise ValueError(f"the Triton top-k kernel takes k <= {MAX_TOPK_K}, got k={k}")
    k_pad = max(2, _pow2(k))
    block = max(min(MAX_BLOCK_V, TOPK_BLOCK_V, _pow2(V)), k_pad, 16)
    topk.teacher_topk_kernel[(N,)](
        logits, logits.stride(0), logprobs, indices, k, V, k, 1.0 / temperature,
        ACC_DTYPE=_tl_dtype(acc), K_PAD=k_pad, BLOCK_V=block, num_warps=TOPK_WARPS if block >= TOPK_BLOCK_V else 4,
        maxnreg=None if acc == torch.float64 else MAX_REGISTERS,
        **_row_walk(logits),
    )
    return logprobs, indices


def uld_topk_gradient(student, z_max, log_d, coef, temperature, *, out=None):
    """``coef[:, None] * softmax(student / T)`` ``[N, V]`` in the student's dtype, from each row's
    largest logit ``z_max`` [N] and ``log_d`` [N], the log of its sum of exp(s - z_max / T); rows
    whose ``coef`` is 0 are 0 (``kernels/uld.py``). Written into ``out`` (a fresh tensor if None),
    which may be ``student`` itself."""
    from ..kernels import uld

    N, V = student.shape
    out = empty((N, V), dtype=student.dtype, device=student.device) if out is None else out
    _launch(uld.uld_topk_grad_kernel, N, V, student, student.stride(0), out, out.stride(0), z_max, log_d, coef, V,
            1.0 / temperature, ACC_DTYPE=_tl_dtype(log_d.dtype), **_row_walk(student, out))
    return out


def topk_kd_forward(student, teacher_logprobs, teacher_indices, labels, grad_scale, opts: KDOptions, tail, *,
                    inplace=False, need_grad=True):
    """Per-row loss ``[N]`` and the dense student gradient ``[N, V]`` of the top-k KD loss, as
    ``kd_forward`` (the math is at the top of ``kernels/topk_kd_loss.py``)."""
    from ..kernels import topk_kd_loss

    N, V = student.shape
    K = teacher_logprobs.shape[1]
    acc = accumulation_dtype(student.dtype, teacher_logprobs.dtype)
    loss = empty(N, dtype=acc, device=student.device)
    grad = gradient_buffer(student, inplace, need_grad)
    if N == 0:
        return loss, grad
    # The listed columns' gradients, parked between the kernel's passes (see its docstring).
    scratch = loss if grad is None else empty((N, K), dtype=acc, device=student.device)
    _launch(topk_kd_loss.topk_kd_forward_kernel, N, V,
            student, student.stride(0), teacher_logprobs, teacher_logprobs.stride(0),
            teacher_indices, teacher_indices.stride(0), *_labels(labels, loss),
            loss if grad is None else grad, 0 if grad is None else grad.stride(0), grad_scale, scratch, loss, V, K,
            opts=opts, TAIL=TAILS.index(tail), HAS_LABELS=labels is not None, WRITE_GRAD=grad is not None,
            ACC_DTYPE=_tl_dtype(acc), BLOCK_K=min(MAX_BLOCK_K, max(2, _pow2(K))),
            **_row_walk(student, grad))
    return loss, grad


# ----------------------------------------------------------------------- vocabulary-parallel shards


def partial_stats(student, teacher, labels, opts: KDOptions, vocab_start):
    """The shard's per-row statistics ``[N, len(VOCAB_PARALLEL_STATS)]`` (accumulation dtype)."""
    from ..kernels import vocab_parallel
    from . import VOCAB_PARALLEL_STATS

    N, W = student.shape
    acc = accumulation_dtype(student.dtype, teacher.dtype)
    stats = empty((N, len(VOCAB_PARALLEL_STATS)), dtype=acc, device=student.device)
    _launch(vocab_parallel.partial_stats_kernel, N, W,
            student, student.stride(0), teacher, teacher.stride(0), *_labels(labels, stats), stats, W, vocab_start,
            opts=opts, HAS_LABELS=labels is not None, ACC_DTYPE=_tl_dtype(acc), **_row_walk(student, teacher))
    return stats


def row_scalars(student, teacher, labels, row, opts: KDOptions):
    """The shard's part of the row scalars A1, A2 ``[N, 2]`` from the global values in ``row``."""
    from ..kernels import vocab_parallel

    N, W = student.shape
    scalars = empty((N, 2), dtype=row.dtype, device=student.device)
    _launch(vocab_parallel.row_scalars_kernel, N, W,
            student, student.stride(0), teacher, teacher.stride(0), *_labels(labels, row), row, scalars, W,
            opts=opts, HAS_LABELS=labels is not None, ACC_DTYPE=_tl_dtype(row.dtype), **_row_walk(student, teacher))
    return scalars


def shard_finish(student, teacher, labels, row, grad_scale, opts: KDOptions, vocab_start, *, inplace=False,
                 need_grad=True):
    """The row losses ``[N]`` and the shard's gradient ``[N, W]`` (student dtype, times
    ``grad_scale``; None unless ``need_grad``) from the global row values ``row``."""
    from ..kernels import vocab_parallel

    N, W = student.shape
    loss = empty(N, dtype=row.dtype, device=student.device)
    grad = gradient_buffer(student, inplace, need_grad)
    _launch(vocab_parallel.shard_finish_kernel, N, W,
            student, student.stride(0), teacher, teacher.stride(0), *_labels(labels, row), row,
            loss if grad is None else grad, 0 if grad is None else grad.stride(0), grad_scale, loss, W, vocab_start,
            opts=opts, HAS_LABELS=labels is not None, WRITE_GRAD=grad is not None, ACC_DTYPE=_tl_dtype(row.dtype),
            **_row_walk(student, teacher, grad))
    return loss, grad
