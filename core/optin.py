"""Who is opted in to injection: one rule for the webhook and the operator.

The webhook decides whether to inject a pod; the operator decides whether a
running pod without the sidecar is worth a ``SidecarMissing`` Warning. When
the two judged by separate code they drifted apart (the operator warned about
pods in namespaces the webhook is configured never to inject), so both call
:func:`decide`, and both get the same inputs from the chart: the excluded
namespaces, and the images a sidecar may run (:func:`allowed_image`).

The rule, in order:

1. system namespaces, the release's own namespace (whose pods would need the
   webhook to start: a deadlock) and the chart's ``excludedNamespaces`` are
   never injected, whatever their labels or annotations say;
2. the pod annotation ``sidekey.io/inject: "false"`` opts out and ``"true"``
   opts in; it wins over the namespace label;
3. otherwise the namespace label ``sidekey.io/inject=enabled`` decides. Any
   other annotation value is ignored, with a warning saying so.

Pure: no I/O, no component imports; whoever calls it knows how to learn
whether the namespace is labelled (the webhook from the path the apiserver
called, the operator from its namespace index).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Literal

from sidekey.core import contract

Reason = Literal[
    "annotation", "namespace-label",  # opted in
    "opted-out", "not-opted-in", "system-namespace", "own-namespace", "excluded-namespace",
]


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether the pod is opted in, why, and a warning for its author if any."""

    inject: bool
    reason: Reason
    warning: str | None = None


def decide(namespace: str, annotations: Mapping[str, str], *, namespace_opted_in: bool,
           excluded_namespaces: Collection[str], own_namespace: str | None) -> Decision:
    """Whether a pod of ``namespace`` with these annotations is opted in."""
    if namespace in contract.SYSTEM_NAMESPACES:
        return Decision(False, "system-namespace")
    if own_namespace and namespace == own_namespace:
        return Decision(False, "own-namespace")
    if namespace in excluded_namespaces:
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


def allowed_image(image: str, *, default: str, allow_list: Collection[str]) -> bool:
    """Whether a sidecar may run ``image``: the installed default always may, and so
    may every image on the chart's allow-list (what ``sidekey.io/image`` picks from)."""
    return image == default or image in allow_list
