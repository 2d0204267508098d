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

A pod whose native sidecar holds the token is in the injected shape only if
that sidecar is the injected one. The guard checks it when the pod is
created as a subject; a pod created earlier could carry a look-alike (the
allowed image with another command, a mount over its code, env that moves
its API client) that hands the token to anyone. So before an account is
*newly* granted, its pods' sidecars are vetted too (``sidecar_problem``):
the contract's command, an allowed image, only the env the sidecar reads
(never the two that move its API client; the pod's name, uid, addresses and
account from the pod itself, each once), only the API volume mounted, that
volume made of the apiserver's token, ``kube-root-ca.crt`` and the
namespace, its own UID, no exec probe or hook; and around it no shared or
host process namespace, privileged agent, hostPath volume (unless the pod
carries the guard's override for it) or ephemeral container targeting it.
Accounts already granted are not re-vetted: their pods since were checked by the guard, and
an upgrade that changes the sidecar's command must not revoke every grant.

Nor does deletion end it at once: the apiserver caches a successful token
authentication for 10 seconds, so a token copied out of the pod authenticates
for up to that long after the pod is gone. A held pod that goes therefore
keeps holding the grant back for ``TOKEN_CACHE_SECONDS`` more.

And not only a held one. Whoever may create pods as an account no policy
names yet can run a bare pod, copy its token out and delete it, again and
again: when an admin then names the account, no pod is left to hold the
grant back, yet the last copied token still authenticates. So the operator
remembers every exposed pod that goes, of any account in any namespace
(``RecentlyGone``, fed by the pod watch's DELETED events and checked on the
pod's last state, sidecar vetted), and for ``TOKEN_CACHE_SECONDS`` it holds
back a new grant of that account like a live one. The memory is bounded
(``MAX_GONE_REMEMBERED`` pods); past that it stops telling pods apart in the
namespace of the pod it could not keep, and every account the namespace's
policies do not bind yet waits instead (fail closed, never forget). The
accounts already bound are not held back by it: their pods lived while they
were bound, so nothing is gained, and a rollout of an older sidecar must
not revoke grants. A DELETED event reaches the operator a moment after the
pod is gone (kopf batches each object's events for 0.1 s), so a pod
force-deleted just before a reconcile's listing is in neither; a new grant
therefore waits ``controller.WATCH_LAG_SECONDS`` after the listing and looks
again. What the memory cannot see is a pod deleted while no operator ran,
or a deletion the watch never delivers (kopf re-lists after ``410 Gone``
without reporting what went): closing that would need deletions recorded
outside the process, or every new grant waiting after a start.

That memory lives in the operator's process, so a restart (crash, upgrade,
rescheduling) would shorten it: the new instance never saw the pod, and the
pod is no longer there to list. So an instance that has not yet watched a
policy's pods for ``TOKEN_CACHE_SECONDS`` (counted from its first listing of
them) grants no account the policy's RoleBinding does not name yet
(``verdicts.RestartWait``, condition reason ``OperatorRestarted``). We chose
that over persisting "held pod gone at T" (in the policy's status, say): it
needs no state, so nothing can be lost or stale, no CRD field and no write
per deletion; it costs a new grant at most ``TOKEN_CACHE_SECONDS`` after a
restart, and only for a policy an operator reconciled before (a new policy
had nothing held, so nothing to forget). Accounts already bound stay bound.
The chart runs one instance (no leader election), so a restart is the only
hand-over; an instance that never restarts never waits.

A legacy token Secret of a subject account (``legacy_token``) holds the
grant back the same way: any pod of the namespace can mount it.

Pure functions over the served pod, and that one bounded memory; no I/O.
Names only: never a value.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from sidekey.core import contract

#: The kube-apiserver's success TTL for cached token authentications (10 s), plus margin.
TOKEN_CACHE_SECONDS = 15.0
#: How many exposed pods that went ``RecentlyGone`` tells apart (about 2 MB at most);
#: that is 270 deletions a second for 15 s, and past it a namespace-wide wait.
MAX_GONE_REMEMBERED = 4096


@dataclass(frozen=True, slots=True)
class ExposedPod:
    """A pod that holds an API token outside the sidecar, and where."""

    namespace: str
    name: str
    uid: str
    service_account: str
    container: str  # the first container found holding a token
    volume: str  # the volume it holds it through
    #: Set when the container is a sidecar that is not the injected one: what differs.
    lookalike: str | None = None
    #: Gone from the apiserver less than ``TOKEN_CACHE_SECONDS`` ago: its token may
    #: still authenticate, so it holds the grant back a little longer.
    deleted: bool = False
    #: Not a pod but a legacy token Secret of the account (``legacy_token``).
    secret: bool = False


#: A Secret the token controller fills with a non-expiring API token of the account it names.
LEGACY_TOKEN_TYPE = "kubernetes.io/service-account-token"
LEGACY_TOKEN_ACCOUNT = "kubernetes.io/service-account.name"


def legacy_token(secret: Mapping[str, Any]) -> ExposedPod | None:
    """A legacy token Secret, as what holds the grant of its account back; else None.

    Such a token never expires and is not bound to a pod, and any pod of the
    namespace may mount it as a ``secret`` volume without the right to read
    Secrets: whoever can create pods there holds the account's API token. The
    guard cannot tell (CEL does not see a mounted Secret's type), but the
    operator reads Secrets, so the grant waits until the Secret is deleted.
    """
    meta = secret.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    account = annotations.get(LEGACY_TOKEN_ACCOUNT) if isinstance(annotations, Mapping) else None
    if secret.get("type") != LEGACY_TOKEN_TYPE or not isinstance(account, str) or not account:
        return None
    return ExposedPod(namespace=str(meta.get("namespace", "")), name=str(meta.get("name", "")),
                      uid=str(meta.get("uid", "")), service_account=account, container="",
                      volume="", secret=True)


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


#: Env the injected sidecar may carry: what it reads, except the two variables
#: that point its API client at another server or another token directory.
SIDECAR_ENV_ALLOWED = frozenset(contract.SIDECAR_ENV) - {contract.ENV_API_SERVER,
                                                         contract.ENV_API_TOKEN_DIR}
_API_VOLUME_SOURCES = frozenset({"serviceAccountToken", "configMap", "downwardAPI"})
#: The env the webhook fills from the pod itself, and from which field. A plain
#: value instead would let a look-alike name another pod's addresses, so the
#: sidecar's refusal of upstreams resolving to its own pod would miss the real
#: ones (a hosts entry could then hairpin the key to the agent). The webhook
#: builds the same six (webhook/sidecars.py; tests/operator/test_exposure.py
#: checks the two agree).
SIDECAR_FIELD_ENV: dict[str, str] = {
    contract.ENV_POD_NAME: "metadata.name",
    contract.ENV_POD_NAMESPACE: "metadata.namespace",
    contract.ENV_POD_UID: "metadata.uid",
    contract.ENV_POD_IP: "status.podIP",
    contract.ENV_POD_IPS: "status.podIPs",
    contract.ENV_SERVICE_ACCOUNT: "spec.serviceAccountName",
}


def _is_api_volume(volume: Mapping[str, Any]) -> bool:
    """The API volume as injected: the apiserver's token, kube-root-ca.crt, the namespace."""
    projected = volume.get("projected")
    sources = projected.get("sources") if isinstance(projected, Mapping) else None
    if set(volume) != {"name", "projected"} or not isinstance(sources, list):
        return False
    kinds = [next(iter(src)) for src in sources if isinstance(src, Mapping) and len(src) == 1]
    if sorted(kinds) != sorted(_API_VOLUME_SOURCES):  # each exactly once
        return False
    for src in sources:
        if not isinstance(src, Mapping) or len(src) != 1 or not set(src) <= _API_VOLUME_SOURCES:
            return False
        config_map = src.get("configMap")
        if isinstance(config_map, Mapping) and config_map.get("name") != contract.KUBE_ROOT_CA_CONFIGMAP:
            return False
        token = src.get("serviceAccountToken")
        if isinstance(token, Mapping) and token.get("audience"):
            return False
    return True


_PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def _isolation_problem(pod_spec: Mapping[str, Any], annotations: Mapping[str, Any]) -> str | None:
    """What lets an agent container reach into the sidecar's processes or files, or None.

    The guard's isolation checks, honouring the same override annotations (a
    pod author who accepted the risk in writing is not held back for it).
    """
    def allowed(annotation: str) -> bool:
        return annotations.get(annotation) == "true"

    if pod_spec.get("shareProcessNamespace") and not allowed(contract.ANNOTATION_ALLOW_SHARED_PROCESS_NAMESPACE):
        return "the pod shares its process namespace"
    if pod_spec.get("hostPID") and not allowed(contract.ANNOTATION_ALLOW_HOST_PID):
        return "the pod uses the host's process namespace (hostPID)"  # /proc/<pid>/root and environ
    if not allowed(contract.ANNOTATION_ALLOW_PRIVILEGED):
        for c in _agent_containers(pod_spec):
            context = c.get("securityContext")
            if isinstance(context, Mapping) and context.get("privileged"):
                return f"container {str(c.get('name', ''))!r} is privileged"  # the node's files are its
    if not allowed(contract.ANNOTATION_ALLOW_HOST_PATH) and any(
            isinstance(v, Mapping) and "hostPath" in v for v in pod_spec.get("volumes") or []):
        return "the pod has a hostPath volume"  # the kubelet keeps every pod's volumes on the node
    for c in pod_spec.get("ephemeralContainers") or []:
        if isinstance(c, Mapping) and c.get("targetContainerName") == contract.SIDECAR_CONTAINER_NAME:
            return f"ephemeral container {str(c.get('name', ''))!r} targets the sidecar"
    return None


def sidecar_problem(pod_spec: Mapping[str, Any], sidecar: Mapping[str, Any], *,
                    images: Collection[str] | None,
                    annotations: Mapping[str, Any] | None = None) -> str | None:
    """What makes this native sidecar other than the injected one (names only), or None.

    The security-relevant part of the guard's allow-list, from the contract:
    what could move or leak the sidecar's API token, in the sidecar and in
    the pod around it. ``images`` None: the operator was not told the
    installed image, so any image passes. ``annotations`` are the pod's (the
    guard's overrides).
    """
    image = str(sidecar.get("image") or "")
    if images is not None and image not in images:
        return f"image {image!r} is not an allowed sidecar image"
    if sidecar.get("restartPolicy") != "Always":
        return "it is not a native sidecar (restartPolicy: Always)"
    if list(sidecar.get("command") or []) != list(contract.SIDECAR_COMMAND) or sidecar.get("args"):
        return "its command or args differ from the injected sidecar's"
    if sidecar.get("envFrom"):
        return "it has envFrom"
    seen: set[str] = set()
    for e in sidecar.get("env") or []:
        name = str(e.get("name", "")) if isinstance(e, Mapping) else ""
        if name not in SIDECAR_ENV_ALLOWED:
            return f"it sets env {name!r}"
        if name in seen:  # the kubelet lets the later entry win
            return f"it sets env {name!r} twice"
        seen.add(name)
        source = e.get("valueFrom")
        if source is not None and (not isinstance(source, Mapping) or set(source) != {"fieldRef"}):
            return f"env {name!r} comes from something other than a fieldRef"
        if name in SIDECAR_FIELD_ENV:
            field = source.get("fieldRef") if isinstance(source, Mapping) else None
            path = field.get("fieldPath") if isinstance(field, Mapping) else None
            if path != SIDECAR_FIELD_ENV[name]:
                return f"env {name!r} is not the pod's own {SIDECAR_FIELD_ENV[name]}"
    mounts = [(str(m.get("name")), str(m.get("mountPath")))
              for m in sidecar.get("volumeMounts") or [] if isinstance(m, Mapping)]
    if mounts != [(contract.API_TOKEN_VOLUME, contract.API_TOKEN_DIR)] or sidecar.get("volumeDevices"):
        return f"it mounts other than {contract.API_TOKEN_VOLUME!r} at {contract.API_TOKEN_DIR}"
    for v in pod_spec.get("volumes") or []:
        if isinstance(v, Mapping) and v.get("name") == contract.API_TOKEN_VOLUME and \
                not _is_api_volume(v):
            return f"volume {contract.API_TOKEN_VOLUME!r} is not the injected one"
    context = sidecar.get("securityContext") or {}
    if context.get("runAsUser") != contract.SIDECAR_UID or context.get("privileged"):
        return "it does not run as the sidecar's own user"
    # an exec probe or hook runs a command of the pod author's beside the token
    if any(isinstance(sidecar.get(p), Mapping) and "exec" in sidecar[p] for p in _PROBES) or \
            sidecar.get("lifecycle"):
        return "it runs exec probes or lifecycle hooks"
    return _isolation_problem(pod_spec, annotations or {})


def exposed(pod: Mapping[str, Any], *, agent_audiences: Collection[str],
            vet_sidecar: bool = False, sidecar_images: Collection[str] | None = None
            ) -> ExposedPod | None:
    """The pod, if a container other than the injected sidecar holds an API token; else None.

    With ``vet_sidecar`` (for an account not granted yet), a native sidecar
    holding a token is vetted as well (``sidecar_problem``), its image
    against ``sidecar_images``.
    """
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    if not isinstance(spec, Mapping):
        return None
    volumes = _token_volumes(spec, agent_audiences)

    def hit(container: Mapping[str, Any], volume: str, lookalike: str | None = None) -> ExposedPod:
        return ExposedPod(
            namespace=str(meta.get("namespace", "")), name=str(meta.get("name", "")),
            uid=str(meta.get("uid", "")), service_account=service_account(pod),
            container=str(container.get("name", "")), volume=volume, lookalike=lookalike)

    for c in _agent_containers(spec):
        for m in c.get("volumeMounts") or []:
            if isinstance(m, Mapping) and m.get("name") in volumes:
                return hit(c, str(m.get("name")))
    if not vet_sidecar:
        return None
    for c in spec.get("initContainers") or []:
        if not isinstance(c, Mapping) or c.get("name") != contract.SIDECAR_CONTAINER_NAME:
            continue
        held = [str(m.get("name")) for m in c.get("volumeMounts") or []
                if isinstance(m, Mapping) and m.get("name") in volumes]
        problem = sidecar_problem(spec, c, images=sidecar_images,
                                  annotations=meta.get("annotations") or {}) if held else None
        if problem is not None:
            return hit(c, held[0], problem)
    return None


class RecentlyGone:
    """The exposed pods that went less than ``ttl`` ago, in every namespace.

    Kept in the order they went (a dict keeps insertion order, and every
    entry is stamped "now" on a monotonic clock), so pruning pops expired
    entries from the front: each entry costs O(1) to add and to drop. At
    ``capacity`` it forgets nothing: the pod it cannot keep makes its
    namespace *blind* for ``ttl`` instead (``blind_until``), and past
    ``capacity`` blind namespaces, every namespace is. A blind namespace
    grants no account that is not bound already until then.
    """

    def __init__(self, ttl: float = TOKEN_CACHE_SECONDS,
                 capacity: int = MAX_GONE_REMEMBERED) -> None:
        self._ttl = ttl
        self._capacity = max(1, capacity)
        self._pods: dict[str, tuple[float, ExposedPod]] = {}  # by uid, oldest first
        self._blind: dict[str, float] = {}  # namespace -> when it last lost a pod, oldest first
        self._blind_everywhere: float | None = None

    def __len__(self) -> int:
        return len(self._pods)

    def went(self, pod: ExposedPod, now: float) -> None:
        """``pod`` went (or was first seen gone) at ``now``; a pod known already keeps its time."""
        self.prune(now)
        if pod.uid in self._pods:
            return
        if len(self._pods) < self._capacity:
            self._pods[pod.uid] = (now, pod)
        elif pod.namespace in self._blind or len(self._blind) < self._capacity:
            self._blind.pop(pod.namespace, None)  # re-added last: the order stays by time
            self._blind[pod.namespace] = now
        else:
            self._blind_everywhere = now

    def forget(self, uid: str) -> None:
        """The pod is there after all (a listing found it): its live self holds."""
        self._pods.pop(uid, None)

    def since(self, uid: str) -> float | None:
        """When the pod went, if it is remembered."""
        entry = self._pods.get(uid)
        return entry[0] if entry is not None else None

    def recent(self, namespace: str, accounts: Collection[str], now: float
               ) -> list[tuple[float, ExposedPod]]:
        """The remembered pods of ``accounts`` in ``namespace``: (when each went, the pod)."""
        self.prune(now)
        return [(since, pod) for since, pod in self._pods.values()
                if pod.namespace == namespace and pod.service_account in accounts]

    def blind_until(self, namespace: str, now: float) -> float | None:
        """When the namespace's forgotten pods stop mattering, while that is later than ``now``."""
        self.prune(now)
        lost = [t for t in (self._blind.get(namespace), self._blind_everywhere) if t is not None]
        return max(lost) + self._ttl if lost else None

    def prune(self, now: float) -> None:
        cutoff = now - self._ttl
        while self._pods:
            uid = next(iter(self._pods))
            if self._pods[uid][0] > cutoff:
                break
            del self._pods[uid]
        while self._blind:
            namespace = next(iter(self._blind))
            if self._blind[namespace] > cutoff:
                break
            del self._blind[namespace]
        if self._blind_everywhere is not None and self._blind_everywhere <= cutoff:
            self._blind_everywhere = None
