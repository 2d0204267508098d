"""Running the real ``helm`` against the chart, for the chart and guard tests.

The binary is the one the control-plane build script produces (pinned, built
from the Go module proxy), so a test renders exactly what a user's helm would.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "sidekey"
#: The Kubernetes version ``helm template`` renders for (the one the tests run).
KUBE_VERSION = "1.36.0"


def binary() -> Path:
    """The helm binary: $SIDEKEY_HELM, else the cached pinned build (built if missing)."""
    explicit = os.environ.get("SIDEKEY_HELM")
    if explicit:
        return Path(explicit)
    from sidekey.localcluster import binaries

    path = binaries.find().helm
    if not path.exists():
        raise RuntimeError(f"no helm at {path}: run localcluster/build-binaries.sh")
    return path


def run(*args: str, env: Mapping[str, str] | None = None, check: bool = True,
        timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run helm; on failure raise with its stderr, which says what is wrong."""
    proc = subprocess.run([str(binary()), *args], capture_output=True, text=True,
                          env=dict(env) if env is not None else None, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def value_args(values: Mapping[str, Any] | None, tmp: Path | None = None) -> list[str]:
    """``--values FILE`` for a dict of values (written next to the chart test's tmp dir)."""
    if not values:
        return []
    directory = tmp if tmp is not None else Path(os.environ.get("TMPDIR", "/tmp"))
    path = directory / f"values-{abs(hash(yaml.safe_dump(values)))}.yaml"
    path.write_text(yaml.safe_dump(values))
    return ["--values", str(path)]


def template(values: Mapping[str, Any] | None = None, *, show_only: Sequence[str] = (),
             release: str = "sidekey", namespace: str = "sidekey-system",
             extra: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The chart rendered by ``helm template``, as parsed documents (empty ones dropped)."""
    args = ["template", release, str(CHART), "--namespace", namespace,
            "--kube-version", KUBE_VERSION, *value_args(values), *extra]
    for path in show_only:
        args += ["--show-only", path]
    out = run(*args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def template_text(values: Mapping[str, Any] | None = None, *, show_only: Sequence[str] = (),
                  release: str = "sidekey", namespace: str = "sidekey-system") -> str:
    """The rendered YAML text, exactly as helm prints it (what the tests apply)."""
    args = ["template", release, str(CHART), "--namespace", namespace,
            "--kube-version", KUBE_VERSION, *value_args(values)]
    for path in show_only:
        args += ["--show-only", path]
    return run(*args).stdout
