"""What a policy's status should say: pure functions, no API calls.

The reconcile gathers facts (the policy as served, its namespace's other
policies, what each referenced Secret holds) and these functions turn them
into conditions. Keeping them pure makes every message testable without a
cluster, and makes sure no function here ever sees a Secret's value: it only
gets ``SecretKeys`` (which keys are present and non-empty).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sidekey.core import policies
from sidekey.operator import conditions, exposure, kubeobjects

#: How many held-back pods a condition names; the rest are counted.
MAX_PODS_NAMED = 5


@dataclass(frozen=True, slots=True)
class Missing:
    """The Secret does not exist."""

    name: str


@dataclass(frozen=True, slots=True)
class Unreadable:
    """The operator could not read the Secret (forbidden, or the API failed)."""

    name: str
    why: str


SecretLookup = kubeobjects.SecretKeys | Missing | Unreadable


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of one reconcile, before it is written."""

    policy: policies.AgentPolicy | None  # None: the spec does not parse
    upstream_count: int
    wanted: tuple[conditions.Wanted, ...]
    grants: bool  # keep the Role and RoleBinding (False: remove them)
    retry: bool = False  # look again with backoff: the fix would come unannounced
    #: The pods holding a subject's grant back (empty: every subject is granted).
    held_pods: tuple[exposure.ExposedPod, ...] = ()
    #: Accounts whose new grant waits out a restarted operator's grace (``RestartWait``).
    waiting: frozenset[str] = frozenset()

    @property
    def ready(self) -> conditions.Wanted:
        return next(w for w in self.wanted if w.type == conditions.READY)

    @property
    def granted(self) -> frozenset[str]:
        """The subject accounts the RoleBinding names."""
        if self.policy is None:
            return frozenset()
        return (self.policy.service_accounts - {p.service_account for p in self.held_pods}
                - self.waiting)


def parse(raw: Mapping[str, Any]) -> policies.AgentPolicy | policies.PolicyError:
    try:
        return policies.parse(policies.raw(raw))
    except policies.PolicyError as exc:
        return exc


def raw_upstream_count(raw: Mapping[str, Any]) -> int:
    ups = (raw.get("spec") or {}).get("upstreams") if isinstance(raw.get("spec"), Mapping) else None
    return len(ups) if isinstance(ups, list) else 0


def conflicts(policy: policies.AgentPolicy, namespace_policies: Iterable[Mapping[str, Any]]
              ) -> list[policies.Conflict]:
    """The conflicts this policy loses against older policies of its namespace.

    Policies that do not parse take part in nothing: they grant nothing, so
    they cannot win an upstream name either.
    """
    parsed: list[policies.AgentPolicy] = [policy]
    for raw in namespace_policies:
        meta = raw.get("metadata") or {}
        if meta.get("uid") == policy.uid or meta.get("name") == policy.name:
            continue
        other = parse(raw)
        if isinstance(other, policies.AgentPolicy):
            parsed.append(other)
    lost: list[policies.Conflict] = []
    for sa in sorted(policy.service_accounts):
        lost += [c for c in policies.select(parsed, sa).conflicts if c.loser is policy]
    return lost


def losers(namespace_policies: Iterable[Mapping[str, Any]]) -> dict[str, list[policies.Conflict]]:
    """Every conflict of a namespace at once, by the losing policy's name.

    Used when one policy changes, to find the neighbours whose Conflict
    condition must change without calling the API for each of them.
    """
    parsed = [p for p in map(parse, namespace_policies) if isinstance(p, policies.AgentPolicy)]
    found: dict[str, list[policies.Conflict]] = {}
    for sa in sorted({sa for p in parsed for sa in p.service_accounts}):
        for c in policies.select(parsed, sa).conflicts:
            found.setdefault(c.loser.name, []).append(c)
    return found


def conflict_message(lost: Sequence[policies.Conflict]) -> str:
    return lost[0].message + (f" (and {len(lost) - 1} more conflicts)" if len(lost) > 1 else "")


@dataclass(frozen=True, slots=True)
class _Need:
    where: str
    secret: str
    key: str


def _needs(policy: policies.AgentPolicy) -> list[_Need]:
    needs: list[_Need] = []
    for i, up in enumerate(policy.upstreams):
        for key in up.auth.secret_keys:
            needs.append(_Need(f"spec.upstreams[{i}] ({up.name})", up.auth.secret_name, key))
    return needs


def secrets_resolved(policy: policies.AgentPolicy, lookups: Mapping[str, SecretLookup]
                     ) -> conditions.Wanted:
    """SecretsResolved: every referenced Secret exists and every key is non-empty."""
    problems: list[tuple[str, str]] = []  # (reason, message)
    unknown: list[str] = []
    seen: set[tuple[str, str]] = set()
    for need in _needs(policy):
        if (need.secret, need.key) in seen:
            continue
        seen.add((need.secret, need.key))
        found = lookups.get(need.secret)
        if found is None or isinstance(found, Missing):
            problems.append(("SecretNotFound",
                             f"Secret {need.secret!r} named by {need.where} does not exist in "
                             f"namespace {policy.namespace!r}; create it with key {need.key!r}"))
        elif isinstance(found, Unreadable):
            unknown.append(f"Secret {need.secret!r} could not be read by the operator: {found.why}")
        elif need.key in found.empty:
            problems.append(("KeyEmpty",
                             f"key {need.key!r} of Secret {need.secret!r} (named by {need.where}) "
                             f"is empty; put the credential in it"))
        elif need.key not in found.present:
            problems.append(("KeyNotFound",
                             f"Secret {need.secret!r} has no key {need.key!r} (named by "
                             f"{need.where}); add it or fix the key name"))
    if problems:
        reasons = {r for r, _ in problems}
        reason = reasons.pop() if len(reasons) == 1 else "SecretsUnresolved"
        return conditions.Wanted(conditions.SECRETS_RESOLVED, "False", reason,
                                 _join([m for _, m in problems]))
    if unknown:
        return conditions.Wanted(conditions.SECRETS_RESOLVED, "Unknown", "SecretUnreadable",
                                 _join(unknown))
    n = len({need.secret for need in _needs(policy)})
    return conditions.Wanted(conditions.SECRETS_RESOLVED, "True", "Resolved",
                             f"{n} referenced Secret{'s' if n != 1 else ''} hold every key")


def _join(messages: Sequence[str]) -> str:
    if len(messages) <= 3:
        return "; ".join(messages)
    return "; ".join(messages[:3]) + f"; and {len(messages) - 3} more"


@dataclass(frozen=True, slots=True)
class Hold:
    """Which subject accounts the RoleBinding names, and why the others wait."""

    granted: frozenset[str]
    pods: tuple[exposure.ExposedPod, ...]
    condition: conditions.Wanted
    #: Accounts held back by a restarted operator's grace alone (``RestartWait``).
    waiting: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class RestartWait:
    """This operator instance has not watched the policy's pods long enough to
    know that none of them went moments ago: the accounts the RoleBinding does
    not name yet (``bound`` is what it names) wait until ``until`` (RFC 3339).

    The memory of held pods that went (``exposure.TOKEN_CACHE_SECONDS``) lives
    in the process: an operator that restarts right after such a pod is
    deleted does not know it, and would grant while the apiserver still
    accepts a token copied from that pod. Accounts already bound stay bound:
    nothing is taken away by a restart.
    """

    bound: frozenset[str]
    until: str
    #: ``OperatorRestarted``, or ``TooManyPodsGone`` when more exposed pods went in
    #: the namespace than the operator tells apart (``exposure.RecentlyGone``): then
    #: it cannot know that none of them ran as these accounts either.
    reason: str = "OperatorRestarted"


#: The reason of a namespace-wide wait: ``exposure.RecentlyGone`` was full.
TOO_MANY_PODS_GONE = "TooManyPodsGone"


def reconciled_before(raw: Mapping[str, Any], has_binding: bool) -> bool:
    """Whether an operator has reconciled this policy before: it wrote conditions
    or the policy's RoleBinding. Only then can an earlier instance have held a
    pod back whose deletion this one did not see; a policy no operator has
    looked at yet gets its grants at once."""
    return has_binding or bool(conditions.existing(raw.get("status")))


def hold(policy: policies.AgentPolicy,
         exposed: Mapping[str, Sequence[exposure.ExposedPod]],
         restart: RestartWait | None = None) -> Hold:
    """Grant each subject account unless one of its pods holds an API token outside
    the sidecar (or a legacy token Secret of it exists, which any pod may mount):
    that pod would read the Secrets the moment the account is bound.

    The grant follows once those pods (and Secrets) are gone (deleted, or pods
    recreated injected); the pod and Secret watches bring the reconcile back.
    After a restart, or while the memory of pods that went is full for the
    namespace (``restart``, its ``reason`` says which), an account not bound
    yet also waits for that to end; a timer brings the reconcile back then.
    ``exposed`` includes pods that went moments ago (``deleted``): their
    token may still authenticate from the apiserver's cache.
    """
    pods = tuple(sorted((p for sa in sorted(policy.service_accounts) for p in exposed.get(sa, ())),
                        key=lambda p: (p.service_account, p.name)))
    held = frozenset(p.service_account for p in pods)
    waiting = (frozenset(policy.service_accounts) - restart.bound - held if restart is not None
               else frozenset[str]())
    granted = frozenset(policy.service_accounts) - held - waiting
    if not pods and not waiting:
        return Hold(granted, (), conditions.Wanted(
            conditions.SUBJECTS_GRANTED, "True", "Granted",
            f"service account{'s' if len(granted) != 1 else ''} {', '.join(sorted(granted))} "
            "may read the policy's Secrets"))
    wait = _wait_message(waiting, restart) if restart is not None and waiting else ""
    if not pods:
        return Hold(granted, (), conditions.Wanted(
            conditions.SUBJECTS_GRANTED, "False", restart.reason if restart else "", wait),
            waiting)
    named = [_held_pod(p) for p in pods[:MAX_PODS_NAMED]]
    more = f" and {len(pods) - MAX_PODS_NAMED} more" if len(pods) > MAX_PODS_NAMED else ""
    accounts = ", ".join(sorted(held))
    one = len(pods) == 1
    fix = f"Delete {'it' if one else 'them'}"
    if not all(p.secret for p in pods):
        fix += f", or recreate {'it' if one else 'the pods'} injected (sidekey.io/inject: \"true\")"
    message = (
        f"the grant to service account{'s' if len(held) != 1 else ''} {accounts} is held back: "
        f"{'; '.join(named)}{more} {'holds' if one else 'hold'} an API "
        "token outside the sidekey sidecar, which would read the policy's Secrets once granted. "
        f"{fix}, and the grant follows")
    if wait:
        message += f". And {wait[0].lower()}{wait[1:]}"
    reason = "LegacyTokenSecrets" if all(p.secret for p in pods) else "UninjectedPods"
    return Hold(granted, pods, conditions.Wanted(conditions.SUBJECTS_GRANTED, "False", reason, message),
                waiting)


def _wait_message(waiting: frozenset[str], wait: RestartWait) -> str:
    one = len(waiting) == 1
    why = ("the operator restarted and has only just begun to watch this policy's pods"
           if wait.reason != TOO_MANY_PODS_GONE else
           "more pods that held an API token outside the sidekey sidecar were deleted in this "
           f"namespace in the last {exposure.TOKEN_CACHE_SECONDS:.0f} s than the operator "
           "remembers one by one")
    return (
        f"the grant to service account{'' if one else 's'} {', '.join(sorted(waiting))} waits "
        f"until {wait.until}: {why}, so it cannot know whether a pod of "
        f"{'this account' if one else 'these accounts'} that held an API token outside the "
        "sidekey sidecar was deleted moments before (the apiserver accepts a token copied from "
        "such a pod for up to 10 s after it is gone). Nothing to do: the grant follows then")


def _held_pod(pod: exposure.ExposedPod) -> str:
    if pod.secret:
        gone = "; deleted, the apiserver may accept its token for a few seconds more" if pod.deleted else ""
        return (f"Secret {pod.name} (a legacy token of service account {pod.service_account!r}, "
                f"which any pod of the namespace may mount{gone})")
    if pod.deleted:
        return f"pod {pod.name} (deleted; the apiserver may accept its token for a few seconds more)"
    where = f"container {pod.container!r} mounts API token volume {pod.volume!r}"
    if pod.lookalike:
        return f"pod {pod.name} ({where} but is not the injected sidecar: {pod.lookalike})"
    return f"pod {pod.name} ({where})"


def default_subject(policy: policies.AgentPolicy) -> conditions.Wanted | None:
    """A warning while the policy names ``default``: every pod of the namespace
    that names no account runs as it, so each of them must carry the sidecar."""
    if "default" not in policy.service_accounts:
        return None
    return conditions.Wanted(
        conditions.DEFAULT_SUBJECT, "True", "DefaultServiceAccount",
        f"the policy names the 'default' service account: every pod in namespace "
        f"{policy.namespace!r} that sets no serviceAccountName runs as it, so each must now run "
        "with the sidekey sidecar (the bypass guard refuses the others) and any that already "
        "runs without it holds the grant back; give the agents an account of their own")


def invalid(raw: Mapping[str, Any], error: policies.PolicyError) -> Verdict:
    message = f"{error.field}: {error.message}"
    return Verdict(
        policy=None, upstream_count=raw_upstream_count(raw),
        wanted=(
            conditions.Wanted(conditions.SECRETS_RESOLVED, "Unknown", "InvalidSpec",
                              "not checked: the spec is invalid"),
            conditions.Wanted(conditions.READY, "False", "InvalidSpec", message),
        ),
        grants=False,
    )


def judge(policy: policies.AgentPolicy, lost: Sequence[policies.Conflict],
          secrets: conditions.Wanted, rbac_problem: tuple[str, str] | None,
          held: Hold | None = None) -> Verdict:
    """Ready is True only with no conflict, RBAC in place, every subject granted
    and every Secret resolved.

    A policy that loses a conflict keeps its grants: the sidecar merges
    policies with ``policies.select`` and still serves its other upstreams.
    """
    held = held if held is not None else hold(policy, {})
    count = len(policy.upstreams)
    if lost:
        ready = conditions.Wanted(conditions.READY, "False", "Conflict", conflict_message(lost))
    elif rbac_problem is not None:
        ready = conditions.Wanted(conditions.READY, "False", rbac_problem[0], rbac_problem[1])
    elif held.pods or held.waiting:
        ready = conditions.Wanted(conditions.READY, "False", "GrantHeld", held.condition.message)
    elif secrets.status != "True":
        ready = conditions.Wanted(conditions.READY, "False", "SecretsUnresolved", secrets.message)
    else:
        sas = ", ".join(sorted(policy.service_accounts))
        ready = conditions.Wanted(
            conditions.READY, "True", "Ready",
            f"{count} upstream{'s' if count != 1 else ''} ready for service account"
            f"{'s' if len(policy.service_accounts) != 1 else ''} {sas}")
    retry = rbac_problem is not None or secrets.status == "Unknown"
    warning = default_subject(policy)
    wanted = (secrets, held.condition, *((warning,) if warning else ()), ready)
    return Verdict(policy=policy, upstream_count=count, wanted=wanted, grants=True,
                   retry=retry, held_pods=held.pods, waiting=held.waiting)
