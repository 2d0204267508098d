"""JSON Patch (RFC 6902) from two versions of one object.

The webhook builds the pod it wants and lets this module say how to get
there, instead of hand-writing patch operations that must agree with the
pod's current shape (a missing ``env`` list needs ``add`` of the list, an
existing one ``add`` of an element...). Dicts are diffed key by key and
lists of equal length element by element, so a change to one container's
env touches only that path; lists that change length are replaced whole.
Identical inputs give an empty patch: that is the idempotence check.
"""

from __future__ import annotations

from typing import Any, TypedDict


class Operation(TypedDict, total=False):
    op: str
    path: str
    value: Any


def pointer(parts: list[str | int]) -> str:
    """A JSON pointer (RFC 6901): '~' and '/' in keys are escaped."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def diff(old: Any, new: Any) -> list[Operation]:
    ops: list[Operation] = []
    _diff(old, new, [], ops)
    return ops


def _diff(old: Any, new: Any, path: list[str | int], ops: list[Operation]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in old:
            if key not in new:
                ops.append({"op": "remove", "path": pointer([*path, key])})
        for key, value in new.items():
            if key not in old:
                ops.append({"op": "add", "path": pointer([*path, key]), "value": value})
            else:
                _diff(old[key], value, [*path, key], ops)
        return
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            _diff(a, b, [*path, i], ops)
        return
    if type(old) is not type(new) or old != new:
        ops.append({"op": "replace", "path": pointer(path), "value": new})
