"""Code shape (issue 11): no Python file over 500 lines anywhere in the repository, and no
function over 60 lines outside ``benchmarks/`` and ``tests/``."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 60
# Run outputs, build products and caches are not source; hidden directories (.git, .venv,
# tool caches) are skipped as well.
SKIPPED_DIRS = {"runs", "build", "dist", "__pycache__"}
SKIPPED_PATHS = {"benchmarks/results"}
# Measurement scripts and tests may have long functions; their files still count.
FUNCTION_LIMIT_EXEMPT = {"benchmarks", "tests"}


def python_files() -> Iterator[Path]:
    """The repository's ``.py`` files, as paths relative to its root."""
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        dirs = rel.parts[:-1]
        if any(d.startswith(".") or d in SKIPPED_DIRS or d.endswith(".egg-info") for d in dirs):
            continue
        if any(rel.as_posix().startswith(f"{skipped}/") for skipped in SKIPPED_PATHS):
            continue
        yield rel


Function = ast.FunctionDef | ast.AsyncFunctionDef


def functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, Function]]:
    """Every function and method in ``tree``, nested ones included, by qualified name."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{prefix}{node.name}"
            if not isinstance(node, ast.ClassDef):
                yield name, node
            yield from functions(node, f"{name}.")
        else:
            yield from functions(node, prefix)


def offenders() -> dict[str, str]:
    """What is over the limits (file, or file::function), with a line saying why."""
    found = {}
    for rel in python_files():
        text = (ROOT / rel).read_text(encoding="utf-8")
        name = rel.as_posix()
        lines = len(text.splitlines())
        if lines > MAX_FILE_LINES:
            found[name] = f"{name}: {lines} lines (limit {MAX_FILE_LINES})"
        if rel.parts[0] in FUNCTION_LIMIT_EXEMPT:
            continue
        for qualname, node in functions(ast.parse(text, filename=name)):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                found[f"{name}::{qualname}"] = (
                    f"{name}:{node.lineno} {qualname}: {length} lines (limit {MAX_FUNCTION_LINES})"
                )
    return found


def test_no_file_or_function_is_over_the_limits() -> None:
    found = sorted(offenders().values())
    assert not found, "over the code-shape limits:\n" + "\n".join(found)


def test_the_checker_sees_the_code() -> None:
    files = {rel.as_posix() for rel in python_files()}
    assert {"fedmpq/quant.py", "coordinator/engine.py", "tests/unit/test_code_shape.py"} <= files
    names = dict(functions(ast.parse("class A:\n    def f(self):\n        def g(): pass\n")))
    assert set(names) == {"A.f", "A.f.g"}
