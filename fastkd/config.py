"""Process-wide settings of fastkd, each read in one place, at the call it applies to.

``kd_kernel``: the dense Triton kernel of ``kd_loss`` (and of every loss built on it), one of
KD_KERNELS. ``fastkd.backends.triton.kd_kernel`` reads it at each launch:

    "auto"      the default: the kernel the audit's model (``fastkd audit``) times faster for the
                call's V, divergence and number of teachers
    "two_pass"  ``kernels/kd_loss.py``: any V and up to four teachers, each input read twice (three
                times for a divergence with no cross term, ``fastkd.divergences``)
    "resident"  ``kernels/kd_resident.py``: each input read once, one CTA holding the row (one teacher,
                rows of up to ``resident_capacity`` columns; other calls raise NotImplementedError)

Set it (``fastkd.config.kd_kernel = "resident"``) or override it for a block
(``with fastkd.config.override(kd_kernel="two_pass"): ...``). Its initial value is the environment
variable ``FASTKD_KD_KERNEL`` (else "auto"), read once, when this module is first imported (at the
first Triton call at the latest). Compiled code (``torch.compile``) reads it at each call as well:
the launcher runs inside the custom op, outside the graph.
"""
import contextlib
import os

KD_KERNELS = ("auto", "two_pass", "resident")

kd_kernel = os.environ.get("FASTKD_KD_KERNEL", "auto")


def check_kd_kernel(name):
    if name not in KD_KERNELS:
        raise ValueError(f"fastkd.config.kd_kernel={name!r} is not one of {', '.join(KD_KERNELS)} (its initial "
                         "value is the environment variable FASTKD_KD_KERNEL)")
    return name


@contextlib.contextmanager
def override(*, kd_kernel):
    """Run the block with ``fastkd.config.kd_kernel`` set to ``kd_kernel`` (checked), then restore it."""
    saved = globals()["kd_kernel"]
    globals()["kd_kernel"] = check_kd_kernel(kd_kernel)
    try:
        yield
    finally:
        globals()["kd_kernel"] = saved
