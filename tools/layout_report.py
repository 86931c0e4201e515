"""What a reviewer checks first: long functions and the imports between the repository's top folders.

    python tools/layout_report.py [--limit 60] [ROOT]

Prints every function (library, tests, experiments, benchmarks, tools) longer than ``--limit``
lines of code (its docstring not counted), then each top folder's imports of the others
(``functional_seg``, ``experiments``, ``benchmarks``, ``tests``; a test module importing another
test module counts), with the files that make each edge. Standard library only, so it runs on
any checkout (before/after a change).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

TOPS = ("functional_seg", "experiments", "benchmarks", "tests", "tools")


def _files(root: Path) -> list[Path]:
    return sorted(p for top in TOPS if (root / top).is_dir() for p in (root / top).rglob("*.py"))


def _code_lines(node) -> int:
    """A function's lines without its docstring (an Args section is not complexity)."""
    n = node.end_lineno - node.lineno + 1
    first = node.body[0] if node.body else None
    if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) \
            and isinstance(first.value.value, str):
        n -= first.end_lineno - first.lineno + 1
    return n


def long_functions(root: Path, limit: int) -> list[tuple[int, int, str]]:
    """(code lines, lines with the docstring, where) of every function over ``limit`` code lines."""
    out = []
    for path in _files(root):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                code = _code_lines(node)
                if code > limit:
                    out.append((code, node.end_lineno - node.lineno + 1, f"{path.relative_to(root)}:{node.lineno} "
                                                                          f"{node.name}"))
    return sorted(out, reverse=True)


def _heads(node: ast.AST) -> list[str]:
    """The first component of every module an absolute import names."""
    if isinstance(node, ast.ImportFrom) and node.module and not node.level:
        return [node.module.split(".")[0]]
    if isinstance(node, ast.Import):
        return [a.name.split(".")[0] for a in node.names]
    return []


def folder_imports(root: Path) -> dict[tuple[str, str], list[str]]:
    """(importer folder, imported folder) -> the importing files; a test module importing another
    test module is the edge ``tests -> tests (a test module)``."""
    test_modules = {p.stem for p in (root / "tests").glob("test_*.py")}
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in _files(root):
        rel = path.relative_to(root)
        top = rel.parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            for head in _heads(node):
                if head in test_modules:
                    target = "tests (a test module)"
                elif head in TOPS and head != top:
                    target = head
                else:
                    continue
                if str(rel) not in edges[(top, target)]:
                    edges[(top, target)].append(str(rel))
    return dict(edges)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", nargs="?", default=Path(__file__).resolve().parents[1], type=Path)
    p.add_argument("--limit", type=int, default=60)
    args = p.parse_args(argv)
    longs = long_functions(args.root, args.limit)
    print(f"functions over {args.limit} lines of code (docstrings not counted): {len(longs)}")
    for code, total, where in longs:
        print(f"  {code:4d}  ({total} with the docstring)  {where}")
    print("imports between top folders (importer -> imported: files):")
    for (a, b), files in sorted(folder_imports(args.root).items()):
        shown = ", ".join(files[:4]) + (f" and {len(files) - 4} more" if len(files) > 4 else "")
        print(f"  {a} -> {b}: {len(files)} ({shown})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
