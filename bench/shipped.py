"""The sidecar as the image ships it: the image's venv, on the image's own interpreter.

Why: an agent pod runs ``/opt/sidekey/bin/sidekey proxy`` on the image's Python,
Debian 12's ``python3.11`` (built with profile-guided optimisation and LTO, and
linked statically). A development venv may sit on another build of Python: here
it is pyenv's, a plain shared build that runs the same bytecode 15-25 % slower.
Measured on that interpreter, the sidecar would be billed for an interpreter no
pod runs. So the benchmark's Python arms (the sidecar, the floors and LiteLLM)
run on the image's interpreter, and the sidecar on the image's venv:

- the image is built from this tree first (``localcluster.image``, cached: about
  2 s when nothing changed), so the run measures the code checked out;
- its layers are unpacked here once per image: Debian's interpreter and standard
  library, the venv of the lock, the project's wheel with its compiled request path;
- the venv's ``bin/python`` (``/usr/bin/python3.11`` in the image) and its
  ``pyvenv.cfg`` are pointed at the unpacked interpreter, which then finds the
  image's standard library beside it. Only the C libraries it loads (libc, libssl)
  are this host's; the image's come from the same Debian release.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

CACHE = Path.home() / ".cache" / "sidekey" / "bench" / "shipped"
#: The interpreter the image's venv links to, and the venv (paths in the image, no leading slash).
INTERPRETER = "usr/bin/python3.11"
VENV = "opt/sidekey"


class ShippedError(RuntimeError):
    """The image's interpreter cannot be had on this host: the run fails with what to do."""


@dataclass(frozen=True)
class Shipped:
    """The image's venv on this host: ``python`` as the image runs it, ``launcher`` its entry point."""

    venv: Path
    image: str  # the image's manifest digest
    version: str  # the interpreter's, as platform.python_version() gives it

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def launcher(self) -> Path:
        return self.venv / "bin" / "sidekey"

    @property
    def interpreter(self) -> Path:
        """The unpacked image's ``/usr/bin/python3.11``, which the venv's ``bin/python`` links to."""
        return self.venv.parents[1] / INTERPRETER

    def check_runs(self, pid: int) -> None:
        """Fail unless process ``pid`` runs the image's interpreter (its ``/proc/PID/exe``)."""
        exe = Path(os.readlink(f"/proc/{pid}/exe"))
        if exe != self.interpreter.resolve():
            raise ShippedError(f"process {pid} runs {exe}, not the image's interpreter {self.interpreter}")

    def sidecar_command(self) -> list[str]:
        """``/opt/sidekey/bin/sidekey proxy`` as the image runs it (its shebang: ``python -IBu``)."""
        return [str(self.python), "-IBu", str(self.launcher), "proxy"]


def _unpack(layers: list[Path], root: Path) -> None:
    """The image's filesystem under ``root``, its venv pointed at the interpreter beside it."""
    part = root.with_name(root.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    for layer in layers:
        with tarfile.open(layer) as tar:
            tar.extractall(part, filter="tar")
    interpreter = part / INTERPRETER
    if not interpreter.is_file():
        raise ShippedError(f"the image has no /{INTERPRETER}, the interpreter its venv links to")
    venv = part / VENV
    link = venv / "bin" / "python"
    link.unlink()
    link.symlink_to(Path("../../..") / INTERPRETER)  # within the unpacked tree
    config = venv / "pyvenv.cfg"
    config.write_text(re.sub(r"(?m)^home = .*$", f"home = {root / INTERPRETER.rsplit('/', 1)[0]}",
                             config.read_text()))
    part.rename(root)


def shipped() -> Shipped:
    """The image of this tree (built if the tree changed), unpacked here once, its venv on its own interpreter."""
    from sidekey.localcluster import image  # the harness's own venv has it

    try:
        built = image.build_sidekey(image.default_output())
    except image.ImageError as exc:
        raise ShippedError(f"the image could not be built, so there is no sidecar to measure: {exc}") from exc
    root = CACHE / f"image-{built.manifest_digest.removeprefix('sha256:')[:16]}"
    if not (root / VENV / "bin" / "sidekey").exists():
        for old in CACHE.glob("image-*"):  # one image at a time: each is about 150 MB
            shutil.rmtree(old, ignore_errors=True)
        _unpack([layer.path for layer in built.layers], root)
    venv = root / VENV
    try:
        version = subprocess.run([str(venv / "bin" / "python"), "-IBc", "import platform; print(platform.python_version())"],
                                 capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    except (subprocess.SubprocessError, OSError) as exc:
        raise ShippedError(f"the image's interpreter does not run on this host ({venv / 'bin' / 'python'}): {exc}") from exc
    return Shipped(venv=venv, image=built.manifest_digest, version=version)
