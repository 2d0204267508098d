"""docs/install.md's tested commands, run against a cluster: shared by the
pod-less install test (tests/chart) and the real node's (tests/node), so both
run exactly what the docs say."""

from __future__ import annotations

import re
import shlex
from typing import Any

from sidekey.localcluster import helm

INSTALL_DOC = helm.ROOT / "docs" / "install.md"
CRD = "customresourcedefinition/agentpolicies.sidekey.io"


def documented(step: str) -> list[list[str]]:
    """The commands of the ``<!-- tested: step -->`` block of docs/install.md."""
    text = INSTALL_DOC.read_text()
    match = re.search(rf"<!-- tested: {step} -->\s*```sh\n(.*?)```", text, re.S)
    assert match, f"docs/install.md has no tested block {step!r}"
    return [shlex.split(line) for line in match.group(1).splitlines() if line.strip()]


def run_documented(cluster: Any, step: str, helm_timeout: float = 180) -> list[str]:
    """Run a tested block's helm and kubectl commands; their outputs, in order."""
    outputs = []
    for argv in documented(step):
        tool, args = argv[0], argv[1:]
        assert tool in ("helm", "kubectl"), argv
        if tool == "helm":
            outputs.append(helm.run(*args, env=cluster.env(), timeout=helm_timeout).stdout)
        else:
            outputs.append(cluster.kubectl(*args))
    return outputs


def adopt_crd(cluster: Any, release: str, namespace: str) -> None:
    """Let the release adopt the CRD if another test (or crds/) created it already."""
    if cluster.kubectl("get", CRD, "--ignore-not-found", "-o", "name").strip():
        cluster.kubectl("annotate", "--overwrite", CRD, f"meta.helm.sh/release-name={release}",
                        f"meta.helm.sh/release-namespace={namespace}")
        cluster.kubectl("label", "--overwrite", CRD, "app.kubernetes.io/managed-by=Helm")
