"""The least memory traffic each case must move: the numerator of GB/s and of the roofline.

Counted per element of the ``[N, V]`` tensors (``e`` bytes for the case's dtype, O(N) terms such as
the per-row loss left out):

| op | fwd | bwd | fwd+bwd |
|---|---|---|---|
| kd_loss | read student + teacher: 2e | read one saved [N, V] tensor, write the gradient: 2e | read student + teacher, write the gradient: 3e |
| softmax, log_softmax | read x, write y: 2e | read y and dy, write dx: 3e | 5e |

kd_loss fwd+bwd is the floor of issue 5 (6·N·V for bf16): a fused loss reads each logit once and
writes the gradient once. Its fwd and bwd alone are the least a split forward / backward can move;
fastkd's forward also writes the gradient, so it moves more than the fwd floor on purpose.
"""
from .cases import Case

_ELEMENT_READS_WRITES = {
    "kd_loss": {"fwd": 2, "bwd": 2, "fwd+bwd": 3},
    "softmax": {"fwd": 2, "bwd": 3, "fwd+bwd": 5},
    "log_softmax": {"fwd": 2, "bwd": 3, "fwd+bwd": 5},
}


def min_bytes(case: Case) -> int:
    element = case.torch_dtype.itemsize
    return _ELEMENT_READS_WRITES[case.op][case.mode] * element * case.n * case.v


def copy_bytes(numel: int, element: int) -> int:
    """A device-to-device copy reads and writes every element once."""
    return 2 * numel * element
