"""The ledger of a serviceAccount token budget: slices handed to sidecars, kept in a Lease.

One budget of one service account (per policy, upstream and window) is one
``coordination.k8s.io/v1`` Lease in the policy's namespace. Its annotation
``sidekey.io/ledger`` holds this ledger as JSON; ``spec.leaseDurationSeconds``
is how long a holder may go unseen before its slice is reclaimed. The
operator creates the Lease, reclaims the slices of holders that went silent
and reports the spend in the policy's status. Sidecars read it and write it
back with the ``resourceVersion`` they read, so two grants can never be made
from the same remainder: the apiserver refuses the second write (409) and
that sidecar reads again. No other datastore.

Accounting, per window (fixed, see ``llmpolicy``):

- each holder (a pod, by uid) has ``granted`` (tokens handed to it in this
  window) and ``used`` (what it last reported spent or reserved);
- ``retired`` is the use of holders that left (released, or reclaimed after
  the timeout): their unspent part went back to the pool, their use stays;
- the pool has ``tokens - retired - sum(granted)`` left, and a grant never
  exceeds it: **the total granted never exceeds the budget**.

A holder reports ``used`` with every write. When it dies, ``granted - used``
comes back after the timeout; what it spent after its last report is lost to
the accounting, which is the overrun bound (docs/llm.md): at most the unspent
part of each slice whose holder died. A restarted sidecar keeps its pod's
uid, finds its entry and resumes with what it held: no fresh budget.

These functions are pure (ledger in, ledger out), so the sidecar's grants,
the operator's reclaim and the tests share one definition.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from sidekey.core import errors, llmpolicy, policies

ANNOTATION: Final = "sidekey.io/ledger"
LABEL: Final = "sidekey.io/ledger"
#: How long a holder may go unseen before its slice is reclaimed (the Lease's
#: ``spec.leaseDurationSeconds``, which the operator sets on creation).
DEFAULT_HOLDER_SECONDS: Final = 120
#: A holder writes at least this often while it holds unspent tokens, and stops
#: spending its slice if no write succeeded for ``holder seconds - margin``.
HEARTBEAT_FRACTION: Final = 0.25
SAFETY_MARGIN_FRACTION: Final = 0.1


class LedgerError(errors.InvalidInput):
    """The annotation does not hold a ledger this version can read."""

    def __init__(self, message: str) -> None:
        super().__init__("", message)  # the message says what is wrong with the ANNOTATION


@dataclass(frozen=True, slots=True)
class Holder:
    pod: str  # the pod's name, for people; the key is its uid
    granted: int
    used: int
    seen: float  # Unix seconds of its last write


@dataclass(frozen=True, slots=True)
class Ledger:
    tokens: int
    window_seconds: int
    window: int  # the current window's start, Unix seconds
    retired: int = 0
    holders: Mapping[str, Holder] = field(default_factory=dict)

    @property
    def granted(self) -> int:
        """Tokens handed out in this window: the retired use plus every live slice."""
        return self.retired + sum(h.granted for h in self.holders.values())

    @property
    def spent(self) -> int:
        """What the holders reported spent or reserved, plus the retired use."""
        return self.retired + sum(h.used for h in self.holders.values())

    @property
    def available(self) -> int:
        return max(0, self.tokens - self.granted)

    def holding(self, holder: str) -> int:
        """What ``holder`` may still spend by the ledger (granted minus reported use)."""
        h = self.holders.get(holder)
        return 0 if h is None else max(0, h.granted - h.used)


def new(tokens: int, window_seconds: int, now: float) -> Ledger:
    return Ledger(tokens, window_seconds, _start(now, window_seconds))


def _start(now: float, window_seconds: int) -> int:
    return int(now // window_seconds) * window_seconds


def rolled(ledger: Ledger, now: float) -> Ledger:
    """The ledger in the window holding ``now``: a new window starts with nothing granted."""
    start = _start(now, ledger.window_seconds)
    if start <= ledger.window:
        return ledger
    holders = {k: replace(h, granted=0, used=0) for k, h in ledger.holders.items()}
    return Ledger(ledger.tokens, ledger.window_seconds, start, 0, holders)


def rebudgeted(ledger: Ledger, tokens: int, window_seconds: int, now: float) -> Ledger:
    """The policy changed the budget: same grants, new total (a shorter window restarts it)."""
    if window_seconds != ledger.window_seconds:
        return Ledger(tokens, window_seconds, _start(now, window_seconds), 0,
                      {k: replace(h, granted=0, used=0) for k, h in ledger.holders.items()})
    return replace(ledger, tokens=tokens)


def take(ledger: Ledger, holder: str, pod: str, *, used: int, want: int, need: int,
         now: float) -> tuple[Ledger, int]:
    """Record ``holder``'s report and grant it up to ``want`` (nothing if less than ``need``).

    ``used`` is the holder's own count for this window; a use above what it
    was granted (a reply larger than its estimate) is charged as granted, so
    the ledger shows the overrun instead of hiding it.
    """
    ledger = rolled(ledger, now)
    old = ledger.holders.get(holder, Holder(pod, 0, 0, now))
    used = max(0, used)
    granted = max(old.granted, used)
    base = Ledger(ledger.tokens, ledger.window_seconds, ledger.window, ledger.retired,
                  {**ledger.holders, holder: Holder(pod, granted, used, now)})
    give = min(max(0, want), base.available)
    if give < max(0, need):
        give = 0
    if give:
        holders = dict(base.holders)
        holders[holder] = Holder(pod, granted + give, used, now)
        base = replace(base, holders=holders)
    return base, give


def release(ledger: Ledger, holder: str, *, used: int, now: float) -> Ledger:
    """A holder leaves (its pod stops): its use is retired, its unspent slice returns."""
    ledger = rolled(ledger, now)
    h = ledger.holders.get(holder)
    if h is None:
        return ledger
    holders = {k: v for k, v in ledger.holders.items() if k != holder}
    return replace(ledger, retired=ledger.retired + max(used, h.used), holders=holders)


def reclaim(ledger: Ledger, now: float, holder_seconds: float) -> tuple[Ledger, list[str]]:
    """Retire holders unseen for ``holder_seconds``: their unspent part returns to the pool."""
    ledger = rolled(ledger, now)
    stale = [k for k, h in ledger.holders.items() if now - h.seen > holder_seconds]
    if not stale:
        return ledger, []
    retired = ledger.retired + sum(ledger.holders[k].used for k in stale)
    holders = {k: v for k, v in ledger.holders.items() if k not in stale}
    return replace(ledger, retired=retired, holders=holders), stale


def slice_size(tokens: int) -> int:
    """The slice a sidecar asks for: a twentieth of the budget, at least 1000 tokens.

    Smaller slices spread a budget more evenly over many pods and lose less
    when a pod dies; larger ones write less. A twentieth keeps the writes per
    sidecar at about one per 5% of the budget spent.
    """
    return min(tokens, max(1000, math.ceil(tokens / 20)))


# --- the annotation ----------------------------------------------------------------


def dumps(ledger: Ledger) -> str:
    return json.dumps({
        "v": 1, "tokens": ledger.tokens, "windowSeconds": ledger.window_seconds,
        "window": ledger.window, "retired": ledger.retired,
        "holders": {k: {"pod": h.pod, "granted": h.granted, "used": h.used, "seen": round(h.seen, 3)}
                    for k, h in sorted(ledger.holders.items())},
    }, separators=(",", ":"))


def loads(text: str) -> Ledger:
    try:
        doc = json.loads(text)
        if not isinstance(doc, dict) or doc.get("v") != 1:
            raise LedgerError("not a version 1 ledger")
        holders_raw = doc.get("holders") or {}
        if not isinstance(holders_raw, dict):
            raise LedgerError("holders is not an object")
        holders = {str(k): Holder(str(v["pod"]), _count(v["granted"]), _count(v["used"]), float(v["seen"]))
                   for k, v in holders_raw.items()}
        return Ledger(_count(doc["tokens"]), _count(doc["windowSeconds"]) or 1, _count(doc["window"]),
                      _count(doc.get("retired", 0)), holders)
    except (ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, LedgerError):
            raise
        raise LedgerError(f"unreadable ledger: {type(exc).__name__}") from None


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise LedgerError(f"{value!r} is not a count")
    return value


def lease_name(policy: str, upstream: str, index: int, service_account: str) -> str:
    """A stable Lease name per (policy, upstream, budget index, service account)."""
    digest = hashlib.sha256(f"{policy}\0{upstream}\0{index}\0{service_account}".encode()).hexdigest()[:16]
    return f"sidekey-budget-{digest}"


@dataclass(frozen=True, slots=True)
class Place:
    """Where one serviceAccount budget's ledger lives, and what it counts."""

    namespace: str
    name: str  # the Lease's
    policy: str
    upstream: str
    index: int  # in the upstream's budgets
    service_account: str
    budget: llmpolicy.Budget


def places(policy: policies.AgentPolicy) -> list[Place]:
    """Every ledger a policy needs: one per serviceAccount budget and subject account."""
    found: list[Place] = []
    for up in policy.upstreams:
        if up.llm is None:
            continue
        for i, b in enumerate(up.llm.budgets):
            if b.scope != "serviceAccount":
                continue
            for sa in sorted(policy.service_accounts):
                found.append(Place(policy.namespace, lease_name(policy.name, up.name, i, sa), policy.name,
                                   up.name, i, sa, b))
    return found
