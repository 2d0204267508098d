"""The least-privilege Role and RoleBinding each AgentPolicy gets.

The sidecar of a subject's pod reads, with the pod's own API token, exactly
the Secrets its policies name and the AgentPolicies of its namespace. Nothing
else: ``resourceNames`` pins the Secrets (list and watch then work only with a
``metadata.name`` field selector, which is what the sidecar uses). The owner
reference lets the controller-manager's garbage collector remove both objects
when the policy goes, so the operator needs no finalizer.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

from sidekey.core import contract, llmledger, policies
from sidekey.operator import kubeobjects

RBAC_API_VERSION = "rbac.authorization.k8s.io/v1"
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


def object_name(policy_name: str) -> str:
    """The Role's and RoleBinding's name: ``sidekey-policy-<policy>``, shortened
    with a hash when a long policy name would pass the 253-character limit."""
    name = f"sidekey-policy-{policy_name}"
    if len(name) <= 253:
        return name
    digest = hashlib.sha256(policy_name.encode()).hexdigest()[:10]
    return f"{name[:242]}-{digest}"


def label_value(policy_name: str) -> str:
    """A label value naming the policy (labels stop at 63 characters)."""
    if len(policy_name) <= 63 and _LABEL_VALUE.match(policy_name):
        return policy_name
    digest = hashlib.sha256(policy_name.encode()).hexdigest()[:10]
    return f"{policy_name[:52].rstrip('-.')}-{digest}"


def owner_reference(policy: policies.AgentPolicy) -> kubeobjects.OwnerReference:
    return kubeobjects.OwnerReference(
        apiVersion=contract.API_VERSION, kind=contract.KIND,
        name=policy.name, uid=policy.uid, controller=True,
    )


def _metadata(policy: policies.AgentPolicy) -> kubeobjects.ObjectMeta:
    return kubeobjects.ObjectMeta(
        name=object_name(policy.name),
        namespace=policy.namespace,
        labels={contract.LABEL_MANAGED_BY: contract.MANAGED_BY,
                contract.LABEL_POLICY: label_value(policy.name)},
        ownerReferences=[owner_reference(policy)],
    )


def role(policy: policies.AgentPolicy) -> kubeobjects.Role:
    return kubeobjects.Role(
        apiVersion=RBAC_API_VERSION, kind="Role", metadata=_metadata(policy),
        rules=[
            kubeobjects.PolicyRule(apiGroups=[""], resources=["secrets"],
                                   resourceNames=sorted(policy.secret_names),
                                   verbs=["get", "list", "watch"]),
            kubeobjects.PolicyRule(apiGroups=[contract.GROUP], resources=[contract.PLURAL],
                                   verbs=["get", "list", "watch"]),
            # the ledger Leases of serviceAccount token budgets (core/llmledger.py)
            *([kubeobjects.PolicyRule(apiGroups=["coordination.k8s.io"], resources=["leases"],
                                      resourceNames=names, verbs=["get", "update"])]
              if (names := sorted(p.name for p in llmledger.places(policy))) else []),
        ],
    )


def role_binding(policy: policies.AgentPolicy, granted: Iterable[str] | None = None
                 ) -> kubeobjects.RoleBinding:
    """The binding of ``granted`` (default: every subject account) to the policy's Role.

    Accounts whose grant is held back (``verdicts.hold``) are left out; with all
    of them held the binding names no subject and grants nothing.
    """
    accounts = policy.service_accounts if granted is None else granted
    return kubeobjects.RoleBinding(
        apiVersion=RBAC_API_VERSION, kind="RoleBinding", metadata=_metadata(policy),
        subjects=[kubeobjects.Subject(kind="ServiceAccount", name=sa, namespace=policy.namespace)
                  for sa in sorted(accounts)],
        roleRef=kubeobjects.RoleRef(apiGroup="rbac.authorization.k8s.io", kind="Role",
                                    name=object_name(policy.name)),
    )


def owned_by(obj: Mapping[str, Any], policy_uid: str) -> bool:
    """True when ``obj`` (as served) is controlled by the policy with this uid."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(isinstance(r, Mapping) and r.get("uid") == policy_uid and r.get("controller")
               for r in refs)


def _norm_rules(rules: Any) -> list[dict[str, list[str]]]:
    out = []
    for r in rules or []:
        if isinstance(r, Mapping):
            out.append({k: sorted(r.get(k) or []) for k in
                        ("apiGroups", "resources", "resourceNames", "verbs", "nonResourceURLs")})
    return out


def role_matches(current: Mapping[str, Any], wanted: kubeobjects.Role) -> bool:
    """True when the served Role already grants exactly what is wanted."""
    return (_norm_rules(current.get("rules")) == _norm_rules(wanted["rules"])
            and _meta_matches(current, wanted["metadata"]))


def binding_matches(current: Mapping[str, Any], wanted: kubeobjects.RoleBinding) -> bool:
    subjects = sorted(
        (str(s.get("kind")), str(s.get("name")), str(s.get("namespace")))
        for s in current.get("subjects") or [] if isinstance(s, Mapping)
    )
    want = sorted((s["kind"], s["name"], s["namespace"]) for s in wanted["subjects"])
    return subjects == want and _meta_matches(current, wanted["metadata"])


def _meta_matches(current: Mapping[str, Any], wanted: kubeobjects.ObjectMeta) -> bool:
    meta = current.get("metadata") or {}
    labels = meta.get("labels") or {}
    return all(labels.get(k) == v for k, v in wanted.get("labels", {}).items())


def role_ref_matches(current: Mapping[str, Any], wanted: kubeobjects.RoleBinding) -> bool:
    """roleRef is immutable: a binding pointing elsewhere must be recreated."""
    ref = current.get("roleRef") or {}
    return bool(ref.get("kind") == "Role" and ref.get("name") == wanted["roleRef"]["name"])
