"""The package structure docs/DESIGN.md §6 describes: no import cycles between packages, layers in order,
no oversized modules, and every "DESIGN §N" reference pointing at a section that exists.

Imports are read from the source (ast), the way Python runs them: imports under `if TYPE_CHECKING:` are
left out (they never execute); imports inside functions count (they run when the function does).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tpla_serve"
MAX_LINES = 400

# docs/DESIGN.md §6, bottom to top: a package imports only from its own floor or below.
FLOORS = [
    {"config", "flags", "sglang_options", "forward_batch", "net", "cache", "sampling", "grammar", "tpla"},
    {"layers", "models"},
    {"distributed", "disagg"},
    {"engine"},
    {"speculative"},
    {"entrypoints"},
    {"server", "tools", "launch", "generate", "cluster"},
]
# The disagg package holds the transport (floor 3) and the two PD sides, which sit on the engine (floor 5).
DISAGG_SIDES = {"tpla_serve.disagg.prefill_side", "tpla_serve.disagg.decode_side", "tpla_serve.disagg.role"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST, module: str) -> set[str]:
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(module.split(".")[: -node.level] + ([base] if base else []))
            found.add(base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {name for name in found if name == "tpla_serve" or name.startswith("tpla_serve.")}


def _module_graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        graph[module] = _runtime_imports(ast.parse(path.read_text()), module)
    return graph


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "tpla_serve"


def _floor(module: str) -> int:
    if module in DISAGG_SIDES:
        return 4
    package = _package(module)
    return next(i for i, floor in enumerate(FLOORS) if package in floor)


def test_no_import_cycles_between_packages() -> None:
    edges: dict[str, set[str]] = {}
    for module, imports in _module_graph().items():
        for target in imports:
            a, b = _package(module), _package(target)
            if a != b and "tpla_serve" not in (a, b):
                edges.setdefault(a, set()).add(b)

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                todo.extend(edges.get(node, ()))
        return False

    cycles = sorted({tuple(sorted((a, b))) for a, targets in edges.items() for b in targets if reaches(b, a)})
    assert not cycles, f"packages importing each other: {cycles}"


def test_packages_import_only_downward() -> None:
    upward = []
    for module, imports in _module_graph().items():
        if _package(module) == "tpla_serve":  # the package's own __init__ (a lazy Engine export)
            continue
        for target in imports:
            if _package(target) != "tpla_serve" and _floor(target) > _floor(module):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports from a higher floor (docs/DESIGN.md §6):\n" + "\n".join(sorted(upward))


def test_no_module_over_the_size_limit() -> None:
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    over = {path: n for path, n in sizes.items() if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines: {over}"


def test_design_references_resolve() -> None:
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    sections = {int(m) for m in re.findall(r"^## (\d+)\. ", design, flags=re.MULTILINE)}
    cited = {}
    for path in [*ROOT.glob("tpla_serve/**/*.py"), *ROOT.glob("router/**/*.py"), *ROOT.glob("kernels/**/*.py"),
                 *ROOT.glob("tests/**/*.py"), *ROOT.glob("benchmarks/**/*.py")]:
        for number in re.findall(r"DESIGN §(\d+)", path.read_text()):
            cited.setdefault(int(number), str(path.relative_to(ROOT)))
    missing = {n: where for n, where in cited.items() if n not in sections}
    assert cited and not missing, f"DESIGN sections cited but absent from docs/DESIGN.md: {missing}"
