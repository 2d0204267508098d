"""The shared AgentPolicy model: parsing, path matching, selection and conflicts."""

from __future__ import annotations

import copy
import re
from typing import Any

import hypothesis
import pytest
from hypothesis import strategies as st

from sidekey.core import contract, policies


def manifest(name: str = "p", created: str = "2026-01-01T00:00:00Z", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "subjects": {"serviceAccounts": ["agent"]},
        "upstreams": [{
            "name": "openai", "url": "https://api.openai.com/v1",
            "auth": {"type": "bearer", "secretRef": {"name": "openai", "key": "api-key"}},
            "allow": [{"methods": ["POST"], "paths": ["/chat/completions"]}],
            "env": [{"name": "OPENAI_BASE_URL", "suffix": "/v1/"}],
        }],
    }
    body.update(spec)
    return {"apiVersion": contract.API_VERSION, "kind": contract.KIND,
            "metadata": {"name": name, "namespace": "team", "uid": f"uid-{name}", "generation": 3,
                         "creationTimestamp": created},
            "spec": body}


def upstream(m: dict[str, Any], i: int = 0) -> dict[str, Any]:
    up: dict[str, Any] = m["spec"]["upstreams"][i]
    return up


# --- parsing valid policies -----------------------------------------------------


def test_a_valid_policy_parses_with_defaults() -> None:
    p = policies.parse(manifest())
    assert (p.namespace, p.name, p.uid, p.generation) == ("team", "p", "uid-p", 3)
    assert p.service_accounts == frozenset({"agent"})
    assert p.token_expiration_seconds == contract.DEFAULT_TOKEN_EXPIRATION_SECONDS
    up = p.upstreams[0]
    assert (up.scheme, up.host, up.port, up.base_path) == ("https", "api.openai.com", 443, "/v1")
    assert up.limits == policies.Limits()
    assert up.env == (policies.EnvVar("OPENAI_BASE_URL", "/v1"),)
    assert p.secret_names == frozenset({"openai"})


def test_an_http_url_parses_only_when_insecure() -> None:
    m = manifest()
    upstream(m).update(url="http://10.1.2.3:8080", insecure=True)
    up = policies.parse(m).upstreams[0]
    assert (up.scheme, up.port, up.insecure, up.host_is_ip_literal) == ("http", 8080, True, True)


@pytest.mark.parametrize(("auth", "keys"), [
    ({"type": "bearer", "secretRef": {"name": "s", "key": "k"}}, ("k",)),
    ({"type": "header", "secretRef": {"name": "s", "key": "k"},
      "header": {"name": "x-api-key", "prefix": "Key "}}, ("k",)),
    ({"type": "query", "secretRef": {"name": "s", "key": "k"}, "query": {"param": "key"}}, ("k",)),
    ({"type": "basic", "secretRef": {"name": "s"},
      "basic": {"usernameKey": "u", "passwordKey": "p"}}, ("u", "p")),
    ({"type": "oauth2ClientCredentials", "secretRef": {"name": "s"},
      "oauth2ClientCredentials": {"tokenURL": "https://login.example/token", "clientIdKey": "id",
                                  "clientSecretKey": "secret", "scopes": ["a", "b"]}},
     ("id", "secret")),
])
def test_each_auth_type_names_the_secret_keys_it_reads(auth: dict[str, Any], keys: tuple[str, ...]) -> None:
    m = manifest()
    upstream(m)["auth"] = auth
    parsed = policies.parse(m).upstreams[0].auth
    assert parsed.type == auth["type"]
    assert parsed.secret_name == "s"
    assert parsed.secret_keys == keys


def test_a_header_auth_keeps_its_name_and_prefix() -> None:
    m = manifest()
    upstream(m)["auth"] = {"type": "header", "secretRef": {"name": "s", "key": "k"},
                           "header": {"name": "x-api-key", "prefix": "Key "}}
    auth = policies.parse(m).upstreams[0].auth
    assert (auth.header_name, auth.header_prefix) == ("x-api-key", "Key ")


def test_methods_default_to_any_and_are_upper_cased() -> None:
    m = manifest()
    upstream(m)["allow"] = [{"paths": ["/**"]}, {"methods": ["get"], "paths": ["/models"]}]
    rules = policies.parse(m).upstreams[0].allow
    assert rules[0].methods == frozenset({"*"})
    assert rules[1].methods == frozenset({"GET"})


# --- parsing invalid policies: the error names the field ----------------------------


def _broken(mutate: Any) -> dict[str, Any]:
    m = manifest()
    mutate(m)
    return m


@pytest.mark.parametrize(("mutate", "field"), [
    (lambda m: m.pop("spec"), "spec"),
    (lambda m: m["spec"]["subjects"].update(serviceAccounts=[]), "spec.subjects.serviceAccounts"),
    (lambda m: m["spec"]["subjects"].update(serviceAccounts=["Bad_Name"]),
     "spec.subjects.serviceAccounts[0]"),
    (lambda m: m["spec"].update(upstreams=[]), "spec.upstreams"),
    (lambda m: upstream(m).update(name="Bad_Name"), "spec.upstreams[0].name"),
    (lambda m: upstream(m).update(url="http://x.example"), "spec.upstreams[0].url"),
    (lambda m: upstream(m).update(url="ftp://x.example"), "spec.upstreams[0].url"),
    (lambda m: upstream(m).update(url="https://u:p@x.example"), "spec.upstreams[0].url"),
    (lambda m: upstream(m).update(url="https://x.example/?q=1"), "spec.upstreams[0].url"),
    (lambda m: upstream(m).update(url="https://x.example:99999"), "spec.upstreams[0].url"),
    (lambda m: upstream(m).update(insecure="yes"), "spec.upstreams[0].insecure"),
    (lambda m: upstream(m).pop("auth"), "spec.upstreams[0].auth"),
    (lambda m: upstream(m)["auth"].update(type="digest"), "spec.upstreams[0].auth.type"),
    (lambda m: upstream(m)["auth"].pop("secretRef"), "spec.upstreams[0].auth.secretRef"),
    (lambda m: upstream(m)["auth"]["secretRef"].pop("key"), "spec.upstreams[0].auth.secretRef.key"),
    (lambda m: upstream(m)["auth"]["secretRef"].update(key="a/b"),
     "spec.upstreams[0].auth.secretRef.key"),
    (lambda m: upstream(m)["auth"].update(type="header"), "spec.upstreams[0].auth.header"),
    # a trailing newline passes a `$`-anchored pattern; the name would end the header line early
    (lambda m: upstream(m)["auth"].update(type="header", header={"name": "x-api-key\n"}),
     "spec.upstreams[0].auth.header.name"),
    (lambda m: upstream(m)["auth"]["secretRef"].update(key="k\n"),
     "spec.upstreams[0].auth.secretRef.key"),
    (lambda m: upstream(m).update(name="openai\n"), "spec.upstreams[0].name"),
    (lambda m: upstream(m)["auth"].update(type="basic"), "spec.upstreams[0].auth.basic"),
    (lambda m: upstream(m)["auth"].update(type="query"), "spec.upstreams[0].auth.query"),
    (lambda m: upstream(m)["auth"].update(
        type="oauth2ClientCredentials",
        oauth2ClientCredentials={"tokenURL": "http://login.example/t", "clientIdKey": "i",
                                 "clientSecretKey": "s"}),
     "spec.upstreams[0].auth.oauth2ClientCredentials.tokenURL"),
    (lambda m: upstream(m).update(allow=[]), "spec.upstreams[0].allow"),
    (lambda m: upstream(m)["allow"][0].update(methods=["FETCH"]), "spec.upstreams[0].allow[0].methods"),
    (lambda m: upstream(m)["allow"][0].update(paths=[]), "spec.upstreams[0].allow[0].paths"),
    (lambda m: upstream(m)["allow"][0].update(paths=["/a/../b"]), "spec.upstreams[0].allow[0].paths[0]"),
    (lambda m: upstream(m)["allow"][0].update(paths=["/a*"]), "spec.upstreams[0].allow[0].paths[0]"),
    (lambda m: upstream(m)["allow"][0].update(paths=["/a/"]), "spec.upstreams[0].allow[0].paths[0]"),
    (lambda m: upstream(m).update(limits={"requestsPerMinute": 0}),
     "spec.upstreams[0].limits.requestsPerMinute"),
    (lambda m: upstream(m).update(limits={"timeoutSeconds": True}),
     "spec.upstreams[0].limits.timeoutSeconds"),
    (lambda m: upstream(m).update(caBundle="nope"), "spec.upstreams[0].caBundle"),
    (lambda m: upstream(m).update(env=[{"name": "1X"}]), "spec.upstreams[0].env[0].name"),
    (lambda m: upstream(m).update(env=[{"name": "X", "suffix": "v1"}]), "spec.upstreams[0].env[0].suffix"),
    (lambda m: m["spec"].update(token={"expirationSeconds": 599}), "spec.token.expirationSeconds"),
    (lambda m: m["spec"]["upstreams"].append(copy.deepcopy(upstream(m))), "spec.upstreams[1].name"),
])
def test_an_invalid_policy_raises_an_error_naming_the_field(mutate: Any, field: str) -> None:
    with pytest.raises(policies.PolicyError) as info:
        policies.parse(_broken(mutate))
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert info.value.message


def test_an_http_token_url_is_allowed_with_insecure() -> None:
    m = manifest()
    upstream(m).update(url="http://127.0.0.1:9000", insecure=True)
    upstream(m)["auth"] = {"type": "oauth2ClientCredentials", "secretRef": {"name": "s"},
                           "oauth2ClientCredentials": {"tokenURL": "http://127.0.0.1:9001/t",
                                                       "clientIdKey": "i", "clientSecretKey": "s"}}
    assert policies.parse(m).upstreams[0].auth.token_url == "http://127.0.0.1:9001/t"


def test_a_second_upstream_may_not_set_the_same_env_var() -> None:
    m = manifest()
    second = copy.deepcopy(upstream(m))
    second["name"] = "other"
    m["spec"]["upstreams"].append(second)
    with pytest.raises(policies.PolicyError) as info:
        policies.parse(m)
    assert info.value.field == "spec.upstreams[1].env"


# --- path patterns ------------------------------------------------------------------


@pytest.mark.parametrize(("pattern", "path", "expected"), [
    ("/chat/completions", ["chat", "completions"], True),
    ("/chat/completions", ["chat", "completions", "x"], False),
    ("/models/*", ["models", "gpt"], True),
    ("/models/*", ["models"], False),
    ("/models/*", ["models", "a", "b"], False),
    ("/v1/**", ["v1"], True),
    ("/v1/**", ["v1", "a", "b", "c"], True),
    ("/**", [], True),
    ("/**/files", ["a", "b", "files"], True),
    ("/**/files", ["a", "files", "x"], False),
    ("/", [], True),
    ("/", ["a"], False),
])
def test_a_star_is_one_segment_and_two_stars_any_number(pattern: str, path: list[str],
                                                         expected: bool) -> None:
    assert policies.PathPattern.compile(pattern).matches(path) is expected


def _reference(pattern: str, path: list[str]) -> bool:
    """The meaning of a pattern as a regular expression over the joined path (the model)."""
    parts = [{"*": "/[^/]*", "**": "(?:/[^/]*)*"}.get(seg, "/" + re.escape(seg))
             for seg in pattern.split("/")[1:] if pattern != "/"]
    return re.fullmatch("".join(parts), "".join("/" + seg for seg in path)) is not None


_SEGMENTS = st.sampled_from(["a", "b", "c", "*", "**"])


@hypothesis.settings(max_examples=600, deadline=None)
@hypothesis.given(pattern=st.lists(_SEGMENTS, max_size=7), path=st.lists(st.sampled_from(["a", "b", "c", ""]), max_size=9))
def test_the_linear_glob_match_agrees_with_a_regex_model(pattern: list[str], path: list[str]) -> None:
    text = "/" + "/".join(pattern)
    assert policies.PathPattern.compile(text).matches(path) is _reference(text, path)


def test_the_glob_worst_case_matches_in_one_pass_over_the_path() -> None:
    compiled = policies.PathPattern.compile("/**/a/**/b/**/c")
    assert compiled.matches(["x"] * 400 + ["a", "y", "b", "z", "c"])
    assert not compiled.matches(["a", "b"] * 300)
    assert compiled.matches(["a", "b"] * 299 + ["c"])


def test_an_upstream_allows_only_the_listed_methods_and_paths() -> None:
    up = policies.parse(manifest()).upstreams[0]
    assert up.allows("POST", ["chat", "completions"])
    assert not up.allows("GET", ["chat", "completions"])
    assert not up.allows("POST", ["files"])


# --- selection and conflicts ------------------------------------------------------


def _policy(name: str, created: str, *, upstream_name: str = "openai", env: str = "OPENAI_BASE_URL",
            sas: tuple[str, ...] = ("agent",)) -> policies.AgentPolicy:
    m = manifest(name, created)
    m["spec"]["subjects"]["serviceAccounts"] = list(sas)
    upstream(m)["name"] = upstream_name
    upstream(m)["env"] = [{"name": env}]
    return policies.parse(m)


def test_select_keeps_only_the_policies_naming_the_service_account() -> None:
    a = _policy("a", "2026-01-01T00:00:00Z")
    b = _policy("b", "2026-01-02T00:00:00Z", upstream_name="x", env="X", sas=("other",))
    sel = policies.select([a, b], "agent")
    assert sel.policies == (a,)
    assert set(sel.upstreams) == {"openai"}
    assert sel.conflicts == ()


def test_the_older_policy_wins_an_upstream_name_and_the_newer_one_is_named_the_loser() -> None:
    new = _policy("newer", "2026-02-01T00:00:00Z", env="OTHER")
    old = _policy("older", "2026-01-01T00:00:00Z")
    sel = policies.select([new, old], "agent")
    assert sel.upstreams["openai"][0] is old
    [conflict] = sel.conflicts
    assert (conflict.loser, conflict.winner, conflict.what, conflict.name) == (new, old, "upstream", "openai")
    assert "'older'" in conflict.message and "agent" in conflict.message


def test_two_policies_setting_the_same_env_var_conflict() -> None:
    old = _policy("older", "2026-01-01T00:00:00Z")
    new = _policy("newer", "2026-02-01T00:00:00Z", upstream_name="azure")
    sel = policies.select([old, new], "agent")
    assert set(sel.upstreams) == {"openai"}
    [conflict] = sel.conflicts
    assert (conflict.loser, conflict.what, conflict.name) == (new, "env", "OPENAI_BASE_URL")


def test_policies_created_in_the_same_second_are_ordered_by_name() -> None:
    b = _policy("b", "2026-01-01T00:00:00Z")
    a = _policy("a", "2026-01-01T00:00:00Z")
    assert policies.select([b, a], "agent").conflicts[0].winner is a


def test_the_shortest_token_lifetime_of_the_selecting_policies_applies() -> None:
    m1, m2 = manifest("a"), manifest("b", "2026-01-02T00:00:00Z")
    m1["spec"]["token"] = {"expirationSeconds": 3600}
    m2["spec"]["token"] = {"expirationSeconds": 900}
    upstream(m2)["name"], upstream(m2)["env"] = "b", []
    sel = policies.select([policies.parse(m1), policies.parse(m2)], "agent")
    assert sel.token_expiration_seconds == 900
    assert policies.select([], "agent").token_expiration_seconds == contract.DEFAULT_TOKEN_EXPIRATION_SECONDS
