"""The house in layers: the import contract bites, the CLI goes through the API, rooms stay small."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("loom", "backends", "estimators", "placement")
LINT = Path(sys.executable).parent / "lint-imports"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 60
#: functions allowed past MAX_FUNCTION_LINES, each with its reason (none today)
LONG_FUNCTIONS: dict[str, str] = {}


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    if not LINT.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    return subprocess.run([str(LINT), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_contracts_hold():
    run = _lint(ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 kept, 0 broken" in run.stdout


@pytest.mark.parametrize(("module", "line", "named"), [
    ("loom/core/paths.py", "from loom.app import config", "loom.core.paths -> loom.app.config"),
    ("backends/null.py", "from loom.model import family", "backends.null -> loom.model.family"),
    ("loom/model/cuts.py", "from loom.model import cutting", "No cycles are allowed in loom.model"),
])
def test_an_import_up_or_in_a_circle_fails_and_is_named(tmp_path, module, line, named):
    for name in (*PACKAGES, "pyproject.toml"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}  # noqa\n")
    run = _lint(tmp_path)
    assert run.returncode != 0
    assert named in run.stdout, run.stdout


def _type_checking_imports(tree: ast.Module) -> dict[str, set[str]]:
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    found: dict[str, set[str]] = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom)
        found.setdefault(node.module, set()).update(a.name for a in node.names)
    return found


def test_the_api_lists_one_set_of_names_and_each_resolves():
    import loom.api as api

    tree = ast.parse((ROOT / "loom" / "api.py").read_text())
    exports = {m: set(names) for m, names in api._EXPORTS.items()}
    assert _type_checking_imports(tree) == exports
    for name in api.__all__:
        assert getattr(api, name) is not None, name


def test_the_cli_imports_only_the_api_and_the_standard_library():
    tree = ast.parse((ROOT / "loom" / "cli.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    ours = {m for m in imported if m.split(".")[0] in PACKAGES}
    assert ours == {"loom.api"}, ours
    assert all(m.split(".")[0] in sys.stdlib_module_names for m in imported - ours), imported


def test_modules_and_functions_are_of_a_human_size():
    too_long = []
    for path in _modules():
        text = path.read_text()
        rel = path.relative_to(ROOT)
        if text.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{rel}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES and f"{rel}:{node.name}" not in LONG_FUNCTIONS:
                    too_long.append(f"{rel}:{node.lineno} {node.name}: {n} lines")
    assert not too_long, "split these, or give the reason in LONG_FUNCTIONS:\n" + "\n".join(too_long)


def test_every_module_says_what_it_is_for_in_a_few_lines():
    long_docs = []
    for path in _modules():
        doc = ast.get_docstring(ast.parse(path.read_text()))
        if not doc:
            long_docs.append(f"{path.relative_to(ROOT)}: no docstring")
        elif len(doc.splitlines()) > 12:
            long_docs.append(f"{path.relative_to(ROOT)}: {len(doc.splitlines())} lines (reasoning goes to docs/)")
    assert not long_docs, "\n".join(long_docs)
