"""The options of every entry point and their static checks.

Every check here looks at shapes, dtypes, devices and Python scalars only: nothing reads tensor
values, so validation never synchronises with the device (``fastkd.checks`` holds the checks that
read values).

Divergences are declared in ``fastkd.divergences`` (names, parameter checks, mixture weights);
the names of TAILS are the top-k kernel's integer codes, by position (``kernels/topk_kd_loss.py``
defines the same order as constexprs; a test checks the correspondence).
"""
import math
import numbers
from dataclasses import dataclass, fields
from functools import cached_property
from typing import NamedTuple, Optional

import torch

from .divergences import DIVERGENCES, log_weight, lookup

TAILS = ("bucket", "renormalize", "ignore")
REDUCTIONS = ("batchmean", "sum", "mean", "none")
BACKENDS = ("auto", "triton", "torch")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class KDOptions:
    """What the kernels (and their torch peers) compute per row; the reduction is ``Reduction``'s.

    Built once per call, checked, by ``make_options`` (or by ``fastkd.ops.unpack_kd_options`` from
    the packed scalars of a custom op). The scalars derived from it on the host (1/T, the
    gradient's factor, the log-weights) are its cached properties below, computed on first use
    and never again: the launchers and the torch backend read them, they do not rebuild them."""
    temperature: float = 1.0
    divergence: str = "kl"
    beta: float = 0.5
    skew: float = 0.1
    hard_weight: float = 0.0
    soft_weight: float = 1.0
    t2_scale: bool = True
    ignore_index: int = -100
    teacher_temperature: Optional[float] = None  # None: the student's temperature
    teacher_weights: tuple = (1.0,)  # the mixture of teachers' weights, summing to 1 (one per teacher)

    @property
    def teacher_T(self):
        return self.temperature if self.teacher_temperature is None else self.teacher_temperature

    @property
    def num_teachers(self):
        return len(self.teacher_weights)

    @cached_property
    def inv_temperature(self):
        return 1.0 / self.temperature

    @cached_property
    def inv_teacher_temperature(self):
        return 1.0 / self.teacher_T

    @cached_property
    def log_teacher_weights(self):
        """log w_i of the mixture of teachers (-inf for a weight of 0)."""
        return tuple(map(log_weight, self.teacher_weights))

    @property
    def entry(self):
        """The divergence's registry entry (``fastkd.divergences``)."""
        return lookup(self.divergence)

    @cached_property
    def divergence_code(self):
        return DIVERGENCES.index(self.divergence)

    @cached_property
    def soft_scale(self):
        """Factor on the divergence: soft_weight, times T**2 (the student's T) when t2_scale."""
        return self.soft_weight * (self.temperature**2 if self.t2_scale else 1.0)

    @cached_property
    def soft_grad_scale(self):
        """Factor on dD/ds in the student gradient, before the reduction's ``grad_scale``:
        soft_scale / T (s = z / T)."""
        return self.soft_scale / self.temperature

    @property
    def cross_term_side(self):
        """``"teacher"`` or ``"student"`` where D is known after the first pass from a cross term
        (one teacher, a divergence the registry gives one), else None."""
        return self.entry.cross_term if self.num_teachers == 1 else None

    @property
    def has_cross_term(self):
        return self.cross_term_side is not None

    @property
    def grad_reads_row_scalars(self):
        """Whether dD/ds reads the row scalars A1, A2: every divergence but kl (whose gradient is
        q - p). The vocabulary-parallel loss (``fastkd.distributed``) exchanges them for these, also
        where its loss comes from the exchanged cross term: reverse_kl's gradient at a one-hot q is
        exact only with A1, A2 whose terms round as its own (a cross term would need the teacher's
        logit at the student's argmax for that, which one rank holds)."""
        return self.divergence != "kl"

    @cached_property
    def mixture_weights(self):
        """(mix_weight, log w_p, log w_q) of the mixture M = w_p p + w_q q this divergence uses."""
        entry = self.entry
        return entry.mixture_weights(entry.parameter_value(beta=self.beta, skew=self.skew))


@dataclass(frozen=True)
class Reduction:
    """How the per-row losses become the loss: ``kind`` one of REDUCTIONS, and the gradient
    accumulation count that replaces the kept-row count (None, a number, or a 0-d tensor)."""
    kind: str = "batchmean"
    num_items_in_batch: object = None


class LogitTransform(NamedTuple):
    """A fused-linear logit transform: ``z -> softcap * tanh(scale * z / softcap)``, or
    ``scale * z`` when softcap is None."""
    scale: float = 1.0
    softcap: Optional[float] = None


IDENTITY = LogitTransform()


def _real(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not -math.inf < value < math.inf:  # not math.isfinite: comparisons trace under torch.compile
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}")
    return value


def check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _may_overlap(x):
    """True when two elements of ``x`` may share memory (a stride-0 dimension, an ``as_strided``
    view that folds onto itself), from its sizes and strides alone: no data is read. Dimensions of
    more than one element, by increasing stride, must each step past all the earlier ones span;
    a layout that interleaves its dimensions passes no such test and counts as overlapping. An
    empty tensor has no two elements, whatever its strides."""
    if x.numel() == 0:
        return False
    span = 0
    for stride, size in sorted((abs(st), sz) for sz, st in zip(x.shape, x.stride()) if sz > 1):
        if stride <= span:
            return True
        span += stride * (size - 1)
    return False


def check_inplace(inplace, student, name="student_logits"):
    """``inplace`` a bool, and with ``inplace=True`` a ``student`` whose elements do not overlap:
    the gradient written into overlapping storage would keep only one row's value."""
    check_bool("inplace", inplace)
    if inplace and _may_overlap(student):
        raise ValueError(f"inplace=True needs {name} whose elements do not overlap in memory, but its strides "
                         f"{tuple(student.stride())} for shape {tuple(student.shape)} may overlap (an expand()ed "
                         "or otherwise self-overlapping view): pass inplace=False, or a .contiguous() copy")
    return inplace


def check_temperature(temperature, name="temperature"):
    temperature = _real(name, temperature)
    if temperature <= 0:
        raise ValueError(f"{name} must be > 0, got {temperature}")
    return temperature


def check_backend(backend):
    return _choice("backend", backend, BACKENDS)


def check_tail(tail):
    return _choice("tail", tail, TAILS)


def make_options(temperature=1.0, divergence="kl", beta=0.5, skew=0.1, hard_weight=0.0, soft_weight=1.0,
                 t2_scale=True, ignore_index=-100, teacher_temperature=None, teacher_weights=(1.0,)):
    """Validate the per-row KD options and return them as ``KDOptions`` (``teacher_weights``:
    already checked by ``check_teacher_weights``). The parameters are KDOptions' fields, in their
    order: the entry points pass them by position (a cached call keyed by position costs less)."""
    entry = lookup(divergence)
    beta, skew = _real("beta", beta), _real("skew", skew)
    entry.check(beta=beta, skew=skew)
    hard_weight, soft_weight = _real("hard_weight", hard_weight), _real("soft_weight", soft_weight)
    if hard_weight < 0 or soft_weight < 0:
        raise ValueError(f"hard_weight and soft_weight must be >= 0, got {hard_weight} and {soft_weight}")
    ignore_index = check_int("ignore_index", ignore_index)
    check_bool("t2_scale", t2_scale)
    if teacher_temperature is not None:
        teacher_temperature = check_temperature(teacher_temperature, "teacher_temperature")
    return KDOptions(check_temperature(temperature), entry.name, beta, skew, hard_weight, soft_weight,
                     t2_scale, ignore_index, teacher_temperature, tuple(teacher_weights))


# The KD options an entry point takes as keyword arguments (teacher_weights apart: it is checked
# against the number of teachers, ``check_teacher_weights``).
OPTION_NAMES = tuple(f.name for f in fields(KDOptions) if f.name != "teacher_weights")


def options_of(arguments, **more):
    """``make_options`` of the OPTION_NAMES among an entry point's ``arguments`` (its ``locals()``)
    and of ``more``."""
    return make_options(**{name: arguments[name] for name in OPTION_NAMES}, **more)


def as_teachers(teacher_logits, name="teacher_logits"):
    """``teacher_logits`` (a tensor, or a list or tuple of them: a mixture of teachers) as a tuple."""
    if isinstance(teacher_logits, (list, tuple)):
        if not teacher_logits:
            raise ValueError(f"{name} is an empty {type(teacher_logits).__name__}; pass one teacher or several")
        return tuple(teacher_logits)
    return (teacher_logits,)


def check_teacher_weights(teacher_weights, num_teachers):
    """The mixture weights of ``num_teachers`` teachers, normalised to sum to 1: None gives them all
    the same weight; otherwise one real number >= 0 per teacher, not all 0 (divided by their sum)."""
    if teacher_weights is None:
        return (1.0 / num_teachers,) * num_teachers
    if isinstance(teacher_weights, torch.Tensor) or not isinstance(teacher_weights, (list, tuple)):
        raise TypeError(f"teacher_weights must be a list or tuple of numbers (one per teacher), got "
                        f"{type(teacher_weights).__name__}")
    if len(teacher_weights) != num_teachers:
        raise ValueError(f"teacher_weights has {len(teacher_weights)} weights for {num_teachers} teachers")
    weights = [_real(f"teacher_weights[{i}]", w) for i, w in enumerate(teacher_weights)]
    if any(w < 0 for w in weights):
        raise ValueError(f"teacher_weights must be >= 0, got {list(teacher_weights)}")
    total = sum(weights)
    if total <= 0:
        raise ValueError(f"teacher_weights must not all be 0, got {list(teacher_weights)}")
    return tuple(w / total for w in weights)


def make_reduction(reduction="batchmean", num_items_in_batch=None):
    """Validate ``reduction`` and ``num_items_in_batch`` and return them as ``Reduction``.

    ``num_items_in_batch``: None, a real number >= 0, or a one-element real tensor (never read, so
    no synchronisation), kept as a number or a 0-d tensor. It replaces the kept-row count that
    ``"batchmean"`` (and ``"mean"``, times V) divides by; other reductions have no normaliser."""
    reduction = _choice("reduction", reduction, REDUCTIONS)
    if num_items_in_batch is None:
        return Reduction(reduction)
    if reduction not in ("batchmean", "mean"):
        raise ValueError(f"num_items_in_batch replaces the normaliser of reduction='batchmean' (or 'mean'); "
                         f"reduction={reduction!r} has none: drop num_items_in_batch or change the reduction")
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(f"num_items_in_batch must be a number or a one-element tensor, got shape "
                             f"{tuple(num_items_in_batch.shape)}")
        if num_items_in_batch.dtype == torch.bool or num_items_in_batch.is_complex():
            raise TypeError(f"num_items_in_batch must hold a real number, got {num_items_in_batch.dtype}")
        return Reduction(reduction, num_items_in_batch.detach().reshape(()))
    value = _real("num_items_in_batch", num_items_in_batch)
    if value < 0:
        raise ValueError(f"num_items_in_batch must be >= 0, got {num_items_in_batch}")
    return Reduction(reduction, num_items_in_batch)


def check_dim(x, dim):
    """``dim`` must index one of ``x``'s dimensions (negative counts from the end)."""
    if not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim!r} is not a dimension of a {x.dim()}-d tensor")
    return dim


def check_logits(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{name} must have a vocabulary dimension, got a 0-d tensor")


def check_teacher_constant(name, x):
    if x.requires_grad:
        raise ValueError(f"{name} requires grad; the teacher is a constant: pass {name}.detach()")


def _vocabulary_hint(student, teacher, v_student, v_teacher):
    """How to distil across vocabularies that differ only in padding: a view of the wider side's
    shared columns. ``student``, ``teacher``: (argument name, whether it is a weight ``[V, H]``,
    whose vocabulary is its first dim, rather than logits ``[..., V]``)."""
    v = min(v_student, v_teacher)
    name, is_weight = teacher if v_teacher > v_student else student
    wider = f"{name}[:{v}] (and its bias likewise)" if is_weight else f"{name}[..., :{v}]"
    return (f"; if the two vocabularies are one tokenizer's, the wider one padded (e.g. 151936 and 152064 columns), "
            f"pass {wider}: a view, read without a copy, that takes the loss over the shared first {v} columns, "
            "each side renormalised there")


def check_kd_inputs(student, teachers, labels, opts: KDOptions):
    """Check the tensors of a KD loss call against each other and the options; ``teachers`` is the
    tuple of ``as_teachers``."""
    check_logits("student_logits", student)
    for i, teacher in enumerate(teachers):
        name = "teacher_logits" if len(teachers) == 1 else f"teacher_logits[{i}]"
        check_logits(name, teacher)
        if student.shape != teacher.shape:
            hint = (_vocabulary_hint(("student_logits", False), (name, False), student.shape[-1], teacher.shape[-1])
                    if student.shape[:-1] == teacher.shape[:-1] else "")
            raise ValueError(f"student_logits shape {tuple(student.shape)} and {name} shape "
                             f"{tuple(teacher.shape)} differ{hint}")
        if student.device != teacher.device:
            raise ValueError(f"student_logits is on {student.device} and {name} on {teacher.device}")
        check_teacher_constant(name, teacher)
    if student.shape[-1] == 0:
        raise ValueError("student_logits has an empty vocabulary dimension (V = 0)")
    check_labels(student, labels, opts)


def check_labels(student, labels, opts: KDOptions, *, name="student_logits"):
    """Check ``labels`` (or None) against the leading dims and device of ``student`` (the logits
    ``[..., V]``, or ``name``d another ``[..., X]`` tensor of the same rows) and the options."""
    if labels is None:
        if opts.hard_weight > 0:
            raise ValueError(f"hard_weight={opts.hard_weight} needs labels")
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype not in INDEX_DTYPES:
        raise TypeError(f"labels must be int64 (or int32), got {labels.dtype}")
    if labels.shape != student.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match the leading dims "
                         f"{tuple(student.shape[:-1])} of {name}")
    if labels.device != student.device:
        raise ValueError(f"labels is on {labels.device} and {name} on {student.device}")


def check_k(k, V):
    k = check_int("k", k)
    if not 1 <= k <= V:
        raise ValueError(f"k must be in [1, V] = [1, {V}], got {k}")
    return k


def check_topk_inputs(student, logprobs, indices):
    """Check a student ``[..., V]`` against a top-k teacher ``logprobs``/``indices`` ``[..., k]``."""
    check_logits("student_logits", student)
    check_logits("teacher_logprobs", logprobs)
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"teacher_indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"teacher_indices must be int32 or int64, got {indices.dtype}")
    if logprobs.shape != indices.shape:
        raise ValueError(f"teacher_logprobs shape {tuple(logprobs.shape)} and teacher_indices shape "
                         f"{tuple(indices.shape)} differ")
    if logprobs.shape[:-1] != student.shape[:-1]:
        raise ValueError(f"teacher_logprobs shape {tuple(logprobs.shape)} does not match the leading dims "
                         f"{tuple(student.shape[:-1])} of student_logits")
    for name, t in (("teacher_logprobs", logprobs), ("teacher_indices", indices)):
        if t.device != student.device:
            raise ValueError(f"{name} is on {t.device} and student_logits on {student.device}")
    check_teacher_constant("teacher_logprobs", logprobs)
    V = student.shape[-1]
    if V == 0:
        raise ValueError("student_logits has an empty vocabulary dimension (V = 0)")
    k = logprobs.shape[-1]
    if not 1 <= k <= V:
        raise ValueError(f"teacher_logprobs lists k={k} tokens; k must be in [1, V] = [1, {V}]")


# ------------------------------------------------------------------------- fused linear + KD loss


def check_hidden_size(name, hidden):
    """A linear layer's input ``[..., H]`` with H > 0 (with H = 0 the logits would be the bias alone)."""
    if hidden.shape[-1] == 0:
        raise ValueError(f"{name} has an empty hidden dimension (H = 0, shape {tuple(hidden.shape)}); the fused "
                         "losses take the hidden states that the LM head multiplies")


def _check_tensor(name, x, dim=None):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if dim is None and x.dim() == 0:
        raise ValueError(f"{name} must have a hidden dimension [..., H], got a 0-d tensor")
    if dim is None:
        check_hidden_size(name, x)
    if dim is not None and x.dim() != dim:
        raise ValueError(f"{name} must be {dim}-d, got shape {tuple(x.shape)}")


def _check_linear(prefix, hidden, weight, bias, device):
    """Check ``{prefix}_hidden`` [..., H], ``{prefix}_weight`` [V, H], ``{prefix}_bias`` [V] or None."""
    names = f"{prefix}_hidden", f"{prefix}_weight", f"{prefix}_bias"
    _check_tensor(names[0], hidden)
    _check_tensor(names[1], weight, dim=2)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{names[1]} shape {tuple(weight.shape)} is not [V, H] for {names[0]} of hidden "
                         f"size H = {hidden.shape[-1]} (shape {tuple(hidden.shape)})")
    tensors = [(names[0], hidden), (names[1], weight)]
    if bias is not None:
        _check_tensor(names[2], bias, dim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{names[2]} shape {tuple(bias.shape)} does not match V = {weight.shape[0]} "
                             f"of {names[1]}")
        tensors.append((names[2], bias))
    for name, x in tensors[1:]:
        if x.dtype != hidden.dtype:
            raise TypeError(f"{name} is {x.dtype} but {names[0]} is {hidden.dtype}; the matmul needs one dtype")
    for name, x in tensors:
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} and student_hidden on {device}")
    return tensors


def _as_list(value, count):
    """``value`` (one item, a list or tuple, or None) as a list of ``count`` items."""
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value] * count


def check_fused_inputs(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                       teacher_bias, teacher_logits, labels, opts):
    """Check the tensors of a fused linear KD call against each other and the options, and return
    the teachers as a tuple of ``("logits", z_t)`` or ``("linear", h_t, W_t, b_t)`` (several teachers:
    lists of each argument, one entry per teacher)."""
    device = student_hidden.device if isinstance(student_hidden, torch.Tensor) else None
    _check_linear("student", student_hidden, student_weight, student_bias, device)
    if student_weight.shape[0] == 0:
        raise ValueError("student_weight has an empty vocabulary dimension (V = 0)")
    lead, V = tuple(student_hidden.shape[:-1]), student_weight.shape[0]

    if teacher_logits is not None:
        if teacher_hidden is not None or teacher_weight is not None or teacher_bias is not None:
            raise ValueError("pass the teacher either as teacher_hidden and teacher_weight (and teacher_bias) "
                             "or as teacher_logits, not both")
        logits = as_teachers(teacher_logits)
        for i, z in enumerate(logits):
            name = "teacher_logits" if len(logits) == 1 else f"teacher_logits[{i}]"
            check_logits(name, z)
            if tuple(z.shape) != lead + (V,):
                hint = _vocabulary_hint(("student_weight", True), (name, False), V, z.shape[-1]) if tuple(z.shape[:-1]) == lead else ""
                raise ValueError(f"{name} shape {tuple(z.shape)} is not the student logits shape {lead + (V,)} "
                                 f"(student_hidden leading dims and V of student_weight){hint}")
            if z.device != device:
                raise ValueError(f"{name} is on {z.device} and student_hidden on {device}")
            check_teacher_constant(name, z)
        teachers = tuple(("logits", z) for z in logits)
    else:
        if teacher_hidden is None and teacher_weight is None:
            raise ValueError("no teacher: pass teacher_hidden and teacher_weight, or teacher_logits")
        if teacher_hidden is None or teacher_weight is None:
            missing = "teacher_hidden" if teacher_hidden is None else "teacher_weight"
            raise ValueError(f"{missing} is missing: a teacher given by hidden states needs both "
                             "teacher_hidden and teacher_weight (or pass teacher_logits instead)")
        hiddens = as_teachers(teacher_hidden, "teacher_hidden")
        weights, biases = _as_list(teacher_weight, len(hiddens)), _as_list(teacher_bias, len(hiddens))
        if len(weights) != len(hiddens) or len(biases) != len(hiddens):
            raise ValueError(f"{len(hiddens)} teacher_hidden, {len(weights)} teacher_weight and {len(biases)} "
                             "teacher_bias: give one of each per teacher")
        teachers = []
        for i, (h, w, b) in enumerate(zip(hiddens, weights, biases)):
            prefix = "teacher" if len(hiddens) == 1 else f"teacher[{i}]"
            tensors = _check_linear(prefix, h, w, b, device)
            if tuple(h.shape[:-1]) != lead:
                raise ValueError(f"{prefix}_hidden shape {tuple(h.shape)} and student_hidden shape "
                                 f"{tuple(student_hidden.shape)} differ in their leading (token) dims")
            if w.shape[0] != V:
                hint = _vocabulary_hint(("student_weight", True), (f"{prefix}_weight", True), V, w.shape[0])
                raise ValueError(f"{prefix}_weight has V = {w.shape[0]} rows and student_weight V = {V}; student "
                                 f"and teacher need the same vocabulary{hint}")
            for name, x in tensors:
                check_teacher_constant(name, x)
            teachers.append(("linear", h, w, b))
        teachers = tuple(teachers)
    check_labels(student_hidden, labels, opts, name="student_hidden")
    return teachers


def check_logit_transform(side, logit_scale, softcap):
    """``LogitTransform(logit_scale, softcap)`` of one side (``"student"``, ``"teacher"``), checked:
    real, finite and > 0 (``softcap`` may be None); errors name ``{side}_logit_scale`` / ``{side}_softcap``."""
    prefix = f"{side}_" if side else ""
    for name, value in ((f"{prefix}logit_scale", logit_scale), (f"{prefix}softcap", softcap)):
        if value is None and name.endswith("softcap"):
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            kind = "a real number or None" if name.endswith("softcap") else "a real number"
            raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be finite and > 0, got {value}")
    return LogitTransform(float(logit_scale), None if softcap is None else float(softcap))


def check_transforms(student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap):
    """The (student, teacher) ``LogitTransform`` pair, checked."""
    return (check_logit_transform("student", student_logit_scale, student_softcap),
            check_logit_transform("teacher", teacher_logit_scale, teacher_softcap))


def check_chunk_size(chunk_size):
    return None if chunk_size is None else check_int("chunk_size", chunk_size, minimum=1)


def check_int(name, value, minimum=None):
    """``value`` as an int (bool refused), at least ``minimum`` when given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)
