"""Compiles the sidecar's request path to C with mypyc; everything else is pyproject.toml.

Why: every agent pod pays the sidecar's CPU on each request, and once the
transport is C (uvloop, llhttp) the bill is the interpreter running sidekey's
own checks. mypyc turns the modules named in ``[tool.sidekey] compiled`` into C
extensions from the annotations mypy --strict already checks, so no check is
dropped or rewritten (docs/performance.md, "Compiled", has the numbers). The
``.py`` files stay the source and still ship; the extension beside each one is
what Python imports.

mypyc names a module from its path, and the package folders are mapped
(``proxy/`` is ``sidekey.proxy``), so the sources are staged as symlinks under
``build/mypyc/src/sidekey/``. The compile reads no installed package
(``--no-site-packages``): what a dependency's types would say is ``Any`` here,
so the C is the same whichever venv builds it.

The C is one large file (about 40 s at -O3). When the machine has ccache, the
compiler runs through it and hands back the object an earlier build of the same
C made: a change outside the compiled modules, another checkout of the same
tree and a rebuild of the image's wheel then cost the type check alone.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
import tomllib
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
STAGE = Path("build") / "mypyc" / "src"


def _stage(package_dirs: dict[str, str]) -> None:
    """Link every module of the mapped packages at the path its dotted name implies."""
    for package, folder in package_dirs.items():
        target = STAGE.joinpath(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for source in (ROOT / folder).glob("*.py"):
            link = target / source.name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(source)


def _compiler_cache() -> None:
    """Route the C compiler through ccache, if the machine has it and CC is not chosen already."""
    if "CC" in os.environ or shutil.which("ccache") is None:
        return
    os.environ["CC"] = f"ccache {sysconfig.get_config_var('CC') or 'cc'}"  # LDSHARED follows CC
    # paths inside the tree are hashed relative to it, and the build folder only names
    # the debug info's working directory: another checkout of the same tree hits
    os.environ.setdefault("CCACHE_BASEDIR", str(ROOT))
    os.environ.setdefault("CCACHE_NOHASHDIR", "1")


def _extensions() -> list[object]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dirs: dict[str, str] = config["tool"]["setuptools"]["package-dir"]
    compiled: list[str] = config["tool"]["sidekey"]["compiled"]
    _stage(package_dirs)
    _compiler_cache()
    from mypyc.build import mypycify  # a build requirement (pyproject.toml), not a runtime one

    os.environ["MYPYPATH"] = str(STAGE)  # module names from the staged paths (--explicit-package-bases)
    paths = [str(STAGE.joinpath(*name.split(".")).with_suffix(".py")) for name in compiled]
    return list(mypycify(
        ["--explicit-package-bases", "--no-site-packages", "--ignore-missing-imports",
         "--follow-imports=silent", "--python-version=3.11", *paths],
        opt_level="3", debug_level="0", group_name="sidekey_native",
        target_dir=str(Path("build") / "mypyc" / "c"),
    ))


setup(ext_modules=_extensions())
