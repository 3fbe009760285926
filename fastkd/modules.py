"""``nn.Module`` wrappers of the functional API."""
import torch

from .functional import kd_loss
from .options import check_backend, make_options


class KDLoss(torch.nn.Module):
    """``kd_loss`` as a module: ``KDLoss(temperature=2.0)(student_logits, teacher_logits, labels)``.

    Takes the keyword options of ``fastkd.kd_loss`` (checked here, once).
    """

    def __init__(self, *, temperature=1.0, divergence="kl", beta=0.5, skew=0.1, ignore_index=-100,
                 hard_weight=0.0, soft_weight=1.0, t2_scale=True, reduction="batchmean",
                 inplace=False, backend="auto"):
        super().__init__()
        self.options = dict(temperature=temperature, divergence=divergence, beta=beta, skew=skew,
                            ignore_index=ignore_index, hard_weight=hard_weight, soft_weight=soft_weight,
                            t2_scale=t2_scale, reduction=reduction)
        make_options(**self.options)
        self.inplace, self.backend = inplace, check_backend(backend)

    def forward(self, student_logits, teacher_logits, labels=None):
        return kd_loss(student_logits, teacher_logits, labels=labels, inplace=self.inplace,
                       backend=self.backend, **self.options)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
