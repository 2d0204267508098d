"""Whether the request path runs compiled, as built from the sources in this tree.

Why: setup.py compiles the modules named in pyproject.toml's ``[tool.sidekey]
compiled`` to C extensions, and Python imports the extension, not the ``.py``
beside it. An edit after the last build would then be tested and measured as
the code it replaced. ``hack/relink`` builds and records ``digest()`` of what the
build read in the venv; the tests and the benchmark refuse to start when the
tree's digest differs, and say how to rebuild it (a few tens of seconds).

``python -m bench.compiled --digest`` prints the digest (hack/relink uses it).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
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
    return None


if __name__ == "__main__":
    if sys.argv[1:] != ["--digest"]:
        sys.exit("usage: python -m bench.compiled --digest")
    print(digest())
