"""The package's layers: imports flow one way (core ← analyses ← measurement ← views ← entry points), no cycle.

Every import counts for the direction, ``if TYPE_CHECKING:`` ones too (a type a lower layer names from a higher one
is a dependency all the same); the cycle check reads the imports that run.
"""

import ast
from pathlib import Path

import lightning_mc

PACKAGE = Path(lightning_mc.__file__).parent
#: Lower layers never import higher ones. ``lightning_mc.masks`` is a public import path (a re-export), at the level of
#: the entry points.
LAYERS = {
    "core": 0,
    "analyses": 1,
    "measurement": 2,
    "views": 3,
    "callbacks": 4,
    "functional": 4,
    "masks": 4,
}


def _imports(path: Path, runtime_only: bool) -> set[str]:
    """``lightning_mc...`` modules imported by ``path`` (``from x import y`` and ``import x``).

    With ``runtime_only``, imports inside ``if TYPE_CHECKING:`` blocks are left out.
    """
    tree = ast.parse(path.read_text())
    type_checking = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for node in ast.walk(block)
    }
    modules: set[str] = set()
    for node in ast.walk(tree):
        if runtime_only and id(node) in type_checking:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import module`
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    return {module for module in modules if module.startswith("lightning_mc")}


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


MODULES = {_module(path): path for path in PACKAGE.rglob("*.py")}
#: Every import, ``TYPE_CHECKING`` ones included: what the direction of the layers is about.
IMPORTS = {module: {d for d in _imports(path, False) if d in MODULES} for module, path in MODULES.items()}
#: The imports that run: what an import cycle is about.
GRAPH = {module: {d for d in _imports(path, True) if d in MODULES} for module, path in MODULES.items()}


def test_every_module_belongs_to_a_layer_and_every_layer_is_a_real_part_of_the_package() -> None:
    assert {module.split(".")[1] for module in MODULES if "." in module} == set(LAYERS)


def test_no_module_imports_a_higher_layer_even_for_type_checking() -> None:
    upward = [
        (module, dependency)
        for module, dependencies in IMPORTS.items()
        for dependency in dependencies
        if _layer(module) is not None and _layer(dependency) is not None and _layer(dependency) > _layer(module)
    ]
    assert upward == []


def test_the_layer_check_sees_type_checking_imports_and_the_public_import_paths(tmp_path: Path) -> None:
    module = tmp_path / "lower.py"
    module.write_text(
        "from typing import TYPE_CHECKING\nimport lightning_mc.core.result\nif TYPE_CHECKING:\n"
        "    from lightning_mc.callbacks import monitor\n"
    )
    assert _imports(module, runtime_only=False) >= {"lightning_mc.callbacks.monitor", "lightning_mc.core.result"}
    assert "lightning_mc.callbacks.monitor" not in _imports(module, runtime_only=True)
    assert _layer("lightning_mc.masks") == LAYERS["functional"]
    assert "lightning_mc.core.attribute_builders" in IMPORTS["lightning_mc.masks"]


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


def test_no_two_modules_share_a_name() -> None:
    names = [module.rsplit(".", 1)[-1] for module, path in MODULES.items() if path.name != "__init__.py"]
    assert sorted({name for name in names if names.count(name) > 1}) == []


def test_the_options_declaration_imports_no_analysis() -> None:
    analyses = {module for module in MODULES if module.startswith("lightning_mc.analyses.")}
    assert IMPORTS["lightning_mc.analyses.options"] & analyses == set()
