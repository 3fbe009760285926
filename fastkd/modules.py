"""``nn.Module`` wrappers of the functional API: each checks its options once, at construction."""
import torch

from .functional import fused_linear_kd_loss, kd_loss, topk_kd_loss
from .options import (check_backend, check_bool, check_chunk_size, check_tail, check_teacher_weights,
                      check_transforms, make_options, make_reduction)


def _kd_options(**options):
    """Check the KD options of a module (those of ``kd_loss``) and return them as a dict.
    ``teacher_weights`` (when given) is checked against as many teachers as it has weights: the
    number of teachers is known at the call."""
    reduction = options.pop("reduction")
    teacher_weights = options.pop("teacher_weights", None)
    make_options(**options)
    make_reduction(reduction)
    if teacher_weights is not None:
        check_teacher_weights(teacher_weights, len(teacher_weights) if isinstance(teacher_weights, (list, tuple))
                              else 1)
        options["teacher_weights"] = teacher_weights
    return dict(options, reduction=reduction)


class KDLoss(torch.nn.Module):
    """``kd_loss`` as a module: ``KDLoss(temperature=2.0)(student_logits, teacher_logits, labels)``.

    Takes the keyword options of ``fastkd.kd_loss`` (checked here, once).
    """

    def __init__(self, *, temperature=1.0, divergence="kl", beta=0.5, skew=0.1, ignore_index=-100,
                 hard_weight=0.0, soft_weight=1.0, t2_scale=True, reduction="batchmean",
                 inplace=False, backend="auto", check_finite=False, teacher_temperature=None, teacher_weights=None):
        super().__init__()
        self.options = _kd_options(temperature=temperature, divergence=divergence, beta=beta, skew=skew,
                                   ignore_index=ignore_index, hard_weight=hard_weight, soft_weight=soft_weight,
                                   t2_scale=t2_scale, reduction=reduction, teacher_temperature=teacher_temperature,
                                   teacher_weights=teacher_weights)
        self.inplace, self.backend = check_bool("inplace", inplace), check_backend(backend)
        self.check_finite = check_bool("check_finite", check_finite)

    def forward(self, student_logits, teacher_logits, labels=None, num_items_in_batch=None):
        """``teacher_logits``: a tensor, or a list of them (a mixture with ``teacher_weights``)."""
        return kd_loss(student_logits, teacher_logits, labels=labels, inplace=self.inplace,
                       backend=self.backend, check_finite=self.check_finite, num_items_in_batch=num_items_in_batch,
                       **self.options)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class TopKKDLoss(torch.nn.Module):
    """``topk_kd_loss`` as a module:
    ``TopKKDLoss(temperature=2.0, tail="bucket")(student_logits, topk, labels=labels)`` with a
    ``fastkd.TopK``, or ``(student_logits, teacher_logprobs, teacher_indices, labels)``.

    Takes the keyword options of ``fastkd.topk_kd_loss`` (checked here, once).
    """

    def __init__(self, *, tail="bucket", temperature=1.0, divergence="kl", beta=0.5, skew=0.1,
                 ignore_index=-100, hard_weight=0.0, soft_weight=1.0, t2_scale=True, reduction="batchmean",
                 inplace=False, backend="auto", validate_indices=None, teacher_temperature=None, check_finite=False):
        super().__init__()
        self.options = _kd_options(temperature=temperature, divergence=divergence, beta=beta, skew=skew,
                                   ignore_index=ignore_index, hard_weight=hard_weight, soft_weight=soft_weight,
                                   t2_scale=t2_scale, reduction=reduction, teacher_temperature=teacher_temperature)
        self.tail = check_tail(tail)
        self.inplace, self.backend, self.validate_indices = inplace, check_backend(backend), validate_indices
        self.check_finite = check_bool("check_finite", check_finite)

    def forward(self, student_logits, teacher_logprobs, teacher_indices=None, labels=None, num_items_in_batch=None):
        return topk_kd_loss(student_logits, teacher_logprobs, teacher_indices, labels=labels, tail=self.tail,
                            inplace=self.inplace, backend=self.backend, validate_indices=self.validate_indices,
                            num_items_in_batch=num_items_in_batch, check_finite=self.check_finite, **self.options)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in {"tail": self.tail, **self.options}.items())


class FusedLinearKDLoss(torch.nn.Module):
    """``fused_linear_kd_loss`` as a module:

        loss_fn = FusedLinearKDLoss(temperature=2.0)
        loss = loss_fn(student_hidden, student.lm_head.weight, teacher_hidden, teacher.lm_head.weight, labels)

    Takes the keyword options of ``fastkd.kd_loss`` (checked here, once), ``chunk_size`` and the
    logit transforms ``student_logit_scale``, ``student_softcap``, ``teacher_logit_scale``,
    ``teacher_softcap`` of ``fused_linear_kd_loss``.
    """

    def __init__(self, *, temperature=1.0, divergence="kl", beta=0.5, skew=0.1, ignore_index=-100,
                 hard_weight=0.0, soft_weight=1.0, t2_scale=True, reduction="batchmean",
                 backend="auto", chunk_size=None, student_logit_scale=1.0, student_softcap=None,
                 teacher_logit_scale=1.0, teacher_softcap=None, teacher_temperature=None, teacher_weights=None):
        super().__init__()
        self.options = _kd_options(temperature=temperature, divergence=divergence, beta=beta, skew=skew,
                                   ignore_index=ignore_index, hard_weight=hard_weight, soft_weight=soft_weight,
                                   t2_scale=t2_scale, reduction=reduction, teacher_temperature=teacher_temperature,
                                   teacher_weights=teacher_weights)
        self.backend = check_backend(backend)
        self.chunk_size = check_chunk_size(chunk_size)
        self.transforms = dict(student_logit_scale=student_logit_scale, student_softcap=student_softcap,
                               teacher_logit_scale=teacher_logit_scale, teacher_softcap=teacher_softcap)
        check_transforms(**self.transforms)

    def forward(self, student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, labels=None, *,
                teacher_logits=None, student_bias=None, teacher_bias=None, num_items_in_batch=None):
        return fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                    teacher_logits=teacher_logits, student_bias=student_bias,
                                    teacher_bias=teacher_bias, chunk_size=self.chunk_size, labels=labels,
                                    backend=self.backend,
                                    num_items_in_batch=num_items_in_batch, **self.options, **self.transforms)

    def extra_repr(self):
        shown = {**self.options, "chunk_size": self.chunk_size, **self.transforms}
        return ", ".join(f"{k}={v!r}" for k, v in shown.items())
