"""Token budgets as one sidecar holds them: reserve before forwarding, settle after.

Each budget of a route is an ``Account``: a limit, what is spent and what
is reserved by requests in flight, in the current fixed window. For a
``pod`` budget the limit is the policy's ``tokens``; for a
``serviceAccount`` budget it is what the ledger granted this sidecar so
far (``llmslices.SharedAccount`` grows it from the Lease).

A ``Reservation`` is taken from every budget of the route at once, or from
none. The event loop runs one request's code at a time and nothing here
awaits, so the check and the take are one step: concurrent requests can
never reserve the same tokens twice. The settle charges the upstream's
reported usage and releases the rest; a request that fails or is cancelled
before usage is known settles to its estimate (what it may have cost).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sidekey.core import llmpolicy
from sidekey.proxy import llmrequests


class Account:
    """One budget in this sidecar: ``limit - spent - reserved`` is what is left."""

    __slots__ = ("_clock", "budget", "limit", "reserved", "spent", "window")

    def __init__(self, budget: llmpolicy.Budget, *, clock: Callable[[], float] = time.time) -> None:
        self.budget = budget
        self._clock = clock
        self.window = budget.window_start(clock())
        self.limit = self.initial_limit()
        self.spent = 0
        self.reserved = 0

    def initial_limit(self) -> int:
        return self.budget.tokens

    def now(self) -> float:
        return self._clock()

    def rebudget(self, budget: llmpolicy.Budget) -> None:
        """The policy changed the total (same window and scope): the spend stays, the limit moves."""
        self.budget = budget
        self.limit = budget.tokens

    def roll(self) -> int:
        """Move to the window holding now (a new window starts empty); its start."""
        start = self.budget.window_start(self._clock())
        if start != self.window:
            self.window = start
            self.spent = 0
            self.reserved = 0
            self.limit = self.initial_limit()
        return start

    def left(self) -> int:
        self.roll()
        return self.limit - self.spent - self.reserved

    def take(self, tokens: int) -> int | None:
        """Reserve ``tokens`` now if they are left; the window they count in, or None."""
        if self.left() < tokens:
            return None
        self.reserved += tokens
        return self.window

    def settle(self, reserved: int, window: int, actual: int) -> None:
        """Replace a reservation by what it really cost (a reply from an old window counts now)."""
        current = self.roll()
        if window == current:
            self.reserved = max(0, self.reserved - reserved)
        self.spent += max(0, actual)

    def shortfall(self) -> str:
        """Why less is left than the budget says, when it is not spend (a ledger out of reach)."""
        return ""

    def retry_after(self) -> int:
        return max(1, math.ceil(self.budget.window_end(self._clock()) - self._clock()))


@dataclass(slots=True)
class Reservation:
    """Tokens held in every budget of a route for one request."""

    parts: list[tuple[Account, int, int]]  # (account, tokens, window)
    settled: bool = False

    @property
    def tokens(self) -> int:
        return self.parts[0][1] if self.parts else 0

    def extend(self, tokens: int) -> bool:
        """Reserve ``tokens`` more in every budget, or in none (a stream's next output)."""
        taken: list[tuple[Account, int]] = []
        for account, _, _ in self.parts:
            window = account.take(tokens)
            if window is None:
                for a, w in taken:
                    a.settle(tokens, w, 0)
                return False
            taken.append((account, window))
        self.parts = [(a, t + tokens, w) for a, t, w in self.parts]
        return True

    def settle(self, actual: int | None) -> None:
        """Charge ``actual`` (None: unknown, charge the reservation) and release the rest; once."""
        if self.settled:
            return
        self.settled = True
        for account, tokens, window in self.parts:
            account.settle(tokens, window, tokens if actual is None else actual)


def _spent_message(account: Account, upstream: str, policy: str) -> str:
    b = account.budget
    end = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(b.window_end(account.now())))
    return (f"token budget {b.label} of upstream {upstream!r} (AgentPolicy {policy!r}) has "
            f"{max(0, account.left())} tokens left in the window ending {end} "
            f"({account.spent} spent, {account.reserved} reserved by requests in flight"
            f"{account.shortfall()}); retry after {account.retry_after()} s")


def refusal(account: Account, upstream: str, policy: str, *, need: int | None = None) -> llmrequests.LlmRefusal:
    message = _spent_message(account, upstream, policy)
    if need is not None:
        message += f"; this request may cost up to {need} tokens (lower max_tokens to fit)"
    return llmrequests.LlmRefusal(429, "budget_spent", "rate_limit_error", message,
                                  retry_after=account.retry_after())


def reserve(accounts: Sequence[Account], call: llmrequests.Call, *, cap: bool, upstream: str,
            policy: str) -> Reservation:
    """Reserve the call's estimate in every budget (capping its reply first); 429 otherwise."""
    if not accounts or not call.spends:
        return Reservation([])
    if cap and call.max_output is None and call.endpoint in llmrequests.CAP_FIELD:
        tightest = min(accounts, key=lambda a: a.left())
        if not call.cap(tightest.left()):
            raise refusal(tightest, upstream, policy)
    need = call.estimate
    parts: list[tuple[Account, int, int]] = []
    for account in accounts:
        window = account.take(need)
        if window is None:
            for a, t, w in parts:
                a.settle(t, w, 0)
            raise refusal(account, upstream, policy, need=need)
        parts.append((account, need, window))
    return Reservation(parts)
