"""Whether the request path runs compiled, as built from the sources in this tree.

Why: setup.py compiles the modules named in pyproject.toml's ``[tool.sidekey]
compiled`` to C extensions, and Python imports the extension, not the ``.py``
beside it. An edit after the last build would then be tested and measured as
the code it replaced. ``hack/relink`` builds and records ``digest()`` of what the
build read in the venv; the tests and the benchmark refuse to start when the
tree's digest differs, and say how to rebuild it (a few tens of seconds).

The same goes for bytecode. The image compiles every module's bytecode when it is
built (the Dockerfile's ``compileall``, localcluster/image.py), so its sidecar
starts from ``.pyc`` files. This machine's environment sets
``PYTHONDONTWRITEBYTECODE=1`` and the editable install writes none, so a sidecar
the benchmark starts would compile each of its sources at every start. Measured
at import (``python -IB -c "import sidekey.proxy.main"``): 16.7 MB of RssAnon
without the bytecode and 14.9 MB with it, because the compiler's garbage leaves
arenas half used. ``hack/relink`` writes the bytecode, and ``advice()`` names a
module without it.

``python -m bench.compiled --digest`` prints the digest, and ``--bytecode``
compiles the bytecode (hack/relink uses both).
"""

from __future__ import annotations

import compileall
import hashlib
import importlib
import importlib.machinery
import importlib.util
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Where hack/relink records the digest it built from: in the venv that imports the build.
STAMP = ".sidekey-relinked"


def _config() -> dict[str, dict[str, object]]:
    config: dict[str, dict[str, object]] = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]
    return config


def modules() -> list[str]:
    """The dotted names setup.py compiles."""
    compiled = _config()["sidekey"]["compiled"]
    assert isinstance(compiled, list)
    return [str(name) for name in compiled]


def digest() -> str:
    """A hash of every module of the mapped packages, setup.py and pyproject.toml: what a build reads."""
    package_dirs = _config()["setuptools"]["package-dir"]
    assert isinstance(package_dirs, dict)
    files = [ROOT / "setup.py", ROOT / "pyproject.toml"]
    files += sorted(p for folder in sorted(set(package_dirs.values())) for p in (ROOT / folder).glob("*.py"))
    h = hashlib.sha256()
    for path in files:
        h.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def imported_folders() -> list[Path]:
    """The folders the venv imports the mapped packages from (the editable install's links)."""
    package_dirs = _config()["setuptools"]["package-dir"]
    assert isinstance(package_dirs, dict)
    folders: list[Path] = []
    for package in sorted(package_dirs):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            folders += [Path(p) for p in spec.submodule_search_locations]
    return folders


def write_bytecode() -> bool:
    """Compile every module the venv imports from this tree (timestamped: an edit invalidates it)."""
    return all(compileall.compile_dir(folder, maxlevels=0, quiet=1) for folder in imported_folders())


def missing_bytecode() -> list[Path]:
    """The modules of this tree whose bytecode is absent or older than their source."""
    missing = []
    for folder in imported_folders():
        for source in sorted(folder.glob("*.py")):
            cached = Path(importlib.util.cache_from_source(str(source)))
            if not cached.exists() or cached.stat().st_mtime < source.stat().st_mtime:
                missing.append(source)
    return missing


def advice() -> str | None:
    """None when every compiled module imports as an extension built from this tree;
    otherwise what is wrong and the command that mends it."""
    for name in modules():
        # what an import would load, asked of the path finder: a module already imported by
        # another compiled one carries a made-up __file__ (mypyc's), and find_spec reads it
        package, _, leaf = name.rpartition(".")
        spec = importlib.machinery.PathFinder.find_spec(leaf, importlib.import_module(package).__path__)
        origin = spec.origin if spec is not None else None
        if origin is None or not origin.endswith(".so"):
            return (f"{name} is not compiled (it imports from {origin}): run ./hack/relink, "
                    "which builds the request path's C extensions (setup.py)")
    stamp = Path(sys.prefix) / STAMP
    built = stamp.read_text().strip() if stamp.exists() else None
    if built != digest():
        return (f"the request path's C extensions were not built from this tree's sources ({stamp} "
                f"{'differs' if built else 'is missing'}): run ./hack/relink to rebuild them")
    if missing := missing_bytecode():
        return (f"modules without up-to-date bytecode: {len(missing)} ({missing[0].name} first), so a "
                "sidecar would compile them at every start, unlike the image's: run ./hack/relink")
    return None


if __name__ == "__main__":
    if sys.argv[1:] == ["--digest"]:
        print(digest())
    elif sys.argv[1:] == ["--bytecode"]:
        sys.exit(0 if write_bytecode() else 1)
    else:
        sys.exit("usage: python -m bench.compiled --digest | --bytecode")
