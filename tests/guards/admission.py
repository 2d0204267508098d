"""Asking the real apiserver, and reading its answer.

Every guard test sends a request with kubectl (as the admin, or as another
user through impersonation) and reads what the apiserver said: the object it
stored, or the denial message.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from typing import Any

import yaml

from sidekey.localcluster import helm
from tests.guards import manifests
from tests.support.namespaces import make_namespace

GUARD_TEMPLATES = ("templates/guard-bypass.yaml", "templates/guard-escalation.yaml")


@dataclass(frozen=True)
class Answer:
    """What the apiserver answered: admitted (with the stored object) or denied (with why)."""

    admitted: bool
    message: str
    obj: dict[str, Any] | None = None


def kubectl(cluster: Any, *args: str, input: str | None = None, as_user: str | None = None) -> Answer:
    who = [f"--as={as_user}"] if as_user else []
    try:
        out = cluster.kubectl(*who, *args, input=input)
    except subprocess.CalledProcessError as exc:
        return Answer(False, str(exc.stderr).strip())
    try:
        obj = json.loads(out) if out.strip().startswith("{") else None
    except json.JSONDecodeError:
        obj = None
    return Answer(True, out.strip(), obj)


def create(cluster: Any, manifest: dict[str, Any], *, as_user: str | None = None,
           dry_run: bool = False) -> Answer:
    args = ["create", "-o", "json", "-f", "-"]
    if dry_run:
        args.append("--dry-run=server")
    return kubectl(cluster, *args, input=yaml.safe_dump(manifest), as_user=as_user)


def apply(cluster: Any, manifest: dict[str, Any], *, as_user: str | None = None) -> Answer:
    return kubectl(cluster, "apply", "-o", "json", "-f", "-", input=yaml.safe_dump(manifest),
                   as_user=as_user)


def exists(cluster: Any, kind: str, namespace: str, name: str) -> bool:
    out = cluster.kubectl("get", kind, name, "-n", namespace, "--ignore-not-found", "-o", "name")
    return bool(out.strip())


def install_guards(cluster: Any, values: dict[str, Any] | None = None) -> str:
    """Apply exactly what ``helm template --show-only`` renders for the two guards."""
    text = helm.template_text(values, show_only=GUARD_TEMPLATES)
    cluster.kubectl("apply", "-f", "-", input=text)
    return text


def remove_guards(cluster: Any, text: str, timeout: float = 30.0) -> None:
    """Delete the guards, and return only once the apiserver has stopped enforcing them.

    The apiserver drops a deleted policy asynchronously, as it loads one: a
    module that builds a subject pod right after another module removed the
    guards was refused by the guard still loaded (one CI run lost 222 attack
    tests to it). A bare pod of a policy subject is the probe, in a namespace
    of its own.
    """
    cluster.kubectl("delete", "--ignore-not-found", "--wait=true", "-f", "-", input=text)
    namespace = make_namespace(cluster, "skunguard")
    try:
        for obj in (manifests.service_account(namespace, "agent"), manifests.secret(namespace),
                    manifests.agent_policy(namespace)):
            answer = apply(cluster, obj)
            assert answer.admitted, answer.message
        probe = manifests.bare_pod(namespace, "probe")
        deadline = time.monotonic() + timeout
        answer = create(cluster, probe, dry_run=True)
        while not answer.admitted and time.monotonic() < deadline:
            time.sleep(0.2)
            answer = create(cluster, probe, dry_run=True)
        assert answer.admitted, f"the guards were still enforced {timeout:.0f} s after their deletion: {answer.message}"
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def wait_until_enforced(cluster: Any, probe: dict[str, Any], timeout: float = 30.0) -> Answer:
    """The apiserver loads policies asynchronously: retry a server-side dry run until denied."""
    deadline = time.monotonic() + timeout
    answer = create(cluster, probe, dry_run=True)
    while answer.admitted and time.monotonic() < deadline:
        time.sleep(0.3)
        answer = create(cluster, probe, dry_run=True)
    return answer
