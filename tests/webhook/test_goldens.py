"""Golden pairs: a pod as the apiserver sends it (after ServiceAccount admission) -> the patch.

Each case is a folder under golden/ with ``pod.yaml`` and the expected
``patch.json`` (the JSON patch) and ``result.json`` (warnings, or the denial).
They are compared as parsed data; ``pytest --update-goldens`` rewrites them
from the current code, and the diff is then reviewed like any other change.
Beyond the pinned output, every injected case is checked for the properties
that matter whatever the exact patch: the patch applies, the result holds no
API credential outside the sidecar, and admitting the result again is a no-op.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml

from sidekey.core import contract
from sidekey.webhook import caching, patching
from sidekey.webhook import settings as settings_mod

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "pod.yaml").exists())


def _load(case: str) -> tuple[dict[str, Any], caching.Lookup, settings_mod.Settings]:
    folder = GOLDEN / case
    pod = yaml.safe_load((folder / "pod.yaml").read_text())
    policies_file = folder / "policies.yaml" if (folder / "policies.yaml").exists() else GOLDEN / "policies.yaml"
    settings_file = folder / "settings.yaml" if (folder / "settings.yaml").exists() else GOLDEN / "settings.yaml"
    lookup = caching.parse_all(yaml.safe_load(policies_file.read_text()) or [], patching.service_account(pod))
    return pod, lookup, settings_mod.load(settings_file)


def _admit(case: str) -> tuple[dict[str, Any], list[Any], dict[str, Any]]:
    pod, lookup, settings = _load(case)
    try:
        outcome = patching.patch(pod, lookup.policies, settings)
    except patching.Refused as exc:
        return pod, [], {"denied": exc.message, "reasons": [r.reason for r in exc.refusals]}
    return pod, list(outcome.patch), {"warnings": [*outcome.warnings, *lookup.warnings]}


def _write(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def test_there_are_at_least_twelve_golden_pod_shapes() -> None:
    assert len(CASES) >= 12


@pytest.mark.parametrize("case", CASES)
def test_the_patch_matches_its_golden_file(case: str, update_goldens: bool) -> None:
    _, ops, result = _admit(case)
    folder = GOLDEN / case
    if update_goldens:
        _write(folder / "patch.json", ops)
        _write(folder / "result.json", result)
    assert ops == json.loads((folder / "patch.json").read_text())
    assert result == json.loads((folder / "result.json").read_text())


def _mounts_of(container: dict[str, Any]) -> set[str]:
    return {m["name"] for m in container.get("volumeMounts") or []}


INJECTED = [c for c in CASES if "refused" not in c]


@pytest.mark.parametrize("case", INJECTED)
def test_the_injected_pod_holds_no_api_credential_outside_the_sidecar(case: str) -> None:
    pod, ops, _ = _admit(case)
    out = jsonpatch.apply_patch(pod, ops)
    spec = out["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert not any(v["name"].startswith(contract.KUBE_API_ACCESS_PREFIX) for v in spec["volumes"])
    sidecar, *rest = spec["initContainers"]
    assert sidecar["name"] == contract.SIDECAR_CONTAINER_NAME
    assert sidecar["restartPolicy"] == "Always"
    assert _mounts_of(sidecar) == {contract.API_TOKEN_VOLUME}
    for c in [*rest, *spec["containers"]]:
        assert contract.API_TOKEN_VOLUME not in _mounts_of(c), c["name"]
        assert not any(m.startswith(contract.KUBE_API_ACCESS_PREFIX) for m in _mounts_of(c)), c["name"]
        assert {"name": contract.AGENT_TOKEN_VOLUME, "mountPath": contract.AGENT_TOKEN_DIR,
                "readOnly": True} in c["volumeMounts"]
        env = {e["name"] for e in c.get("env") or []}
        assert {contract.ENV_TOKEN_FILE, contract.ENV_URL} <= env
    assert contract.ANNOTATION_STATUS in out["metadata"]["annotations"]


@pytest.mark.parametrize("case", INJECTED)
def test_admitting_the_injected_pod_again_yields_an_empty_patch(case: str) -> None:
    pod, ops, _ = _admit(case)
    _, lookup, settings = _load(case)
    out = jsonpatch.apply_patch(pod, ops)
    assert patching.patch(out, lookup.policies, settings).patch == []


def test_an_already_injected_pod_is_among_the_goldens_and_gets_an_empty_patch() -> None:
    assert json.loads((GOLDEN / "already-injected" / "patch.json").read_text()) == []
