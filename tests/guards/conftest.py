"""The guards, installed from the chart's own rendering for the guard tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.guards import admission, manifests


@pytest.fixture(scope="package")
def guards(cluster: Any, crds: list[str]) -> Iterator[str]:
    """Both guards, applied from ``helm template`` output, removed after the package."""
    text = admission.install_guards(cluster)
    try:
        yield text
    finally:
        admission.remove_guards(cluster, text)


@pytest.fixture
def subject_namespace(cluster: Any, guards: str, namespace: str) -> str:
    """A namespace with a subject account ``agent``, its Secret and an AgentPolicy naming both.

    Returns once the bypass guard is enforced there (the apiserver loads policies
    and params asynchronously).
    """
    for obj in (manifests.service_account(namespace, "agent"),
                manifests.service_account(namespace, "bystander"),
                manifests.secret(namespace), manifests.agent_policy(namespace)):
        answer = admission.apply(cluster, obj)
        assert answer.admitted, answer.message
    probe = manifests.bare_pod(namespace, "probe")
    answer = admission.wait_until_enforced(cluster, probe)
    assert not answer.admitted, "the bypass guard did not take effect within 30 s"
    return namespace

