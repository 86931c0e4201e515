"""compile_cache: where torch's compile caches live, and the artifacts file that carries them.

The warm-start test compiles a small function with inductor in two fresh interpreters, each with
its own empty cache folder: the second finds the first one's graph only through the file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from functional_seg import compile_cache as cc

_COMPILE = """
import sys, torch
from torch._dynamo.utils import counters
from functional_seg import compile_cache as cc
mode, path = sys.argv[1], sys.argv[2]
loaded = cc.load_artifacts(path) if mode == "load" else None
f = torch.compile(lambda x: torch.sin(x) * 2 + x.cos(), fullgraph=True)
y = f(torch.arange(64, dtype=torch.float32))
assert torch.allclose(y, torch.sin(torch.arange(64.0)) * 2 + torch.arange(64.0).cos(), atol=1e-5)
saved = cc.save_artifacts(path) if mode == "save" else None
print(loaded, saved, counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"])
"""


def _run(mode: str, path: Path, cache: Path) -> list[str]:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    out = subprocess.run([sys.executable, "-c", _COMPILE, mode, str(path)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


def test_the_artifacts_file_warms_a_fresh_cache(tmp_path):
    file = tmp_path / "carry" / "compiled.bin"
    loaded, saved, hits, misses = _run("save", file, tmp_path / "cold")
    assert (loaded, int(hits), int(misses)) == ("None", 0, 1)  # cold: built from nothing
    assert int(saved) == file.stat().st_size > 0
    loaded, saved, hits, misses = _run("load", file, tmp_path / "fresh")  # another empty folder
    assert (loaded, int(hits), int(misses)) == ("True", 1, 0)  # the graph came from the file


def test_a_missing_file_loads_nothing_and_a_damaged_one_is_named(tmp_path):
    assert cc.load_artifacts(tmp_path / "none.bin") is False
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"not a compile cache")
    with pytest.raises(cc.CompileCacheError, match=r"compile cache .*bad\.bin: not a compile-cache file of torch"):
        cc.load_artifacts(bad)


def test_a_file_that_cannot_be_written_is_one_error_naming_it(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"new artifacts", None))
    blocker = tmp_path / "plain_file"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(cc.CompileCacheError, match=r"compile cache .*plain_file/c\.bin: cannot write it"):
        cc.save_artifacts(blocker / "c.bin")
    (tmp_path / "c.bin").write_bytes(b"old artifacts")
    assert cc.save_artifacts(tmp_path / "c.bin") == len(b"new artifacts")  # replaced whole (core.files.write_atomic)
    assert (tmp_path / "c.bin").read_bytes() == b"new artifacts"


def test_nothing_compiled_writes_nothing(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: None)
    assert cc.save_artifacts(tmp_path / "c.bin") == 0 and not (tmp_path / "c.bin").exists()


def test_compiled_code_goes_to_the_user_cache_unless_the_user_chose_a_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unset")  # recorded first, so the test's own value is undone
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    assert cc.use_user_cache_dir() == tmp_path / "xdg" / "functional_seg" / "compile"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "xdg" / "functional_seg" / "compile")
    assert (tmp_path / "xdg" / "functional_seg" / "compile").is_dir()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "chosen"))
    assert cc.use_user_cache_dir() == tmp_path / "chosen"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "chosen")


def test_an_unwritable_user_cache_keeps_torch_s_default_with_a_warning(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unset")  # recorded first, so the test's own value is undone
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    with pytest.warns(RuntimeWarning, match=f"cannot create {blocker / 'functional_seg' / 'compile'}"):
        assert cc.use_user_cache_dir() is None
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ


def test_the_fit_hook_saves_once_after_the_first_epoch_and_only_warns_on_failure(tmp_path, monkeypatch):
    import torch

    blobs = iter([b"epoch 1", b"epoch 2"])
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (next(blobs), None))
    hook = cc.SaveArtifacts(tmp_path / "c.bin")
    hook.on_epoch_end({"epoch": 1}, 3)
    hook.on_epoch_end({"epoch": 2}, 3)
    assert (tmp_path / "c.bin").read_bytes() == b"epoch 1"
    blocker = tmp_path / "plain_file"
    blocker.write_text("")
    with pytest.warns(RuntimeWarning, match="plain_file/c.bin: cannot write it"):
        cc.SaveArtifacts(blocker / "c.bin").on_epoch_end({"epoch": 1}, 3)  # no exception: training goes on
