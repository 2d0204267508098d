"""The kopf handlers: kopf watches, these functions route each event.

Every handler is ``async``: kopf runs plain functions in a thread pool, and
these touch the asyncio queue, which is not thread-safe. Only
event-watching and indexing handlers are used. They keep no state in the
watched objects (no annotations, no status.kopf) and, unlike kopf's timers,
daemons and deletion handlers, never put a finalizer on anything, so an
uninstall can never leave AgentPolicies or namespaces stuck. The work itself
happens in the controller's keyed queue, which retries with backoff.

Watched:
- AgentPolicies: indexed by namespace (kopf fills the index before any
  handler runs), and every change reconciles the policy and its neighbours;
- Secrets: a change to one a policy names reconciles that policy, and so
  does a legacy token Secret of a subject account; a change to the webhook's
  TLS or CA Secret re-checks TLS;
- Roles and RoleBindings the operator manages: an edit is reverted;
- the MutatingWebhookConfiguration: its caBundle is (re)set;
- Pods and labelled Namespaces: opted-in pods without a sidecar are reported,
  and a subject's pod holding an API token outside the sidecar (or such a pod
  going away) reconciles the policies whose grant it holds back.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import kopf

from sidekey.core import contract
from sidekey.operator import controller, login, pods, webhook_tls
from sidekey.operator.options import Options

log = logging.getLogger(__name__)
POLICY_INDEX = "sidekey_policies"
NAMESPACE_INDEX = "sidekey_injected_namespaces"
MANAGED = {contract.LABEL_MANAGED_BY: contract.MANAGED_BY}


def register(registry: kopf.OperatorRegistry, opts: Options, ctl: controller.Controller,
             reporter: pods.PodReporter, tls: webhook_tls.TlsManager | None) -> None:
    """Register every handler on ``registry`` (never kopf's global default registry)."""

    @kopf.on.login(registry=registry, id="login")
    async def _login(**_: Any) -> kopf.ConnectionInfo:
        return login.connection_info(opts.kubeconfig)

    @kopf.on.startup(registry=registry, id="startup")
    async def _startup(**kwargs: Any) -> None:
        ctl.attach(kwargs[POLICY_INDEX])

    @kopf.index(contract.GROUP, contract.VERSION, contract.PLURAL, registry=registry,
                id=POLICY_INDEX)
    async def _index_policy(namespace: str | None, body: kopf.Body, **_: Any) -> dict[str, Any]:
        return {str(namespace): controller.snapshot(body)}

    @kopf.on.event(contract.GROUP, contract.VERSION, contract.PLURAL, registry=registry,
                   id="policy")
    async def _policy(type: str, namespace: str | None, name: str, **_: Any) -> None:
        ctl.policy_changed(str(namespace), name, deleted=type == "DELETED")

    @kopf.on.event("", "v1", "secrets", registry=registry, id="secret")
    async def _secret(type: str, namespace: str | None, name: str, body: kopf.Body,
                      **_: Any) -> None:
        namespace = str(namespace)
        if tls is not None and namespace == opts.namespace and name in (opts.tls_secret,
                                                                          opts.ca_secret):
            tls.request()
        ctl.secret_changed(namespace, name, body, deleted=type == "DELETED")

    @kopf.on.event("rbac.authorization.k8s.io", "v1", "roles", registry=registry,
                   labels=MANAGED, id="role")
    async def _role(namespace: str | None, labels: Mapping[str, str], **_: Any) -> None:
        ctl.role_changed(str(namespace), labels)

    @kopf.on.event("rbac.authorization.k8s.io", "v1", "rolebindings", registry=registry,
                   labels=MANAGED, id="rolebinding")
    async def _role_binding(namespace: str | None, labels: Mapping[str, str], **_: Any) -> None:
        ctl.role_changed(str(namespace), labels)

    if tls is not None:
        @kopf.on.event("admissionregistration.k8s.io", "v1", "mutatingwebhookconfigurations",
                       registry=registry, id="webhookconfiguration",
                       when=lambda name, **_: name == opts.webhook_configuration)
        async def _webhook_configuration(type: str, **_: Any) -> None:
            if type != "DELETED":
                tls.request()

    @kopf.on.event("", "v1", "namespaces", registry=registry, id="namespace")
    async def _namespace(**_: Any) -> None:
        # kopf runs no handler before every index is filled, and some namespace
        # always exists: the first call proves the operator is really handling.
        if not ctl.handling.is_set():
            ctl.handling.set()

    @kopf.index("", "v1", "namespaces", registry=registry, id=NAMESPACE_INDEX,
                labels={contract.LABEL_INJECT: contract.LABEL_INJECT_ENABLED})
    async def _index_namespace(name: str, **_: Any) -> dict[str, bool]:
        return {name: True}

    @kopf.on.event("", "v1", "pods", registry=registry, id="pod")
    async def _pod(type: str, body: kopf.Body, uid: str, **kwargs: Any) -> None:
        ctl.pod_changed(body, deleted=type == "DELETED")
        if type == "DELETED":
            reporter.forget(uid)
            return
        await reporter.observe(body, kwargs[NAMESPACE_INDEX])
