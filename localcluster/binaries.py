"""Finding, or building, the control-plane binaries.

``KUBEBUILDER_ASSETS`` (the envtest convention) wins when set. Otherwise the
pinned versions are built from the Go module proxy by ``build-binaries.sh``
next to this module and cached under ``~/.cache/sidekey/bin/<versions>/``, so
only the first run on a machine pays for the build.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REQUIRED = ("etcd", "kube-apiserver", "kube-controller-manager")
BUILD_SCRIPT = Path(__file__).with_name("build-binaries.sh")


class BinariesUnavailable(RuntimeError):
    """The control plane cannot run here; the message says how to get the binaries."""


@dataclass(frozen=True, slots=True)
class Binaries:
    directory: Path

    def path(self, name: str) -> Path:
        return self.directory / name

    @property
    def helm(self) -> Path:
        return self.directory / "helm"

    @property
    def kubectl(self) -> Path:
        own = self.directory / "kubectl"
        if own.exists():
            return own
        found = shutil.which("kubectl")
        if found is None:
            raise BinariesUnavailable(
                f"no kubectl in {self.directory} or on PATH; run {BUILD_SCRIPT} to build it"
            )
        return Path(found)


def _missing(directory: Path) -> list[str]:
    return [n for n in REQUIRED if not os.access(directory / n, os.X_OK)]


def find(*, build: bool = True, progress: bool = False) -> Binaries:
    """Locate the binaries, building them if needed and allowed."""
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets:
        directory = Path(assets)
        missing = _missing(directory)
        if missing:
            raise BinariesUnavailable(
                f"KUBEBUILDER_ASSETS={assets} lacks {', '.join(missing)}; point it at a folder "
                f"with etcd, kube-apiserver and kube-controller-manager, or unset it so that "
                f"{BUILD_SCRIPT} builds them (needs Go >= 1.26 and the Go module proxy)"
            )
        return Binaries(directory)
    cached = subprocess.run(["bash", str(BUILD_SCRIPT), "--check"], capture_output=True, text=True, check=False)
    if cached.returncode == 0:
        return Binaries(Path(cached.stdout.strip()))
    if not build:
        raise BinariesUnavailable(
            f"KUBEBUILDER_ASSETS is not set; run {BUILD_SCRIPT} (needs Go >= 1.26) and export "
            "KUBEBUILDER_ASSETS=<the folder it prints>"
        )
    if shutil.which("go") is None:
        raise BinariesUnavailable(
            "the control plane needs etcd, kube-apiserver and kube-controller-manager: install Go "
            f">= 1.26 so that {BUILD_SCRIPT} can build them, or set KUBEBUILDER_ASSETS"
        )
    stderr = None if progress else subprocess.PIPE
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, stderr=stderr, text=True, check=False
    )
    if proc.returncode != 0:
        detail = (proc.stderr or "")[-4000:]
        raise BinariesUnavailable(f"{BUILD_SCRIPT} failed (exit {proc.returncode}):\n{detail}")
    directory = Path(proc.stdout.strip().splitlines()[-1])
    missing = _missing(directory)
    if missing:
        raise BinariesUnavailable(f"{BUILD_SCRIPT} did not produce {', '.join(missing)} in {directory}")
    if progress:
        print(f"control-plane binaries in {directory}", file=sys.stderr)
    return Binaries(directory)


NODE_REQUIRED = ("kubelet", "kube-proxy", "kube-scheduler", "containerd", "containerd-shim-runc-v2", "ctr", "pause")
NODE_BUILD_SCRIPT = Path(__file__).with_name("build-node-binaries.sh")


def find_node(*, build: bool = True, progress: bool = False) -> Binaries:
    """The node's binaries (kubelet, kube-proxy, kube-scheduler, containerd, pause).

    Kept apart from the control plane's folder and key, because only a run
    with a node needs them. ``SIDEKEY_NODE_BIN_DIR`` points at a folder of
    one's own; otherwise they are built once and cached like the others.
    """
    own = os.environ.get("SIDEKEY_NODE_BIN_DIR")
    if own:
        missing = [n for n in NODE_REQUIRED if not os.access(Path(own) / n, os.X_OK)]
        if missing:
            raise BinariesUnavailable(f"SIDEKEY_NODE_BIN_DIR={own} lacks {', '.join(missing)}; "
                                      f"unset it so that {NODE_BUILD_SCRIPT} builds them")
        return Binaries(Path(own))
    cached = subprocess.run(["bash", str(NODE_BUILD_SCRIPT), "--check"], capture_output=True, text=True, check=False)
    if cached.returncode == 0:
        return Binaries(Path(cached.stdout.strip()))
    if not build or shutil.which("go") is None or shutil.which("gcc") is None:
        raise BinariesUnavailable(
            f"the node's binaries ({', '.join(NODE_REQUIRED)}) are not built; run {NODE_BUILD_SCRIPT} "
            "(needs Go >= 1.26, gcc with a static libc, and the Go module proxy)")
    stderr = None if progress else subprocess.PIPE
    proc = subprocess.run(["bash", str(NODE_BUILD_SCRIPT)], stdout=subprocess.PIPE, stderr=stderr,
                          text=True, check=False)
    if proc.returncode != 0:
        raise BinariesUnavailable(f"{NODE_BUILD_SCRIPT} failed (exit {proc.returncode}):\n{(proc.stderr or '')[-4000:]}")
    return Binaries(Path(proc.stdout.strip().splitlines()[-1]))
