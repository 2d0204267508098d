"""The real ``helm`` against the chart: one wrapper for the demo and the tests.

The binary is the pinned one the control-plane build produces (or
``$SIDEKEY_HELM``), so what is rendered here is exactly what a user's helm
renders. ``template`` returns the parsed documents; ``template_text`` the YAML
as helm prints it, for callers that apply it unchanged.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from sidekey.localcluster import binaries

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "sidekey"
#: The Kubernetes version ``helm template`` renders for unless told otherwise (the one the tests run).
KUBE_VERSION = "1.36.0"
RELEASE = "sidekey"
NAMESPACE = "sidekey-system"


class HelmFailed(RuntimeError):
    """helm exited non-zero; the message has its stderr, which says what is wrong."""


def binary() -> Path:
    """The helm binary: $SIDEKEY_HELM, else the cached pinned build (built if missing)."""
    explicit = os.environ.get("SIDEKEY_HELM")
    if explicit:
        return Path(explicit)
    path = binaries.find().helm
    if not path.exists():
        raise binaries.BinariesUnavailable(f"no helm at {path}: run localcluster/build-binaries.sh")
    return path


def run(*args: str, env: Mapping[str, str] | None = None, check: bool = True,
        timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run helm; with ``check``, a failure raises ``HelmFailed`` with helm's stderr."""
    proc = subprocess.run([str(binary()), *args], capture_output=True, text=True,
                          env=dict(env) if env is not None else None, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise HelmFailed(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def value_args(values: Mapping[str, Any] | None, directory: Path | None = None) -> list[str]:
    """``--values FILE`` for a dict of values (the file is named for its content, so reuse is safe)."""
    if not values:
        return []
    text = yaml.safe_dump(dict(values))
    folder = directory if directory is not None else Path(tempfile.gettempdir())
    path = folder / f"sidekey-values-{hashlib.sha256(text.encode()).hexdigest()[:16]}.yaml"
    path.write_text(text)
    return ["--values", str(path)]


def _template_args(values: Mapping[str, Any] | None, show_only: Sequence[str], release: str,
                   namespace: str, kube_version: str, extra: Sequence[str]) -> list[str]:
    args = ["template", release, str(CHART), "--namespace", namespace,
            "--kube-version", kube_version, *value_args(values), *extra]
    for path in show_only:
        args += ["--show-only", path]
    return args


def template_text(values: Mapping[str, Any] | None = None, *, show_only: Sequence[str] = (),
                  release: str = RELEASE, namespace: str = NAMESPACE, kube_version: str = KUBE_VERSION,
                  extra: Sequence[str] = ()) -> str:
    """The rendered YAML text, exactly as helm prints it."""
    return run(*_template_args(values, show_only, release, namespace, kube_version, extra)).stdout


def template(values: Mapping[str, Any] | None = None, *, show_only: Sequence[str] = (),
             release: str = RELEASE, namespace: str = NAMESPACE, kube_version: str = KUBE_VERSION,
             extra: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The chart rendered by ``helm template``, as parsed documents (empty ones dropped)."""
    text = template_text(values, show_only=show_only, release=release, namespace=namespace,
                         kube_version=kube_version, extra=extra)
    return [doc for doc in yaml.safe_load_all(text) if doc]


def local_webhook_configuration(url: str, ca_pem: bytes, *, name: str | None = None,
                                values: Mapping[str, Any] | None = None,
                                kube_version: str = KUBE_VERSION) -> dict[str, Any]:
    """The chart's MutatingWebhookConfiguration, pointed at a webhook process on ``url``.

    Nothing routes a Service on the local control plane, so each entry's
    ``clientConfig`` becomes ``{url: <url><its path>, caBundle}``; everything
    else (rules, matchConditions, selectors, failurePolicy) is exactly what
    ``helm install`` registers. ``name`` renames it, so several can coexist.
    """
    [config] = template(values, show_only=["templates/webhook-mutatingwebhookconfiguration.yaml"],
                        kube_version=kube_version)
    ca_bundle = base64.b64encode(ca_pem).decode()
    for hook in config["webhooks"]:
        path = hook["clientConfig"]["service"]["path"]
        hook["clientConfig"] = {"url": url.rstrip("/") + path, "caBundle": ca_bundle}
    if name is not None:
        config["metadata"]["name"] = name
    return config
