"""The codes and column orders that the host side and the kernels share by position, checked: the
divergence and tail codes, the vocabulary-parallel tables' columns, and the torch table mirroring
the kernel table function for function."""
import inspect

from fastkd.backends import VOCAB_PARALLEL_ROW, VOCAB_PARALLEL_STATS
from fastkd.backends import torch_divergences
from fastkd.kernels import divergences, topk_kd_loss, vocab_parallel
from fastkd.options import DIVERGENCES, TAILS


def test_divergence_codes_are_the_kernels():
    for code, name in enumerate(DIVERGENCES):
        assert getattr(divergences, name.upper()).value == code, name


def test_tail_codes_are_the_kernels():
    for code, name in enumerate(TAILS):
        assert getattr(topk_kd_loss, name.upper()).value == code, name


def test_vocab_parallel_columns_are_the_kernels():
    for column, name in enumerate(VOCAB_PARALLEL_STATS):
        assert getattr(vocab_parallel, name.upper()).value == column, name
    kernel_names = {"d_s": "ROW_D_S", "d_t": "ROW_D_T", "cross": "ROW_CROSS", "z_y": "ROW_Z_Y"}
    for column, name in enumerate(VOCAB_PARALLEL_ROW):
        assert getattr(vocab_parallel, kernel_names.get(name, name.upper())).value == column, name
    assert vocab_parallel.STATS_WIDTH.value == len(VOCAB_PARALLEL_STATS)
    assert vocab_parallel.ROW_WIDTH.value == len(VOCAB_PARALLEL_ROW)


def _functions_in_order(module):
    """Public functions (jit or plain) defined in ``module``, in the order of the file."""
    defined = {name: getattr(value, "fn", value) for name, value in vars(module).items() if not name.startswith("_")}
    defined = {name: fn for name, fn in defined.items()
               if inspect.isfunction(fn) and fn.__module__ == module.__name__}
    return sorted(defined, key=lambda name: inspect.getsourcelines(defined[name])[1])


def test_the_torch_table_mirrors_the_kernel_table():
    """Same functions, same order (the kernels' plumbing, which has no torch peer, aside)."""
    kernel = _functions_in_order(divergences)
    torch_side = [name for name in _functions_in_order(torch_divergences) if name != "finite"]
    assert [name for name in kernel if name in torch_side] == torch_side
    plumbing = {"divergence_scalars", "load_tile", "load_teacher_tiles", "finish_row_statistics", "row_loss"}
    assert set(kernel) - set(torch_side) <= plumbing, set(kernel) - set(torch_side)
