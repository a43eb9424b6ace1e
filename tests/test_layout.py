"""The package layout is the architecture: these tests keep it so.

- no import cycles between gearvisor's modules (module-level imports; an import inside a
  function or under TYPE_CHECKING is a deliberate late one and does not count);
- absolute imports only, so a moved module's imports stay valid;
- the layers: policy/ is pure (imports no other layer), nothing outside master/ and cli/
  imports master/, nothing but cli/ imports cli/, and child/ code never imports master/
  code (a forked child must not be able to reach the master's loop).
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "gearvisor"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path, late: bool = False) -> set[str]:
    """The gearvisor modules `path` imports when it is imported; with `late`, also those its
    functions import when they run. Imports under `if TYPE_CHECKING:` never count."""
    found: set[str] = set()

    def add(node: ast.stmt) -> None:
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: line {node.lineno}: use an absolute import"
            subs = [f"{node.module}.{a.name}" for a in node.names]  # from pkg import module
            found.update(m for m in subs if m in MODULES)
            if node.module in MODULES and not all(m in MODULES for m in subs):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in MODULES)

    def walk(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and isinstance(node.test, ast.Name) \
                    and node.test.id == "TYPE_CHECKING":
                walk(node.orelse)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                add(node)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not late:
                continue
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    walk([n for n in getattr(node, field, []) if isinstance(n, ast.AST)])

    walk(ast.parse(path.read_text()).body)
    return found


GRAPH = {name: imports(path) for name, path in MODULES.items()}


SUBPACKAGES = {"master", "cli", "child", "policy", "config", "gearman", "helpers", "shm",
               "journal",
               "metrics"}


def layer(module: str) -> str:
    """The subpackage a module belongs to, or "top" for gearvisor's top-level modules."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in SUBPACKAGES else "top"


def test_the_graph_sees_the_whole_package() -> None:
    assert {"gearvisor.master.arbiter", "gearvisor.policy.pool", "gearvisor.child.python",
            "gearvisor.cli.main", "gearvisor.config.load"} <= set(GRAPH)
    assert "gearvisor.master.loop" in GRAPH["gearvisor.master.arbiter"]


def test_no_import_cycles() -> None:
    done: set[str] = set()

    def visit(module: str, chain: tuple[str, ...]) -> None:
        assert module not in chain, "import cycle: " + " -> ".join((*chain, module))
        if module not in done:
            for imported in sorted(GRAPH[module]):
                visit(imported, (*chain, module))
            done.add(module)

    for module in sorted(GRAPH):
        visit(module, ())


def imports_of(layer_name: str) -> dict[str, set[str]]:
    """Every import (at import time or late) of the modules of one layer."""
    return {name: imports(path, late=True) for name, path in MODULES.items()
            if layer(name) == layer_name}


def test_policy_is_pure() -> None:
    for module, names in imports_of("policy").items():
        for name in names:
            assert layer(name) in ("policy", "config", "top"), f"{module} imports {name}"
            assert name != "gearvisor.log", f"{module} logs: policy decides, callers log"


def test_only_master_and_cli_import_the_master_and_only_cli_imports_cli() -> None:
    for other in ("child", "policy", "config", "gearman", "helpers", "shm", "metrics",
                  "journal", "top"):
        for module, names in imports_of(other).items():
            if module == "gearvisor.__main__":  # `python -m gearvisor` is the CLI
                continue
            for name in names:
                assert layer(name) not in ("master", "cli"), f"{module} imports {name}"
    for module, names in imports_of("master").items():
        assert not any(layer(n) == "cli" for n in names), f"{module} imports the CLI"


def test_the_cli_does_not_load_the_master_until_it_runs_one() -> None:
    """Every `gearvisor` command imports the CLI; the master (and what it pulls in) is for
    `run` only. Loading it made each `gearvisor status` or `reload` take about 0.5 s."""
    import subprocess
    import sys

    code = ("import sys, gearvisor.cli.main; "
            "print(sorted(m for m in sys.modules if m.startswith('gearvisor.master')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout
