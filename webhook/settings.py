"""The webhook's settings file: what every injected sidecar looks like.

The chart renders this YAML into a ConfigMap; every key is optional so a
bare install works. It is parsed once at start-up into a frozen dataclass:
a typo or a wrong type stops the webhook with a message naming the key,
rather than injecting a sidecar nobody asked for.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from sidekey.core import contract, errors

DEFAULT_IMAGE: Final = "ghcr.io/sidekey/sidekey:0.1.0"
LOG_LEVELS: Final = frozenset({"debug", "info", "warning", "error"})
#: Audiences the apiserver is commonly configured to accept besides "no audience"
#: (which always means the apiserver's own). A pod projecting its own token with
#: one of these would hold an API credential beside the sidecar's.
DEFAULT_API_AUDIENCES: Final = (
    "https://kubernetes.default.svc",
    "https://kubernetes.default.svc.cluster.local",
    "kubernetes.default.svc",
)
#: A Kubernetes resource quantity (cpu "250m", memory "128Mi", "1e3", "0.5").
QUANTITY: Final = re.compile(r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+|[numkMGTPE]|[KMGTPE]i)?$")

_KEYS: Final = frozenset({
    "image", "imageAllowList", "imagePullPolicy", "port", "healthPort", "audience",
    "resources", "excludedNamespaces", "logLevel", "apiAudiences",
})


class SettingsError(errors.InvalidInput):
    """A settings file that cannot be used, with the key to fix (``field``)."""

    type = "invalid_settings"

    @property
    def key(self) -> str:
        return self.field

    def __str__(self) -> str:
        return f"settings {self.field}: {self.message}"


@dataclass(frozen=True, slots=True)
class Resources:
    """Requests and limits of the sidecar; ``None`` leaves a value unset."""

    cpu_request: str | None = "25m"
    memory_request: str | None = "48Mi"
    cpu_limit: str | None = None
    memory_limit: str | None = "128Mi"


@dataclass(frozen=True, slots=True)
class Settings:
    image: str = DEFAULT_IMAGE
    image_allow_list: frozenset[str] = frozenset({DEFAULT_IMAGE})
    image_pull_policy: str = "IfNotPresent"
    port: int = contract.DEFAULT_PROXY_PORT
    health_port: int = contract.DEFAULT_HEALTH_PORT
    audience: str = contract.DEFAULT_AUDIENCE
    resources: Resources = field(default_factory=Resources)
    excluded_namespaces: frozenset[str] = frozenset()
    log_level: str = "info"
    api_audiences: tuple[str, ...] = DEFAULT_API_AUDIENCES

    def allows_image(self, image: str) -> bool:
        """The default image is always allowed, whatever the allow-list says."""
        return image == self.image or image in self.image_allow_list


def check_port(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise SettingsError(where, f"must be a port number between 1 and 65535, got {value!r}")
    return value


def check_quantity(value: object, where: str) -> str:
    text = str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value
    if not isinstance(text, str) or not QUANTITY.match(text):
        raise SettingsError(where, f"{value!r} is not a resource quantity such as 100m or 128Mi")
    return text


def _str_list(value: object, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise SettingsError(where, "must be a list of non-empty strings")
    return list(value)


def _resources(raw: object) -> Resources:
    if raw is None:
        return Resources()
    if not isinstance(raw, Mapping):
        raise SettingsError("resources", "must be an object with requests and limits")
    unknown = sorted(set(raw) - {"requests", "limits"})
    if unknown:
        raise SettingsError(f"resources.{unknown[0]}", "is not a known key (requests, limits)")
    values: dict[str, str | None] = {}
    for part in ("requests", "limits"):
        section = raw.get(part) or {}
        if not isinstance(section, Mapping):
            raise SettingsError(f"resources.{part}", "must be an object with cpu and memory")
        bad = sorted(set(section) - {"cpu", "memory"})
        if bad:
            raise SettingsError(f"resources.{part}.{bad[0]}", "is not a known key (cpu, memory)")
        for kind in ("cpu", "memory"):
            v = section.get(kind)
            values[f"{kind}_{part[:-1]}"] = (
                None if v is None else check_quantity(v, f"resources.{part}.{kind}"))
    return Resources(cpu_request=values["cpu_request"], memory_request=values["memory_request"],
                     cpu_limit=values["cpu_limit"], memory_limit=values["memory_limit"])


def from_mapping(raw: Mapping[str, Any]) -> Settings:
    """Settings from the parsed YAML; raise SettingsError on the first problem."""
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise SettingsError(unknown[0], f"is not a known key ({', '.join(sorted(_KEYS))})")
    defaults = Settings()
    image = raw.get("image", defaults.image)
    if not isinstance(image, str) or not image or any(c.isspace() for c in image):
        raise SettingsError("image", f"must be an image reference, got {image!r}")
    allow = frozenset(_str_list(raw.get("imageAllowList"), "imageAllowList")) | {image}
    pull = raw.get("imagePullPolicy", defaults.image_pull_policy)
    if pull not in ("Always", "IfNotPresent", "Never"):
        raise SettingsError("imagePullPolicy", f"must be Always, IfNotPresent or Never, got {pull!r}")
    port = check_port(raw.get("port", defaults.port), "port")
    health_port = check_port(raw.get("healthPort", defaults.health_port), "healthPort")
    if port == health_port:
        raise SettingsError("healthPort", f"must differ from port ({port})")
    audience = raw.get("audience", defaults.audience)
    if not isinstance(audience, str) or not audience:
        raise SettingsError("audience", "must be a non-empty string")
    level = raw.get("logLevel", defaults.log_level)
    if not isinstance(level, str) or level.lower() not in LOG_LEVELS:
        raise SettingsError("logLevel", f"must be one of {', '.join(sorted(LOG_LEVELS))}, got {level!r}")
    api_audiences = raw.get("apiAudiences")
    return Settings(
        image=image, image_allow_list=allow, image_pull_policy=str(pull), port=port,
        health_port=health_port, audience=audience, resources=_resources(raw.get("resources")),
        excluded_namespaces=frozenset(_str_list(raw.get("excludedNamespaces"), "excludedNamespaces")),
        log_level=level.lower(),
        api_audiences=(defaults.api_audiences if api_audiences is None
                       else tuple(_str_list(api_audiences, "apiAudiences"))),
    )


def load(path: Path) -> Settings:
    """Read the settings file; an empty file means every default."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SettingsError(str(path), f"cannot be read: {exc}") from None
    if not isinstance(raw, Mapping):
        raise SettingsError(str(path), "must hold a YAML mapping")
    return from_mapping(raw)
