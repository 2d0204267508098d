"""The chart's copy of the contract, generated from ``core/contract.py`` and the sidecar builder.

Helm cannot import Python, so the chart holds a rendered ``_contract.tpl`` of
named templates: the names the webhook, the sidecar and the guards agree on,
and what the bypass guard expects of the sidecar. The guard's expectations
are read off the objects the webhook really builds (``webhook/sidecars.py``):
the env names and their ``fieldRef``s, the mounts, the security context, the
``sidekey-api-access`` volume and the pod-level fields (``sidecars.pod_spec``:
no automounted token, no service links), so a change to the sidecar changes the
guard with it. ``tests/chart/test_contract_template.py`` fails when the file
drifts; with SIDEKEY_UPDATE_GOLDENS=1 it rewrites it.

Checks of the sidecar's shape are rendered as CEL that compares a field with
its injected value *exactly*: each key the webhook writes must be there with
that value, and the keys listed in ``ABSENT`` (fields of the Kubernetes type
the webhook leaves unset) must not be. Nothing else the guard checks about the
sidecar comes from anywhere but here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Final

import yaml

from sidekey.core import contract
from sidekey.localcluster import helm
from sidekey.webhook import settings as settings_mod
from sidekey.webhook import sidecars
from tests.chart import crd_template

TEMPLATE = helm.CHART / "templates" / "_contract.tpl"

#: Fields of the Kubernetes types that the webhook never sets on the sidecar and
#: that a look-alike must not set either, keyed by where they sit in the
#: container or volume (``[]`` stands for any list item).
ABSENT: Final[Mapping[str, Sequence[str]]] = {
    "": ("workingDir", "envFrom", "volumeDevices", "lifecycle"),
    "securityContext": ("seLinuxOptions", "windowsOptions", "procMount", "appArmorProfile"),
    "securityContext.capabilities": ("add",),
    "securityContext.seccompProfile": ("localhostProfile",),
    "volumeMounts[]": ("subPath", "subPathExpr", "mountPropagation", "recursiveReadOnly"),
    # hostPort: the apiserver sets it to containerPort under hostNetwork (an
    # accepted risk with its own override); the guard checks it beside this.
    "ports[]": ("hostIP",),
    "projected.sources[].serviceAccountToken": ("audience",),
    "projected.sources[].configMap": ("optional",),
    "projected.sources[].configMap.items[]": ("mode",),
    "projected.sources[].downwardAPI.items[]": ("mode", "resourceFieldRef"),
}
#: Sidecar fields compared exactly, grouped by the guard rule that reports them.
EXACT: Final[Mapping[str, Sequence[str]]] = {
    "sidecarCommandCheck": ("command",),
    "sidecarMountsCheck": ("volumeMounts",),
    "sidecarPortsCheck": ("ports",),
    "sidecarSecurityContextCheck": ("securityContext",),
    "sidecarFixedFieldsCheck": ("restartPolicy", "terminationMessagePath", "terminationMessagePolicy"),
}
#: Fields of the sidecar whose value is a chart value, not a constant: compared
#: with the value helm renders.
TEMPLATED: Final[Mapping[str, str]] = {
    "ports[].containerPort": "{{ .Values.sidecar.healthPort }}",
}
#: Where the value of each plain (non-fieldRef) env var of the sidecar comes
#: from in the chart; ``None``: any port number (the pod's sidekey.io/port).
VALUE_ENV: Final[Mapping[str, str | None]] = {
    contract.ENV_PROXY_PORT: None,
    contract.ENV_HEALTH_PORT: ".Values.sidecar.healthPort",
    contract.ENV_AUDIENCE: ".Values.sidecar.audience",
}

HEADER = """\
{{- /*
Generated from core/contract.py, webhook/sidecars.py and crds/ by
tests/chart/test_contract_template.py (SIDEKEY_UPDATE_GOLDENS=1).
Do not edit: change the contract or the sidecar, and regenerate.
The *Check templates are CEL over a container `c`, a volume `v` or the pod `object`.
*/}}
"""


def _cel(value: Any) -> str:
    """A JSON value as a CEL literal (JSON's syntax is CEL's for these types)."""
    return json.dumps(value, separators=(", ", ": "))


def exact(expr: str, value: Any, where: str = "") -> list[str]:
    """CEL terms that hold when ``expr`` is exactly ``value`` (keys in ABSENT[where] unset)."""
    if isinstance(value, Mapping):
        terms: list[str] = []
        for key, sub in value.items():
            path = f"{where}.{key}" if where else key
            terms.append(f"has({expr}.{key})")
            terms += exact(f"{expr}.{key}", sub, path)
        terms += [f"!has({expr}.{key})" for key in ABSENT.get(where, ())]
        return terms
    if where in TEMPLATED:
        return [f"{expr} == {TEMPLATED[where]}"]
    if isinstance(value, list) and any(isinstance(v, Mapping) for v in value):
        terms = [f"{expr}.size() == {len(value)}"]
        for i, item in enumerate(value):
            terms += exact(f"{expr}[{i}]", item, f"{where}[]")
        return terms
    return [f"{expr} == {_cel(value)}"]


def built() -> tuple[sidecars.Container, sidecars.Volume]:
    """The sidecar and its API volume exactly as the webhook injects them with default settings."""
    settings = settings_mod.Settings()
    sidecar, problems = sidecars.resolve({}, settings)
    assert not problems, problems
    return sidecars.container(sidecar, settings), sidecars.api_volume()


def _define(name: str, body: str) -> str:
    return f'{{{{- define "sidekey.contract.{name}" -}}}}\n{body}\n{{{{- end }}}}\n'


def _capabilities(names: Sequence[str]) -> str:
    return _cel(sorted({*names, *(f"CAP_{n}" for n in names)}))


def crd_limits() -> dict[str, int]:
    """How many upstreams and subjects an AgentPolicy may have (the escalation guard checks each)."""
    crd = yaml.safe_load(crd_template.SOURCE.read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    return {"maxUpstreams": spec["upstreams"]["maxItems"],
            "maxSubjects": spec["subjects"]["properties"]["serviceAccounts"]["maxItems"]}


def _names() -> dict[str, str]:
    """The contract's names, as plain text."""
    return {
        "group": contract.GROUP, "apiVersion": contract.API_VERSION, "kind": contract.KIND,
        "plural": contract.PLURAL,
        "sidecarName": contract.SIDECAR_CONTAINER_NAME, "apiVolume": contract.API_TOKEN_VOLUME,
        "injectKey": contract.ANNOTATION_INJECT, "injectEnabled": contract.LABEL_INJECT_ENABLED,
        "imageAnnotation": contract.ANNOTATION_IMAGE,
        "allowPrefix": contract.ANNOTATION_ALLOW_PREFIX,
        "allowHostNetwork": contract.ANNOTATION_ALLOW_HOST_NETWORK,
        "allowSharedProcessNamespace": contract.ANNOTATION_ALLOW_SHARED_PROCESS_NAMESPACE,
        "allowHostPid": contract.ANNOTATION_ALLOW_HOST_PID,
        "allowPrivileged": contract.ANNOTATION_ALLOW_PRIVILEGED,
        "allowHostPath": contract.ANNOTATION_ALLOW_HOST_PATH,
        "allowCapabilities": contract.ANNOTATION_ALLOW_CAPABILITIES,
        "webhookName": contract.WEBHOOK_NAME, "webhookPath": contract.WEBHOOK_PATH,
        "webhookNamespaceName": contract.WEBHOOK_NAMESPACE_NAME,
        "webhookNamespacePath": contract.WEBHOOK_NAMESPACE_PATH,
        "healthPortName": contract.HEALTH_PORT_NAME, "healthzPath": contract.HEALTHZ_PATH,
        "readyPath": contract.READY_PATH, "metricsPath": contract.METRICS_PATH,
    }


def _data(container: sidecars.Container) -> dict[str, str]:
    """Lists, maps and numbers, as CEL literals (or text for messages)."""
    field_env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]
                 if "valueFrom" in e}
    return {
        "systemNamespaces": _cel(sorted(contract.SYSTEM_NAMESPACES)),
        "command": _cel(list(contract.SIDECAR_COMMAND)),
        "traceCapabilities": _capabilities(sorted(contract.DANGEROUS_CAPABILITIES)),
        "traceCapabilitiesText": ", ".join(sorted(contract.DANGEROUS_CAPABILITIES)),
        "controlCapabilities": _capabilities(sorted(contract.DANGEROUS_CAPABILITIES - {"SYS_PTRACE"})),
        "sniffingCapabilities": _capabilities([*contract.SNIFFING_CAPABILITIES, "ALL"]),
        "sniffingDrop": _cel(list(contract.SNIFFING_CAPABILITIES)),
        "sniffingCapabilitiesText": ", ".join(contract.SNIFFING_CAPABILITIES),
        "sidecarFieldEnv": _cel(field_env),
        "apiTokenExpirationSeconds": str(contract.SIDECAR_API_TOKEN_EXPIRATION_SECONDS),
        **{k: str(v) for k, v in crd_limits().items()},
    }


def _value_env(container: sidecars.Container) -> str:
    value_env = [e["name"] for e in container["env"] if "valueFrom" not in e]
    assert sorted(value_env) == sorted(VALUE_ENV), (
        f"the sidecar's plain env {value_env} and VALUE_ENV disagree: say where each value comes from")
    pairs = " ".join(f'"{name}" ' + ('""' if src is None else f"(toString {src})")
                     for name, src in VALUE_ENV.items())
    return ("{{- /* The plain env vars of the sidecar and their values; \"\" means any port number. */}}\n"
            + _define("sidecarValueEnv", f"{{{{- dict {pairs} | toJson }}}}"))


def _checks(container: sidecars.Container, volume: sidecars.Volume) -> list[str]:
    """CEL that holds when the sidecar ``c`` (the API volume ``v``) is exactly as built."""
    c: Mapping[str, Any] = container
    out = []
    for name, keys in EXACT.items():
        terms = [t for key in keys for t in (
            [f"has(c.{key})", *exact(f"c.{key}", c[key], key)] if key in c else [f"!has(c.{key})"])]
        if name == "sidecarFixedFieldsCheck":
            terms += [f"!has(c.{key})" for key in ABSENT[""]]
        if name == "sidecarCommandCheck":
            terms += ["!has(c.args)"]
        out.append(_define(name, " && ".join(terms)))
    vol: Mapping[str, Any] = volume
    out.append(_define("apiVolumeCheck", " && ".join(
        t for key in vol if key != "name" for t in [f"has(v.{key})", *exact(f"v.{key}", vol[key], key)])))
    # The pod-level fields the webhook sets (automountServiceAccountToken and
    # enableServiceLinks false), over the pod under admission; absent is the
    # apiserver's default (true), so each must be there.
    fields = sidecars.pod_spec()
    out.append(_define("podSpecCheck", " && ".join(
        t for key, value in fields.items() for t in [f"has(object.spec.{key})", *exact(f"object.spec.{key}", value, f"spec.{key}")])))
    out.append(_define("podSpecText", ", ".join(f"{key}: {_cel(value)}" for key, value in fields.items())))
    return out


def render() -> str:
    """The whole ``_contract.tpl``."""
    container, volume = built()
    return "".join([
        HEADER,
        *(_define(k, v) for k, v in _names().items()),
        *(_define(k, v) for k, v in _data(container).items()),
        _value_env(container),
        *_checks(container, volume),
    ])
