"""Reading and writing the session's cluster with kubectl, and waiting for it to change."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import yaml


def apply(cluster: Any, *manifests: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(manifests))


def get(cluster: Any, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
    args = ["get", kind, name, "-o", "json", "--ignore-not-found"]
    if namespace:
        args += ["-n", namespace]
    out = cluster.kubectl(*args)
    return json.loads(out) if out.strip() else None


def wait_for(what: str, check: Callable[[], Any], timeout: float = 15.0, interval: float = 0.1
             ) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def condition(policy: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for c in ((policy or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return dict(c)
    return None


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, step: float = 0.05) -> float:
    """Poll until ``predicate()`` holds; return how long it took (the tests assert on it)."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(step)
    return time.monotonic() - started
