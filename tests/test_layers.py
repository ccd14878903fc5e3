"""The package's imports point one way, in the order data flows:
compat/atomic/errors → base → lora → data → inference → training → serving → recipes → demo →
cli.

Read from the source (every `import`, also inside functions; `if TYPE_CHECKING:` blocks are not
imports), so a lazy import cannot hide an arrow pointing backwards.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lorakit"  # read as text, never imported
LAYERS = [
    ("lorakit.compat", "lorakit.atomic", "lorakit.errors", "lorakit.log"),  # nothing of lorakit
    ("lorakit.base",),
    ("lorakit.lora",),
    ("lorakit.data",),
    ("lorakit.inference",),
    ("lorakit.training",),
    ("lorakit.serving",),
    ("lorakit.recipes",),
    ("lorakit.demo",),
    ("lorakit.cli", "lorakit.__main__"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> set[str]:
    return {module_name(p) for p in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> int | None:
    for i, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    return None  # the package root, which re-exports the public API


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def imports(source: str, me: str, is_package: bool, known: set[str]) -> set[str]:
    """lorakit modules that module `me` imports ("from pkg import submodule" counts as the
    submodule)."""
    package = me if is_package else me.rpartition(".")[0]
    tree = ast.parse(source)
    skip = _type_checking_nodes(tree)
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source_module = ".".join(base + ([node.module] if node.module else []))
            else:
                source_module = node.module or ""
            for alias in node.names:
                sub = f"{source_module}.{alias.name}"
                found.add(sub if sub in known else source_module)
    return {m for m in found if m.split(".")[0] == "lorakit" and m != me}


def backwards(g: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {d}" for m, deps in g.items() if layer_of(m) is not None
                  for d in deps if layer_of(d) is None or layer_of(d) > layer_of(m))


def graph() -> dict[str, set[str]]:
    known = all_modules()
    return {module_name(p): imports(p.read_text(), module_name(p), p.name == "__init__.py", known)
            for p in PACKAGE.rglob("*.py")}


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in all_modules() if m != "lorakit" and layer_of(m) is None)
    assert not unplaced, f"modules outside the layer map (add them to LAYERS): {unplaced}"


def test_imports_point_down_the_layers():
    wrong = backwards(graph())
    assert not wrong, "imports against the data flow:\n" + "\n".join(wrong)


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_lazy_imports_and_skips_type_checking():
    known = all_modules()
    source = ("from typing import TYPE_CHECKING\n"
              "if TYPE_CHECKING:\n    from lorakit.training import SFTTrainer\n"
              "def f():\n    from lorakit.lora import backends\n"
              "from lorakit import compat\n")
    found = imports(source, "lorakit.base.loading", False, known)
    assert found == {"lorakit.lora.backends", "lorakit.compat"}
    assert backwards({"lorakit.base.loading": found}) == [
        "lorakit.base.loading -> lorakit.lora.backends"]
