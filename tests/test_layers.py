"""The package's layers: imports flow one way (core ← analyses ← measurement ← views ← entry points), no cycle."""

import ast
from pathlib import Path

import lightning_mc

PACKAGE = Path(lightning_mc.__file__).parent
#: Lower layers never import higher ones at run time.
LAYERS = {"core": 0, "analyses": 1, "measurement": 2, "views": 3, "callbacks": 4, "functional": 4}


def _runtime_imports(path: Path) -> set[str]:
    """``lightning_mc...`` modules imported by ``path``, leaving out ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text())
    type_checking = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for node in ast.walk(block)
    }
    return {
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        and node.module
        and node.module.startswith("lightning_mc")
        and id(node) not in type_checking
    }


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


GRAPH = {_module(path): _runtime_imports(path) for path in PACKAGE.rglob("*.py")}


def test_every_layer_is_a_real_part_of_the_package() -> None:
    assert {module.split(".")[1] for module in GRAPH if "." in module} >= set(LAYERS)


def test_no_module_imports_a_higher_layer() -> None:
    upward = [
        (module, dependency)
        for module, dependencies in GRAPH.items()
        for dependency in dependencies
        if _layer(module) is not None and _layer(dependency) is not None and _layer(dependency) > _layer(module)
    ]
    assert upward == []


def test_the_import_graph_has_no_cycle() -> None:
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dependency in sorted(GRAPH.get(module, ())):
            if dependency not in GRAPH:
                continue
            if state.get(dependency) == 1:
                cycles.append([*path, module, dependency])
            elif dependency not in state:
                visit(dependency, [*path, module])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [])
    assert cycles == []
