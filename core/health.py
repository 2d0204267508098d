"""The bodies of the health endpoints, the same in the sidecar, the webhook and the operator.

``/readyz`` answers 200 when every check passes and 503 otherwise, and in
both cases JSON that names each failing check with what it is waiting for,
so a person (or ``kubectl describe``, which shows a failed probe's body)
learns *why* a replica is not ready without reading its log::

    {"ready": false, "failing": {"policies": "AgentPolicies not listed yet"}}

``/healthz`` stays a plain ``ok``: liveness says nothing but "the process answers".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def readiness(failing: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
    """The status and body of ``/readyz``, given the failing checks (name -> what is missing)."""
    return (503 if failing else 200), {"ready": not failing, "failing": dict(failing)}
