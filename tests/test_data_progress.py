"""``prepare(progress=...)``: plain lines every ~10% off a terminal, a tqdm bar on one, silence on a cache hit."""

from __future__ import annotations

import io

import pytest

from functional_seg.data import make_generic_dataset, prepare
from functional_seg.data.progress import Progress


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return make_generic_dataset(tmp_path / "g", n=25, size=12)


def test_plain_lines_every_tenth_and_nothing_on_a_cache_hit(root, capsys):
    prepare(root, "train", 8, workers=1, progress=True)  # 20 samples
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and len(lines) == 10
    assert lines[0] == "prepare train (generic, 8px): 2/20 (10%)"
    assert lines[-1] == "prepare train (generic, 8px): 20/20 (100%)"
    prepare(root, "train", 8, workers=1, progress=True)
    assert capsys.readouterr().err == ""


def test_default_is_quiet_off_a_terminal(root, capsys):
    prepare(root, "val", 8, workers=1)
    prepare(root, "test", 8, workers=1, progress=False)
    assert capsys.readouterr().err == ""


def test_few_steps_still_end_at_100_percent():
    out = io.StringIO()
    with Progress(3, "x", True, stream=out) as bar:
        for _ in range(3):
            bar.update()
    assert out.getvalue().splitlines() == ["x: 1/3 (33%)", "x: 2/3 (66%)", "x: 3/3 (100%)"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_tqdm_bar():
    out = _Terminal()
    with Progress(40, "decode", None, stream=out) as bar:
        for _ in range(40):
            bar.update()
    assert "\r" in out.getvalue() and "decode" in out.getvalue()
    silent = io.StringIO()
    with Progress(40, "decode", None, stream=silent) as bar:
        bar.update(40)
    assert silent.getvalue() == ""
