"""The AgentPolicy reconcile: facts in, RBAC and status out.

One run for one policy: parse it, find the conflicts it loses against older
policies of its namespace, look at the Secrets it names (which keys hold a
value; the values are dropped on read), list the pods of each subject
account and hold back the grant of any account whose pods hold an API token
outside the sidecar (``exposure``), keep its Role and RoleBinding in step,
then write the status and post Events on transitions. Every step is
idempotent and cheap when nothing changed (no write at all), so the run can
be triggered as often as the world changes: by the policy, by a neighbour
policy, by a Secret it names, or by a subject's pod that comes or goes.

The pods are listed from the apiserver (a consistent read), not from the
watch: a pod created just before the edit that names its account may not
have reached the watch yet, and granting first would hand it the Secret.

The policies themselves come from a kopf index: kopf fills it before any
handler runs, so a conflict with an older policy is seen from the first
reconcile after a restart.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import logging
import time
from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import Any, Protocol, cast

from sidekey.core import contract, kubeapi, policies
from sidekey.operator import (
    conditions,
    exposure,
    kubeobjects,
    metrics,
    queueing,
    rbac,
    recording,
    rest,
    verdicts,
)

log = logging.getLogger(__name__)
Key = tuple[str, str]  # (namespace, name)


#: How long a new grant waits after the pod listing for the pod watch to deliver
#: a deletion that listing could have missed (kopf holds each object's events
#: for its 0.1 s batch window first).
WATCH_LAG_SECONDS = 1.0


class PolicyIndex(Protocol):
    """The part of a ``kopf.Index`` the controller reads: namespace -> policies."""

    def __contains__(self, key: object) -> bool: ...
    def __getitem__(self, key: str) -> Iterable[policies.RawAgentPolicy]: ...


def snapshot(body: Mapping[str, Any]) -> policies.RawAgentPolicy:
    """A plain, detached copy of a policy as served (kopf's bodies are live views)."""
    def plain(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value
    copy = {k: plain(body.get(k)) for k in ("apiVersion", "kind", "metadata", "spec", "status")
            if body.get(k) is not None}
    return cast(policies.RawAgentPolicy, copy)


def referenced_secrets(raw: Mapping[str, Any]) -> set[str]:
    """Secret names a policy refers to, read leniently so an invalid spec still counts."""
    names: set[str] = set()
    spec = raw.get("spec")
    ups = spec.get("upstreams") if isinstance(spec, Mapping) else None
    for up in ups if isinstance(ups, list) else []:
        auth = up.get("auth") if isinstance(up, Mapping) else None
        ref = auth.get("secretRef") if isinstance(auth, Mapping) else None
        if isinstance(ref, Mapping) and isinstance(ref.get("name"), str):
            names.add(ref["name"])
    return names


def subject_accounts(raw: Mapping[str, Any]) -> set[str]:
    """Subject accounts a policy names, read leniently so an invalid spec still counts."""
    spec = raw.get("spec")
    subjects = spec.get("subjects") if isinstance(spec, Mapping) else None
    accounts = subjects.get("serviceAccounts") if isinstance(subjects, Mapping) else None
    return {a for a in accounts if isinstance(a, str)} if isinstance(accounts, list) else set()


def secret_keys(name: str, secret: Mapping[str, Any]) -> kubeobjects.SecretKeys:
    """Narrow a served Secret to which keys hold a value; the values go no further."""
    present: set[str] = set()
    empty: set[str] = set()
    data = secret.get("data")
    for key, value in (data.items() if isinstance(data, Mapping) else ()):
        try:
            filled = isinstance(value, str) and len(base64.b64decode(value, validate=True)) > 0
        except (binascii.Error, ValueError):
            filled = False
        (present if filled else empty).add(str(key))
    return kubeobjects.SecretKeys(name, frozenset(present), frozenset(empty))


def reference(raw: Mapping[str, Any]) -> kubeobjects.ObjectReference:
    meta = raw.get("metadata") or {}
    return kubeobjects.ObjectReference(
        apiVersion=contract.API_VERSION, kind=contract.KIND, name=str(meta.get("name", "")),
        namespace=str(meta.get("namespace", "")), uid=str(meta.get("uid", "")))


class Controller:
    def __init__(self, api: rest.Rest, recorder: recording.Recorder, stats: metrics.Metrics,
                 *, agent_audiences: Collection[str] = (contract.DEFAULT_AUDIENCE,),
                 sidecar_images: Collection[str] | None = None,
                 token_cache_seconds: float = exposure.TOKEN_CACHE_SECONDS,
                 gone_capacity: int = exposure.MAX_GONE_REMEMBERED,
                 watch_lag_seconds: float = WATCH_LAG_SECONDS,
                 workers: int = 4) -> None:
        self._api = api
        self._recorder = recorder
        self._stats = stats
        self._audiences = frozenset(agent_audiences)
        self._images = frozenset(sidecar_images) if sidecar_images is not None else None
        self._index: PolicyIndex | None = None
        self._ready: dict[Key, bool] = {}
        #: Per policy, the pods its last reconcile held a grant back for, by uid.
        self._held: dict[Key, dict[str, exposure.ExposedPod]] = {}
        #: Per policy, the accounts its last reconcile bound.
        self._granted: dict[Key, frozenset[str]] = {}
        #: Exposed pods that went, of every account and namespace: from the pod
        #: watch's DELETED events, and held pods a reconcile no longer finds.
        self._gone = exposure.RecentlyGone(token_cache_seconds, gone_capacity)
        #: Per policy an earlier instance reconciled, the restart grace: (its end on
        #: the monotonic clock, the same as RFC 3339 for the condition).
        self._restart_grace: dict[Key, tuple[float, str]] = {}
        #: Per policy, when the wait its last reconcile reported ends (monotonic).
        self._wait_ends: dict[Key, float] = {}
        self._token_cache = token_cache_seconds
        self._watch_lag = watch_lag_seconds
        #: Set once kopf delivers events, i.e. its indexes are filled.
        self.handling = asyncio.Event()
        self.queue: queueing.Queue[Key] = queueing.Queue(self.reconcile, workers=workers)
        stats.queue_depth.set_function(lambda: self.queue.depth)

    # --- Triggers (called from kopf handlers) ---------------------------------

    def attach(self, index: PolicyIndex) -> None:
        """Remember kopf's live policy index (the same object on every call)."""
        self._index = index

    @property
    def attached(self) -> bool:
        return self._index is not None

    def _policies(self, namespace: str) -> list[policies.RawAgentPolicy]:
        if self._index is None or namespace not in self._index:
            return []
        return list(self._index[namespace])

    def policy_changed(self, namespace: str, name: str, *, deleted: bool) -> None:
        """A policy changed: reconcile it, and the neighbours whose conflicts changed.

        A neighbour's status depends on the changed policy only through
        conflicts, so those are recomputed here from the index (no API call)
        and only neighbours whose Conflict condition is now wrong are queued.
        """
        if deleted:
            self._ready.pop((namespace, name), None)
            self._held.pop((namespace, name), None)
            self._granted.pop((namespace, name), None)
            self._restart_grace.pop((namespace, name), None)
            self._wait_ends.pop((namespace, name), None)
            self._update_gauge()
        else:
            self.queue.add((namespace, name))
        neighbours = self._policies(namespace)
        lost = verdicts.losers(neighbours)
        for raw in neighbours:
            other = str((raw.get("metadata") or {}).get("name", ""))
            if other and other != name and _conflict_stale(raw, lost.get(other, [])):
                self.queue.add((namespace, other))

    def secret_changed(self, namespace: str, name: str, body: Mapping[str, Any] | None = None,
                       *, deleted: bool = False) -> None:
        """A Secret changed: reconcile the policies naming it, and, for a legacy
        token Secret, the policies whose subject it holds back (``exposure.legacy_token``).

        A legacy token Secret that goes is remembered like an exposed pod that
        goes: a token copied from it may authenticate from the apiserver's
        cache a little longer, whether or not a policy named its account yet.
        """
        token = exposure.legacy_token(body) if body is not None else None
        if deleted and token is not None:
            self._gone.went(token, time.monotonic())
        for raw in self._policies(namespace):
            if name in referenced_secrets(raw) or (
                    token is not None and token.service_account in subject_accounts(raw)):
                self.queue.add((namespace, str(raw["metadata"]["name"])))

    def pod_changed(self, body: Mapping[str, Any], *, deleted: bool) -> None:
        """A pod came, changed or went: reconcile the policies whose hold it changes.

        Only a change of the answer matters: a pod of a subject account that now
        holds an API token outside the sidecar and is not yet holding a grant
        back, or one that was and no longer does (it went, or was replaced).
        Every other pod event costs a set lookup.

        A pod that goes while it holds an API token outside the sidecar, of any
        account, is remembered (``exposure.RecentlyGone``): a policy that names
        its account in the next ``TOKEN_CACHE_SECONDS`` holds the new grant
        back for it, as a copy of its token may still authenticate. That costs
        one ``exposure.exposed`` per deleted pod, on its last state.
        """
        meta = body.get("metadata") or {}
        namespace, uid = str(meta.get("namespace", "")), str(meta.get("uid", ""))
        account = exposure.service_account(body)
        if deleted:
            gone = exposure.exposed(body, agent_audiences=self._audiences, vet_sidecar=True,
                                    sidecar_images=self._images)
            if gone is not None:
                self._gone.went(gone, time.monotonic())
        for raw in self._policies(namespace):
            name = str((raw.get("metadata") or {}).get("name", ""))
            if not name or account not in subject_accounts(raw):
                continue
            key = (namespace, name)
            vet = key in self._granted and account not in self._granted[key]
            holds = not deleted and exposure.exposed(
                body, agent_audiences=self._audiences, vet_sidecar=vet,
                sidecar_images=self._images) is not None
            if holds != (uid in self._held.get(key, {})):
                self.queue.add(key)

    def role_changed(self, namespace: str, labels: Mapping[str, str]) -> None:
        """A Role or RoleBinding we manage changed: put it back if someone edited it."""
        wanted = labels.get(contract.LABEL_POLICY)
        for raw in self._policies(namespace):
            name = str((raw.get("metadata") or {}).get("name", ""))
            if rbac.label_value(name) == wanted:
                self.queue.add((namespace, name))

    def _find(self, namespace: str, name: str) -> policies.RawAgentPolicy | None:
        for raw in self._policies(namespace):
            if (raw.get("metadata") or {}).get("name") == name:
                return raw
        return None

    # --- The reconcile ----------------------------------------------------------

    async def reconcile(self, key: Key) -> None:
        namespace, name = key
        raw = self._find(namespace, name)
        if raw is None:
            return  # deleted: the garbage collector removes its Role and RoleBinding
        started = time.monotonic()
        try:
            verdict, rbac_changed = await self._judge(raw)
            if not await self._write_status(raw, verdict):
                return  # the policy is gone
        except Exception as exc:
            if rest.terminating(exc):
                # The namespace is being deleted, and the policy with it: nothing to keep.
                log.debug("AgentPolicy %s/%s: namespace terminating", namespace, name)
                return
            self._stats.reconciles.labels("error").inc()
            self._stats.errors.labels("reconcile" if not rest.transient(exc) else "api").inc()
            if rest.transient(exc):
                raise queueing.Retry(f"transient API error: {exc}") from exc
            raise
        finally:
            self._stats.duration.observe(time.monotonic() - started)
        ready = verdict.ready.status == "True"
        self._stats.reconciles.labels("ready" if ready else "not_ready").inc()
        self._ready[key] = ready
        self._held[key] = {p.uid: p for p in verdict.held_pods}
        self._granted[key] = verdict.granted
        self._update_gauge()
        due: list[float] = []  # monotonic times the hold may end with no event announcing it
        settling = [p for p in verdict.held_pods if p.deleted]
        if settling:
            # Nothing announces that the apiserver's token cache has expired: look again then.
            # A pod another policy's reconcile forgot meanwhile (its TTL passed) is due now.
            since = min((t for p in settling if (t := self._gone.since(p.uid)) is not None),
                        default=time.monotonic() - self._token_cache)
            due.append(since + self._token_cache)
        if verdict.waiting:  # nor that a restart's grace, or a namespace-wide wait, is over
            due.append(self._wait_ends.get(key, time.monotonic()))
        if due:
            self.queue.add_after(key, max(0.1, min(due) - time.monotonic()))
        if rbac_changed and verdict.policy is not None:
            p = verdict.policy
            granted = ", ".join(sorted(verdict.granted)) or "none (every grant is held back)"
            await self._recorder.post(
                reference(raw), "Normal", "RBACUpdated",
                f"Role and RoleBinding {rbac.object_name(p.name)} let service account(s) "
                f"{granted} read Secret(s) "
                f"{', '.join(sorted(p.secret_names))} and the namespace's AgentPolicies")
        if verdict.retry:
            # Nothing we watch announces the fix (granted rights, a foreign Role
            # removed), so look again with backoff; the status is already written.
            raise queueing.Retry(f"{verdict.ready.reason}: will look again")

    def _update_gauge(self) -> None:
        ready = sum(1 for v in self._ready.values() if v)
        self._stats.policies.labels("true").set(ready)
        self._stats.policies.labels("false").set(len(self._ready) - ready)
        self._stats.blocked_subject_pods.set(
            len({u for pods in self._held.values() for u, p in pods.items() if not p.secret}))

    async def _judge(self, raw: Mapping[str, Any]) -> tuple[verdicts.Verdict, bool]:
        meta = raw.get("metadata") or {}
        parsed = verdicts.parse(raw)
        if isinstance(parsed, policies.PolicyError):
            await self._remove_rbac(str(meta.get("namespace")), str(meta.get("name")),
                                    str(meta.get("uid")))
            return verdicts.invalid(raw, parsed), False
        lost = verdicts.conflicts(parsed, self._policies(parsed.namespace))
        lookups = {s: await self._lookup(parsed.namespace, s) for s in sorted(parsed.secret_names)}
        secrets = verdicts.secrets_resolved(parsed, lookups)
        bound = await self._bound(parsed)
        exposed = await self._exposed_pods(parsed, bound or frozenset())
        held = self._hold(raw, parsed, exposed, bound)
        if self._watch_lag > 0 and held.granted - (bound or frozenset()):
            # A pod force-deleted just before the listing above is missing from it, and
            # its DELETED event reaches ``pod_changed`` a moment later: before a new
            # grant, give the watch that moment and look at what went again.
            await asyncio.sleep(self._watch_lag)
            held = self._hold(raw, parsed, exposed, bound)
        problem, changed = await self._ensure_rbac(parsed, held.granted)
        return verdicts.judge(parsed, lost, secrets, problem, held), changed

    def _hold(self, raw: Mapping[str, Any], policy: policies.AgentPolicy,
              exposed: dict[str, list[exposure.ExposedPod]], bound: frozenset[str] | None
              ) -> verdicts.Hold:
        return verdicts.hold(policy, self._with_recently_gone(policy, exposed, bound),
                             self._wait(raw, policy, bound))

    async def _bound(self, policy: policies.AgentPolicy) -> frozenset[str] | None:
        """The accounts this policy's RoleBinding names now (read, so a restart knows);
        None when the policy has no RoleBinding of its own."""
        current = await self._api.get(rest.role_binding_path(policy.namespace,
                                                             rbac.object_name(policy.name)))
        if current is None or not rbac.owned_by(current, policy.uid):
            return None
        return frozenset(str(s.get("name")) for s in current.get("subjects") or []
                         if isinstance(s, Mapping) and s.get("kind") == "ServiceAccount")

    async def _exposed_pods(self, policy: policies.AgentPolicy, bound: Collection[str]
                            ) -> dict[str, list[exposure.ExposedPod]]:
        """Per subject account, its pods that hold an API token outside the sidecar.

        A consistent LIST per account (``spec.serviceAccountName`` is a pod field
        selector), paged, so a pod created a moment ago is seen. Pods being
        deleted still count: their token is valid until the object is gone. The
        sidecars of an account not bound yet are vetted too (``exposure``).
        """
        found: dict[str, list[exposure.ExposedPod]] = {}
        for account in sorted(policy.service_accounts):
            params = {"fieldSelector": f"spec.serviceAccountName={account}", "limit": "500"}
            while True:
                page = await self._api.get(rest.pods_path(policy.namespace), params) or {}
                for pod in page.get("items") or []:
                    hit = exposure.exposed(pod, agent_audiences=self._audiences,
                                           vet_sidecar=account not in bound,
                                           sidecar_images=self._images)
                    if hit is not None:
                        found.setdefault(account, []).append(hit)
                more = (page.get("metadata") or {}).get("continue")
                if not more:
                    break
                params = {**params, "continue": str(more)}
        params = {"fieldSelector": f"type={exposure.LEGACY_TOKEN_TYPE}", "limit": "500"}
        while True:  # legacy token Secrets of a subject: any pod may mount one
            page = await self._api.get(rest.secret_path(policy.namespace), params) or {}
            for secret in page.get("items") or []:
                token = exposure.legacy_token(secret)  # names only: the value goes no further
                if token is not None and token.service_account in policy.service_accounts:
                    found.setdefault(token.service_account, []).append(token)
            more = (page.get("metadata") or {}).get("continue")
            if not more:
                break
            params = {**params, "continue": str(more)}
        return found

    async def _lookup(self, namespace: str, name: str) -> verdicts.SecretLookup:
        try:
            secret = await self._api.get(rest.secret_path(namespace, name))
        except kubeapi.ApiError as exc:
            if exc.status == 403:
                return verdicts.Unreadable(name, "forbidden: grant the operator get on secrets")
            raise
        if secret is None:
            return verdicts.Missing(name)
        return secret_keys(name, secret)

    def _restart_wait(self, raw: Mapping[str, Any], policy: policies.AgentPolicy,
                      bound: frozenset[str] | None) -> verdicts.RestartWait | None:
        """The restart grace of this policy, while it lasts (``verdicts.RestartWait``).

        ``_gone`` remembers the held pods that went only in this process. So
        until a reconcile of the policy has completed here (its held pods are
        then in ``_held``, and their deletion is seen), and for
        ``TOKEN_CACHE_SECONDS`` after the pod listing of that reconcile, an
        account the RoleBinding does not name is not granted: a held pod deleted
        before that listing, unseen, may still have a token the apiserver
        accepts from its cache. Counting from the listing rather than the
        process start also covers a pod deleted after the start but before the
        policy's first reconcile. Only a policy that an operator reconciled
        before gets the grace (``verdicts.reconciled_before``): for a new one,
        nothing was held, so nothing was forgotten. The grace is derived from
        what a restart leaves (the policy's conditions, its RoleBinding) and
        this process's clock: nothing stored that a crash or upgrade could lose.
        A first reconcile that fails is not one: the next attempt starts the
        grace again, since the pods that one listed were not remembered.
        """
        key = (policy.namespace, policy.name)
        now = time.monotonic()
        if key not in self._held:  # not reconciled in this process yet: (re)start the grace
            if verdicts.reconciled_before(raw, bound is not None):
                self._restart_grace[key] = (now + self._token_cache,
                                            conditions.rfc3339_in(self._token_cache))
            else:
                self._restart_grace.pop(key, None)
        grace = self._restart_grace.get(key)
        if grace is None:
            return None
        if now >= grace[0]:
            del self._restart_grace[key]
            return None
        return verdicts.RestartWait(bound=bound or frozenset(), until=grace[1])

    def _wait(self, raw: Mapping[str, Any], policy: policies.AgentPolicy,
              bound: frozenset[str] | None) -> verdicts.RestartWait | None:
        """The wait of the accounts not bound yet, if any: the restart grace, or a
        namespace-wide wait while ``_gone`` could not keep every pod that went
        there (``exposure.RecentlyGone.blind_until``); the later one."""
        key = (policy.namespace, policy.name)
        now = time.monotonic()
        waits: list[tuple[float, verdicts.RestartWait]] = []
        restart = self._restart_wait(raw, policy, bound)
        if restart is not None:
            waits.append((self._restart_grace[key][0], restart))
        blind = self._gone.blind_until(policy.namespace, now)
        if blind is not None:
            waits.append((blind, verdicts.RestartWait(
                bound=bound or frozenset(), until=conditions.rfc3339_in(blind - now),
                reason=verdicts.TOO_MANY_PODS_GONE)))
        if not waits:
            self._wait_ends.pop(key, None)
            return None
        end, wait = max(waits, key=lambda w: w[0])
        self._wait_ends[key] = end
        return wait

    def _with_recently_gone(self, policy: policies.AgentPolicy,
                            exposed: dict[str, list[exposure.ExposedPod]],
                            bound: frozenset[str] | None
                            ) -> dict[str, list[exposure.ExposedPod]]:
        """Add the exposed pods of an account not bound yet that went less than the
        token cache's TTL ago: those the pod watch saw go (of any account, so also
        before the policy named it, or while it was invalid), and those this
        policy held that its listing no longer finds (whether or not the watch
        delivered their deletion). An account bound already is not held back for
        them: its pods lived while it was bound."""
        now = time.monotonic()
        found = {p.uid for pods in exposed.values() for p in pods}
        key = (policy.namespace, policy.name)
        for uid, pod in self._held.get(key, {}).items():
            if uid not in found and not pod.deleted:
                self._gone.went(pod, now)
        for uid in found:
            self._gone.forget(uid)
        result = {account: list(pods) for account, pods in exposed.items()}
        accounts = policy.service_accounts - (bound or frozenset())
        for _, pod in self._gone.recent(policy.namespace, accounts, now):
            result.setdefault(pod.service_account, []).append(dataclasses.replace(pod, deleted=True))
        return result

    async def _ensure_rbac(self, policy: policies.AgentPolicy, granted: Collection[str]
                           ) -> tuple[tuple[str, str] | None, bool]:
        """Create or fix the Role and RoleBinding of the ``granted`` accounts; (problem, changed)."""
        ns, obj_name = policy.namespace, rbac.object_name(policy.name)
        changed = False
        try:
            want_role = rbac.role(policy)
            current = await self._api.get(rest.role_path(ns, obj_name))
            if current is not None and not rbac.owned_by(current, policy.uid):
                return ("RoleConflict", f"Role {obj_name!r} exists but is not managed by this "
                        "AgentPolicy; delete or rename that Role"), False
            if current is None or not rbac.role_matches(current, want_role):
                await self._api.patch(rest.role_path(ns, obj_name), want_role, "apply")
                changed = True
            want_binding = rbac.role_binding(policy, granted)
            current = await self._api.get(rest.role_binding_path(ns, obj_name))
            if current is not None and not rbac.owned_by(current, policy.uid):
                return ("RoleConflict", f"RoleBinding {obj_name!r} exists but is not managed by "
                        "this AgentPolicy; delete or rename that RoleBinding"), changed
            if current is not None and not rbac.role_ref_matches(current, want_binding):
                await self._api.delete(rest.role_binding_path(ns, obj_name))
                current = None
            if current is None or not rbac.binding_matches(current, want_binding):
                await self._api.patch(rest.role_binding_path(ns, obj_name), want_binding, "apply")
                changed = True
        except kubeapi.ApiError as exc:
            if rest.transient(exc) or rest.terminating(exc):
                raise
            return ("RBACFailed", f"could not write Role/RoleBinding {obj_name!r}: "
                    f"{exc.status} {exc.reason}: {exc.message}"), changed
        return None, changed

    async def _remove_rbac(self, namespace: str, name: str, uid: str) -> None:
        """An invalid policy grants nothing: remove what an earlier version was given."""
        obj_name = rbac.object_name(name)
        for path in (rest.role_binding_path(namespace, obj_name), rest.role_path(namespace, obj_name)):
            try:
                current = await self._api.get(path)
                if current is not None and rbac.owned_by(current, uid):
                    await self._api.delete(path)
            except kubeapi.ApiError as exc:
                if rest.transient(exc):
                    raise
                log.warning("could not remove %s of invalid AgentPolicy %s/%s: %s",
                            path, namespace, name, exc)

    async def _write_status(self, raw: Mapping[str, Any], verdict: verdicts.Verdict) -> bool:
        """Write the status if it changed; False when the policy no longer exists."""
        meta = raw.get("metadata") or {}
        generation = int(meta.get("generation") or 0)
        found = raw.get("status")
        status: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
        old = conditions.existing(status)
        new = conditions.merge(old, verdict.wanted, generation, conditions.now_rfc3339())
        if (conditions.same(new, old) and status.get("observedGeneration") == generation
                and status.get("upstreamCount") == verdict.upstream_count):
            return True
        body = {"status": kubeobjects.PolicyStatus(
            observedGeneration=generation, upstreamCount=verdict.upstream_count, conditions=new)}
        try:
            await self._api.patch(
                rest.policy_path(str(meta.get("namespace")), str(meta.get("name"))) + "/status",
                body, "merge")
        except kubeapi.ApiError as exc:
            if exc.status == 404:
                return False  # deleted meanwhile
            raise
        await self._post_transitions(raw, old, new)
        return True

    async def _post_transitions(self, raw: Mapping[str, Any],
                                old: Mapping[str, kubeobjects.Condition],
                                new: list[kubeobjects.Condition]) -> None:
        target = reference(raw)
        posted: set[tuple[str, str]] = set()  # (reason, message): one Event says it once
        for c in _changed(old, new):
            event: tuple[kubeobjects.EventType, str] | None = None
            if c["type"] == conditions.READY:
                event = ("Normal", "Ready") if c["status"] == "True" else ("Warning", c["reason"])
                log.info("AgentPolicy %s/%s Ready=%s %s: %s", target["namespace"],
                         target["name"], c["status"], c["reason"], c["message"])
            elif c["type"] == conditions.SUBJECTS_GRANTED:
                before = old.get(c["type"])
                if c["status"] == "False":
                    event = ("Warning", "GrantHeld")
                    log.warning("AgentPolicy %s/%s: %s", target["namespace"], target["name"],
                                c["message"])
                elif before is not None and before["status"] == "False":
                    event = ("Normal", "GrantReleased")
            elif c["type"] == conditions.DEFAULT_SUBJECT:
                event = ("Warning", "DefaultSubject")
            if event is not None and (event[1], c["message"]) not in posted:
                posted.add((event[1], c["message"]))
                await self._recorder.post(target, event[0], event[1], c["message"])


def _conflict_stale(raw: Mapping[str, Any], lost: list[policies.Conflict]) -> bool:
    """Whether a policy's Ready condition disagrees with the conflicts it now loses."""
    ready = conditions.existing(raw.get("status")).get(conditions.READY)
    if ready is None:
        return True
    if lost:
        return ready["reason"] != "Conflict" or ready["message"] != verdicts.conflict_message(lost)
    return ready["reason"] == "Conflict"


def _changed(old: Mapping[str, kubeobjects.Condition], new: Iterable[kubeobjects.Condition]
             ) -> Iterator[kubeobjects.Condition]:
    for c in new:
        prev = old.get(c["type"])
        if prev is None or (prev["status"], prev["reason"], prev["message"]) != (
                c["status"], c["reason"], c["message"]):
            yield c
