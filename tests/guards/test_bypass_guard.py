"""The bypass guard, on the real apiserver: no pod runs as a subject without the sidecar.

Pods are built by hand in the injected shape (tests/guards/manifests.py) and in
the broken shapes that would hand an agent the key; each case reads the
apiserver's own answer. The guard is what ``helm template`` renders.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from sidekey.core import contract
from tests.guards import admission, manifests

pytestmark = pytest.mark.e2e

FIX_HINT = 'annotate the pod with sidekey.io/inject: "true"'


def _denied(answer: admission.Answer, *fragments: str) -> None:
    assert not answer.admitted, f"expected a denial, the apiserver admitted it: {answer.message[:300]}"
    assert "bypass-guard" in answer.message, answer.message
    for fragment in fragments:
        assert fragment in answer.message, answer.message


class TestPodsOfSubjectsWithoutTheSidecarAreDenied:
    def test_a_bare_pod_running_as_a_subject_account_is_denied_with_how_to_fix_it(
            self, cluster: Any, subject_namespace: str) -> None:
        answer = admission.create(cluster, manifests.bare_pod(subject_namespace, "bare"))
        _denied(answer, FIX_HINT, "service account agent", "AgentPolicy openai")
        assert not admission.exists(cluster, "pod", subject_namespace, "bare")

    def test_a_pod_that_opts_out_with_inject_false_is_denied(
            self, cluster: Any, subject_namespace: str) -> None:
        pod = manifests.bare_pod(subject_namespace, "opted-out",
                                 annotations={contract.ANNOTATION_INJECT: "false"})
        _denied(admission.create(cluster, pod), FIX_HINT)

    def test_a_pod_stamped_as_injected_without_the_sidecar_is_denied(
            self, cluster: Any, subject_namespace: str) -> None:
        pod = manifests.bare_pod(subject_namespace, "stamped", annotations={
            contract.ANNOTATION_INJECT: "true",
            contract.ANNOTATION_STATUS: json.dumps({"injected": True, "image": "whatever"})})
        pod["spec"]["automountServiceAccountToken"] = False
        _denied(admission.create(cluster, pod), FIX_HINT)

    def test_a_pod_running_as_the_default_account_is_checked_when_default_is_a_subject(
            self, cluster: Any, subject_namespace: str) -> None:
        policy = manifests.agent_policy(subject_namespace, "defaults", subjects=["default"])
        assert admission.apply(cluster, policy).admitted
        pod = manifests.bare_pod(subject_namespace, "no-account")
        del pod["spec"]["serviceAccountName"]
        answer = admission.wait_until_enforced(cluster, pod)
        _denied(answer, "service account default", FIX_HINT)


class TestTheInjectedShapeIsCheckedInTheSpec:
    def test_a_pod_in_the_injected_shape_is_admitted(self, cluster: Any, subject_namespace: str) -> None:
        answer = admission.create(cluster, manifests.injected_pod(subject_namespace, "injected"))
        assert answer.admitted, answer.message
        assert answer.obj is not None
        assert answer.obj["spec"]["initContainers"][0]["name"] == contract.SIDECAR_CONTAINER_NAME

    def test_a_sidecar_image_outside_the_allow_list_is_denied(
            self, cluster: Any, subject_namespace: str) -> None:
        pod = manifests.injected_pod(subject_namespace, "evil-image", image="evil.example/sidekey:0.1.0")
        _denied(admission.create(cluster, pod), "evil.example/sidekey:0.1.0", "allow-list",
                manifests.DEFAULT_SIDECAR_IMAGE)

    def test_an_image_added_to_the_charts_allow_list_value_is_admitted(
            self, cluster: Any, subject_namespace: str) -> None:
        extra = "registry.example/sidekey:0.1.1"
        pod = manifests.injected_pod(subject_namespace, "allowed-image", image=extra)
        assert not admission.create(cluster, pod, dry_run=True).admitted
        admission.install_guards(cluster, {"sidecar": {"imageAllowList": [extra]}})
        try:
            answer = admission.create(cluster, pod, dry_run=True)
            deadline = time.monotonic() + 30
            while not answer.admitted and time.monotonic() < deadline:
                time.sleep(0.3)
                answer = admission.create(cluster, pod, dry_run=True)
            assert answer.admitted, answer.message
        finally:
            admission.install_guards(cluster)

    def test_a_token_for_an_audience_the_chart_lists_may_be_mounted_by_an_agent(
            self, cluster: Any, subject_namespace: str) -> None:
        pod = manifests.injected_pod(subject_namespace, "vault-token")
        pod["spec"]["volumes"].append({"name": "vault", "projected": {"sources": [
            {"serviceAccountToken": {"path": "token", "audience": "vault", "expirationSeconds": 600}}]}})
        manifests.agent(pod)["volumeMounts"].append({"name": "vault", "mountPath": "/vault"})
        _denied(admission.create(cluster, pod, dry_run=True), "guards.extraTokenAudiences")
        admission.install_guards(cluster, {"guards": {"extraTokenAudiences": ["vault"]}})
        try:
            answer = admission.create(cluster, pod, dry_run=True)
            deadline = time.monotonic() + 30
            while not answer.admitted and time.monotonic() < deadline:
                time.sleep(0.3)
                answer = admission.create(cluster, pod, dry_run=True)
            assert answer.admitted, answer.message
        finally:
            admission.install_guards(cluster)

    def test_a_sidecar_that_is_not_a_native_sidecar_is_denied(
            self, cluster: Any, subject_namespace: str) -> None:
        pod = manifests.injected_pod(subject_namespace, "not-native")
        side = manifests.sidecar(pod)
        del side["restartPolicy"], side["readinessProbe"], side["startupProbe"]  # probes need a native sidecar
        _denied(admission.create(cluster, pod), "restartPolicy: Always")

    def test_a_sidecar_as_a_regular_container_is_denied(self, cluster: Any, subject_namespace: str) -> None:
        pod = manifests.injected_pod(subject_namespace, "regular")
        side = pod["spec"].pop("initContainers")[0]
        del side["restartPolicy"], side["readinessProbe"]
        pod["spec"]["containers"].append(side)
        _denied(admission.create(cluster, pod), FIX_HINT)

    def test_a_pod_that_keeps_automount_on_is_denied(self, cluster: Any, subject_namespace: str) -> None:
        pod = manifests.injected_pod(subject_namespace, "automount")
        del pod["spec"]["automountServiceAccountToken"]
        _denied(admission.create(cluster, pod), "automountServiceAccountToken: false")

    @pytest.mark.parametrize("audience", [None, "https://kubernetes.default.svc"])
    def test_an_agent_container_that_keeps_an_api_token_is_denied(
            self, cluster: Any, subject_namespace: str, audience: str | None) -> None:
        pod = manifests.injected_pod(subject_namespace, f"api-token-{'none' if audience is None else 'svc'}")
        projection: dict[str, Any] = {"path": "token", "expirationSeconds": 3607}
        if audience is not None:
            projection["audience"] = audience
        pod["spec"]["volumes"].append(
            {"name": "my-api-token", "projected": {"sources": [{"serviceAccountToken": projection}]}})
        manifests.agent(pod)["volumeMounts"].append(
            {"name": "my-api-token", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"})
        _denied(admission.create(cluster, pod), "container(s) agent", "mount a token the apiserver accepts")

    def test_an_agent_container_that_mounts_the_sidecars_api_volume_is_denied(
            self, cluster: Any, subject_namespace: str) -> None:
        pod = manifests.injected_pod(subject_namespace, "steals-api-volume")
        manifests.agent(pod)["volumeMounts"].append(
            {"name": contract.API_TOKEN_VOLUME, "mountPath": "/tmp/api", "readOnly": True})
        _denied(admission.create(cluster, pod), "container(s) agent", contract.API_TOKEN_VOLUME)

    def test_an_init_container_that_mounts_an_api_token_is_denied(
            self, cluster: Any, subject_namespace: str) -> None:
        pod = manifests.injected_pod(subject_namespace, "init-steals")
        pod["spec"]["initContainers"].insert(0, {
            "name": "setup", "image": manifests.AGENT_IMAGE,
            "volumeMounts": [{"name": contract.API_TOKEN_VOLUME, "mountPath": "/api"}]})
        _denied(admission.create(cluster, pod), "container(s) setup")

    def test_an_agent_that_mounts_only_the_sidekey_audience_token_is_admitted(
            self, cluster: Any, subject_namespace: str) -> None:
        pod = manifests.injected_pod(subject_namespace, "agent-token-twice")
        pod["spec"]["volumes"].append({"name": "own-sidekey-token", "projected": {"sources": [
            {"serviceAccountToken": {"path": "t", "audience": "sidekey", "expirationSeconds": 600}}]}})
        manifests.agent(pod)["volumeMounts"].append({"name": "own-sidekey-token", "mountPath": "/t"})
        answer = admission.create(cluster, pod)
        assert answer.admitted, answer.message

    @pytest.mark.parametrize("how", ["env", "envFrom", "volume", "projected"])
    def test_an_agent_container_that_references_the_policys_secret_is_denied(
            self, cluster: Any, subject_namespace: str, how: str) -> None:
        pod = manifests.injected_pod(subject_namespace, f"secret-{how.lower()}")
        agent = manifests.agent(pod)
        if how == "env":
            agent["env"].append({"name": "OPENAI_API_KEY", "valueFrom": {
                "secretKeyRef": {"name": manifests.SECRET, "key": "api-key"}}})
        elif how == "envFrom":
            agent["envFrom"] = [{"secretRef": {"name": manifests.SECRET}}]
        else:
            source: dict[str, Any] = (
                {"secret": {"secretName": manifests.SECRET}} if how == "volume"
                else {"projected": {"sources": [{"secret": {"name": manifests.SECRET}}]}})
            pod["spec"]["volumes"].append({"name": "keys", **source})
            agent["volumeMounts"].append({"name": "keys", "mountPath": "/keys"})
        _denied(admission.create(cluster, pod), manifests.SECRET)

    def test_an_agent_may_reference_other_secrets(self, cluster: Any, subject_namespace: str) -> None:
        pod = manifests.injected_pod(subject_namespace, "other-secret")
        manifests.agent(pod)["env"].append({"name": "DB_PASSWORD", "valueFrom": {
            "secretKeyRef": {"name": "database", "key": "password"}}})
        answer = admission.create(cluster, pod)
        assert answer.admitted, answer.message

    @pytest.mark.parametrize("env", [contract.ENV_API_SERVER, contract.ENV_API_TOKEN_DIR])
    def test_a_sidecar_pointed_at_another_apiserver_or_token_is_denied(
            self, cluster: Any, subject_namespace: str, env: str) -> None:
        pod = manifests.injected_pod(subject_namespace, f"moved-{env.lower().replace('_', '-')}")
        manifests.sidecar(pod)["env"].append({"name": env, "value": "https://evil.example"})
        _denied(admission.create(cluster, pod), env)

    @pytest.mark.parametrize("change", [
        {"command": ["python", "-c", "leak()"]},
        {"args": ["--api-server", "https://evil.example"]},
    ])
    def test_a_sidecar_running_another_command_is_denied(
            self, cluster: Any, subject_namespace: str, change: dict[str, list[str]]) -> None:
        pod = manifests.injected_pod(subject_namespace, f"other-{next(iter(change))}")
        manifests.sidecar(pod).update(change)
        _denied(admission.create(cluster, pod), "must run the command")

    def test_a_sidecar_with_an_exec_probe_is_denied(self, cluster: Any, subject_namespace: str) -> None:
        pod = manifests.injected_pod(subject_namespace, "exec-probe")
        manifests.sidecar(pod)["startupProbe"] = {"exec": {"command": ["python", "-c", "leak()"]}}
        _denied(admission.create(cluster, pod), "exec")

    def test_a_sidecar_sharing_a_volume_with_an_agent_is_denied(
            self, cluster: Any, subject_namespace: str) -> None:
        pod = manifests.injected_pod(subject_namespace, "shared-dir")
        pod["spec"]["volumes"].append({"name": "shared", "emptyDir": {}})
        manifests.sidecar(pod)["volumeMounts"].append({"name": "shared", "mountPath": "/out"})
        manifests.agent(pod)["volumeMounts"].append({"name": "shared", "mountPath": "/in"})
        _denied(admission.create(cluster, pod), "must mount only")


def _isolation_break(pod: dict[str, Any], shape: str) -> None:
    spec, agent = pod["spec"], manifests.agent(pod)
    if shape in ("shareProcessNamespace", "hostPID", "hostNetwork"):
        spec[shape] = True
    elif shape == "privileged":
        agent["securityContext"] = {"privileged": True}
    elif shape == "capabilities":
        agent["securityContext"] = {"capabilities": {"add": ["SYS_PTRACE"]}}
    else:
        spec["volumes"].append({"name": "node", "hostPath": {"path": "/var/lib/kubelet"}})
        agent["volumeMounts"].append({"name": "node", "mountPath": "/node"})


OVERRIDES = {
    "shareProcessNamespace": contract.ANNOTATION_ALLOW_SHARED_PROCESS_NAMESPACE,
    "hostPID": contract.ANNOTATION_ALLOW_HOST_PID,
    "hostNetwork": contract.ANNOTATION_ALLOW_HOST_NETWORK,
    "privileged": contract.ANNOTATION_ALLOW_PRIVILEGED,
    "capabilities": contract.ANNOTATION_ALLOW_CAPABILITIES,
    "hostPath": contract.ANNOTATION_ALLOW_HOST_PATH,
}


class TestShapesThatReachTheSidecarAreRefusedLikeTheWebhookDoes:
    """A hand-made pod that skips the webhook gets the webhook's refusals, overrides included."""

    @pytest.mark.parametrize("shape", sorted(OVERRIDES))
    def test_an_isolation_breaking_shape_is_denied_with_its_override(
            self, cluster: Any, subject_namespace: str, shape: str) -> None:
        pod = manifests.injected_pod(subject_namespace, f"breaks-{shape.lower()}")
        _isolation_break(pod, shape)
        _denied(admission.create(cluster, pod), f'{OVERRIDES[shape]}: "true"')

    @pytest.mark.parametrize("shape", ["shareProcessNamespace", "capabilities", "hostNetwork"])
    def test_the_documented_override_accepts_the_risk(
            self, cluster: Any, subject_namespace: str, shape: str) -> None:
        pod = manifests.injected_pod(subject_namespace, f"accepts-{shape.lower()}")
        _isolation_break(pod, shape)
        pod["metadata"]["annotations"][OVERRIDES[shape]] = "true"
        answer = admission.create(cluster, pod)
        assert answer.admitted, answer.message


class TestEphemeralContainers:
    def _debug(self, cluster: Any, namespace: str, pod: str, container: dict[str, Any]) -> admission.Answer:
        patch = json.dumps({"spec": {"ephemeralContainers": [container]}})
        return admission.kubectl(cluster, "patch", "pod", pod, "-n", namespace,
                                 "--subresource=ephemeralcontainers", "--type=strategic", "-p", patch)

    def test_an_ephemeral_container_aimed_at_the_sidecar_is_denied(
            self, cluster: Any, subject_namespace: str) -> None:
        assert admission.create(cluster, manifests.injected_pod(subject_namespace, "debugged")).admitted
        answer = self._debug(cluster, subject_namespace, "debugged", {
            "name": "debugger", "image": "busybox", "targetContainerName": contract.SIDECAR_CONTAINER_NAME})
        _denied(answer, "may not target the sidekey-proxy sidecar")

    def test_an_ephemeral_container_that_mounts_the_api_token_is_denied(
            self, cluster: Any, subject_namespace: str) -> None:
        assert admission.create(cluster, manifests.injected_pod(subject_namespace, "debugged-2")).admitted
        answer = self._debug(cluster, subject_namespace, "debugged-2", {
            "name": "debugger", "image": "busybox",
            "volumeMounts": [{"name": contract.API_TOKEN_VOLUME, "mountPath": "/api"}]})
        _denied(answer, "container(s) debugger")

    def test_an_ephemeral_container_aimed_at_the_agent_is_admitted(
            self, cluster: Any, subject_namespace: str) -> None:
        assert admission.create(cluster, manifests.injected_pod(subject_namespace, "debugged-3")).admitted
        answer = self._debug(cluster, subject_namespace, "debugged-3", {
            "name": "debugger", "image": "busybox", "targetContainerName": "agent",
            "securityContext": {"capabilities": {"add": ["SYS_PTRACE"]}}})  # kubectl debug --profile=general
        assert answer.admitted, answer.message


class TestTheGuardStaysWithinTheCelCostBudget:
    def test_a_large_injected_pod_is_admitted_and_a_large_broken_one_denied(
            self, cluster: Any, subject_namespace: str) -> None:
        """40 agents x 30 mounts x 60 volumes x 30 env vars: every rule runs to the end."""
        pod = manifests.injected_pod(subject_namespace, "large")
        for v in range(60):
            pod["spec"]["volumes"].append({"name": f"data-{v}", "emptyDir": {}})
        template = manifests.agent(pod)
        pod["spec"]["containers"] = [{
            **template, "name": f"agent-{i}",
            "env": [*template["env"], *({"name": f"V{e}", "valueFrom": {"secretKeyRef": {
                "name": f"other-{e}", "key": "k"}}} for e in range(30))],
            "volumeMounts": [*template["volumeMounts"],
                             *({"name": f"data-{v}", "mountPath": f"/data/{v}"} for v in range(30))],
        } for i in range(40)]
        answer = admission.create(cluster, pod)
        assert answer.admitted, answer.message[:500]

        broken = manifests.variant(pod, "large-broken")
        broken["spec"]["containers"][-1]["envFrom"] = [{"secretRef": {"name": manifests.SECRET}}]
        _denied(admission.create(cluster, broken), "container(s) agent-39")


class TestPodUpdates:
    def test_swapping_the_sidecar_image_of_a_running_pod_is_denied(
            self, cluster: Any, subject_namespace: str) -> None:
        assert admission.create(cluster, manifests.injected_pod(subject_namespace, "swapped")).admitted
        answer = admission.kubectl(cluster, "set", "image", "pod/swapped", "-n", subject_namespace,
                                   f"{contract.SIDECAR_CONTAINER_NAME}=evil.example/sidekey:0.1.0")
        _denied(answer, "evil.example/sidekey:0.1.0", "allow-list")

    def test_changing_the_agent_image_of_a_running_pod_is_admitted(
            self, cluster: Any, subject_namespace: str) -> None:
        assert admission.create(cluster, manifests.injected_pod(subject_namespace, "upgraded")).admitted
        answer = admission.kubectl(cluster, "set", "image", "pod/upgraded", "-n", subject_namespace,
                                   "agent=example.invalid/agent:2")
        assert answer.admitted, answer.message

    def test_a_pod_that_predates_its_policy_can_still_be_labelled(
            self, cluster: Any, guards: str, namespace: str) -> None:
        assert admission.apply(cluster, manifests.service_account(namespace, "agent")).admitted
        assert admission.create(cluster, manifests.bare_pod(namespace, "old")).admitted
        for obj in (manifests.secret(namespace), manifests.agent_policy(namespace)):
            assert admission.apply(cluster, obj).admitted
        assert not admission.wait_until_enforced(cluster, manifests.bare_pod(namespace, "probe")).admitted
        answer = admission.kubectl(cluster, "label", "pod", "old", "-n", namespace, "moved=yes")
        assert answer.admitted, answer.message


class TestPodsOutsideThePoliciesAreUnaffected:
    def test_a_pod_whose_account_is_not_a_subject_is_admitted_bare(
            self, cluster: Any, subject_namespace: str) -> None:
        answer = admission.create(cluster, manifests.bare_pod(subject_namespace, "bystander", sa="bystander"))
        assert answer.admitted, answer.message

    def test_a_subject_named_in_another_namespace_is_not_a_subject_here(
            self, cluster: Any, subject_namespace: str, guards: str) -> None:
        from tests.support.namespaces import make_namespace

        other = make_namespace(cluster, "sk-other")
        try:
            assert admission.apply(cluster, manifests.service_account(other, "agent")).admitted
            answer = admission.create(cluster, manifests.bare_pod(other, "bare"))
            assert answer.admitted, answer.message
        finally:
            cluster.kubectl("delete", "namespace", other, "--wait=false")

    def test_pods_of_the_system_namespaces_are_never_checked(self, cluster: Any, guards: str) -> None:
        """They must start even if the AgentPolicy CRD goes away, and are never injected."""
        for obj in (manifests.secret("kube-system", "sk-test-key"),
                    manifests.agent_policy("kube-system", "sk-test", subjects=["default"],
                                           secret_name="sk-test-key")):
            assert admission.apply(cluster, obj).admitted
        try:
            time.sleep(2)  # give the apiserver time to see the param, were it to apply
            answer = admission.create(cluster, manifests.bare_pod("kube-system", "sk-test", sa="default"), dry_run=True)
            assert answer.admitted, answer.message
        finally:
            cluster.kubectl("-n", "kube-system", "delete", "agentpolicy/sk-test", "secret/sk-test-key")

    def test_the_guards_type_check_without_warnings(self, cluster: Any, guards: str) -> None:
        policies = json.loads(cluster.kubectl("get", "validatingadmissionpolicies", "-o", "json"))["items"]
        ours = [p for p in policies if p["metadata"]["name"].endswith("-guard")]
        assert {p["metadata"]["name"] for p in ours} == {"sidekey-bypass-guard", "sidekey-escalation-guard"}
        for policy in ours:
            warnings = policy.get("status", {}).get("typeChecking", {}).get("expressionWarnings", [])
            assert warnings == [], warnings
