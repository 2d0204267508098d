"""Who is injected: the shared opt-in rule (``core/optin.py``) fed the webhook's settings.

The MutatingWebhookConfiguration already sends only opted-in pods here, but
the code decides again so that a hand-edited configuration can never inject
into a system namespace or the webhook's own (whose pods would then need the
webhook to start: a deadlock).

The rule itself lives in the core, because the operator applies it too (to
report opted-in pods that run without the sidecar): one rule, so the two can
never disagree about who is opted in.

Namespace labels are invisible to the webhook (an AdmissionReview carries
the pod, not its namespace) and to ``matchConditions``. The apiserver checks
them with the ``namespaceSelector`` of a second webhook entry that calls a
second path (``contract.WEBHOOK_NAMESPACE_PATH``); arriving on that path is
what "the namespace opted in" means here.
"""

from __future__ import annotations

from collections.abc import Mapping

from sidekey.core import optin
from sidekey.webhook.settings import Settings

Decision = optin.Decision
Reason = optin.Reason


def decide(namespace: str, annotations: Mapping[str, str], *, namespace_opted_in: bool,
           settings: Settings, own_namespace: str | None) -> optin.Decision:
    """Whether to inject; the pod's annotation wins over the namespace label."""
    return optin.decide(namespace, annotations, namespace_opted_in=namespace_opted_in,
                        excluded_namespaces=settings.excluded_namespaces,
                        own_namespace=own_namespace)
