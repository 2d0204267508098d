"""The escalation guard, on the real apiserver: a policy names only Secrets its author can read.

``mallory`` may create and edit AgentPolicies in the namespace but may not read
its Secrets; the tests act as her through impersonation (kubectl --as) with
Roles they create, and read the apiserver's answer.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.guards import admission, manifests

pytestmark = pytest.mark.e2e

USER = "mallory"


def _role(namespace: str, name: str, rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": name, "namespace": namespace}, "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": name, "namespace": namespace},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": USER}]},
    ]


@pytest.fixture
def policy_editor(cluster: Any, guards: str, namespace: str) -> str:
    """A namespace with a Secret, an admin's policy, and mallory who may edit policies only."""
    for obj in [manifests.secret(namespace), manifests.service_account(namespace, "agent"),
                manifests.service_account(namespace, "mallory-bot"),
                *_role(namespace, "policy-editor", [{
                    "apiGroups": ["sidekey.io"], "resources": ["agentpolicies"],
                    "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]}])]:
        answer = admission.apply(cluster, obj)
        assert answer.admitted, answer.message
    _wait_until_allowed(cluster, namespace, "create", "agentpolicies.sidekey.io")
    can = cluster.kubectl("auth", "can-i", "get", "secret/" + manifests.SECRET, "-n", namespace,
                          f"--as={USER}", check=False)
    assert can.strip().startswith("no"), can
    return namespace


def _wait_until_allowed(cluster: Any, namespace: str, *what: str, timeout: float = 20.0) -> None:
    """RBAC changes reach the authorizer through an informer: wait until they apply."""
    deadline = time.monotonic() + timeout
    while True:
        can = cluster.kubectl("auth", "can-i", *what, "-n", namespace, f"--as={USER}", check=False)
        if can.strip().startswith("yes"):
            return
        assert time.monotonic() < deadline, f"{USER} still may not {' '.join(what)}: {can}"
        time.sleep(0.2)


def _denied_for_secret(answer: admission.Answer, namespace: str) -> None:
    assert not answer.admitted, f"expected a denial, the apiserver admitted it: {answer.message[:300]}"
    assert "escalation-guard" in answer.message, answer.message
    assert f"may not get Secret {manifests.SECRET} in namespace {namespace}" in answer.message
    assert "missing permission: get on secrets" in answer.message
    assert USER in answer.message


class TestAuthorsWhoCannotReadTheSecretAreDenied:
    def test_creating_a_policy_that_names_an_unreadable_secret_is_denied(
            self, cluster: Any, policy_editor: str) -> None:
        answer = admission.create(cluster, manifests.agent_policy(policy_editor), as_user=USER)
        _denied_for_secret(answer, policy_editor)
        assert not admission.exists(cluster, "agentpolicy", policy_editor, "openai")

    def test_adding_their_own_service_account_to_the_subjects_is_denied(
            self, cluster: Any, policy_editor: str) -> None:
        assert admission.create(cluster, manifests.agent_policy(policy_editor)).admitted
        patch = json.dumps({"spec": {"subjects": {"serviceAccounts": ["agent", "mallory-bot"]}}})
        answer = admission.kubectl(cluster, "patch", "agentpolicy", "openai", "-n", policy_editor,
                                   "--type=merge", "-p", patch, as_user=USER)
        _denied_for_secret(answer, policy_editor)
        stored = json.loads(cluster.kubectl("get", "agentpolicy", "openai", "-n", policy_editor, "-o", "json"))
        assert stored["spec"]["subjects"]["serviceAccounts"] == ["agent"]

    def test_pointing_the_url_at_another_host_is_denied(self, cluster: Any, policy_editor: str) -> None:
        assert admission.create(cluster, manifests.agent_policy(policy_editor)).admitted
        changed = manifests.agent_policy(policy_editor, url="https://collector.mallory.example/v1")
        answer = admission.apply(cluster, changed, as_user=USER)
        _denied_for_secret(answer, policy_editor)
        stored = json.loads(cluster.kubectl("get", "agentpolicy", "openai", "-n", policy_editor, "-o", "json"))
        assert stored["spec"]["upstreams"][0]["url"] == "https://api.openai.com/v1"

    def test_an_unreadable_secret_behind_a_readable_one_is_named(
            self, cluster: Any, policy_editor: str) -> None:
        """Each upstream is checked on its own; the apiserver reports the first denial."""
        for obj in _role(policy_editor, "read-openai-key", [{
                "apiGroups": [""], "resources": ["secrets"], "resourceNames": [manifests.SECRET],
                "verbs": ["get"]}]):
            assert admission.apply(cluster, obj).admitted
        _wait_until_allowed(cluster, policy_editor, "get", f"secret/{manifests.SECRET}")
        policy = manifests.agent_policy(policy_editor)
        second = json.loads(json.dumps(policy["spec"]["upstreams"][0]))
        second.update(name="anthropic", url="https://api.anthropic.com")
        second["auth"]["secretRef"]["name"] = "anthropic-key"
        policy["spec"]["upstreams"].append(second)
        answer = admission.create(cluster, policy, as_user=USER)
        assert not answer.admitted
        assert "may not get Secret anthropic-key in namespace" in answer.message, answer.message
        assert "which upstream anthropic names" in answer.message, answer.message


def _grant_secret(cluster: Any, namespace: str) -> None:
    for obj in _role(namespace, "read-openai-key", [{
            "apiGroups": [""], "resources": ["secrets"], "resourceNames": [manifests.SECRET], "verbs": ["get"]}]):
        assert admission.apply(cluster, obj).admitted
    _wait_until_allowed(cluster, namespace, "get", f"secret/{manifests.SECRET}")


def _grant_tokens(cluster: Any, namespace: str, account: str) -> None:
    for obj in _role(namespace, f"tokens-of-{account}", [{
            "apiGroups": [""], "resources": ["serviceaccounts/token"], "resourceNames": [account],
            "verbs": ["create"]}]):
        assert admission.apply(cluster, obj).admitted
    _wait_until_allowed(cluster, namespace, "create", f"serviceaccounts/{account}", "--subresource=token")


class TestAuthorsNeedAuthorityOverEverySubject:
    """Reading the Secret is not enough: naming an account needs the right to act as it."""

    def test_an_author_who_may_read_the_secret_may_not_name_an_account_they_cannot_act_as(
            self, cluster: Any, policy_editor: str) -> None:
        _grant_secret(cluster, policy_editor)
        answer = admission.create(cluster, manifests.agent_policy(policy_editor), as_user=USER)
        assert not answer.admitted, answer.message
        assert "escalation-guard" in answer.message, answer.message
        assert f"may not create tokens for service account agent in namespace {policy_editor}" in answer.message
        assert "missing permission: create on serviceaccounts/token" in answer.message
        assert not admission.exists(cluster, "agentpolicy", policy_editor, "openai")

    def test_adding_a_victim_account_to_an_existing_policy_is_refused(
            self, cluster: Any, policy_editor: str) -> None:
        _grant_secret(cluster, policy_editor)
        _grant_tokens(cluster, policy_editor, "agent")
        assert admission.create(cluster, manifests.agent_policy(policy_editor), as_user=USER).admitted
        patch = json.dumps({"spec": {"subjects": {"serviceAccounts": ["agent", "mallory-bot"]}}})
        answer = admission.kubectl(cluster, "patch", "agentpolicy", "openai", "-n", policy_editor,
                                   "--type=merge", "-p", patch, as_user=USER)
        assert not answer.admitted, answer.message
        assert "may not create tokens for service account mallory-bot" in answer.message, answer.message
        stored = json.loads(cluster.kubectl("get", "agentpolicy", "openai", "-n", policy_editor, "-o", "json"))
        assert stored["spec"]["subjects"]["serviceAccounts"] == ["agent"]


    def test_a_namespace_editor_has_that_authority(self, cluster: Any, policy_editor: str) -> None:
        """The built-in ``edit`` ClusterRole carries ``create serviceaccounts/token``: a team is not affected."""
        editor = "edith"
        for obj in [
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
             "metadata": {"name": "edith-edit", "namespace": policy_editor},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
             "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": editor}]},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
             "metadata": {"name": "edith-policies", "namespace": policy_editor},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "policy-editor"},
             "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": editor}]},
        ]:
            assert admission.apply(cluster, obj).admitted
        deadline = time.monotonic() + 20
        while not cluster.kubectl("auth", "can-i", "create", "serviceaccounts/agent", "--subresource=token",
                                  "-n", policy_editor, f"--as={editor}", check=False).strip().startswith("yes"):
            assert time.monotonic() < deadline, "the edit role does not grant serviceaccounts/token"
            time.sleep(0.2)
        answer = admission.create(cluster, manifests.agent_policy(policy_editor), as_user=editor)
        assert answer.admitted, answer.message


class TestAuthorsWhoCanReadTheSecretAreAllowed:
    def test_an_admin_may_create_and_change_the_policy(self, cluster: Any, policy_editor: str) -> None:
        assert admission.create(cluster, manifests.agent_policy(policy_editor)).admitted
        changed = manifests.agent_policy(policy_editor, subjects=["agent", "mallory-bot"],
                                         url="https://api.openai.com/v2")
        answer = admission.apply(cluster, changed)
        assert answer.admitted, answer.message

    def test_an_author_granted_get_on_exactly_that_secret_and_tokens_of_the_subject_may_create_the_policy(
            self, cluster: Any, policy_editor: str) -> None:
        _grant_secret(cluster, policy_editor)
        _grant_tokens(cluster, policy_editor, "agent")
        answer = admission.create(cluster, manifests.agent_policy(policy_editor), as_user=USER)
        assert answer.admitted, answer.message

    def test_metadata_only_changes_are_not_checked(self, cluster: Any, policy_editor: str) -> None:
        """The operator's finalizers and annotations must never need Secret reads."""
        assert admission.create(cluster, manifests.agent_policy(policy_editor)).admitted
        answer = admission.kubectl(cluster, "label", "agentpolicy", "openai", "-n", policy_editor,
                                   "team=agents", as_user=USER)
        assert answer.admitted, answer.message
