"""The real apiserver accepts the LLM fields in their valid shape and refuses bad ones by field."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from sidekey.core import policies

pytestmark = pytest.mark.e2e

Manifest = dict[str, Any]


def valid() -> Manifest:
    return {
        "apiVersion": "sidekey.io/v1alpha1", "kind": "AgentPolicy",
        "metadata": {"name": "llm", "namespace": "default"},
        "spec": {
            "subjects": {"serviceAccounts": ["agent"]},
            "upstreams": [{
                "name": "openai", "url": "https://api.openai.com/v1",
                "auth": {"type": "bearer", "secretRef": {"name": "openai", "key": "api-key"}},
                "allow": [{"methods": ["POST"], "paths": ["/chat/completions"]}],
                "api": "openai",
                "models": ["gpt-4.1*", "o3-mini", "ft:gpt-4o:org::x1"],
                "budgets": [{"tokens": 100000, "window": "24h", "scope": "serviceAccount"},
                            {"tokens": 5000, "window": "1h"}],
            }],
        },
    }


def up(m: Manifest) -> dict[str, Any]:
    upstream: dict[str, Any] = m["spec"]["upstreams"][0]
    return upstream


def _dry_run(cluster: Any, manifest: Manifest) -> subprocess.CompletedProcess[str]:
    own = cluster.bin_dir / "kubectl"
    return subprocess.run(
        [str(own) if own.exists() else "kubectl", f"--kubeconfig={cluster.kubeconfig}", "apply",
         "--dry-run=server", "-o", "json", "-f", "-"],
        input=yaml.safe_dump(manifest), capture_output=True, text=True, timeout=60, check=False)


def test_the_llm_fields_are_accepted_defaulted_and_parsed(cluster: Any, crds: Any) -> None:
    result = _dry_run(cluster, valid())
    assert result.returncode == 0, result.stderr
    served = json.loads(result.stdout)
    assert served["spec"]["upstreams"][0]["budgets"][1]["scope"] == "pod"  # the default
    llm = policies.parse(served).upstreams[0].llm
    assert llm is not None and llm.api == "openai"
    assert [b.scope for b in llm.budgets] == ["serviceAccount", "pod"]


BAD: list[tuple[str, Callable[[Manifest], None], str]] = [
    ("models without api", lambda m: up(m).pop("api"), "need api"),
    ("an unknown api", lambda m: up(m).update(api="gemini"), "spec.upstreams[0].api"),
    ("a star inside a model", lambda m: up(m).update(models=["gpt-*-mini"]), "spec.upstreams[0].models[0]"),
    ("zero tokens", lambda m: up(m)["budgets"][0].update(tokens=0), "spec.upstreams[0].budgets[0].tokens"),
    ("a week unit", lambda m: up(m)["budgets"][0].update(window="1w"), "spec.upstreams[0].budgets[0].window"),
    ("a window over 366d", lambda m: up(m)["budgets"][0].update(window="400d"), "at most 366d"),
    ("an unknown scope", lambda m: up(m)["budgets"][0].update(scope="namespace"),
     "spec.upstreams[0].budgets[0].scope"),
    ("two budgets of one window and scope",
     lambda m: up(m)["budgets"].append({"tokens": 9, "window": "1h", "scope": "pod"}),
     "only one budget"),
]


@pytest.mark.parametrize(("mutate", "says"), [(b[1], b[2]) for b in BAD], ids=[b[0] for b in BAD])
def test_a_bad_llm_field_is_refused_by_the_apiserver_naming_it(
        cluster: Any, crds: Any, mutate: Callable[[Manifest], None], says: str) -> None:
    m = valid()
    mutate(m)
    result = _dry_run(cluster, m)
    assert result.returncode != 0, f"accepted: {yaml.safe_dump(m)}"
    assert says in result.stderr, result.stderr
    # and the shared parser refuses it too (the schema may be older than the reader)
    with pytest.raises(policies.PolicyError):
        policies.parse(m)
