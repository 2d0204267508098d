"""The MutatingWebhookConfiguration: the tests register it, the chart renders the same shape.

Two webhook entries, mutually exclusive, so each pod is sent at most once:

- ``inject.sidekey.io`` (path ``/mutate``): pods annotated
  ``sidekey.io/inject: "true"`` in any non-system namespace, plus
  ``kubectl debug`` (``pods/ephemeralcontainers``) on pods that carry the
  sidecar;
- ``namespace.inject.sidekey.io`` (path ``/mutate/namespace``): pods in a
  namespace labelled ``sidekey.io/inject=enabled`` whose annotation is neither
  "true" (the first entry has them) nor "false" (opted out).

``matchConditions`` cannot see namespace labels, hence the second entry with
its ``namespaceSelector``. Both use ``failurePolicy: Fail``: since only
opted-in pods match, a webhook outage blocks opted-in pods (which must never
start without the sidecar) and nothing else.
"""

from __future__ import annotations

from typing import Any

from sidekey.core import contract

_ANNOTATIONS = "object.metadata.annotations"
_HAS_ANNOTATION = f"has(object.metadata.annotations) && '{contract.ANNOTATION_INJECT}' in {_ANNOTATIONS}"
ANNOTATED_TRUE = f"{_HAS_ANNOTATION} && {_ANNOTATIONS}['{contract.ANNOTATION_INJECT}'] == 'true'"
ANNOTATED_FALSE = f"{_HAS_ANNOTATION} && {_ANNOTATIONS}['{contract.ANNOTATION_INJECT}'] == 'false'"
HAS_SIDECAR = (f"has(object.spec.initContainers) && object.spec.initContainers.exists(c, "
               f"c.name == '{contract.SIDECAR_CONTAINER_NAME}')")
DEBUGGING_INJECTED = (f"has(request.subResource) && request.subResource == 'ephemeralcontainers' "
                      f"&& {HAS_SIDECAR}")


def _rules() -> list[dict[str, Any]]:
    return [
        {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"],
         "scope": "Namespaced"},
        {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["UPDATE"],
         "resources": ["pods/ephemeralcontainers"], "scope": "Namespaced"},
    ]


def _excluded(namespaces: list[str]) -> dict[str, Any]:
    return {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": namespaces}


def _client_config(url: str | None, service: dict[str, Any] | None, path: str,
                   ca_bundle: str) -> dict[str, Any]:
    if (url is None) == (service is None):
        raise ValueError("give exactly one of url (https://host:port) or service ({name, namespace, port})")
    if url is not None:
        return {"url": url.rstrip("/") + path, "caBundle": ca_bundle}
    assert service is not None
    return {"service": {**service, "path": path}, "caBundle": ca_bundle}


def mutating_webhook_configuration(
    *, ca_bundle: str, url: str | None = None, service: dict[str, Any] | None = None,
    name: str = contract.WEBHOOK_CONFIGURATION, own_namespace: str | None = None,
    timeout_seconds: int = 5,
) -> dict[str, Any]:
    """The configuration; ``url`` is the server's base (tests), ``service`` a Service ref (chart).

    ``ca_bundle`` is base64 of the PEM CA, as the API expects.
    """
    excluded = sorted(contract.SYSTEM_NAMESPACES | ({own_namespace} if own_namespace else set()))
    common: dict[str, Any] = {
        "sideEffects": "None",
        "admissionReviewVersions": ["v1"],
        "timeoutSeconds": timeout_seconds,
        "reinvocationPolicy": "IfNeeded",
        "matchPolicy": "Equivalent",
        "failurePolicy": "Fail",
        "rules": _rules(),
        "objectSelector": {},
    }
    by_annotation = {
        "name": contract.WEBHOOK_NAME,
        "clientConfig": _client_config(url, service, contract.WEBHOOK_PATH, ca_bundle),
        "namespaceSelector": {"matchExpressions": [_excluded(excluded)]},
        "matchConditions": [
            {"name": "annotated-or-debugging-injected",
             "expression": f"({ANNOTATED_TRUE}) || ({DEBUGGING_INJECTED})"},
        ],
        **common,
    }
    by_namespace = {
        "name": contract.WEBHOOK_NAMESPACE_NAME,
        "clientConfig": _client_config(url, service, contract.WEBHOOK_NAMESPACE_PATH, ca_bundle),
        "namespaceSelector": {"matchExpressions": [
            _excluded(excluded),
            {"key": contract.LABEL_INJECT, "operator": "In", "values": [contract.LABEL_INJECT_ENABLED]},
        ]},
        "matchConditions": [
            {"name": "not-opted-out", "expression": f"!({ANNOTATED_FALSE})"},
            {"name": "not-annotated-in", "expression": f"!({ANNOTATED_TRUE})"},
            {"name": "not-debugging-injected", "expression": f"!({DEBUGGING_INJECTED})"},
        ],
        **common,
    }
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "sidekey",
                                              "app.kubernetes.io/component": "webhook"}},
        "webhooks": [by_annotation, by_namespace],
    }
