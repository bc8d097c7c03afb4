"""The package's shape: no module imports one that imports it back, and each imports on its own."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "crashlab"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """Every crashlab module `name` imports, at module level or inside a function."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import module`
    # Importing a.b.c runs a/__init__ and a/b/__init__ first: they are imported too.
    found |= {".".join(m.split(".")[:i]) for m in set(found) for i in range(1, m.count(".") + 1)}
    return {m for m in found if m in MODULES and m != name}


def cycles() -> list[list[str]]:
    graph = {m: imports_of(m) for m in MODULES}
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for dep in sorted(graph[m]):
            if state.get(dep) == 1:
                found.append([*stack[stack.index(dep):], dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def test_the_import_graph_finds_what_it_should() -> None:
    assert "crashlab.guest.machine" in imports_of("crashlab.guest.job")
    assert "crashlab.guest.shell" in imports_of("crashlab.guest.transport")


def test_no_module_imports_one_that_imports_it_back() -> None:
    found = cycles()
    assert found == [], "import cycles: " + "; ".join(" -> ".join(c) for c in found)


@pytest.mark.parametrize("name", sorted(m for m in MODULES if not m.endswith("__main__")))
def test_each_module_imports_alone(name: str) -> None:
    r = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True,
                       cwd=PACKAGE.parent, timeout=60)
    assert r.returncode == 0, r.stderr.strip().splitlines()[-1:]
