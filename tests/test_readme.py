"""The README's promises: its library example runs as written, and its commands are the real ones."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_the_library_in_one_page_runs_as_written(tmp_path, capsys):
    (block,) = re.findall(r"## The library in one page\n.*?```python\n(.*?)```", README, flags=re.S)
    code = block.replace('"/tmp/pets"', repr(str(tmp_path / "pets")))
    exec(compile(code, "README.md", "exec"), {})
    miou = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= miou <= 1.0


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in README and "make test" in ci
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^test: install\n(\t.*\n)*\t\$\(PY\) -m pytest -q -n 2$", makefile, flags=re.M)


def test_the_own_data_commands_are_the_ones_the_script_runs():
    """tools/readme_own_data.sh runs the README's four own-data commands as written (it is run by hand:
    ~2 min); every line of the README's block must be a line of the script."""
    (block,) = re.findall(r"## Your own data.*?```bash\n(.*?)```", README, flags=re.S)
    script = (REPO / "tools" / "readme_own_data.sh").read_text().splitlines()
    lines = [line for line in block.splitlines() if line.strip()]
    assert sum(line.startswith("fseg ") for line in lines) == 4
    assert all(line in script for line in lines)
