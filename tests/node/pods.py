"""Running pods on the node: apply, wait, read what the kubelet reports.

Shared by the node test modules; the waits fail with the pod's status (and
its events) so that a pod stuck in ContainerCreating says why.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml


def apply(cluster: Any, manifest: dict[str, Any]) -> dict[str, Any]:
    out = cluster.kubectl("apply", "-o", "json", "-f", "-", input=yaml.safe_dump(manifest))
    result: dict[str, Any] = json.loads(out)
    return result


def get(cluster: Any, namespace: str, pod: str) -> dict[str, Any]:
    result: dict[str, Any] = cluster.request("GET", f"/api/v1/namespaces/{namespace}/pods/{pod}")
    return result


def events(cluster: Any, namespace: str) -> str:
    return str(cluster.kubectl("get", "events", "-n", namespace, "--sort-by=.lastTimestamp", check=False))


def wait_for_phase(cluster: Any, namespace: str, pod: str, phases: set[str], timeout: float = 60) -> dict[str, Any]:
    """Poll a pod until its phase is one of ``phases``; fail with its status and events otherwise."""
    deadline = time.monotonic() + timeout
    obj: dict[str, Any] = {}
    while time.monotonic() < deadline:
        obj = get(cluster, namespace, pod)
        if obj.get("status", {}).get("phase") in phases:
            return obj
        time.sleep(0.2)
    pytest.fail(f"pod {namespace}/{pod} not in {sorted(phases)} after {timeout}s: "
                f"{json.dumps(obj.get('status'), indent=1)}\n{events(cluster, namespace)}")


def static_image(cluster: Any, name: str, c_source: str) -> str:
    """Compile a static C program and import it into the node as image ``name`` (entry point /app)."""
    from sidekey.localcluster import node

    with tempfile.TemporaryDirectory() as d:
        src, exe = Path(d) / "app.c", Path(d) / "app"
        src.write_text(c_source)
        subprocess.run(["gcc", "-Os", "-static", "-o", str(exe), str(src)], check=True, capture_output=True)
        archive = Path(d) / "image.tar"
        archive.write_bytes(node.oci_archive(name, {"/app": (exe.read_bytes(), 0o755)},
                                             {"Entrypoint": ["/app"], "User": "65532:65532"}))
        cluster.import_image(archive)
    return name
