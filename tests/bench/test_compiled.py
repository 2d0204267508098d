"""The guard against testing or measuring a stale build of the compiled request path."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from bench import compiled


def test_this_session_runs_the_build_of_this_tree() -> None:
    assert compiled.advice() is None
    assert compiled.modules(), "setup.py compiles nothing"
    for name in compiled.modules():
        module = __import__(name, fromlist=["_"])
        assert type(module.__loader__).__name__ == "ExtensionFileLoader", name


def test_a_module_left_as_python_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiled, "modules", lambda: ["sidekey.proxy.routes"])  # never compiled
    advice = compiled.advice()
    assert advice is not None and "sidekey.proxy.routes is not compiled" in advice and "./hack/relink" in advice


def test_sources_changed_since_the_build_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiled, "digest", lambda: "0" * 64)
    advice = compiled.advice()
    assert advice is not None and "not built from this tree's sources" in advice and "./hack/relink" in advice


def test_a_module_without_bytecode_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "fresh.py").write_text("X = 1\n")
    (tmp_path / "edited.py").write_text("X = 1\n")
    monkeypatch.setattr(compiled, "imported_folders", lambda: [tmp_path])
    assert compiled.write_bytecode() and compiled.advice() is None
    cached = Path(importlib.util.cache_from_source(str(tmp_path / "edited.py")))
    os.utime(cached, (0, 0))  # older than its source, as after an edit
    advice = compiled.advice()
    assert advice is not None and "bytecode: 1 (edited.py first)" in advice and "./hack/relink" in advice
    assert compiled.missing_bytecode() == [tmp_path / "edited.py"]


def test_the_sidecar_starts_from_bytecode_here() -> None:
    """The sidecar's imports compile no source of this tree (each compile raises an audit event)."""
    probe = ("import sys\n"
             "compiled = []\n"
             "sys.addaudithook(lambda event, args: compiled.append(str(args[1])) if event == 'compile' else None)\n"
             "import sidekey.proxy.main\n"
             "print(*(name for name in compiled if 'sidekey' in name), sep='\\n')\n"
             "print('imported', len([m for m in sys.modules if m.startswith('sidekey.')]))\n")
    out = subprocess.run([sys.executable, "-IB", "-c", probe], capture_output=True, text=True, check=True)
    *compiled_at_start, imported = [line for line in out.stdout.splitlines() if line]
    assert compiled_at_start == []
    assert int(imported.split()[1]) > 20  # the probe did import the sidecar


def test_the_digest_changes_with_any_module_setup_py_or_pyproject(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = subprocess.run([sys.executable, "-m", "bench.compiled", "--digest"], cwd=compiled.ROOT,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == compiled.digest()  # what hack/relink records
    for name in ("pyproject.toml", "setup.py"):
        shutil.copy2(compiled.ROOT / name, tmp_path / name)
    for folder in set(tomllib.loads((compiled.ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
            "package-dir"].values()):
        shutil.copytree(compiled.ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    monkeypatch.setattr(compiled, "ROOT", tmp_path)
    seen = {compiled.digest()}
    # a compiled module, one it imports (its types are compiled in), setup.py and the module list
    for changed in ("proxy/fastpath.py", "core/tokens.py", "setup.py", "pyproject.toml"):
        with (tmp_path / changed).open("a") as f:
            f.write("\n# changed\n")
        seen.add(compiled.digest())
    assert len(seen) == 5
