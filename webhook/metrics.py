"""The webhook's Prometheus metrics, on a registry of their own.

A registry per server (not the process-global one) lets tests and the
benchmark run several servers in one process and read exact counts. Label
values are a small fixed vocabulary (results and reason labels), never a
pod or namespace name, so cardinality stays bounded.
"""

from __future__ import annotations

from typing import Final, Literal

import prometheus_client

Result = Literal["injected", "unchanged", "skipped", "denied", "allowed", "error"]

#: Admission latency is dominated by the JSON work; a cache miss adds an API read.
BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = prometheus_client.CollectorRegistry(auto_describe=True)
        self.admissions = prometheus_client.Counter(
            "sidekey_webhook_admissions", "Admission reviews answered, by result and reason.",
            ["result", "reason"], registry=self.registry)
        self.latency = prometheus_client.Histogram(
            "sidekey_webhook_admission_duration_seconds",
            "Time to answer one admission review, from body read to response.",
            ["result"], buckets=BUCKETS, registry=self.registry)
        self.policy_live_reads = prometheus_client.Counter(
            "sidekey_webhook_policy_live_reads", "AgentPolicy lists read live on a cache miss.",
            registry=self.registry)
        self.tls_reloads = prometheus_client.Counter(
            "sidekey_webhook_tls_reloads", "Serving certificate reloads from disk, by result.",
            ["result"], registry=self.registry)

    def observe(self, result: Result, reason: str, seconds: float) -> None:
        self.admissions.labels(result=result, reason=reason).inc()
        self.latency.labels(result=result).observe(seconds)

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)
