"""Functions stay short enough to read at once: a body over 60 lines (its docstring not counted) says why in
its docstring, with the words "Long because"."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "emu2"
MAX_LINES = 60


def body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the signature to the end of the body, the docstring's lines left out."""
    lines = node.end_lineno - node.lineno + 1
    if ast.get_docstring(node) is not None:
        lines -= node.body[0].end_lineno - node.body[0].lineno + 1
    return lines


def long_functions(source: str) -> list[tuple[str, int]]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lines = body_lines(node)
            reason = "Long because" in " ".join((ast.get_docstring(node) or "").split())
            if lines > MAX_LINES and not reason:
                found.append((node.name, lines))
    return found


def test_the_length_reader_leaves_out_the_docstring_and_accepts_a_stated_reason():
    statements = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES - 1))  # with the signature: 60 lines
    doc = '    """' + "\n".join(["Doc."] * 30) + '"""\n'
    assert long_functions(f"def f():\n{doc}{statements}\n") == []  # the docstring is free
    assert long_functions(f"def f():\n{statements}\n    y = 1\n") == [("f", MAX_LINES + 1)]
    assert long_functions(f'def f():\n    """Long because it lists {MAX_LINES} values."""\n{statements}\n'
                          "    y = 1\n") == []


def test_no_function_is_long_without_saying_why():
    offenders = {f"{path.relative_to(PACKAGE.parent)}:{name} ({lines} lines)"
                 for path in sorted(PACKAGE.rglob("*.py")) for name, lines in long_functions(path.read_text())}
    assert not offenders, sorted(offenders)
