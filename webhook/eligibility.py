"""Who is injected: the pod's annotation, its namespace's label, and the exclusions.

The MutatingWebhookConfiguration already sends only opted-in pods here, but
the code decides again so that a hand-edited configuration can never inject
into a system namespace or the webhook's own (whose pods would then need the
webhook to start: a deadlock).

Namespace labels are invisible to the webhook (an AdmissionReview carries
the pod, not its namespace) and to ``matchConditions``. The apiserver checks
them with the ``namespaceSelector`` of a second webhook entry that calls a
second path (``contract.WEBHOOK_NAMESPACE_PATH``); arriving on that path is
what "the namespace opted in" means here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from sidekey.core import contract
from sidekey.webhook import settings as settings_mod

Reason = Literal[
    "annotation", "namespace-label",  # injected
    "opted-out", "not-opted-in", "system-namespace", "own-namespace", "excluded-namespace",
]


@dataclass(frozen=True, slots=True)
class Decision:
    inject: bool
    reason: Reason
    warning: str | None = None


def decide(namespace: str, annotations: Mapping[str, str], *, namespace_opted_in: bool,
           settings: settings_mod.Settings, own_namespace: str | None) -> Decision:
    """Whether to inject; the pod's annotation wins over the namespace label."""
    if namespace in contract.SYSTEM_NAMESPACES:
        return Decision(False, "system-namespace")
    if own_namespace and namespace == own_namespace:
        return Decision(False, "own-namespace")
    if namespace in settings.excluded_namespaces:
        return Decision(False, "excluded-namespace")
    value = annotations.get(contract.ANNOTATION_INJECT)
    if value == "false":
        return Decision(False, "opted-out")
    if value == "true":
        return Decision(True, "annotation")
    warning = None
    if value is not None:
        warning = (f'annotation {contract.ANNOTATION_INJECT}: {value!r} is neither "true" nor '
                   '"false" and was ignored')
    if namespace_opted_in:
        return Decision(True, "namespace-label", warning)
    return Decision(False, "not-opted-in", warning)
