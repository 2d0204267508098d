"""The HTTPS server: thin HTTP handling around the pure decisions.

``Handler.review`` turns a request body into a status and a JSON answer
without touching aiohttp, so the benchmark measures exactly the handler.
The aiohttp layer only reads the body (bounded), routes, and serves
health and metrics. Nothing here can answer 500: bad input is a 4xx that
says what to fix, and an unexpected failure while deciding is a *denial*
(the pod is not created without its sidecar) with a message that points at
the webhook's log.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any, Final

from aiohttp import web

from sidekey.core import contract, errors, health
from sidekey.webhook import caching, eligibility, patching, refusals, reviews
from sidekey.webhook import metrics as metrics_mod
from sidekey.webhook.settings import Settings

log = logging.getLogger("sidekey.webhook")

#: An AdmissionReview carries the object and the old object; etcd caps one at
#: 1.5 MiB, so 8 MiB leaves room and still stops a flood.
MAX_BODY_BYTES: Final = 8 * 1024 * 1024
#: The first Kubernetes minor with native sidecars on by default.
NATIVE_SIDECAR_MINOR: Final = 29

Answer = tuple[int, dict[str, Any]]


def _error(status: int, error: errors.SidekeyError) -> Answer:
    return status, error.body()


class Handler:
    """Decides one AdmissionReview: who is injected, with what, or why not."""

    def __init__(self, settings: Settings, source: caching.PolicySource, *,
                 metrics: metrics_mod.Metrics, own_namespace: str | None = None,
                 cluster_minor: int | None = None) -> None:
        self.settings = settings
        self.source = source
        self.metrics = metrics
        self.own_namespace = own_namespace
        self.cluster_minor = cluster_minor

    async def review(self, body: bytes, *, namespace_opted_in: bool = False) -> Answer:
        started = time.perf_counter()
        result: metrics_mod.Result = "error"
        reason = "internal"
        try:
            try:
                req = reviews.parse(body)
            except reviews.BadReview as exc:
                reason = "bad-request"
                return _error(exc.status, exc)
            result, reason, answer = await self._decide(req, namespace_opted_in)
            self._log(req, result, reason)
            return 200, dict(answer)
        finally:
            self.metrics.observe(result, reason, time.perf_counter() - started)

    async def _decide(self, req: reviews.Request,
                      namespace_opted_in: bool) -> tuple[metrics_mod.Result, str, reviews.AdmissionReview]:
        if not req.is_pod:
            return "skipped", "not-a-pod", reviews.allow(req.uid)
        pod = req.object
        if pod is None:
            return "error", "bad-request", reviews.deny(
                req.uid, "request.object is missing: a Pod review must carry the pod", code=400,
                reason="BadRequest")
        try:
            patching.check_shape(pod)
            namespace = req.namespace or str((pod.get("metadata") or {}).get("namespace") or "")
            if req.operation == "UPDATE" and req.sub_resource == "ephemeralcontainers":
                return await self._ephemeral(req, pod, namespace)
            if req.operation != "CREATE" or req.sub_resource:
                return "skipped", "operation", reviews.allow(req.uid)
            return await self._create(req, pod, namespace, namespace_opted_in)
        except patching.BadPod as exc:
            return "error", "bad-request", reviews.deny(
                req.uid, f"request.object is not a valid Pod: {exc}", code=400, reason="BadRequest")
        except patching.Refused as exc:
            return "denied", exc.reason, reviews.deny(req.uid, exc.message)
        except caching.Unavailable as exc:
            return "error", "policies-unavailable", reviews.deny(
                req.uid, f"sidekey: {exc}", code=503, reason="ServiceUnavailable")
        except Exception:
            log.exception("admission %s failed", req.uid)
            return "error", "internal", reviews.deny(
                req.uid, "sidekey could not decide on this pod (internal error; see the sidekey "
                "webhook's log); it was not created without its sidecar", code=503,
                reason="ServiceUnavailable")

    async def _create(self, req: reviews.Request, pod: dict[str, Any], namespace: str,
                      namespace_opted_in: bool) -> tuple[metrics_mod.Result, str, reviews.AdmissionReview]:
        meta = pod.get("metadata")
        annotations = (meta.get("annotations") if isinstance(meta, Mapping) else None) or {}
        if not isinstance(annotations, Mapping):
            raise patching.BadPod("metadata.annotations", "must map strings to strings")
        decision = eligibility.decide(namespace, annotations, namespace_opted_in=namespace_opted_in,
                                      settings=self.settings, own_namespace=self.own_namespace)
        early = [decision.warning] if decision.warning else []
        if not decision.inject:
            return "skipped", decision.reason, reviews.allow(req.uid, warnings=early)
        if self.cluster_minor is not None and self.cluster_minor < NATIVE_SIDECAR_MINOR:
            raise patching.Refused([refusals.Refusal("cluster-version", (
                f"this cluster runs Kubernetes 1.{self.cluster_minor}, which has no native sidecars "
                "(init containers with restartPolicy Always, 1.29+); sidekey does not fall back to a "
                "regular container, which would break Jobs and start ordering"))])
        lookup = await self.source.lookup(namespace, patching.service_account(pod))
        if lookup.live:
            self.metrics.policy_live_reads.inc()
        outcome = patching.patch(pod, lookup.policies, self.settings)
        warnings = [*early, *outcome.warnings, *lookup.warnings]
        result: metrics_mod.Result = "injected" if outcome.patch else "unchanged"
        return result, decision.reason, reviews.allow(req.uid, outcome.patch, warnings)

    async def _ephemeral(self, req: reviews.Request, pod: dict[str, Any],
                         namespace: str) -> tuple[metrics_mod.Result, str, reviews.AdmissionReview]:
        lookup = await self.source.lookup(namespace, patching.service_account(pod))
        patching.check_ephemeral(pod, req.old_object, lookup.policies)
        return "allowed", "ephemeral", reviews.allow(req.uid)

    def _log(self, req: reviews.Request, result: str, reason: str) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        meta = (req.object or {}).get("metadata")
        meta = meta if isinstance(meta, Mapping) else {}
        name = req.name or str(meta.get("name") or (str(meta.get("generateName", "")) + "*"))
        log.info(json.dumps({"msg": "admission", "uid": req.uid, "namespace": req.namespace,
                             "pod": name, "operation": req.operation, "subResource": req.sub_resource,
                             "dryRun": req.dry_run, "result": result, "reason": reason}))


HANDLER: Final = web.AppKey("handler", Handler)
#: The readiness checks: name -> a callable returning what is missing, or None when ready.
READY: Final = web.AppKey("ready", dict)


async def _mutate(request: web.Request, *, namespace_opted_in: bool) -> web.Response:
    handler = request.app[HANDLER]
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        handler.metrics.observe("error", "too-large", 0.0)
        return web.json_response(errors.body(
            "request_too_large", f"the body exceeds {MAX_BODY_BYTES} bytes; an AdmissionReview is far smaller"),
            status=413)
    status, answer = await handler.review(body, namespace_opted_in=namespace_opted_in)
    return web.json_response(answer, status=status)


async def mutate(request: web.Request) -> web.Response:
    return await _mutate(request, namespace_opted_in=False)


async def mutate_namespace(request: web.Request) -> web.Response:
    return await _mutate(request, namespace_opted_in=True)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    missing = {name: problem for name, check in request.app[READY].items() if (problem := check())}
    status, body = health.readiness(missing)
    return web.json_response(body, status=status)


async def metrics_endpoint(request: web.Request) -> web.Response:
    body = request.app[HANDLER].metrics.render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def make_app(handler: Handler) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[HANDLER] = handler
    app[READY] = {"policies": lambda: None if handler.source.ready else "AgentPolicies not listed yet"}
    app.router.add_post(contract.WEBHOOK_PATH, mutate)
    app.router.add_post(contract.WEBHOOK_NAMESPACE_PATH, mutate_namespace)
    app.router.add_get(contract.HEALTHZ_PATH, healthz)
    app.router.add_get(contract.READY_PATH, readyz)
    app.router.add_get(contract.METRICS_PATH, metrics_endpoint)
    return app
