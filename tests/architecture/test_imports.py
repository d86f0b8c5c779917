"""The shape of sidecar/: its layers as import-linter contracts, no import cycle, no hidden imports.

`lint-imports` reads the contracts from pyproject.toml ([tool.importlinter]); tests/run runs it
too. These tests show the contracts hold, that they fail on a forbidden import, and check what
import-linter does not: a cycle through a package's face, an import hidden in a function or
behind TYPE_CHECKING, and the size of the rooms.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "sidecar"
LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))
# The command line launches the daemon and, for `sidecar work`, the optional LLM extra: both
# imported when the subcommand runs, so `sidecar status` stays quick and works without extras.
LAZY_IMPORTS_ALLOWED = {"sidecar/cli.py"}
MAX_MODULE_LINES = 500
MAX_TOP_LEVEL_MODULES = 12


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LINT_IMPORTS, "--no-cache", "--config", str(ROOT / "pyproject.toml")],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def sources() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield str(path.relative_to(ROOT)), ast.parse(path.read_text(encoding="utf-8"))


def test_the_import_contracts_hold() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "forbidden", "contract"),
    [
        ("queue/hooks.py", "sidecar.server", "The stores never import the server"),
        ("client/calls.py", "sidecar.queue.base", "The clients depend only on"),
        ("server/state.py", "sidecar.llm.pacing", "The daemon never imports the LLM side"),
        ("models.py", "sidecar.config", "protocol and models import nothing"),
    ],
)
def test_a_forbidden_import_breaks_its_contract(
    tmp_path: Path, module: str, forbidden: str, contract: str
) -> None:
    shutil.copytree(PACKAGE, tmp_path / "sidecar", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "sidecar" / module
    target.write_text(target.read_text(encoding="utf-8") + f"\nimport {forbidden}  # noqa\n")
    result = lint_imports(tmp_path)  # lint-imports puts its working folder first on the path
    assert result.returncode != 0, result.stdout
    # Long contract names wrap in the report: read it as one line, each name up to its verdict.
    report = " ".join(result.stdout.split())
    assert re.search(re.escape(contract) + r"(?:(?!KEPT).)*? BROKEN", report), result.stdout


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in graph.find_modules_directly_imported_by(node):
            if not dep.startswith("sidecar"):
                continue
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph.modules):
        if module.startswith("sidecar") and module not in index:
            visit(module)
    return found


def test_no_module_imports_itself_through_others() -> None:
    # Stricter than the contract: a package's face (its __init__) counts as a module, so a
    # submodule that imports its own package's face is a cycle here.
    assert _cycles(grimp.build_graph("sidecar")) == []


def test_the_cycle_check_finds_a_cycle(tmp_path: Path) -> None:
    shutil.copytree(PACKAGE, tmp_path / "sidecar", ignore=shutil.ignore_patterns("__pycache__"))
    worker = tmp_path / "sidecar" / "client" / "worker.py"
    worker.write_text(worker.read_text(encoding="utf-8") + "\nimport sidecar.client  # noqa\n")
    code = (
        "import grimp, sys, json\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_imports import _cycles\n"
        "print(json.dumps(_cycles(grimp.build_graph('sidecar'))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "sidecar.client.worker" in result.stdout, result.stdout + result.stderr


def test_no_import_is_hidden_in_a_function_or_behind_type_checking() -> None:
    hidden: list[str] = []
    for name, tree in sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                hidden.append(f"{name}:{node.lineno}: TYPE_CHECKING")
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                for inner in ast.walk(node):
                    if (
                        isinstance(inner, ast.ImportFrom)
                        and (inner.module or "").startswith("sidecar")
                        and name not in LAZY_IMPORTS_ALLOWED
                    ):
                        hidden.append(f"{name}:{inner.lineno}: {ast.unparse(inner)}")
    assert hidden == []


def test_the_rooms_stay_small() -> None:
    long = {
        str(path.relative_to(ROOT)): n
        for path in PACKAGE.rglob("*.py")
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top
