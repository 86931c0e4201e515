"""The architecture holds: data flows one way, and no function grows past a page.

Layers, lowest first: core -> nn -> data / losses / metrics / uncertainty / label_quality /
reliability / checkpoint / render / strips -> models -> train / predict (inference, which
full-resolution scoring in ``train`` runs) -> export / audit / cli. A module may import only from
its own layer or below; ``checkpoint.py`` reads and writes trees and metadata and imports
neither ``models`` nor ``train``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "functional_seg"
_RANK = {"core": 0, "options": 0, "runtime": 0, "compile_cache": 0, "nn": 1, "data": 2, "losses": 2, "metrics": 2,
         "uncertainty": 2, "label_quality": 2, "reliability": 2, "checkpoint": 2, "render": 2, "strips": 2,
         "summary": 3, "models": 3, "train": 4, "predict": 4, "export": 5, "audit": 5, "cli": 6}


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def _part(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _imported_parts(path: Path) -> set[str]:
    """The package parts a module imports (relative imports resolved, absolute functional_seg.* too)."""
    rel = path.relative_to(PACKAGE)
    here = list(rel.parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1] if node.level > 1 else here
                target = base + (node.module.split(".") if node.module else [])
                names = target or [a.name for a in node.names]
                if not target:  # "from . import x" at the top level
                    out.update(a.name for a in node.names)
                    continue
                out.add(names[0])
            elif node.module and node.module.startswith("functional_seg."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("functional_seg."))
    return {p for p in out if p in _RANK}


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_upward_import(path):
    part = _part(path)
    if part == "__init__":
        return
    upward = sorted(p for p in _imported_parts(path) if _RANK[p] > _RANK[part])
    assert not upward, f"{path.relative_to(PACKAGE)} ({part}) imports from the layers above it: {upward}"


def test_checkpoint_imports_neither_models_nor_train():
    assert not _imported_parts(PACKAGE / "checkpoint.py") & {"models", "train"}


def test_no_function_is_longer_than_a_hundred_lines():
    long = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name != "build_parser":
                n = node.end_lineno - node.lineno + 1
                if n > 100:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.name} ({n} lines)")
    assert not long, long


def test_fit_is_short():
    tree = ast.parse((PACKAGE / "train" / "loop.py").read_text())
    (fit,) = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "fit"]
    assert fit.end_lineno - fit.lineno + 1 <= 80


def test_the_train_step_imports_neither_pil_nor_a_dataset_reader():
    import subprocess
    import sys

    code = ("import sys, functional_seg.train.step\n"
            "loaded = sorted(m for m in sys.modules if m == 'PIL' or m.startswith('PIL.') or m in "
            "('functional_seg.data.oxford_pets', 'functional_seg.data.generic', 'functional_seg.data.voc', "
            "'functional_seg.data.sample', 'functional_seg.data.prepared'))\n"
            "print(','.join(loaded))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "", f"the train step pulls in {out.stdout.strip()}"


def test_no_default_class_names_outside_the_layouts():
    """Oxford's names live in its reader; no generic layer imports them to fall back on."""
    readers = {"oxford_pets.py", "voc.py", "synthetic.py", "__init__.py"}
    offenders = []
    for path in _modules():
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "data" and rel.name in readers:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and any(a.name == "CLASS_NAMES" for a in node.names):
                offenders.append(str(rel))
    assert not offenders, offenders


def test_the_torch_free_names_of_choices_are_the_registries():
    """``options`` names the choices for ``--help`` without torch; they must be the real registries'."""
    from functional_seg import options
    from functional_seg.data.augmentation import PRESETS
    from functional_seg.losses import LOSSES
    from functional_seg.runtime import PRECISIONS

    assert options.LOSSES == tuple(LOSSES)
    assert options.AUGMENT_PRESETS == tuple(PRESETS)
    assert options.PRECISIONS == PRECISIONS
    from functional_seg.label_quality import METHODS

    assert options.AUDIT_METHODS == METHODS
