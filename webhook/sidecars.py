"""What the webhook puts into a pod: the sidecar, its volumes, the agents' env.

Every object here is written *fully defaulted*, exactly as the apiserver
stores it (``terminationMessagePath``, probe thresholds, ``defaultMode``,
``fieldRef.apiVersion``...). That is what makes injection idempotent: a pod
read back from the apiserver compares equal to what we would inject now, so
re-admitting it yields an empty patch without trusting any stamp.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Final, NotRequired, TypedDict

from sidekey.core import contract
from sidekey.webhook.settings import QUANTITY, Settings

#: Startup: poll every second for up to two minutes (JWKS and first policy read).
STARTUP_PERIOD_SECONDS: Final = 1
STARTUP_FAILURE_THRESHOLD: Final = 120
READINESS_PERIOD_SECONDS: Final = 5

_SUFFIX: Final = {
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
    "k": Decimal("1e3"), "M": Decimal("1e6"), "G": Decimal("1e9"), "T": Decimal("1e12"),
    "P": Decimal("1e15"), "E": Decimal("1e18"),
    "Ki": Decimal(2**10), "Mi": Decimal(2**20), "Gi": Decimal(2**30), "Ti": Decimal(2**40),
    "Pi": Decimal(2**50), "Ei": Decimal(2**60),
}
_QUANTITY_PARTS: Final = re.compile(r"^([+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))([eE][+-]?[0-9]+|[a-zA-Z]*)$")


# --- Shapes -------------------------------------------------------------------


class FieldRef(TypedDict):
    apiVersion: str
    fieldPath: str


class EnvVarSource(TypedDict):
    fieldRef: FieldRef


class EnvVar(TypedDict):
    name: str
    value: NotRequired[str]
    valueFrom: NotRequired[EnvVarSource]


class VolumeMount(TypedDict):
    name: str
    mountPath: str
    readOnly: bool


class HTTPGetAction(TypedDict):
    path: str
    port: int
    scheme: str


class Probe(TypedDict):
    httpGet: HTTPGetAction
    timeoutSeconds: int
    periodSeconds: int
    successThreshold: int
    failureThreshold: int


class ContainerPort(TypedDict):
    name: str
    containerPort: int
    protocol: str


class Container(TypedDict):
    name: str
    image: str
    imagePullPolicy: str
    command: list[str]
    restartPolicy: str
    ports: list[ContainerPort]
    env: list[EnvVar]
    resources: dict[str, dict[str, str]]
    volumeMounts: list[VolumeMount]
    startupProbe: Probe
    readinessProbe: Probe
    securityContext: dict[str, Any]
    terminationMessagePath: str
    terminationMessagePolicy: str


class Volume(TypedDict):
    name: str
    projected: dict[str, Any]


# --- Per-pod choices ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SidecarSpec:
    """The sidecar one pod gets: settings plus that pod's allowed overrides."""

    image: str
    port: int
    health_port: int
    resources: dict[str, dict[str, str]]


def _port_override(value: str, settings: Settings) -> tuple[int | None, str | None]:
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= 65535:  # "²" is a digit to isdigit()
        return None, f"annotation {contract.ANNOTATION_PORT}: {value!r} is not a port number (1-65535)"
    port = int(value)
    if port == settings.health_port:
        return None, (f"annotation {contract.ANNOTATION_PORT}: {port} is the sidecar's health port; "
                      "pick another port")
    return port, None


def resolve(annotations: Mapping[str, str], settings: Settings) -> tuple[SidecarSpec, list[str]]:
    """The pod's sidecar and the problems with its override annotations (each a refusal)."""
    problems: list[str] = []
    image = annotations.get(contract.ANNOTATION_IMAGE, settings.image)
    if not settings.allows_image(image):
        problems.append(f"annotation {contract.ANNOTATION_IMAGE}: {image!r} is not on the sidecar image "
                        "allow-list (settings imageAllowList); remove the annotation or ask the "
                        "platform team to allow the image")
        image = settings.image
    port = settings.port
    if contract.ANNOTATION_PORT in annotations:
        override, problem = _port_override(annotations[contract.ANNOTATION_PORT], settings)
        if problem:
            problems.append(problem)
        elif override is not None:
            port = override
    res = settings.resources
    wanted = {
        ("requests", "cpu"): (contract.ANNOTATION_CPU_REQUEST, res.cpu_request),
        ("requests", "memory"): (contract.ANNOTATION_MEMORY_REQUEST, res.memory_request),
        ("limits", "cpu"): (contract.ANNOTATION_CPU_LIMIT, res.cpu_limit),
        ("limits", "memory"): (contract.ANNOTATION_MEMORY_LIMIT, res.memory_limit),
    }
    resources: dict[str, dict[str, str]] = {}
    for (part, kind), (annotation, default) in wanted.items():
        value = annotations.get(annotation, default)
        if value is None:
            continue
        if not QUANTITY.match(value):
            problems.append(f"annotation {annotation}: {value!r} is not a resource quantity "
                            "such as 100m or 128Mi")
            continue
        resources.setdefault(part, {})[kind] = value
    for kind in ("cpu", "memory"):
        req, lim = resources.get("requests", {}).get(kind), resources.get("limits", {}).get(kind)
        if req and lim and quantity(req) > quantity(lim):
            problems.append(f"sidecar {kind} request {req} exceeds its limit {lim}; fix the "
                            f"sidekey.io/{kind}-request or sidekey.io/{kind}-limit annotation")
    return SidecarSpec(image=image, port=port, health_port=settings.health_port, resources=resources), problems


def quantity(text: str) -> Decimal:
    """A resource quantity's value, so "0.5" and "500m" compare equal."""
    m = _QUANTITY_PARTS.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a quantity")
    number, suffix = m.groups()
    try:
        if suffix[:1] in ("e", "E"):
            return Decimal(number) * (Decimal(10) ** int(suffix[1:]))
        return Decimal(number) * _SUFFIX[suffix]
    except (KeyError, InvalidOperation):
        raise ValueError(f"{text!r} is not a quantity") from None


# --- The injected objects -----------------------------------------------------


def _field_env(name: str, path: str) -> EnvVar:
    return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}


def _probe(sidecar: SidecarSpec, *, period: int, failures: int) -> Probe:
    return {
        "httpGet": {"path": contract.READY_PATH, "port": sidecar.health_port, "scheme": "HTTP"},
        "timeoutSeconds": 1, "periodSeconds": period, "successThreshold": 1,
        "failureThreshold": failures,
    }


def container(sidecar: SidecarSpec, settings: Settings) -> Container:
    """The native sidecar: an init container with restartPolicy Always, placed first."""
    return {
        "name": contract.SIDECAR_CONTAINER_NAME,
        "image": sidecar.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": list(contract.SIDECAR_COMMAND),
        "restartPolicy": "Always",
        "ports": [{"name": contract.HEALTH_PORT_NAME, "containerPort": sidecar.health_port, "protocol": "TCP"}],
        "env": [
            _field_env(contract.ENV_POD_NAME, "metadata.name"),
            _field_env(contract.ENV_POD_NAMESPACE, "metadata.namespace"),
            _field_env(contract.ENV_POD_UID, "metadata.uid"),
            _field_env(contract.ENV_POD_IP, "status.podIP"),
            _field_env(contract.ENV_POD_IPS, "status.podIPs"),
            _field_env(contract.ENV_SERVICE_ACCOUNT, "spec.serviceAccountName"),
            {"name": contract.ENV_PROXY_PORT, "value": str(sidecar.port)},
            {"name": contract.ENV_HEALTH_PORT, "value": str(sidecar.health_port)},
            {"name": contract.ENV_AUDIENCE, "value": settings.audience},
        ],
        "resources": sidecar.resources,
        "volumeMounts": [
            {"name": contract.API_TOKEN_VOLUME, "mountPath": contract.API_TOKEN_DIR, "readOnly": True},
        ],
        "startupProbe": _probe(sidecar, period=STARTUP_PERIOD_SECONDS, failures=STARTUP_FAILURE_THRESHOLD),
        "readinessProbe": _probe(sidecar, period=READINESS_PERIOD_SECONDS, failures=3),
        "securityContext": {
            "runAsUser": contract.SIDECAR_UID,
            "runAsGroup": contract.SIDECAR_UID,
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
    }


def api_volume() -> Volume:
    """The sidecar's API credential: what in-cluster config expects, with a 3600 s token.

    Never 3607 s: the apiserver extends exactly-3607-second tokens of its own
    audience to a year. No ``audience`` means the apiserver's own.
    """
    return {
        "name": contract.API_TOKEN_VOLUME,
        "projected": {
            "defaultMode": 0o644,
            "sources": [
                {"serviceAccountToken": {
                    "expirationSeconds": contract.SIDECAR_API_TOKEN_EXPIRATION_SECONDS,
                    "path": contract.API_TOKEN_FILENAME}},
                {"configMap": {"name": contract.KUBE_ROOT_CA_CONFIGMAP,
                               "items": [{"key": "ca.crt", "path": contract.API_CA_FILENAME}]}},
                {"downwardAPI": {"items": [{
                    "path": contract.API_NAMESPACE_FILENAME,
                    "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
            ],
        },
    }


def agent_token_volume(audience: str, expiration_seconds: int) -> Volume:
    """The agents' token: our audience, which the apiserver refuses."""
    return {
        "name": contract.AGENT_TOKEN_VOLUME,
        "projected": {
            "defaultMode": 0o644,
            "sources": [{"serviceAccountToken": {
                "audience": audience, "expirationSeconds": expiration_seconds,
                "path": contract.AGENT_TOKEN_FILENAME}}],
        },
    }


def pod_spec() -> dict[str, bool]:
    """The pod-level fields every injected pod gets, which the bypass guard also pins.

    ``automountServiceAccountToken: false``: only the sidecar holds an API
    token. ``enableServiceLinks: false``: a Service named ``kubernetes`` in the
    pod's namespace would otherwise replace the master service's
    ``KUBERNETES_SERVICE_HOST``/``PORT`` in the sidecar's env (the kubelet lets
    a same-namespace service override it), and with it where the sidecar sends
    its API token. Without links the kubelet still injects the master service's
    variables, so in-cluster config keeps working; agents lose only the
    docker-link variables of their namespace's other Services (DNS still works).
    """
    return {"automountServiceAccountToken": False, "enableServiceLinks": False}


def agent_mount() -> VolumeMount:
    return {"name": contract.AGENT_TOKEN_VOLUME, "mountPath": contract.AGENT_TOKEN_DIR, "readOnly": True}


def agent_env(port: int) -> list[EnvVar]:
    return [
        {"name": contract.ENV_TOKEN_FILE, "value": contract.AGENT_TOKEN_PATH},
        {"name": contract.ENV_URL, "value": f"http://127.0.0.1:{port}"},
    ]


def same_container(existing: Mapping[str, Any], wanted: Container) -> bool:
    """True when ``existing`` is exactly ``wanted``, quantities compared by value.

    Exact on every other field: a pod that arrives with a look-alike sidecar
    carrying one extra field (an envFrom, a command) gets ours instead.
    """
    a = dict(existing)
    b: dict[str, Any] = dict(wanted)
    try:
        ra = _resource_values(a.pop("resources", {}) or {})
        rb = _resource_values(b.pop("resources", {}) or {})
    except ValueError:
        return False
    return ra == rb and a == b


def _resource_values(resources: Mapping[str, Any]) -> dict[str, dict[str, Decimal]]:
    out: dict[str, dict[str, Decimal]] = {}
    for part, values in resources.items():
        if not isinstance(values, Mapping):
            raise ValueError("resources must be a mapping")
        if values:
            out[part] = {k: quantity(str(v)) for k, v in values.items()}
    return out
