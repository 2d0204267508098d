"""Reporting what admission cannot: opted-in pods that run without the sidecar.

A pod created before sidekey was installed, or while the webhook was
unreachable under a lenient failure policy, runs without the sidecar and
without anyone being told (linkerd #13702). The operator sees every pod
event, so it counts such pods in ``sidekey_uninjected_pods`` and posts one
Warning Event per pod. After an upgrade, pods still running an older sidecar
image are counted in ``sidekey_outdated_sidecars`` (one Normal Event each).

Who counts as opted in is the webhook's rule, the same function
(``core/optin.py``) fed the same chart values: a pod the webhook would never
inject (an excluded namespace) is never reported missing its sidecar, and a
pod running an image the chart allows (``sidekey.io/image`` from the
allow-list) is current, not outdated.
"""

from __future__ import annotations

import logging
from collections.abc import Container, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from sidekey.core import contract, optin
from sidekey.operator import kubeobjects, metrics, recording

log = logging.getLogger(__name__)
PodState = Literal["ignored", "injected", "uninjected", "outdated"]


@dataclass(frozen=True, slots=True)
class PodFacts:
    """What the reporter needs of a pod, narrowed from the served object."""

    namespace: str
    name: str
    uid: str
    annotation: str | None  # the sidekey.io/inject annotation, if any
    sidecar_image: str | None  # None: no sidecar container
    finished: bool  # Succeeded, Failed or being deleted

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> PodFacts:
        meta = body.get("metadata") or {}
        spec = body.get("spec") or {}
        status = body.get("status") or {}
        image = None
        for c in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
            if isinstance(c, Mapping) and c.get("name") == contract.SIDECAR_CONTAINER_NAME:
                image = str(c.get("image") or "")
                break
        annotations = meta.get("annotations") or {}
        return cls(
            namespace=str(meta.get("namespace", "")), name=str(meta.get("name", "")),
            uid=str(meta.get("uid", "")),
            annotation=annotations.get(contract.ANNOTATION_INJECT),
            sidecar_image=image,
            finished=bool(meta.get("deletionTimestamp"))
            or status.get("phase") in ("Succeeded", "Failed"),
        )


@dataclass(frozen=True, slots=True)
class Rules:
    """What the chart tells both the webhook and the operator about injection."""

    own_namespace: str
    sidecar_image: str | None  # None: not told, so no pod is called outdated
    sidecar_images: frozenset[str] = frozenset()  # the allow-list
    excluded_namespaces: frozenset[str] = frozenset()


def classify(pod: PodFacts, *, labelled_namespaces: Container[str], rules: Rules) -> PodState:
    """Whether the pod opted in, and if so whether it carries a current sidecar."""
    if pod.finished:
        return "ignored"
    annotations = {contract.ANNOTATION_INJECT: pod.annotation} if pod.annotation is not None else {}
    decision = optin.decide(pod.namespace, annotations,
                            namespace_opted_in=pod.namespace in labelled_namespaces,
                            excluded_namespaces=rules.excluded_namespaces,
                            own_namespace=rules.own_namespace)
    if not decision.inject:
        return "ignored"
    if pod.sidecar_image is None:
        return "uninjected"
    if rules.sidecar_image and not optin.allowed_image(
            pod.sidecar_image, default=rules.sidecar_image, allow_list=rules.sidecar_images):
        return "outdated"
    return "injected"


class PodReporter:
    def __init__(self, recorder: recording.Recorder, stats: metrics.Metrics, rules: Rules) -> None:
        self._recorder = recorder
        self._stats = stats
        self._rules = rules
        self._state: dict[str, PodState] = {}  # uid -> last state worth counting

    def forget(self, uid: str) -> None:
        self._state.pop(uid, None)
        self._update()

    async def observe(self, body: Mapping[str, Any], labelled_namespaces: Container[str]) -> None:
        pod = PodFacts.from_body(body)
        if not pod.uid:
            return
        state = classify(pod, labelled_namespaces=labelled_namespaces, rules=self._rules)
        before = self._state.get(pod.uid)
        if state in ("uninjected", "outdated"):
            self._state[pod.uid] = state
        else:
            self._state.pop(pod.uid, None)
        self._update()
        if state == before or state not in ("uninjected", "outdated"):
            return
        target = kubeobjects.ObjectReference(apiVersion="v1", kind="Pod", name=pod.name,
                                             namespace=pod.namespace, uid=pod.uid)
        if state == "uninjected":
            log.warning("pod %s/%s is opted in to sidekey but runs without the sidecar",
                        pod.namespace, pod.name)
            await self._recorder.post(
                target, "Warning", "SidecarMissing",
                "the pod is opted in to sidekey injection but runs without the "
                f"{contract.SIDECAR_CONTAINER_NAME} sidecar (it was probably created before "
                "sidekey was installed, or while the webhook was unavailable); recreate it, "
                "e.g. with kubectl rollout restart, to have it injected")
        else:
            await self._recorder.post(
                target, "Normal", "SidecarOutdated",
                f"the pod runs sidecar image {pod.sidecar_image!r}, the installed one is "
                f"{self._rules.sidecar_image!r}; recreate the pod to upgrade it")

    def _update(self) -> None:
        values = list(self._state.values())
        self._stats.uninjected_pods.set(values.count("uninjected"))
        self._stats.outdated_sidecars.set(values.count("outdated"))
