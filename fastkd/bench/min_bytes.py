"""The least memory traffic (and, for the matmuls of fused_linear_kd, the floating-point work) each
case must do: the numerators of GB/s, of the fraction of the copy bandwidth, and of TFLOP/s.

Counted per element (``e`` bytes for the case's dtype; O(N) terms such as per-row losses left out):

| op | fwd | bwd | fwd+bwd |
|---|---|---|---|
| kd_loss, kd_loss_ce | read student + teacher [N, V]: 2e | read one saved [N, V], write the gradient: 2e | read both, write the gradient: 3e |
| softmax, log_softmax | read x, write y: 2e | read y and dy, write dx: 3e | 5e |
| topk_kd_loss | read the student [N, V]: 1e | 2e, as kd_loss | read the student, write the gradient: 2e |
| teacher_topk | read the teacher [N, V]: 1e | - | - |
| uld, uld_topk | read student + teacher: 2e | 2e, as kd_loss | read both, write the gradient: 3e |
| fused_linear_kd, per element of the [N, H] and [V, H] hidden states and weights | read h, W, h_t, W_t: 2e | read h, W, write their gradients: 2e | 3e |

The top-k ops also move the k log-probabilities (float32) and indices (int32) of every row: 8 k
bytes. kd_loss fwd+bwd is the floor of a fused loss: 6·N·V bytes for bf16. Its fwd and bwd alone
are the least a split forward / backward can move; fastkd's forward also writes the gradient, so it
moves more than the fwd floor on purpose. fused_linear_kd is bound by its matmuls, not by memory:
each of the four [N, V, H] products (student and teacher logits forward, the hidden and weight
gradients backward) costs 2·N·V·H flops; fwd counts the first two, bwd the last two.
"""
from .cases import TOPK_OPS, Case

_NV_ACCESSES = {
    "kd_loss": {"fwd": 2, "bwd": 2, "fwd+bwd": 3},
    "kd_loss_ce": {"fwd": 2, "bwd": 2, "fwd+bwd": 3},
    "softmax": {"fwd": 2, "bwd": 3, "fwd+bwd": 5},
    "log_softmax": {"fwd": 2, "bwd": 3, "fwd+bwd": 5},
    "topk_kd_loss": {"fwd": 1, "bwd": 2, "fwd+bwd": 2},
    "teacher_topk": {"fwd": 1},
    "uld": {"fwd": 2, "bwd": 2, "fwd+bwd": 3},
    "uld_topk": {"fwd": 2, "bwd": 2, "fwd+bwd": 3},
}
_FUSED_LINEAR_ACCESSES = {"fwd": 2, "bwd": 2, "fwd+bwd": 3}
_FUSED_LINEAR_MATMULS = {"fwd": 2, "bwd": 2, "fwd+bwd": 4}
TOPK_BYTES_PER_ENTRY = 4 + 4  # a float32 log-probability and an int32 index


def min_bytes(case: Case) -> int:
    element = case.torch_dtype.itemsize
    if case.op == "fused_linear_kd":
        return _FUSED_LINEAR_ACCESSES[case.mode] * element * (case.n + case.v) * case.h
    topk = TOPK_BYTES_PER_ENTRY * case.n * case.k if case.op in TOPK_OPS else 0
    return _NV_ACCESSES[case.op][case.mode] * element * case.n * case.v + topk


def min_flops(case: Case) -> int:
    """The matmul work of the case (0 where there is no matmul)."""
    if case.op != "fused_linear_kd":
        return 0
    return _FUSED_LINEAR_MATMULS[case.mode] * 2 * case.n * case.v * case.h


def copy_bytes(numel: int, element: int) -> int:
    """A device-to-device copy reads and writes every element once."""
    return 2 * numel * element
