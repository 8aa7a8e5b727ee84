"""The house stays livable: small modules, no import cycle (imports inside functions included), tooling out of the
library (issue 23)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import cpu_env

SEGDA = Path(__file__).resolve().parents[1] / "segda"
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    found = {}
    for path in SEGDA.rglob("*.py"):
        parts = list(path.relative_to(SEGDA.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every segda module `name` imports, at the top or inside a function: `from a.b import c` names a.b.c when
    that is a module, else a.b."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    # importing a.b.c runs a/__init__ and a/b/__init__ first: those are imported too (except this module's own
    # packages, which Python has already started by the time this module runs)
    own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    out |= {".".join(m.split(".")[:i]) for m in list(out) for i in range(2, m.count(".") + 1)}
    return {m for m in out if m in modules and m != name and m not in own}


def test_no_module_is_over_400_lines():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules: {long}"


def test_no_import_cycle_even_through_imports_inside_functions():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert graph["segda.cli"] >= {"segda.cli_data", "segda.argtypes"}, "the walk sees the imports"


@pytest.mark.slow
def test_importing_training_loads_no_benchmark_or_test_code():
    code = ("import sys, segda.train, segda.methods, segda.data.stream; "
            "print(sorted(m for m in sys.modules if m.startswith(('segda.bench', 'servers', 'helpers'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cpu_env(), check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_training_never_reaches_benchmark_code_and_the_old_modules_are_gone():
    """No import the training code can reach, inside functions included, leads to segda.bench."""
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    reached, todo = set(), ["segda.train", "segda.methods", "segda.data"]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo.extend(graph[name])
    assert not {m for m in reached if m.startswith("segda.bench")}, sorted(reached)
    assert not (SEGDA / "loopback.py").exists() and not (SEGDA / "data" / "keepalive.py").exists()
