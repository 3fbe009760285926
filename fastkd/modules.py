"""``nn.Module`` wrappers of the functional API."""
import torch

from .functional import kd_loss
from .options import check_backend, make_options
from .topk import topk_kd_loss
from .topk_options import check_tail


class KDLoss(torch.nn.Module):
    """``kd_loss`` as a module: ``KDLoss(temperature=2.0)(student_logits, teacher_logits, labels)``.

    Takes the keyword options of ``fastkd.kd_loss`` (checked here, once).
    """

    def __init__(self, *, temperature=1.0, divergence="kl", beta=0.5, skew=0.1, ignore_index=-100,
                 hard_weight=0.0, soft_weight=1.0, t2_scale=True, reduction="batchmean",
                 inplace=False, backend="auto", check_finite=False):
        super().__init__()
        self.options = dict(temperature=temperature, divergence=divergence, beta=beta, skew=skew,
                            ignore_index=ignore_index, hard_weight=hard_weight, soft_weight=soft_weight,
                            t2_scale=t2_scale, reduction=reduction)
        make_options(**self.options)
        if not isinstance(check_finite, bool):
            raise TypeError(f"check_finite must be a bool, got {type(check_finite).__name__}")
        self.inplace, self.backend, self.check_finite = inplace, check_backend(backend), check_finite

    def forward(self, student_logits, teacher_logits, labels=None, num_items_in_batch=None):
        return kd_loss(student_logits, teacher_logits, labels=labels, inplace=self.inplace,
                       backend=self.backend, check_finite=self.check_finite,
                       num_items_in_batch=num_items_in_batch, **self.options)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class TopKKDLoss(torch.nn.Module):
    """``topk_kd_loss`` as a module:
    ``TopKKDLoss(temperature=2.0, tail="bucket")(student_logits, teacher_logprobs, teacher_indices, labels)``.

    Takes the keyword options of ``fastkd.topk_kd_loss`` (checked here, once).
    """

    def __init__(self, *, tail="bucket", temperature=1.0, divergence="kl", beta=0.5, skew=0.1,
                 ignore_index=-100, hard_weight=0.0, soft_weight=1.0, t2_scale=True, reduction="batchmean",
                 inplace=False, backend="auto", validate_indices=None):
        super().__init__()
        self.options = dict(temperature=temperature, divergence=divergence, beta=beta, skew=skew,
                            ignore_index=ignore_index, hard_weight=hard_weight, soft_weight=soft_weight,
                            t2_scale=t2_scale, reduction=reduction)
        make_options(**self.options)
        self.tail = check_tail(tail)
        self.inplace, self.backend, self.validate_indices = inplace, check_backend(backend), validate_indices

    def forward(self, student_logits, teacher_logprobs, teacher_indices, labels=None, num_items_in_batch=None):
        return topk_kd_loss(student_logits, teacher_logprobs, teacher_indices, labels=labels, tail=self.tail,
                            inplace=self.inplace, backend=self.backend, validate_indices=self.validate_indices,
                            num_items_in_batch=num_items_in_batch, **self.options)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in {"tail": self.tail, **self.options}.items())
