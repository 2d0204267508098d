"""The LLM step of the request path: admit (model, budget), watch the reply, settle.

``forwarding.Proxy`` calls this for routes whose upstream has ``api`` set,
at three points, and nowhere else:

    admit(route, method, segments, body)   after the decision, before the key: the whole
        │                                  body parsed, the model checked, the budget
        │                                  reserved; refusals are LlmRefusal (400/403/429)
    exchange.response(status, sse)         a ChunkHook for the reply: SSE usage and the cut,
        │                                  JSON usage, or the filtered model list
    exchange.finish(record)                on every path (finally): settle the reservation,
                                           count the tokens, the audit fields

Pod budgets are ``llmbudgets.Account`` objects, serviceAccount budgets
``llmslices.SharedAccount`` objects; both live here across routing-table
rebuilds, keyed by what they count, so a policy edit that does not touch a
budget keeps its spend.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

from sidekey.core import kubeapi, llmledger, llmpolicy
from sidekey.proxy import audit as auditing
from sidekey.proxy import (
    decision,
    llmbudgets,
    llmmetrics,
    llmrequests,
    llmslices,
    llmstreams,
    refusals,
    routes,
    upstream,
)

log = logging.getLogger("sidekey.proxy.llm")

#: The most of a JSON reply kept to read its usage (replies are far smaller).
MAX_JSON_REPLY: Final = 8 * 1024 * 1024

AccountKey = tuple[str, str, int, int, str]  # policy, upstream, index, window, scope


class StreamCut(upstream.UpstreamError):
    """The budget ended the stream: the closing events are sent, stop reading the upstream."""

    reason = "budget_cut"


class _Reply:
    """The ChunkHook of one LLM reply (forwarding calls ``chunk`` per piece, then ``end``)."""

    __slots__ = ("_buf", "_exchange", "_meter", "_size", "stopped", "whole")

    def __init__(self, exchange: Exchange, meter: llmstreams.StreamMeter | None, whole: bool) -> None:
        self._exchange = exchange
        self._meter = meter
        self._buf: list[bytes] = []
        self._size = 0
        self.whole = whole  # the model list: forwarding hands the whole body in one piece
        self.stopped = False

    def chunk(self, data: bytes) -> bytes:
        ex = self._exchange
        if self.whole:
            filtered = llmrequests.filter_models(ex.llm, data)
            return data if filtered is None else filtered
        if self._meter is not None:
            out = self._meter.feed(data)
            if self._meter.cut:
                self.stopped = True
                ex.cut = True
            return out
        if self._size + len(data) <= MAX_JSON_REPLY:
            self._buf.append(data)
            self._size += len(data)
        return data

    def end(self) -> None:
        ex = self._exchange
        if self._meter is not None:
            self._meter.flush()
            ex.usage = self._meter.usage
        elif self._buf and self._size <= MAX_JSON_REPLY:
            ex.usage = llmstreams.usage_from_json(ex.llm.api, b"".join(self._buf))


class Exchange:
    """One admitted LLM call: its parsed request, its reservation, what the reply reported."""

    def __init__(self, route: routes.Route, llm: llmpolicy.Llm, call: llmrequests.Call | None,
                 reservation: llmbudgets.Reservation | None, accounts: Sequence[llmbudgets.Account],
                 *, lists_models: bool = False) -> None:
        self.route = route
        self.llm = llm
        self.call = call
        self.reservation = reservation
        self.accounts = accounts
        self.lists_models = lists_models
        self.body = call.encoded() if call is not None else None
        self.status: int | None = None
        self.usage: llmstreams.Usage | None = None
        self.cut = False
        self._finished = False

    def response(self, status: int, sse: bool) -> _Reply | None:
        self.status = status
        if self.lists_models:
            return _Reply(self, None, whole=status == 200) if status == 200 else None
        call = self.call
        if call is None or status >= 300:
            return None
        meter = None
        if sse:
            reservation = self.reservation
            meter = llmstreams.StreamMeter(
                self.llm.api, call,
                more=(reservation.extend if reservation is not None and reservation.parts else _always),
                message=self._cut_message)
        return _Reply(self, meter, whole=False)

    def _cut_message(self) -> str:
        accounts = self.accounts
        tight = min(accounts, key=lambda a: a.left()) if accounts else None
        if tight is None:
            return "the token budget is spent"
        b = tight.budget
        return (f"the stream was ended at the token budget: {b.label} of upstream {self.route.name!r} "
                f"(AgentPolicy {self.route.policy!r}) has no room for more output ({tight.spent} spent, "
                f"{tight.reserved} reserved, this stream included); retry after {tight.retry_after()} s")

    def finish(self, record: auditing.AuditRecord) -> None:
        """Settle once: the reported usage, nothing for an upstream refusal, else the estimate."""
        if self._finished:
            return
        self._finished = True
        call, reservation = self.call, self.reservation
        if call is None:
            return
        usage = self.usage
        estimated = usage is None
        if usage is None:
            status = self.status
            if status is not None and 400 <= status < 500:
                usage = llmstreams.Usage()  # the upstream refused: nothing was generated
                estimated = False
            else:
                held = reservation.tokens if reservation is not None and reservation.parts else call.estimate
                usage = llmstreams.Usage(input=call.prompt_estimate, output=max(0, held - call.prompt_estimate))
        if reservation is not None:
            reservation.settle(usage.total)
        name = self.route.name
        model = llmmetrics.model_label(self.llm, name, call.model)
        for kind, count in (("input", usage.input), ("output", usage.output), ("cached", usage.cached)):
            if count:
                llmmetrics.child(llmmetrics.TOKENS, name, model, kind).inc(count)
        for account in self.accounts:
            b = account.budget
            llmmetrics.child(llmmetrics.BUDGET_REMAINING, name, b.scope, b.window).set(max(0, account.left()))
        if self.cut:
            llmmetrics.child(llmmetrics.DENIALS, name, "budget_cut").inc()
            record["reason"] = "budget_cut"
        record["model"] = call.model[: llmrequests.MAX_MODEL_LENGTH]
        record["tokens"] = {"input": usage.input, "output": usage.output, "cached": usage.cached,
                            "estimated": estimated}


def _always(_: int) -> bool:
    return True


class Gate:
    """The sidecar's LLM state: budget accounts per route, kept across table rebuilds."""

    def __init__(self, *, api: kubeapi.ApiClient | None, namespace: str, pod: str, pod_uid: str,
                 service_account: str, clock: Callable[[], float] = time.time) -> None:
        self._api = api
        self._namespace = namespace
        self._pod = pod
        self._pod_uid = pod_uid
        self._service_account = service_account
        self._clock = clock
        self._accounts: dict[AccountKey, llmbudgets.Account] = {}
        self._tasks: dict[AccountKey, asyncio.Task[None]] = {}

    def accounts(self, route: routes.Route) -> list[llmbudgets.Account]:
        llm = route.upstream.llm
        if llm is None:
            return []
        found: list[llmbudgets.Account] = []
        for i, b in enumerate(llm.budgets):
            key: AccountKey = (route.policy, route.name, i, b.window_seconds, b.scope)
            account = self._accounts.get(key)
            if account is None:
                account = self._new_account(key, route, i, b)
                self._accounts[key] = account
            elif account.budget != b:
                account.rebudget(b)  # a new total keeps what was spent in the window
            found.append(account)
        return found

    def _new_account(self, key: AccountKey, route: routes.Route, index: int, b: llmpolicy.Budget
                     ) -> llmbudgets.Account:
        if b.scope == "pod":
            return llmbudgets.Account(b, clock=self._clock)
        if self._api is None:
            raise llmrequests.LlmRefusal(503, "no_ledger", "unavailable",
                                         f"upstream {route.name!r} has a serviceAccount budget, and this sidecar "
                                         "has no apiserver access to its ledger")
        shared = llmslices.SharedAccount(
            b, api=self._api, namespace=self._namespace,
            lease=llmledger.lease_name(route.policy, route.name, index, self._service_account),
            holder=self._pod_uid, pod=self._pod, clock=self._clock)
        self._tasks[key] = asyncio.get_running_loop().create_task(shared.run(), name=f"budget-{route.name}-{index}")
        return shared

    async def admit(self, route: routes.Route, method: str, segments: Sequence[str], body: bytes | None,
                    record: auditing.AuditRecord) -> Exchange | None:
        """Check the model and reserve the budget; None when this call is not an LLM call."""
        llm = route.upstream.llm
        if llm is None:
            return None
        try:
            return await self._admit(route, llm, method, segments, body, record)
        except llmrequests.LlmRefusal as exc:
            llmmetrics.child(llmmetrics.DENIALS, route.name, exc.reason).inc()
            raise refusal(exc, route.name) from None

    async def _admit(self, route: routes.Route, llm: llmpolicy.Llm, method: str, segments: Sequence[str],
                     body: bytes | None, record: auditing.AuditRecord) -> Exchange | None:
        if method in ("GET", "HEAD"):
            model = llmrequests.model_in_path(segments)
            if model is not None:
                llmrequests.check_model(llm, model, route.policy, route.name)
                return None
            if llmrequests.lists_models(segments) and llm.models:
                return Exchange(route, llm, None, None, (), lists_models=True)
            return None
        where = llmrequests.endpoint(llm.api, segments) if method in llmrequests.BODY_METHODS else None
        if where is None:
            return None
        call = llmrequests.read(llm.api, where, body or b"")
        record["model"] = call.model[: llmrequests.MAX_MODEL_LENGTH]
        llmrequests.check_model(llm, call.model, route.policy, route.name)
        accounts = self.accounts(route)
        for account in accounts:
            if isinstance(account, llmslices.SharedAccount):
                # hold enough for the estimate (or, for a reply to be capped, a slice)
                if call.max_output is not None or not llm.cap_max_tokens:
                    await account.ensure(call.estimate)
                else:
                    await account.ensure(call.prompt_estimate + 1, want=call.prompt_estimate + account.slice)
        reservation = llmbudgets.reserve(accounts, call, cap=llm.cap_max_tokens, upstream=route.name,
                                         policy=route.policy)
        for account in accounts:
            if isinstance(account, llmslices.SharedAccount):
                account.refill_soon()
        return Exchange(route, llm, call, reservation, accounts)

    async def close(self) -> None:
        """On shutdown: stop the heartbeats and hand unspent slices back."""
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        for account in self._accounts.values():
            if isinstance(account, llmslices.SharedAccount) and account.limit:
                with contextlib.suppress(llmslices.LedgerUnavailable):
                    await account.release()


def reads_body(llm: llmpolicy.Llm, method: str, segments: Sequence[str]) -> bool:
    """Whether the call is one whose body the LLM step reads (so it is read whole)."""
    return method in llmrequests.BODY_METHODS and llmrequests.endpoint(llm.api, segments) is not None


def refusal(exc: llmrequests.LlmRefusal, upstream_name: str) -> refusals.Refusal:
    """The sidecar's own refusal for an LLM one (the same JSON shape as every other)."""
    if exc.status == 400:
        return refusals.BadRequest(exc.reason, exc.message, upstream=upstream_name)
    if exc.status == 403:
        return refusals.NotAllowed(exc.reason, exc.message, upstream=upstream_name)
    if exc.status == 429:
        return refusals.RateLimited(exc.reason, exc.message, str(exc.retry_after or 1), upstream=upstream_name)
    return refusals.Unavailable(exc.reason, exc.message, upstream=upstream_name)


async def read_body(body: Any, limit: int, route: routes.Route) -> bytes:
    """The whole request body of an LLM call (its model is in it), within maxRequestBytes."""
    parts: list[bytes] = []
    total = 0
    while chunk := await body.read():
        total += len(chunk)
        if total > min(limit, llmrequests.MAX_BODY):
            raise decision.too_large_stream(route)
        parts.append(chunk)
    return b"".join(parts)
