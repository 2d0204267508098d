"""Pod shapes that would defeat the isolation, and why each is refused.

Each check returns a ``Refusal`` whose message says what is wrong and, where
a documented override exists, names the annotation that accepts the risk.
The shapes that would hand the key or an API credential straight to the
agent (mounting sidekey's volumes, projecting an API token, referencing a
policy's Secret) have no override: allowing them is the same as not using
sidekey.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sidekey.core import contract, policies
from sidekey.webhook import sidecars
from sidekey.webhook.settings import Settings


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str  # a short stable label, used in metrics
    message: str


def _override(annotation: str) -> str:
    return f'set annotation {annotation}: "true" to accept the risk'


def _allowed(annotations: Mapping[str, str], annotation: str) -> bool:
    return annotations.get(annotation) == "true"


def _agent_containers(spec: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Every container but our own sidecar, with the list it sits in."""
    for where in ("initContainers", "containers", "ephemeralContainers"):
        for c in spec.get(where) or []:
            if not isinstance(c, Mapping):
                continue
            if where == "initContainers" and c.get("name") == contract.SIDECAR_CONTAINER_NAME:
                continue
            yield where, c


def _service_account(spec: Mapping[str, Any]) -> str:
    return str(spec.get("serviceAccountName") or spec.get("serviceAccount") or "default")


def insecure_upstreams(policy_list: Iterable[policies.AgentPolicy], service_account: str) -> list[str]:
    """Names of the plain-http (``insecure``) upstreams of the policies that select the account."""
    return sorted({u.name for p in policy_list if p.selects(service_account) for u in p.upstreams
                   if u.insecure})


def _capabilities(container: Mapping[str, Any]) -> set[str]:
    caps = ((container.get("securityContext") or {}).get("capabilities") or {}).get("add") or []
    return {str(c).upper().removeprefix("CAP_") for c in caps}


def container_risks(containers: Iterable[Mapping[str, Any]], annotations: Mapping[str, str], *,
                    ptrace_ok: bool = False) -> list[Refusal]:
    """Privileged containers and added ptrace/admin capabilities.

    ``ptrace_ok`` is for ephemeral containers: one that targets an agent
    container shares that container's process namespace, not the sidecar's,
    so tracing is what debugging it means (``kubectl debug --profile=general``
    adds SYS_PTRACE). Privileged and SYS_ADMIN stay refused: they reach the node.
    """
    dangerous = contract.DANGEROUS_CAPABILITIES - ({"SYS_PTRACE"} if ptrace_ok else set())
    out: list[Refusal] = []
    for c in containers:
        name = c.get("name", "?")
        sc = c.get("securityContext") or {}
        if sc.get("privileged") is True and not _allowed(annotations, contract.ANNOTATION_ALLOW_PRIVILEGED):
            out.append(Refusal("privileged", (
                f"container {name} is privileged: it could read the sidecar's memory and files; "
                + _override(contract.ANNOTATION_ALLOW_PRIVILEGED))))
        bad = sorted(_capabilities(c) & dangerous)
        if bad and not _allowed(annotations, contract.ANNOTATION_ALLOW_CAPABILITIES):
            out.append(Refusal("capabilities", (
                f"container {name} adds capability {', '.join(bad)}: it could trace or control the "
                "sidecar; " + _override(contract.ANNOTATION_ALLOW_CAPABILITIES))))
    return out


def policy_secrets(policy_list: Iterable[policies.AgentPolicy]) -> dict[str, str]:
    """Each Secret an AgentPolicy of the namespace names, and the (first) policy naming it."""
    out: dict[str, str] = {}
    for p in sorted(policy_list, key=lambda p: p.name):
        for secret in sorted(p.secret_names):
            out.setdefault(secret, p.name)
    return out


def _policy_secret(what: str, secret: str, policy: str) -> Refusal:
    return Refusal("policy-secret", (
        f"{what} Secret {secret}, which AgentPolicy {policy} names as an upstream key; no pod in the "
        "namespace may reference it, whatever its service account: call the sidecar instead (a "
        "workload that must hold the key itself runs uninjected, as a service account the platform "
        "team lists in the chart value guards.policySecretReaders)"))


def secret_references(containers: Iterable[Mapping[str, Any]],
                      secrets: Mapping[str, str]) -> list[Refusal]:
    """Env or envFrom naming a Secret an AgentPolicy holds a key in (``secrets``: Secret -> policy)."""
    out: list[Refusal] = []
    if not secrets:
        return out
    for c in containers:
        name = c.get("name", "?")
        refs: set[str] = set()
        for e in c.get("env") or []:
            ref = ((e or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
            if ref.get("name") in secrets:
                refs.add(str(ref["name"]))
        for e in c.get("envFrom") or []:
            ref = (e or {}).get("secretRef") or {}
            if ref.get("name") in secrets:
                refs.add(str(ref["name"]))
        for secret in sorted(refs):
            out.append(_policy_secret(f"container {name} reads", secret, secrets[secret]))
    return out


def sniffing_capabilities(containers: Iterable[Mapping[str, Any]],
                          insecure: Sequence[str]) -> list[Refusal]:
    """Agents that add NET_RAW/NET_ADMIN while a plain-http upstream carries the key on loopback."""
    if not insecure:
        return []
    sniffing = {*contract.SNIFFING_CAPABILITIES, "ALL"}
    out: list[Refusal] = []
    for c in containers:
        bad = sorted(_capabilities(c) & sniffing)
        if bad:
            out.append(Refusal("sniffing-capabilities", (
                f"container {c.get('name', '?')} adds capability {', '.join(bad)} while upstream "
                f"{', '.join(insecure)} is insecure (plain http): it could read the key on the pod's "
                "loopback; remove the capability, or give the upstream an https URL")))
    return out


def _sidekey_mounts(container: Mapping[str, Any]) -> list[Refusal]:
    name = container.get("name", "?")
    out: list[Refusal] = []
    ours = sidecars.agent_mount()
    for m in container.get("volumeMounts") or []:
        if not isinstance(m, Mapping):
            continue
        vol = m.get("name")
        if vol == contract.AGENT_TOKEN_VOLUME and {**m, "readOnly": m.get("readOnly", False)} == ours:
            continue
        if vol in contract.SIDEKEY_VOLUMES:
            out.append(Refusal("sidekey-volume", (
                f"container {name} mounts sidekey's volume {vol}; sidekey mounts its volumes itself "
                "(remove the mount)")))
        elif m.get("mountPath") in (contract.AGENT_TOKEN_DIR, contract.API_TOKEN_DIR) and not str(
                vol).startswith(contract.KUBE_API_ACCESS_PREFIX):
            out.append(Refusal("sidekey-volume", (
                f"container {name} mounts volume {vol} at {m.get('mountPath')}, a path sidekey "
                "reserves; mount it elsewhere")))
    return out


def _volume_risks(volumes: Sequence[Mapping[str, Any]], annotations: Mapping[str, str],
                  secret_names: Mapping[str, str], settings: Settings) -> list[Refusal]:
    out: list[Refusal] = []
    for v in volumes:
        name = str(v.get("name", "?"))
        if name in contract.SIDEKEY_VOLUMES or name.startswith(contract.KUBE_API_ACCESS_PREFIX):
            continue  # sidekey replaces these by name
        if "hostPath" in v and not _allowed(annotations, contract.ANNOTATION_ALLOW_HOST_PATH):
            out.append(Refusal("host-path", (
                f"volume {name} is a hostPath: node files can expose other pods' tokens and keys; "
                + _override(contract.ANNOTATION_ALLOW_HOST_PATH))))
        secrets: set[str] = set()
        secret = v.get("secret") or {}
        if secret.get("secretName") in secret_names:
            secrets.add(str(secret["secretName"]))
        for source in (v.get("projected") or {}).get("sources") or []:
            source = source or {}
            ref = source.get("secret") or {}
            if ref.get("name") in secret_names:
                secrets.add(str(ref["name"]))
            token = source.get("serviceAccountToken")
            if isinstance(token, Mapping):
                audience = token.get("audience") or ""
                if not audience or audience in settings.api_audiences:
                    out.append(Refusal("api-token", (
                        f"volume {name} projects a service account token "
                        f"{'for the apiserver' if not audience else f'with audience {audience}'}: "
                        "only the sidecar may hold an API credential; remove the projection or give "
                        "it another audience")))
        for s in sorted(secrets):
            out.append(_policy_secret(f"volume {name} holds", s, secret_names[s]))
    return out


def _port_clashes(containers: Iterable[Mapping[str, Any]], sidecar: sidecars.SidecarSpec) -> list[Refusal]:
    out: list[Refusal] = []
    for c in containers:
        for p in c.get("ports") or []:
            port = (p or {}).get("containerPort")
            if port in (sidecar.port, sidecar.health_port):
                out.append(Refusal("port", (
                    f"container {c.get('name', '?')} uses port {port}, which the sidecar needs; "
                    f"change the container's port or set annotation {contract.ANNOTATION_PORT}")))
    return out


def pod_risks(pod: Mapping[str, Any], policy_list: Sequence[policies.AgentPolicy],
              settings: Settings, sidecar: sidecars.SidecarSpec) -> list[Refusal]:
    """Everything wrong with a pod about to be injected; empty when it may proceed."""
    spec = pod.get("spec") or {}
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    out: list[Refusal] = []
    if spec.get("hostNetwork") is True and not _allowed(annotations, contract.ANNOTATION_ALLOW_HOST_NETWORK):
        out.append(Refusal("host-network", (
            "hostNetwork is true: the sidecar's localhost proxy would be open to the whole node; "
            + _override(contract.ANNOTATION_ALLOW_HOST_NETWORK))))
    if spec.get("shareProcessNamespace") is True and not _allowed(
            annotations, contract.ANNOTATION_ALLOW_SHARED_PROCESS_NAMESPACE):
        out.append(Refusal("share-process-namespace", (
            "shareProcessNamespace is true: agent containers could read the sidecar's memory; "
            + _override(contract.ANNOTATION_ALLOW_SHARED_PROCESS_NAMESPACE))))
    if spec.get("hostPID") is True and not _allowed(annotations, contract.ANNOTATION_ALLOW_HOST_PID):
        out.append(Refusal("host-pid", (
            "hostPID is true: agent containers could read the sidecar's memory; "
            + _override(contract.ANNOTATION_ALLOW_HOST_PID))))
    agents = list(_agent_containers(spec))
    for where, c in agents:
        if where != "initContainers" and c.get("name") == contract.SIDECAR_CONTAINER_NAME:
            out.append(Refusal("reserved-name", (
                f"a container in {where} is named {contract.SIDECAR_CONTAINER_NAME}, the name sidekey "
                "gives its sidecar; rename it")))
    containers = [c for _, c in agents]
    out += container_risks(containers, annotations)
    secret_names = policy_secrets(policy_list)
    out += secret_references(containers, secret_names)
    out += sniffing_capabilities(containers, insecure_upstreams(policy_list, _service_account(spec)))
    for c in containers:
        out += _sidekey_mounts(c)
    out += _volume_risks([v for v in spec.get("volumes") or [] if isinstance(v, Mapping)],
                         annotations, secret_names, settings)
    out += _port_clashes(containers, sidecar)
    return out


def ephemeral_risks(pod: Mapping[str, Any], old_pod: Mapping[str, Any] | None,
                    policy_list: Sequence[policies.AgentPolicy]) -> list[Refusal]:
    """New ephemeral (``kubectl debug``) containers in a pod that carries the sidecar."""
    spec = pod.get("spec") or {}
    if not any((c or {}).get("name") == contract.SIDECAR_CONTAINER_NAME
               for c in spec.get("initContainers") or []):
        return []
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    old_names = {(c or {}).get("name") for c in ((old_pod or {}).get("spec") or {}).get("ephemeralContainers") or []}
    new = [c for c in spec.get("ephemeralContainers") or []
           if isinstance(c, Mapping) and c.get("name") not in old_names]
    out: list[Refusal] = []
    for c in new:
        name = c.get("name", "?")
        if c.get("targetContainerName") == contract.SIDECAR_CONTAINER_NAME:
            out.append(Refusal("debug-sidecar", (
                f"ephemeral container {name} targets the sidecar {contract.SIDECAR_CONTAINER_NAME}: it "
                "would share its processes and read its keys; debug an agent container instead")))
        for m in c.get("volumeMounts") or []:
            vol = (m or {}).get("name", "")
            if vol in contract.SIDEKEY_VOLUMES or str(vol).startswith(contract.KUBE_API_ACCESS_PREFIX):
                out.append(Refusal("sidekey-volume", (
                    f"ephemeral container {name} mounts sidekey's volume {vol}; debug without it")))
    out += container_risks(new, annotations, ptrace_ok=True)
    out += secret_references(new, policy_secrets(policy_list))
    return out


def message(refusals: Sequence[Refusal]) -> str:
    """One denial message; the apiserver shows it to whoever created the pod."""
    seen: list[str] = []
    for r in refusals:
        if r.message not in seen:
            seen.append(r.message)
    return "sidekey refused this pod: " + "; ".join(seen)
