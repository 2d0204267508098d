"""Status conditions per the Kubernetes API conventions.

``lastTransitionTime`` moves only when a condition's status changes, so that
``kubectl get`` and alerting see how long a policy has been (not) ready; a
new reason or message alone keeps the old time.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sidekey.operator import kubeobjects

READY = "Ready"
SECRETS_RESOLVED = "SecretsResolved"
#: Every subject account holds its grant (False: held back, naming the pods why).
SUBJECTS_GRANTED = "SubjectsGranted"
#: Present (True) only while the policy names the namespace's ``default`` account.
DEFAULT_SUBJECT = "DefaultSubject"


@dataclass(frozen=True, slots=True)
class Wanted:
    """A condition as the reconcile computed it, before times are attached."""

    type: str
    status: kubeobjects.ConditionStatus
    reason: str
    message: str


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339_in(seconds: float) -> str:
    """The time ``seconds`` from now, rounded up to the second: a message saying
    when something ends never names a moment before it does."""
    at = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds)
    if at.microsecond:
        at = at.replace(microsecond=0) + datetime.timedelta(seconds=1)
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def existing(status: Mapping[str, Any] | None) -> dict[str, kubeobjects.Condition]:
    """The conditions currently on an object, by type; malformed entries are ignored."""
    found: dict[str, kubeobjects.Condition] = {}
    if not isinstance(status, Mapping):
        return found
    raw = status.get("conditions")
    if not isinstance(raw, list):
        return found
    for c in raw:
        if not isinstance(c, Mapping) or not isinstance(c.get("type"), str):
            continue
        st = c.get("status")
        found[c["type"]] = kubeobjects.Condition(
            type=c["type"],
            status=st if st in ("True", "False", "Unknown") else "Unknown",
            observedGeneration=int(c.get("observedGeneration") or 0),
            lastTransitionTime=str(c.get("lastTransitionTime") or ""),
            reason=str(c.get("reason") or ""),
            message=str(c.get("message") or ""),
        )
    return found


def merge(
    old: Mapping[str, kubeobjects.Condition],
    wanted: Iterable[Wanted],
    generation: int,
    now: str,
) -> list[kubeobjects.Condition]:
    """The new conditions list: the wanted ones, keeping each transition time
    when the status did not change. Conditions of other types are dropped: the
    operator owns every condition type on an AgentPolicy."""
    result: list[kubeobjects.Condition] = []
    for w in wanted:
        prev = old.get(w.type)
        since = prev["lastTransitionTime"] if prev and prev["status"] == w.status and \
            prev["lastTransitionTime"] else now
        result.append(kubeobjects.Condition(
            type=w.type, status=w.status, observedGeneration=generation,
            lastTransitionTime=since, reason=w.reason, message=_clip(w.message),
        ))
    return result


def same(a: Sequence[kubeobjects.Condition], b: Mapping[str, kubeobjects.Condition]) -> bool:
    """True when writing ``a`` would change nothing a reader cares about."""
    if len(a) != len(b):
        return False
    for c in a:
        prev = b.get(c["type"])
        if prev is None or prev != c:
            return False
    return True


def _clip(message: str, limit: int = 2048) -> str:
    return message if len(message) <= limit else message[: limit - 3] + "..."
