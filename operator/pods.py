"""Reporting what admission cannot: opted-in pods that run without the sidecar.

A pod created before sidekey was installed, or while the webhook was
unreachable under a lenient failure policy, runs without the sidecar and
without anyone being told (linkerd #13702). The operator sees every pod
event, so it counts such pods in ``sidekey_uninjected_pods`` and posts one
Warning Event per pod. After an upgrade, pods still running an older sidecar
image are counted in ``sidekey_outdated_sidecars`` (one Normal Event each).
"""

from __future__ import annotations

import logging
from collections.abc import Container, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from sidekey.core import contract
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


def classify(pod: PodFacts, *, labelled_namespaces: Container[str], own_namespace: str,
             sidecar_image: str | None) -> PodState:
    """Whether the pod opted in, and if so whether it carries a current sidecar.

    The opt-in rule is the webhook's: the pod annotation ``"true"`` opts in,
    ``"false"`` opts out, and otherwise the namespace label decides.
    """
    if pod.finished or pod.namespace in contract.SYSTEM_NAMESPACES or pod.namespace == own_namespace:
        return "ignored"
    if pod.annotation == "false":
        return "ignored"
    if pod.annotation != "true" and pod.namespace not in labelled_namespaces:
        return "ignored"
    if pod.sidecar_image is None:
        return "uninjected"
    if sidecar_image and pod.sidecar_image != sidecar_image:
        return "outdated"
    return "injected"


class PodReporter:
    def __init__(self, recorder: recording.Recorder, stats: metrics.Metrics, *,
                 own_namespace: str, sidecar_image: str | None) -> None:
        self._recorder = recorder
        self._stats = stats
        self._own = own_namespace
        self._image = sidecar_image
        self._state: dict[str, PodState] = {}  # uid -> last state worth counting

    def forget(self, uid: str) -> None:
        self._state.pop(uid, None)
        self._update()

    async def observe(self, body: Mapping[str, Any], labelled_namespaces: Container[str]) -> None:
        pod = PodFacts.from_body(body)
        if not pod.uid:
            return
        state = classify(pod, labelled_namespaces=labelled_namespaces, own_namespace=self._own,
                         sidecar_image=self._image)
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
                f"{self._image!r}; recreate the pod to upgrade it")

    def _update(self) -> None:
        values = list(self._state.values())
        self._stats.uninjected_pods.set(values.count("uninjected"))
        self._stats.outdated_sidecars.set(values.count("outdated"))
