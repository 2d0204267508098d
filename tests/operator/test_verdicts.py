"""What a policy's status says, computed without a cluster."""

from __future__ import annotations

import base64
import datetime
from typing import Any

from sidekey.core import policies
from sidekey.operator import conditions, controller, exposure, kubeobjects, verdicts
from tests.operator.support import policy


def _raw(name: str = "p", created: str = "2026-01-01T00:00:00Z", **kw: Any) -> dict[str, Any]:
    m = policy(name, "team", **kw)
    m["metadata"].update(uid=f"uid-{name}", generation=2, creationTimestamp=created)
    return m


def _parsed(name: str = "p", **kw: Any) -> policies.AgentPolicy:
    return policies.parse(_raw(name, **kw))


def _keys(name: str, present: set[str] = frozenset(), empty: set[str] = frozenset()  # type: ignore[assignment]
          ) -> kubeobjects.SecretKeys:
    return kubeobjects.SecretKeys(name, frozenset(present), frozenset(empty))


# --- Secrets -------------------------------------------------------------------------------


def test_all_keys_present_resolves() -> None:
    c = verdicts.secrets_resolved(_parsed(), {"openai": _keys("openai", {"api-key"})})
    assert (c.type, c.status, c.reason) == ("SecretsResolved", "True", "Resolved")


def test_a_missing_secret_names_the_secret_the_key_and_the_field() -> None:
    c = verdicts.secrets_resolved(_parsed(), {"openai": verdicts.Missing("openai")})
    assert (c.status, c.reason) == ("False", "SecretNotFound")
    assert "'openai'" in c.message and "spec.upstreams[0]" in c.message and "'api-key'" in c.message


def test_a_missing_key_and_an_empty_key_have_their_own_reasons() -> None:
    c = verdicts.secrets_resolved(_parsed(), {"openai": _keys("openai", {"other"})})
    assert (c.status, c.reason) == ("False", "KeyNotFound")
    c = verdicts.secrets_resolved(_parsed(), {"openai": _keys("openai", set(), {"api-key"})})
    assert (c.status, c.reason) == ("False", "KeyEmpty")


def test_an_unreadable_secret_is_unknown_not_false() -> None:
    c = verdicts.secrets_resolved(_parsed(), {"openai": verdicts.Unreadable("openai", "forbidden")})
    assert (c.status, c.reason) == ("Unknown", "SecretUnreadable")


def test_secret_keys_keep_only_names_and_never_values() -> None:
    served = {"data": {"api-key": base64.b64encode(b"sk-secret").decode(), "empty": "",
                       "broken": "not base64!"}}
    keys = controller.secret_keys("s", served)
    assert keys.present == {"api-key"} and keys.empty == {"empty", "broken"}
    assert "sk-secret" not in repr(keys)


# --- Ready -----------------------------------------------------------------------------------


def test_ready_needs_no_conflict_resolved_secrets_and_rbac() -> None:
    p = _parsed()
    ok = conditions.Wanted("SecretsResolved", "True", "Resolved", "fine")
    assert verdicts.judge(p, [], ok, None).ready.status == "True"
    bad = conditions.Wanted("SecretsResolved", "False", "SecretNotFound", "no secret")
    assert verdicts.judge(p, [], bad, None).ready.reason == "SecretsUnresolved"
    assert verdicts.judge(p, [], ok, ("RBACFailed", "denied")).ready.reason == "RBACFailed"


def test_the_newer_policy_loses_and_names_the_older_one() -> None:
    older = _raw("older", "2026-01-01T00:00:00Z")
    newer = _parsed("newer", env="OTHER")
    lost = verdicts.conflicts(policies.parse(_raw("newer", "2026-02-01T00:00:00Z", env="OTHER")),
                              [older, _raw("newer", "2026-02-01T00:00:00Z", env="OTHER")])
    assert len(lost) == 1 and lost[0].winner.name == "older"
    ok = conditions.Wanted("SecretsResolved", "True", "Resolved", "fine")
    verdict = verdicts.judge(newer, lost, ok, None)
    assert (verdict.ready.status, verdict.ready.reason) == ("False", "Conflict")
    assert "'older'" in verdict.ready.message
    assert verdict.grants  # its other upstreams still work
    # the older one has no conflict
    assert verdicts.conflicts(policies.parse(older), [older, _raw("newer", "2026-02-01T00:00:00Z")]) == []


def test_an_invalid_neighbour_cannot_win_a_conflict() -> None:
    broken = _raw("broken", "2025-01-01T00:00:00Z")
    broken["spec"]["upstreams"][0]["url"] = "http://insecure.example"
    assert verdicts.conflicts(_parsed("p"), [broken]) == []


def test_an_invalid_policy_grants_nothing_and_says_what_to_fix() -> None:
    raw = _raw()
    raw["spec"]["upstreams"][0]["url"] = "https://x.example:99999"
    error = verdicts.parse(raw)
    assert isinstance(error, policies.PolicyError)
    v = verdicts.invalid(raw, error)
    assert not v.grants and v.policy is None and v.upstream_count == 1
    assert v.ready.reason == "InvalidSpec" and v.ready.message.startswith("spec.upstreams[0].url: ")


def test_referenced_secrets_are_found_even_in_an_invalid_spec() -> None:
    raw = _raw()
    raw["spec"]["upstreams"].append({"auth": {"secretRef": {"name": "second"}}})
    raw["spec"]["upstreams"].append("garbage")
    assert controller.referenced_secrets(raw) == {"openai", "second"}
    assert controller.referenced_secrets({"spec": None}) == set()


# --- conditions ---------------------------------------------------------------------------


def test_the_transition_time_moves_only_when_the_status_changes() -> None:
    old = conditions.merge({}, [conditions.Wanted("Ready", "False", "A", "a")], 1, "T1")
    kept = conditions.merge({c["type"]: c for c in old},
                            [conditions.Wanted("Ready", "False", "B", "b")], 2, "T2")
    assert kept[0]["lastTransitionTime"] == "T1" and kept[0]["reason"] == "B"
    assert kept[0]["observedGeneration"] == 2
    moved = conditions.merge({c["type"]: c for c in kept},
                             [conditions.Wanted("Ready", "True", "Ready", "ok")], 2, "T3")
    assert moved[0]["lastTransitionTime"] == "T3"
    assert conditions.same(moved, {c["type"]: c for c in moved})
    assert not conditions.same(moved, {c["type"]: c for c in kept})


def test_malformed_existing_conditions_are_ignored() -> None:
    found = conditions.existing({"conditions": [{"type": "Ready", "status": "Maybe"}, "junk", {}]})
    assert list(found) == ["Ready"] and found["Ready"]["status"] == "Unknown"
    assert conditions.existing(None) == {}


def test_problems_nothing_announces_are_looked_at_again() -> None:
    p = _parsed()
    ok = conditions.Wanted("SecretsResolved", "True", "Resolved", "fine")
    unknown = conditions.Wanted("SecretsResolved", "Unknown", "SecretUnreadable", "forbidden")
    missing = conditions.Wanted("SecretsResolved", "False", "SecretNotFound", "no secret")
    assert not verdicts.judge(p, [], ok, None).retry
    assert not verdicts.judge(p, [], missing, None).retry  # the Secret watch announces it
    assert verdicts.judge(p, [], unknown, None).retry
    assert verdicts.judge(p, [], ok, ("RoleConflict", "someone else's Role")).retry


# --- pods that predate the grant ----------------------------------------------------------


def _exposed(name: str, account: str = "agent") -> exposure.ExposedPod:
    return exposure.ExposedPod("team", name, f"uid-{name}", account, "agent", "kube-api-access-x")


def test_an_account_with_an_exposed_pod_is_held_back_and_the_condition_names_the_pod() -> None:
    p = _parsed(service_accounts=("agent", "late"))
    held = verdicts.hold(p, {"late": [_exposed("bare", "late")]})
    assert held.granted == {"agent"}
    c = held.condition
    assert (c.type, c.status, c.reason) == ("SubjectsGranted", "False", "UninjectedPods")
    assert "late" in c.message and "bare" in c.message and "'kube-api-access-x'" in c.message
    ok = verdicts.secrets_resolved(p, {"openai": _keys("openai", {"api-key"})})
    verdict = verdicts.judge(p, [], ok, None, held)
    assert (verdict.ready.status, verdict.ready.reason) == ("False", "GrantHeld")
    assert verdict.granted == {"agent"} and [x.name for x in verdict.held_pods] == ["bare"]


def test_without_exposed_pods_every_account_is_granted() -> None:
    p = _parsed(service_accounts=("agent", "late"))
    held = verdicts.hold(p, {})
    assert held.granted == {"agent", "late"} and held.condition.status == "True"


def test_the_held_pods_named_are_bounded() -> None:
    p = _parsed(service_accounts=("agent",))
    held = verdicts.hold(p, {"agent": [_exposed(f"pod-{i:02}") for i in range(40)]})
    message = held.condition.message
    assert "pod-00" in message and f"pod-{verdicts.MAX_PODS_NAMED - 1:02}" in message
    assert f"pod-{verdicts.MAX_PODS_NAMED:02}" not in message
    assert f"and {40 - verdicts.MAX_PODS_NAMED} more" in message
    assert len(held.pods) == 40  # all of them are still counted


def test_a_policy_naming_default_gets_a_warning_condition() -> None:
    p = _parsed(service_accounts=("default",))
    ok = verdicts.secrets_resolved(p, {"openai": _keys("openai", {"api-key"})})
    wanted = {w.type: w for w in verdicts.judge(p, [], ok, None).wanted}
    warning = wanted["DefaultSubject"]
    assert (warning.status, warning.reason) == ("True", "DefaultServiceAccount")
    assert "'default'" in warning.message and "serviceAccountName" in warning.message
    other = _parsed(service_accounts=("agent",))
    assert "DefaultSubject" not in {w.type for w in verdicts.judge(other, [], ok, None).wanted}


# --- after an operator restart ---------------------------------------------------------------


def test_after_a_restart_only_accounts_not_bound_yet_wait_and_the_condition_says_until_when() -> None:
    p = _parsed(service_accounts=("agent", "late", "new"))
    wait = verdicts.RestartWait(bound=frozenset({"agent"}), until="2026-12-01T22:40:05Z")
    held = verdicts.hold(p, {}, wait)
    assert held.granted == {"agent"} and held.waiting == {"late", "new"} and held.pods == ()
    c = held.condition
    assert (c.type, c.status, c.reason) == ("SubjectsGranted", "False", "OperatorRestarted")
    assert "late, new" in c.message and "until 2026-12-01T22:40:05Z" in c.message
    assert "restarted" in c.message
    ok = verdicts.secrets_resolved(p, {"openai": _keys("openai", {"api-key"})})
    verdict = verdicts.judge(p, [], ok, None, held)
    assert (verdict.ready.status, verdict.ready.reason) == ("False", "GrantHeld")
    assert verdict.ready.message == c.message
    assert verdict.granted == {"agent"} and verdict.waiting == {"late", "new"}
    # every account bound already: a restart takes nothing away, and says nothing
    every = verdicts.hold(p, {}, verdicts.RestartWait(frozenset({"agent", "late", "new"}), "x"))
    assert every.granted == {"agent", "late", "new"} and every.condition.status == "True"


def test_after_a_restart_a_held_pod_still_names_itself_and_the_wait_is_added() -> None:
    p = _parsed(service_accounts=("agent", "late", "new"))
    held = verdicts.hold(p, {"late": [_exposed("bare", "late")]},
                         verdicts.RestartWait(frozenset({"agent"}), "2026-12-01T22:40:05Z"))
    assert held.granted == {"agent"} and held.waiting == {"new"}  # late is held by its pod
    c = held.condition
    assert c.reason == "UninjectedPods" and "bare" in c.message
    assert "service account new waits until 2026-12-01T22:40:05Z" in c.message


def test_only_a_policy_an_operator_reconciled_before_gets_the_restart_grace() -> None:
    assert not verdicts.reconciled_before(_raw(), has_binding=False)  # new: grants at once
    assert verdicts.reconciled_before(_raw(), has_binding=True)
    status = {"conditions": [{"type": "Ready", "status": "False", "reason": "GrantHeld"}]}
    assert verdicts.reconciled_before({**_raw(), "status": status}, has_binding=False)
    assert not verdicts.reconciled_before({**_raw(), "status": {"conditions": "junk"}}, has_binding=False)


def test_the_end_of_a_wait_is_named_rounded_up_to_the_second() -> None:
    before = datetime.datetime.now(datetime.UTC)
    named = datetime.datetime.strptime(conditions.rfc3339_in(15.0), "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=datetime.UTC)
    assert before + datetime.timedelta(seconds=15) <= named  # truncating would name a moment before
    assert named <= before + datetime.timedelta(seconds=17)


def test_a_namespace_wide_wait_says_the_operator_could_not_tell_the_pods_that_went_apart() -> None:
    p = _parsed(service_accounts=("agent", "late"))
    wait = verdicts.RestartWait(frozenset({"agent"}), "2026-12-01T22:40:05Z",
                                reason=verdicts.TOO_MANY_PODS_GONE)
    held = verdicts.hold(p, {}, wait)
    c = held.condition
    assert (c.status, c.reason) == ("False", "TooManyPodsGone") and held.waiting == {"late"}
    assert "service account late waits until 2026-12-01T22:40:05Z" in c.message
    assert "deleted in this namespace" in c.message and "restarted" not in c.message


def test_a_pod_that_went_is_named_as_deleted() -> None:
    p = _parsed(service_accounts=("agent", "late"))
    gone = exposure.ExposedPod("team", "copied", "u9", "late", "agent", "kube-api-access-x",
                               deleted=True)
    held = verdicts.hold(p, {"late": [gone]})
    assert held.granted == {"agent"} and held.condition.reason == "UninjectedPods"
    assert "pod copied (deleted; the apiserver may accept its token" in held.condition.message
