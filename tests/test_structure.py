"""The codes and column orders that the host side and the kernels share by position, checked: the
divergence and tail codes, the vocabulary-parallel tables' columns, and the torch table mirroring
the kernel table function for function; and the import graph of ``fastkd``, which has no cycle."""
import ast
import graphlib
import inspect
from pathlib import Path

import fastkd
from fastkd.backends import VOCAB_PARALLEL_ROW, VOCAB_PARALLEL_STATS
from fastkd.backends import torch_divergences
from fastkd.divergences import DIVERGENCES, REGISTRY
from fastkd.kernels import divergences, topk_kd_loss, vocab_parallel
from fastkd.options import TAILS


def test_divergence_codes_are_the_kernels():
    for code, name in enumerate(DIVERGENCES):
        assert getattr(divergences, name.upper()).value == code, name


def test_divergences_with_a_cross_term_come_first():
    """The kernels tell a divergence with a first-pass cross term by ``DIVERGENCE < JSD``."""
    with_cross_term = [entry.cross_term is not None for entry in REGISTRY]
    assert with_cross_term == sorted(with_cross_term, reverse=True), with_cross_term
    assert divergences.JSD.value == sum(with_cross_term)


def test_tail_codes_are_the_kernels():
    for code, name in enumerate(TAILS):
        assert getattr(topk_kd_loss, name.upper()).value == code, name


def test_vocab_parallel_columns_are_the_kernels():
    for column, name in enumerate(VOCAB_PARALLEL_STATS):
        assert getattr(vocab_parallel, name.upper()).value == column, name
    for column, name in enumerate(VOCAB_PARALLEL_ROW):
        assert getattr(vocab_parallel, name.upper()).value == column, name
    assert vocab_parallel.STATS_WIDTH.value == len(VOCAB_PARALLEL_STATS)
    assert vocab_parallel.ROW_WIDTH.value == len(VOCAB_PARALLEL_ROW)


def _functions_in_order(module):
    """Public functions (jit or plain) defined in ``module``, in the order of the file."""
    defined = {name: getattr(value, "fn", value) for name, value in vars(module).items() if not name.startswith("_")}
    defined = {name: fn for name, fn in defined.items()
               if inspect.isfunction(fn) and fn.__module__ == module.__name__}
    return sorted(defined, key=lambda name: inspect.getsourcelines(defined[name])[1])


def test_the_torch_table_mirrors_the_kernel_table():
    """Same functions, same order (the kernels' plumbing, which has no torch peer, aside; and the
    torch side's jsd log-ratios from ls - lt, which the kernels take from log M instead: the
    torch_divergences module docstring)."""
    kernel = _functions_in_order(divergences)
    torch_only = {"finite", "mixture_log_ratios"}
    torch_side = [name for name in _functions_in_order(torch_divergences) if name not in torch_only]
    assert [name for name in kernel if name in torch_side] == torch_side
    plumbing = {"divergence_scalars", "loss_scalars", "gradient_factors", "init_row_statistics", "fold_row_tile",
                "finish_row_statistics", "row_loss"}
    assert set(kernel) - set(torch_side) <= plumbing, set(kernel) - set(torch_side)


def _module_name(path, root):
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node, module, is_package):
    """The module names an import statement in ``module`` names: ``from a import b`` names a and a.b."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module
    if node.level:
        package = module if is_package else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{node.module}" if node.module else package
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def import_graph(root=Path(fastkd.__file__).parent):
    """{module: the fastkd modules it imports}, from every import statement of every file (those
    inside functions too: a deferred import is a dependency all the same). A package's imports of
    its own submodules are left out: its ``__init__`` is their namespace (it dispatches to them),
    not a layer above them."""
    paths = {_module_name(path, root): path for path in root.rglob("*.py")}
    graph = {}
    for module, path in paths.items():
        is_package = path.name == "__init__.py"
        names = {name for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, (ast.Import, ast.ImportFrom)) for name in _imported(node, module, is_package)}
        graph[module] = {name for name in names & paths.keys()
                         if name != module and not (is_package and name.startswith(module + "."))}
    return graph


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert {"fastkd.functional", "fastkd.distributed", "fastkd.divergences"} <= graph.keys()
    assert "fastkd.autograd" in graph["fastkd.functional"]  # the graph sees relative imports
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as error:
        raise AssertionError(f"import cycle: {' -> '.join(error.args[1])}") from None


def test_the_import_graph_sees_a_deferred_import_cycle(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import f\n")
    (package / "b.py").write_text("def f():\n    from . import a\n")
    graph = import_graph(package)
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg", "pkg.a"}}
