"""Building AdmissionReviews and pods for the webhook tests (shared by unit, e2e and bench)."""

from __future__ import annotations

import copy
import json
import uuid
from typing import Any

API_MOUNT = {"mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
             "name": "kube-api-access-abcde", "readOnly": True}
API_VOLUME = {"name": "kube-api-access-abcde", "projected": {"defaultMode": 420, "sources": [
    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
    {"configMap": {"items": [{"key": "ca.crt", "path": "ca.crt"}], "name": "kube-root-ca.crt"}},
    {"downwardAPI": {"items": [{"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"},
                                "path": "namespace"}]}}]}}


def pod(namespace: str = "agents", *, annotations: dict[str, str] | None = None, sa: str = "agent",
        inject: str | None = "true", **spec: Any) -> dict[str, Any]:
    """A pod as the apiserver sends it after ServiceAccount admission."""
    notes = dict(annotations or {})
    if inject is not None:
        notes["sidekey.io/inject"] = inject
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "agent", "namespace": namespace, "annotations": notes},
        "spec": {"serviceAccountName": sa, "serviceAccount": sa,
                 "containers": [{"name": "agent", "image": "example.invalid/agent:1",
                                 "volumeMounts": [dict(API_MOUNT)]}],
                 "volumes": [copy.deepcopy(API_VOLUME)], **spec},
    }


def review(obj: dict[str, Any] | None, *, operation: str = "CREATE", sub_resource: str | None = None,
           old: dict[str, Any] | None = None, namespace: str = "agents", kind: str = "Pod",
           resource: str = "pods", uid: str | None = None, dry_run: bool = False) -> dict[str, Any]:
    req: dict[str, Any] = {
        "uid": uid or str(uuid.uuid4()),
        "kind": {"group": "", "version": "v1", "kind": kind},
        "resource": {"group": "", "version": "v1", "resource": resource},
        "requestKind": {"group": "", "version": "v1", "kind": kind},
        "requestResource": {"group": "", "version": "v1", "resource": resource},
        "namespace": namespace, "operation": operation, "object": obj, "oldObject": old,
        "userInfo": {"username": "alice"}, "dryRun": dry_run,
    }
    if sub_resource:
        req["subResource"] = sub_resource
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": req}


def body(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()
