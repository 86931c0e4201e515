"""Test helpers of the fault tests (test modules never import each other): a command's one error
line, and every file under a folder, to show that nothing was lost or overwritten."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path


def one_line(capsys, *needles) -> str:
    """The one ``fseg: error:`` line on stderr (no traceback), holding every needle."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("fseg: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def files(folder: Path, *, ignore: Collection[str] = ()) -> dict[str, bytes]:
    """Relative path -> bytes of every file under ``folder`` whose name is not in ``ignore``."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and p.name not in ignore}
