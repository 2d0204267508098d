"""The sidecar process: wiring, readiness, the two listeners and the drain.

Startup never blocks on the apiserver: both listeners come up at once and
answer 503 until the issuer (from the discovery document), the JWKS (from the
apiserver's own ``/openid/v1/jwks``) and the policies are loaded. If the
apiserver goes away later, everything already loaded keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from typing import Any, Final

from sidekey.core import apiconfig, contract, health, httpclient, kubeapi, logs, tokens
from sidekey.proxy import forwarding, listener, llmexchange, metrics, routes, settings

log = logging.getLogger("sidekey.proxy")

#: The most a stopping sidecar waits for the ledger to take its unspent slices back.
RELEASE_SECONDS: Final = 2.0


class SidecarProcess:
    def __init__(
        self, config: settings.Settings, api_config: apiconfig.ApiConfig, audit: logs.AuditWriter | None = None
    ) -> None:
        self.settings = config
        self.api_config = api_config
        self.audit = audit or logs.AuditWriter()
        self.validator: tokens.Validator | None = None
        self.issuer: str | None = None
        self.draining = False
        self._was_ready = False
        self._tasks: list[asyncio.Task[Any]] = []
        self.proxy_port = 0
        self.health_port = 0

    # --- readiness ---------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        # Readiness latches: once the keys and policies were loaded they stay
        # (served from cache when the apiserver goes away); only a drain undoes it.
        if not self._was_ready:
            self._was_ready = self.validator is not None and bool(self.keys.keys) and self.routes.ready
        return self._was_ready and not self.draining

    def _not_ready(self) -> dict[str, str]:
        """The failing readiness checks, each with what it waits for (the /readyz body names them)."""
        checks = {
            "draining": "the sidecar is stopping" if self.draining else None,
            "issuer": None if self.issuer is not None else "the apiserver's issuer is not discovered yet",
            "jwks": None if self.keys.keys else "no signing keys loaded from the apiserver's JWKS yet",
            "policies": None if self.routes.ready else "AgentPolicies and their Secrets not read yet",
        }
        return {name: problem for name, problem in checks.items() if problem} or {"startup": "starting"}

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        # each watch holds a connection: one for policies, one per referenced Secret, plus gets
        self.api = kubeapi.ApiClient(self.api_config, limit=100)
        await self.api.__aenter__()
        self.keys = tokens.KeySet(
            lambda: self.api.get_json("/openid/v1/jwks"),
            on_refresh=lambda result: metrics.JWKS_REFRESHES.labels(result).inc(),
        )
        self.routes = routes.Routes(
            self.api, namespace=s.namespace, service_account=s.service_account, on_rebuild=self._rebuilt
        )
        self.routes.start()
        self._tasks.append(asyncio.create_task(self._discover(), name="discover-issuer"))
        self._tasks.append(asyncio.create_task(self.keys.run(), name="jwks-refresh"))
        # Read at each scrape. The sidecar keeps no ticking task: the audit writer flushes on the
        # loop turn after a line, and a timer re-armed forever would be a few objects made anew
        # at each tick, which after a burst of load sit in the burst's arenas and keep them.
        metrics.READY.set_function(lambda: 1.0 if self.ready else 0.0)
        # one host guard for the upstreams' pool and the OAuth2 token calls (the Proxy makes both)
        resolver = routes.GuardedResolver(s.own_addresses)
        self.proxy = forwarding.Proxy(
            table=lambda: self.routes.table,
            validator=lambda: self.validator,
            ready=lambda: self.ready,
            audit=self.audit,
            pod=s.pod_name,
            namespace=s.namespace,
            resolver=resolver,
            token_cache=s.token_cache,
            llm=llmexchange.Gate(api=self.api, namespace=s.namespace, pod=s.pod_name, pod_uid=s.pod_uid,
                                 service_account=s.service_account),
        )
        self.listener = await self.proxy.listen("127.0.0.1", s.port)
        self.proxy_port = self.listener.port
        # the health listener is the same small HTTP/1.1 server as the proxy's (no aiohttp.web)
        self.health = listener.Listener(self._health)
        await self.health.start(s.health_address, s.health_port)
        self.health_port = self.health.port
        log.info(
            "sidecar listening",
            extra={
                "fields": {
                    "port": self.proxy_port,
                    "health_port": self.health_port,
                    "pod": s.pod_name,
                    "namespace": s.namespace,
                    "service_account": s.service_account,
                }
            },
        )

    async def stop(self) -> None:
        """Drain: stop accepting, let in-flight requests and streams finish, then close."""
        self.draining = True
        log.info("draining", extra={"fields": {"in_flight": self.proxy.in_flight}})
        # stop accepting, close idle connections, wait up to drain_seconds for the busy ones
        await self.listener.drain(self.settings.drain_seconds)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # the drained requests' audit lines first: what follows talks to the apiserver, and
        # a slow one must not use up the grace period before they are out
        self.audit.flush()
        if self.proxy.llm is not None:
            await self._release_slices(self.proxy.llm)
        await self.routes.stop()
        await self.proxy.close()
        await self.api.close()
        await self.health.drain(1.0)
        self.audit.flush()
        log.info("stopped")

    async def _release_slices(self, llm: llmexchange.Gate) -> None:
        """Hand the unspent budget slices back, for at most ``RELEASE_SECONDS``.

        A slice not handed back is not lost: the operator reclaims it after the
        holder timeout. Waiting longer would only eat the pod's grace period.
        """
        try:
            await asyncio.wait_for(llm.close(), RELEASE_SECONDS)
        except TimeoutError:
            log.warning("budget ledger did not answer within %s s: the unspent slices come back "
                        "when the operator reclaims them", RELEASE_SECONDS)

    # --- background work ---------------------------------------------------------------

    async def _discover(self) -> None:
        """The issuer comes from the apiserver's discovery document; retried until it answers."""
        delay = 0.25
        while True:
            try:
                doc = await self.api.get_json("/.well-known/openid-configuration")
                issuer = doc.get("issuer")
                if not isinstance(issuer, str) or not issuer:
                    raise ValueError("discovery document has no issuer")
                break
            except (kubeapi.ApiError, httpclient.HttpError, TimeoutError, OSError, ValueError) as exc:
                metrics.APISERVER_ERRORS.labels("discovery").inc()
                log.warning("issuer discovery failed, retrying: %s", type(exc).__name__)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, 10.0)
        s = self.settings
        self.issuer = issuer
        self.validator = tokens.Validator(
            self.keys,
            tokens.Binding(
                issuer=issuer,
                audience=s.audience,
                namespace=s.namespace,
                pod_name=s.pod_name,
                pod_uid=s.pod_uid,
                service_account=s.service_account,
            ),
        )
        log.info("issuer discovered", extra={"fields": {"issuer": issuer}})

    def _rebuilt(self) -> None:
        log.info("routes updated", extra={"fields": {"routes": routes.describe(self.routes.table)}})

    # --- health listener ---------------------------------------------------------------------

    async def _health(self, request: listener.Request, conn: listener.AgentConnection) -> None:
        reply = listener.Reply(conn, request)
        path = request.target.partition("?")[0]
        if path == contract.HEALTHZ_PATH:
            reply.whole(200, _TEXT, b"ok\n")
        elif path == contract.READY_PATH:
            status, body = health.readiness({} if self.ready else self._not_ready())
            reply.whole(status, _JSON, json.dumps(body).encode())
        elif path == contract.METRICS_PATH:
            reply.whole(200, b"Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n", metrics.exposition())
        else:
            reply.whole(404, _TEXT, b"not found\n")


_TEXT: Final = b"Content-Type: text/plain; charset=utf-8\r\n"
_JSON: Final = b"Content-Type: application/json\r\n"
