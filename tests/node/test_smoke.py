"""A bare pod on the real node: a local image runs to Succeeded, and its logs come back.

The image is a static program imported into the node's containerd (nothing
is pulled). ``kubectl logs`` goes apiserver -> kubelet by the node's
InternalIP; while it runs, a DNS watch checks that no query for the node's
name leaves the machine (the apiserver resolving it through the host's
resolver was a real leak, see localcluster/node.py).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from tests.node import dnswatch, pods

pytestmark = [pytest.mark.e2e, pytest.mark.node]

HELLO = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) {
    printf("hello from a real pod, uid %d gid %d\n", (int)getuid(), (int)getgid());
    return 0;
}
"""


@pytest.fixture(scope="module")
def hello_image(node_cluster: Any) -> str:
    return pods.static_image(node_cluster, "sidekey.test/hello:1", HELLO)


def _bare_pod(namespace: str, name: str, image: str, policy: str = "Never") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace},
            "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False,
                     "containers": [{"name": "app", "image": image, "imagePullPolicy": policy}]}}


def test_the_node_is_ready_untainted_and_known_by_its_internal_ip(node_cluster: Any) -> None:
    node = node_cluster.request("GET", f"/api/v1/nodes/{node_cluster.node_name}")
    ready = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    assert not node["spec"].get("taints")
    addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
    assert addresses["InternalIP"] == "10.244.0.1"
    assert node["status"]["nodeInfo"]["kubeletVersion"] == "v1.36.3"
    assert node["status"]["nodeInfo"]["containerRuntimeVersion"] == "containerd://2.4.2"


def test_a_bare_pod_with_a_local_image_runs_to_succeeded_and_its_logs_come_back(
    node_cluster: Any, node_namespace: str, hello_image: str
) -> None:
    began = time.monotonic()
    pods.apply(node_cluster, _bare_pod(node_namespace, "hello", hello_image))
    pod = pods.wait_for_phase(node_cluster, node_namespace, "hello", {"Succeeded", "Failed"})
    took = time.monotonic() - began
    assert pod["status"]["phase"] == "Succeeded", pod["status"]
    assert pod["spec"]["nodeName"] == node_cluster.node_name  # placed by the real scheduler
    assert pod["status"]["podIP"].startswith("10.244.0.")
    print(f"pod ran to Succeeded in {took:.1f}s")

    node_name = node_cluster.node_name
    with dnswatch.watching() as watch:
        logs = node_cluster.kubectl("logs", "-n", node_namespace, "hello")
        dnswatch.probe_loopback(f"probe-{uuid.uuid4().hex[:6]}.sidekey-dnswatch.test")
        seen_probe = watch.wait_for(".sidekey-dnswatch.test")
    # The image says User 65532:65532, but the kubelet passes only the UID on
    # (the CRI's image status carries no group) and the image has no
    # /etc/group: the group is 0 unless the pod sets runAsGroup.
    assert logs.strip() == "hello from a real pod, uid 65532 gid 0"
    assert seen_probe, "the DNS watch saw not even its own probe"
    leaked = [q for q in watch.queries if node_name in q.name or "cluster.local" in q.name]
    assert not leaked, f"DNS queries for the node's names left through the host resolver: {leaked}"


def test_a_missing_image_is_never_pulled(node_cluster: Any, node_namespace: str) -> None:
    pods.apply(node_cluster, _bare_pod(node_namespace, "never", "sidekey.test/absent:1"))
    deadline = time.monotonic() + 30
    reason = ""
    while time.monotonic() < deadline and reason != "ErrImageNeverPull":
        status = pods.get(node_cluster, node_namespace, "never").get("status", {})
        waiting = [c["state"].get("waiting", {}) for c in status.get("containerStatuses", [])]
        reason = waiting[0].get("reason", "") if waiting else ""
        time.sleep(0.2)
    assert reason == "ErrImageNeverPull"


def test_a_pull_goes_nowhere_but_a_closed_loopback_port(node_cluster: Any, node_namespace: str) -> None:
    """A pod that asks for a pull (IfNotPresent, image absent) gets no DNS query out of the machine."""
    with dnswatch.watching() as watch:
        pods.apply(node_cluster, _bare_pod(node_namespace, "pull", "registry.example.org/absent:1", "IfNotPresent"))
        deadline = time.monotonic() + 30
        message = ""
        while time.monotonic() < deadline and "127.0.0.1:9" not in message:
            status = pods.get(node_cluster, node_namespace, "pull").get("status", {})
            waiting = [c["state"].get("waiting", {}) for c in status.get("containerStatuses", [])]
            message = waiting[0].get("message", "") if waiting else ""
            time.sleep(0.2)
        dnswatch.probe_loopback(f"probe-{uuid.uuid4().hex[:6]}.sidekey-dnswatch.test")
        assert watch.wait_for(".sidekey-dnswatch.test"), "the DNS watch saw not even its own probe"
    assert "127.0.0.1:9" in message, message
    assert not [q for q in watch.queries if "example.org" in q.name], watch.queries


def test_the_node_sent_nothing_the_egress_guard_had_to_refuse(node_cluster: Any) -> None:
    """Every packet a node process sent went to loopback, the bridge or a Service (see NODE_CGROUP)."""
    assert node_cluster.rejected_egress() == 0
