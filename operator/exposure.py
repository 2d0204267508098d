"""Which pods would read a policy's Secrets the moment their account is granted them.

The grant is per service account: every pod that runs as the account and
holds one of its API tokens gets the Secret with it. The bypass guard makes
sure a pod *created* as a subject holds that token only in the sidecar, but a
pod that predates the policy (or the edit that names its account) was never
checked: a bare pod keeps its ``kube-api-access-*`` token in every container,
and once the account is bound it reads the key. So before the operator binds
an account it asks this module which of the account's pods are exposed, and
holds the grant back while any is (``verdicts.hold``).

A pod is exposed when a container other than the native sidecar mounts a
volume holding an API token: ``sidekey-api-access``, or any projected
``serviceAccountToken`` whose audience the apiserver may accept (no audience
means the apiserver's own). That is the bypass guard's own definition
(``agentsWithApiToken`` in ``guard-bypass.yaml``), read here from pods that
already exist. The sidekey audience, and those the chart lists in
``guards.extraTokenAudiences``, are not API credentials.

The phase does not matter: a pod-bound token stays valid while the pod object
exists, whether the pod is Pending, Running or Succeeded (and the kubelet's
3607-second API tokens are extended to a year). Only deletion ends it.

Nor does deletion end it at once: the apiserver caches a successful token
authentication for 10 seconds, so a token copied out of the pod authenticates
for up to that long after the pod is gone. A held pod that goes therefore
keeps holding the grant back for ``TOKEN_CACHE_SECONDS`` more.

Pure functions over the served pod; no I/O. Names only: never a value.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from sidekey.core import contract

#: The kube-apiserver's success TTL for cached token authentications (10 s), plus margin.
TOKEN_CACHE_SECONDS = 15.0


@dataclass(frozen=True, slots=True)
class ExposedPod:
    """A pod that holds an API token outside the sidecar, and where."""

    namespace: str
    name: str
    uid: str
    service_account: str
    container: str  # the first container found holding a token
    volume: str  # the volume it holds it through
    #: Gone from the apiserver less than ``TOKEN_CACHE_SECONDS`` ago: its token may
    #: still authenticate, so it holds the grant back a little longer.
    deleted: bool = False


def service_account(pod: Mapping[str, Any]) -> str:
    spec = pod.get("spec") or {}
    return str(spec.get("serviceAccountName") or spec.get("serviceAccount") or "default")


def _token_volumes(spec: Mapping[str, Any], agent_audiences: Collection[str]) -> set[str]:
    """Volumes holding a token the apiserver accepts."""
    names = {contract.API_TOKEN_VOLUME}
    for v in spec.get("volumes") or []:
        if not isinstance(v, Mapping):
            continue
        sources = (v.get("projected") or {}).get("sources") or []
        for s in sources if isinstance(sources, list) else []:
            token = s.get("serviceAccountToken") if isinstance(s, Mapping) else None
            if isinstance(token, Mapping) and (token.get("audience") or "") not in agent_audiences:
                names.add(str(v.get("name")))
    return names


def _agent_containers(spec: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """Every container but the native sidecar: the guard's three agent lists."""
    for c in spec.get("initContainers") or []:
        if isinstance(c, Mapping) and c.get("name") != contract.SIDECAR_CONTAINER_NAME:
            yield c
    for key in ("containers", "ephemeralContainers"):
        for c in spec.get(key) or []:
            if isinstance(c, Mapping):
                yield c


def exposed(pod: Mapping[str, Any], *, agent_audiences: Collection[str]) -> ExposedPod | None:
    """The pod, if a container other than the sidecar holds an API token; else None."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    if not isinstance(spec, Mapping):
        return None
    volumes = _token_volumes(spec, agent_audiences)
    for c in _agent_containers(spec):
        for m in c.get("volumeMounts") or []:
            if isinstance(m, Mapping) and m.get("name") in volumes:
                return ExposedPod(
                    namespace=str(meta.get("namespace", "")), name=str(meta.get("name", "")),
                    uid=str(meta.get("uid", "")), service_account=service_account(pod),
                    container=str(c.get("name", "")), volume=str(m.get("name")))
    return None
