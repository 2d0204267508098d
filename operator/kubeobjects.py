"""The Kubernetes objects the operator reads and writes, typed at the boundary.

Only the fields the operator uses are declared. Objects the operator writes
(Roles, RoleBindings, Events, status) are built as these TypedDicts and sent
as JSON; objects it reads are narrowed into them (or into dataclasses such as
``SecretKeys``) right where they come off the wire.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypedDict

ConditionStatus = Literal["True", "False", "Unknown"]
EventType = Literal["Normal", "Warning"]


class OwnerReference(TypedDict):
    apiVersion: str
    kind: str
    name: str
    uid: str
    controller: bool


class ObjectMeta(TypedDict, total=False):
    name: str
    namespace: str
    uid: str
    labels: dict[str, str]
    annotations: dict[str, str]
    ownerReferences: list[OwnerReference]
    resourceVersion: str


class PolicyRule(TypedDict, total=False):
    apiGroups: list[str]
    resources: list[str]
    resourceNames: list[str]
    verbs: list[str]


class Role(TypedDict):
    apiVersion: str
    kind: str
    metadata: ObjectMeta
    rules: list[PolicyRule]


class Subject(TypedDict):
    kind: str
    name: str
    namespace: str


class RoleRef(TypedDict):
    apiGroup: str
    kind: str
    name: str


class RoleBinding(TypedDict):
    apiVersion: str
    kind: str
    metadata: ObjectMeta
    subjects: list[Subject]
    roleRef: RoleRef


class Condition(TypedDict):
    type: str
    status: ConditionStatus
    observedGeneration: int
    lastTransitionTime: str
    reason: str
    message: str


class PolicyStatus(TypedDict):
    observedGeneration: int
    upstreamCount: int
    conditions: list[Condition]


class ObjectReference(TypedDict):
    apiVersion: str
    kind: str
    name: str
    namespace: str
    uid: str


@dataclass(frozen=True, slots=True)
class SecretKeys:
    """What the operator needs to know about a referenced Secret: which keys
    hold a non-empty value. The values themselves are dropped on read, so no
    code path after the boundary could log or report them."""

    name: str
    present: frozenset[str]
    empty: frozenset[str]
