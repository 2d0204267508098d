"""Kubernetes Events: what ``kubectl describe`` shows a user.

Events are posted only on transitions (a policy becomes ready, loses a
Secret, a pod is first seen without its sidecar), so a steady cluster posts
nothing. Messages are built from names and reasons alone; the functions that
build them never receive a Secret's value. Posting is best effort: an Event
that cannot be written is logged, never a reason to fail a reconcile.
"""

from __future__ import annotations

import logging
import secrets
import socket

import aiohttp

from sidekey.core import kubeapi
from sidekey.operator import conditions, kubeobjects, rest

log = logging.getLogger(__name__)
COMPONENT = "sidekey-operator"


class Recorder:
    def __init__(self, api: rest.Rest) -> None:
        self._api = api
        self._instance = socket.gethostname()

    async def post(self, target: kubeobjects.ObjectReference, type_: kubeobjects.EventType,
                   reason: str, message: str) -> None:
        now = conditions.now_rfc3339()
        name = f"{target['name'][:200]}.{secrets.token_hex(8)}"
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": name, "namespace": target["namespace"]},
            "involvedObject": dict(target),
            "reason": reason, "message": message[:1024], "type": type_,
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT, "reportingInstance": self._instance[:128],
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        try:
            await self._api.create(rest.events_path(target["namespace"]), event)
        except (kubeapi.ApiError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            if rest.terminating(exc):
                return  # the namespace is going away, and the object with it
            log.warning("could not post event %s on %s/%s: %s", reason, target["namespace"],
                        target["name"], exc)
