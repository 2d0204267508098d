"""The part of a Pod the webhook reads, and a check that it has the right types.

The apiserver only sends schema-valid pods, but the port also hears whoever
else can reach it, and a decision made on ``securityContext: 5`` would be an
exception deep inside a check. Every field the webhook reads is listed here
once, with its JSON type; ``check`` walks the pod against this schema and
raises ``ShapeError`` naming the first field of the wrong type, which the
handler answers with a 400. Fields not listed are never read, so they are
not checked. ``null`` counts as absent, as it does for the apiserver.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from sidekey.core import errors

#: A schema is a type (a leaf), a dict (an object: known keys and their
#: schemas), a one-element list (a list of that schema), or
#: ``MAP_OF_STRINGS``.
Schema = Any
MAP_OF_STRINGS: Final = "map of strings"

_SECRET_REF: Final = {"name": str}
CONTAINER: Final = {
    "name": str,
    "env": [{"name": str, "value": str, "valueFrom": {"secretKeyRef": _SECRET_REF}}],
    "envFrom": [{"secretRef": _SECRET_REF}],
    "volumeMounts": [{"name": str, "mountPath": str, "readOnly": bool, "subPath": str}],
    "securityContext": {"privileged": bool, "capabilities": {"add": [str]}},
    "ports": [{"containerPort": int}],
    "targetContainerName": str,
}
VOLUME: Final = {
    "name": str,
    "hostPath": {"path": str},
    "secret": {"secretName": str},
    "projected": {"sources": [{"secret": _SECRET_REF, "serviceAccountToken": {"audience": str}}]},
}
POD: Final = {
    "metadata": {"name": str, "generateName": str, "namespace": str, "annotations": MAP_OF_STRINGS},
    "spec": {
        "serviceAccountName": str, "serviceAccount": str,
        "hostNetwork": bool, "hostPID": bool, "shareProcessNamespace": bool,
        "containers": [CONTAINER], "initContainers": [CONTAINER], "ephemeralContainers": [CONTAINER],
        "volumes": [VOLUME],
    },
}

_NAMES: Final = {str: "a string", bool: "true or false", int: "an integer"}


class ShapeError(errors.InvalidInput):
    """A field the webhook reads has the wrong JSON type (``field`` is its path)."""


def check(value: Any, schema: Schema = POD, path: str = "") -> None:
    """Raise ShapeError at the first field of the wrong type; ``None`` is always fine."""
    if value is None:
        return
    where = path or "the object"
    if schema is MAP_OF_STRINGS:
        if not isinstance(value, Mapping) or not all(isinstance(v, str) for v in value.values()):
            raise ShapeError(where, "must map strings to strings")
    elif isinstance(schema, dict):
        if not isinstance(value, Mapping):
            raise ShapeError(where, "must be an object")
        for key, sub in schema.items():
            if key in value:
                check(value[key], sub, f"{path}.{key}" if path else key)
    elif isinstance(schema, list):
        if not isinstance(value, list):
            raise ShapeError(where, "must be a list")
        for i, item in enumerate(value):
            if item is None:
                raise ShapeError(f"{where}[{i}]", "must not be null")
            check(item, schema[0], f"{path}[{i}]")
    elif schema is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ShapeError(where, f"must be {_NAMES[int]}")
    elif not isinstance(value, schema):
        raise ShapeError(where, f"must be {_NAMES.get(schema, schema.__name__)}")
