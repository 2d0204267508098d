"""AdmissionReview v1: the shapes on the wire, checked at the boundary.

The request is read field by field into ``Request`` (what the webhook decides
on); the response is built as the ``AdmissionReview`` TypedDict it is on the
wire.

The apiserver is the only legitimate caller, but the port is reachable from
the cluster network: anything that is not a well-formed AdmissionReview gets
a ``BadReview`` (a 4xx with a message saying what to fix), never an exception
escaping into a 500. A review that is well formed but not about a Pod gets
the no-op "allowed" response the API expects.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, NotRequired, TypedDict, cast

from sidekey.core import errors

API_VERSION: Final = "admission.k8s.io/v1"
KIND: Final = "AdmissionReview"
#: Admission warnings longer than this are truncated by kubectl; keep each short.
MAX_WARNING_LENGTH: Final = 120

Operation = Literal["CREATE", "UPDATE", "DELETE", "CONNECT"]
OPERATIONS: Final[tuple[Operation, ...]] = ("CREATE", "UPDATE", "DELETE", "CONNECT")


class Status(TypedDict):
    code: int
    message: str
    reason: NotRequired[str]


class AdmissionResponse(TypedDict):
    uid: str
    allowed: bool
    status: NotRequired[Status]
    patchType: NotRequired[Literal["JSONPatch"]]
    patch: NotRequired[str]
    warnings: NotRequired[list[str]]


class AdmissionReview(TypedDict):
    apiVersion: str
    kind: str
    response: AdmissionResponse


class BadReview(errors.InvalidInput):
    """A body that is not an AdmissionReview v1 we can answer; becomes a 4xx (``status``)."""

    type = "invalid_review"

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__("", message)  # the message names the field: "request.uid is required..."
        self.status = status


@dataclass(frozen=True, slots=True)
class Request:
    """The parts of an AdmissionRequest the webhook decides on."""

    uid: str
    operation: Operation
    group: str
    kind: str
    resource: str
    sub_resource: str
    namespace: str
    name: str
    object: dict[str, Any] | None
    old_object: dict[str, Any] | None
    dry_run: bool

    @property
    def is_pod(self) -> bool:
        return self.group == "" and self.kind == "Pod" and self.resource == "pods"


def _field(obj: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = obj.get(key)
    if not isinstance(value, Mapping):
        raise BadReview(f"{where}.{key} must be an object")
    return value


def parse(body: bytes) -> Request:
    """Decode one AdmissionReview; raise BadReview with a message naming the field."""
    try:
        raw = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadReview(f"the body is not JSON: {exc}") from None
    except RecursionError:
        raise BadReview("the body is not an AdmissionReview: its JSON is nested too deeply") from None
    if not isinstance(raw, Mapping):
        raise BadReview("the body must be a JSON object (an AdmissionReview)")
    if raw.get("kind") != KIND or raw.get("apiVersion") != API_VERSION:
        raise BadReview(
            f"expected kind {KIND} apiVersion {API_VERSION}, got kind {raw.get('kind')!r} "
            f"apiVersion {raw.get('apiVersion')!r}; set admissionReviewVersions: [v1]")
    req = _field(raw, "request", "AdmissionReview")
    uid = req.get("uid")
    if not isinstance(uid, str) or not uid:
        raise BadReview("request.uid is required: the response must echo it")
    kind = _field(req, "kind", "request")
    resource = _field(req, "resource", "request")
    operation = req.get("operation")
    if operation not in OPERATIONS:
        raise BadReview(f"request.operation must be CREATE, UPDATE, DELETE or CONNECT, got {operation!r}")
    obj = req.get("object")
    old = req.get("oldObject")
    for key, value in (("object", obj), ("oldObject", old)):
        if value is not None and not isinstance(value, dict):
            raise BadReview(f"request.{key} must be an object or null")
    return Request(
        uid=uid, operation=cast(Operation, operation), group=str(kind.get("group", "")),
        kind=str(kind.get("kind", "")), resource=str(resource.get("resource", "")),
        sub_resource=str(req.get("subResource") or ""), namespace=str(req.get("namespace") or ""),
        name=str(req.get("name") or ""), object=cast("dict[str, Any] | None", obj),
        old_object=cast("dict[str, Any] | None", old), dry_run=bool(req.get("dryRun", False)),
    )


def _review(response: AdmissionResponse) -> AdmissionReview:
    return {"apiVersion": API_VERSION, "kind": KIND, "response": response}


def _warnings(warnings: Sequence[str]) -> list[str]:
    return [w if len(w) <= MAX_WARNING_LENGTH else w[: MAX_WARNING_LENGTH - 1] + "…" for w in warnings]


def allow(uid: str, patch: Sequence[Mapping[str, Any]] = (), warnings: Sequence[str] = ()) -> AdmissionReview:
    response: AdmissionResponse = {"uid": uid, "allowed": True}
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(
            json.dumps(list(patch), separators=(",", ":")).encode()).decode()
    if warnings:
        response["warnings"] = _warnings(warnings)
    return _review(response)


def deny(uid: str, message: str, *, code: int = 403, reason: str = "Forbidden",
         warnings: Sequence[str] = ()) -> AdmissionReview:
    response: AdmissionResponse = {
        "uid": uid, "allowed": False, "status": {"code": code, "message": message, "reason": reason},
    }
    if warnings:
        response["warnings"] = _warnings(warnings)
    return _review(response)


def decoded_patch(review: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The JSON patch inside a response (tests, the benchmark): [] when none."""
    encoded = review["response"].get("patch")
    if not encoded:
        return []
    ops: list[dict[str, Any]] = json.loads(base64.b64decode(encoded))
    return ops
