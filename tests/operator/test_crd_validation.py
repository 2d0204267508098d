"""The real apiserver refuses invalid AgentPolicies, naming the field to fix.

Each case starts from a valid policy, breaks one thing, and applies it with
``kubectl apply --dry-run=server`` in the ``default`` namespace: the apiserver
runs the CRD's structural schema and CEL rules exactly as for a real
``kubectl apply``, and persists nothing.
"""

from __future__ import annotations

import copy
import json
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from sidekey.core import policies

pytestmark = pytest.mark.e2e

Manifest = dict[str, Any]


def valid(namespace: str = "default") -> Manifest:
    return {
        "apiVersion": "sidekey.io/v1alpha1",
        "kind": "AgentPolicy",
        "metadata": {"name": "agents", "namespace": namespace},
        "spec": {
            "subjects": {"serviceAccounts": ["agent"]},
            "upstreams": [{
                "name": "openai",
                "url": "https://api.openai.com/v1",
                "auth": {"type": "bearer", "secretRef": {"name": "openai", "key": "api-key"}},
                "allow": [{"methods": ["POST"], "paths": ["/chat/completions", "/models/*"]}],
                "env": [{"name": "OPENAI_BASE_URL"}],
            }],
        },
    }


def up(m: Manifest, i: int = 0) -> dict[str, Any]:
    upstream: dict[str, Any] = m["spec"]["upstreams"][i]
    return upstream


def second_upstream(m: Manifest, **changes: Any) -> None:
    extra = copy.deepcopy(up(m))
    extra.pop("env", None)
    extra.update(changes)
    m["spec"]["upstreams"].append(extra)


# (case id, mutation, text the refusal must contain)
BAD: list[tuple[str, Callable[[Manifest], None], str]] = [
    ("no spec", lambda m: m.pop("spec"), "spec"),
    ("no subjects", lambda m: m["spec"].pop("subjects"), "spec.subjects"),
    ("empty service account list",
     lambda m: m["spec"]["subjects"].update(serviceAccounts=[]), "spec.subjects.serviceAccounts"),
    ("service account name with capitals",
     lambda m: m["spec"]["subjects"].update(serviceAccounts=["Agent"]),
     "spec.subjects.serviceAccounts[0]"),
    ("no upstreams", lambda m: m["spec"].update(upstreams=[]), "spec.upstreams"),
    ("upstream name not a DNS label", lambda m: up(m).update(name="Open_AI"), "spec.upstreams[0].name"),
    ("duplicate upstream names", lambda m: second_upstream(m),
     "spec.upstreams: Invalid value: upstream names must be unique"),
    ("http url without insecure", lambda m: up(m).update(url="http://api.openai.com/v1"),
     "spec.upstreams[0].url"),
    ("ftp url even with insecure",
     lambda m: up(m).update(url="ftp://files.example.com", insecure=True), "spec.upstreams[0].url"),
    ("relative url", lambda m: up(m).update(url="/v1"), "spec.upstreams[0].url"),
    ("url with user info", lambda m: up(m).update(url="https://user:pw@api.example.com"),
     "spec.upstreams[0].url"),
    ("url with a query", lambda m: up(m).update(url="https://api.example.com/v1?key=x"),
     "spec.upstreams[0].url"),
    ("unknown auth type", lambda m: up(m)["auth"].update(type="digest"), "spec.upstreams[0].auth.type"),
    ("no secretRef", lambda m: up(m)["auth"].pop("secretRef"), "spec.upstreams[0].auth.secretRef"),
    ("bearer without a key", lambda m: up(m)["auth"]["secretRef"].pop("key"),
     "spec.upstreams[0].auth.secretRef"),
    ("header auth without header", lambda m: up(m)["auth"].update(type="header"),
     "spec.upstreams[0].auth.header"),
    ("header name with a space",
     lambda m: up(m)["auth"].update(type="header", header={"name": "x api key"}),
     "spec.upstreams[0].auth.header.name"),
    ("basic auth without basic", lambda m: up(m)["auth"].update(type="basic"),
     "spec.upstreams[0].auth.basic"),
    ("basic auth without passwordKey",
     lambda m: up(m)["auth"].update(type="basic", basic={"usernameKey": "user"}),
     "spec.upstreams[0].auth.basic.passwordKey"),
    ("query auth without query", lambda m: up(m)["auth"].update(type="query"),
     "spec.upstreams[0].auth.query"),
    ("oauth2 without its block", lambda m: up(m)["auth"].update(type="oauth2ClientCredentials"),
     "spec.upstreams[0].auth.oauth2ClientCredentials"),
    ("oauth2 with an http token URL",
     lambda m: up(m)["auth"].update(type="oauth2ClientCredentials", oauth2ClientCredentials={
         "tokenURL": "http://login.example.com/token", "clientIdKey": "id",
         "clientSecretKey": "secret"}),
     "spec.upstreams[0].auth.oauth2ClientCredentials.tokenURL"),
    ("a type's block under another type",
     lambda m: up(m)["auth"].update(basic={"usernameKey": "u", "passwordKey": "p"}),
     "spec.upstreams[0].auth.basic"),
    ("secret key with a slash", lambda m: up(m)["auth"]["secretRef"].update(key="a/b"),
     "spec.upstreams[0].auth.secretRef.key"),
    ("no allow rules", lambda m: up(m).update(allow=[]), "spec.upstreams[0].allow"),
    ("unknown method", lambda m: up(m)["allow"][0].update(methods=["FETCH"]),
     "spec.upstreams[0].allow[0].methods[0]"),
    ("path without leading slash", lambda m: up(m)["allow"][0].update(paths=["chat"]),
     "spec.upstreams[0].allow[0].paths[0]"),
    ("path with a dot-dot segment", lambda m: up(m)["allow"][0].update(paths=["/a/../b"]),
     "spec.upstreams[0].allow[0].paths[0]"),
    ("star inside a segment", lambda m: up(m)["allow"][0].update(paths=["/models/gpt-*"]),
     "spec.upstreams[0].allow[0].paths[0]"),
    ("zero requests per minute", lambda m: up(m).update(limits={"requestsPerMinute": 0}),
     "spec.upstreams[0].limits.requestsPerMinute"),
    ("timeout above an hour", lambda m: up(m).update(limits={"timeoutSeconds": 7200}),
     "spec.upstreams[0].limits.timeoutSeconds"),
    ("caBundle that is not PEM", lambda m: up(m).update(caBundle="not a certificate"),
     "spec.upstreams[0].caBundle"),
    ("env name with a dash", lambda m: up(m).update(env=[{"name": "OPENAI-BASE-URL"}]),
     "spec.upstreams[0].env[0].name"),
    ("env suffix without slash", lambda m: up(m).update(env=[{"name": "X", "suffix": "v1"}]),
     "spec.upstreams[0].env[0].suffix"),
    ("same env var on two upstreams",
     lambda m: second_upstream(m, name="second", env=[{"name": "OPENAI_BASE_URL"}]),
     "spec.upstreams: Invalid value: an env var name may be set by only one upstream"),
    ("token shorter than 600 s", lambda m: m["spec"].update(token={"expirationSeconds": 60}),
     "spec.token.expirationSeconds"),
    ("insecure that is not a boolean",
     lambda m: up(m).update(insecure="yes"), "spec.upstreams[0].insecure"),
]


def _dry_run(cluster: Any, manifest: Manifest) -> subprocess.CompletedProcess[str]:
    own = cluster.bin_dir / "kubectl"
    return subprocess.run(
        [str(own) if own.exists() else "kubectl", f"--kubeconfig={cluster.kubeconfig}", "apply", "--dry-run=server",
         "-o", "json", "-f", "-"],
        input=yaml.safe_dump(manifest), capture_output=True, text=True, timeout=60, check=False)


def test_the_valid_policy_is_accepted_and_defaulted(cluster: Any, crds: Any) -> None:
    result = _dry_run(cluster, valid())
    assert result.returncode == 0, result.stderr
    served = json.loads(result.stdout)
    assert served["spec"]["token"]["expirationSeconds"] == 600
    upstream = served["spec"]["upstreams"][0]
    assert upstream["insecure"] is False
    assert upstream["limits"] == {"maxRequestBytes": policies.DEFAULT_MAX_REQUEST_BYTES,
                                  "timeoutSeconds": policies.DEFAULT_TIMEOUT_SECONDS}
    # and the shared parser accepts what the apiserver accepted
    assert policies.parse(served).upstreams[0].name == "openai"


def test_every_auth_type_in_its_valid_shape_is_accepted(cluster: Any, crds: Any) -> None:
    shapes: list[dict[str, Any]] = [
        {"type": "header", "secretRef": {"name": "s", "key": "k"},
         "header": {"name": "x-api-key", "prefix": "Token "}},
        {"type": "basic", "secretRef": {"name": "s"},
         "basic": {"usernameKey": "user", "passwordKey": "password"}},
        {"type": "query", "secretRef": {"name": "s", "key": "k"}, "query": {"param": "key"}},
        {"type": "oauth2ClientCredentials", "secretRef": {"name": "s"},
         "oauth2ClientCredentials": {"tokenURL": "https://login.example.com/oauth2/token",
                                     "clientIdKey": "id", "clientSecretKey": "secret",
                                     "scopes": ["api.read"], "audience": "https://api"}},
    ]
    for auth in shapes:
        m = valid()
        up(m)["auth"] = auth
        result = _dry_run(cluster, m)
        assert result.returncode == 0, (auth["type"], result.stderr)
        assert policies.parse(json.loads(result.stdout)).upstreams[0].auth.type == auth["type"]


def test_http_is_accepted_only_with_insecure(cluster: Any, crds: Any) -> None:
    m = valid()
    up(m).update(url="http://10.0.0.5:8080/v1", insecure=True)
    result = _dry_run(cluster, m)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(("mutate", "field"), [(b[1], b[2]) for b in BAD], ids=[b[0] for b in BAD])
def test_an_invalid_policy_is_refused_with_the_field_named(
        cluster: Any, crds: Any, mutate: Callable[[Manifest], None], field: str
) -> None:
    manifest = valid()
    mutate(manifest)
    result = _dry_run(cluster, manifest)
    assert result.returncode != 0, f"accepted: {yaml.safe_dump(manifest)}"
    assert "is invalid" in result.stderr, result.stderr
    assert field in result.stderr, result.stderr


def test_the_table_covers_at_least_fifteen_bad_manifests() -> None:
    assert len(BAD) >= 15
