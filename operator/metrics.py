"""The operator's Prometheus metrics, in a registry of their own.

A private registry (not the process-global default) keeps tests that start
several operators in one process apart, and lists exactly what the operator
exports. Labels carry names and reasons only: never a Secret's content.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import prometheus_client as prom


@dataclass
class Metrics:
    registry: prom.CollectorRegistry = field(default_factory=prom.CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.reconciles = prom.Counter(
            "sidekey_operator_reconciles", "AgentPolicy reconciles, by result "
            "(ready, not_ready, error).", ["result"], registry=r)
        self.errors = prom.Counter(
            "sidekey_operator_errors", "Errors while reconciling or managing TLS, by kind.",
            ["kind"], registry=r)
        self.duration = prom.Histogram(
            "sidekey_operator_reconcile_duration_seconds", "Time to reconcile one AgentPolicy.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.policies = prom.Gauge(
            "sidekey_operator_policies", "AgentPolicies known to the operator, by Ready status.",
            ["ready"], registry=r)
        self.queue_depth = prom.Gauge(
            "sidekey_operator_queue_depth", "Policies waiting for (or in) a reconcile.",
            registry=r)
        self.uninjected_pods = prom.Gauge(
            "sidekey_uninjected_pods", "Pods opted in to injection that run without the sidecar.",
            registry=r)
        self.outdated_sidecars = prom.Gauge(
            "sidekey_outdated_sidecars",
            "Pods whose sidecar image differs from the installed one.", registry=r)
        self.blocked_subject_pods = prom.Gauge(
            "sidekey_operator_blocked_subject_pods",
            "Pods of a policy's subject accounts that hold an API token outside the sidecar, "
            "so the operator holds back their account's grant.", registry=r)
        self.certificate_expiry = prom.Gauge(
            "sidekey_webhook_certificate_expiry_timestamp_seconds",
            "When the webhook's serving certificate (or its CA) expires.", ["certificate"],
            registry=r)
        self.certificate_rotations = prom.Counter(
            "sidekey_webhook_certificate_rotations", "Certificates issued, by kind (ca, serving).",
            ["certificate"], registry=r)

    def render(self) -> bytes:
        return bytes(prom.generate_latest(self.registry))
