"""A node leaves the host exactly as it found it.

The kubelet, containerd, the CNI plugins and kube-proxy change the host
(sysctls, iptables chains for IPv4 and IPv6, kubepods cgroups, overlay and
netns mounts, tmpfs volumes, paths such as /var/lib/kubelet); teardown must
put every one back. This test brings up a node of its own, runs a pod with a
projected token and a Service behind it, shows that the host did change, and
compares the host after teardown with the host before. It runs before the
session's node starts (tests/node/conftest.py orders it first): one node per
machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.node import pods
from tests.node.conftest import LOCK_WAIT

pytestmark = [pytest.mark.e2e, pytest.mark.node]


def _snapshot(node_mod: Any, bin_dir: Any) -> Any:
    from sidekey.localcluster import hoststate

    return hoststate.snapshot(state_dir=node_mod.STATE_DIR, bridge=node_mod.BRIDGE, bin_dirs=[bin_dir])


def test_teardown_restores_sysctls_netfilter_mounts_cgroups_paths_and_processes() -> None:
    from sidekey.localcluster import binaries, node

    bin_dir = binaries.find_node().directory
    cluster = node.NodeCluster(lock_wait=LOCK_WAIT)
    try:
        cluster.start()
    except (node.NodeUnavailable, binaries.BinariesUnavailable, node.ControlPlaneError) as exc:
        pytest.fail(f"no node for the node tests: {exc}", pytrace=False)
    # The host as the node found it once it held the machine's lock (another
    # session's node may have been up until then).
    before = cluster.host_before
    assert before is not None
    try:
        ns = "host-check"
        pods.apply(cluster, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        pods.apply(cluster, {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": ns, "labels": {"app": "p"}},
            "spec": {"containers": [{"name": "pause", "image": node.PAUSE_IMAGE, "imagePullPolicy": "Never"}],
                     "serviceAccountName": "default", "automountServiceAccountToken": True}})
        pods.apply(cluster, {
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "p", "namespace": ns},
            "spec": {"selector": {"app": "p"}, "ports": [{"port": 80}]}})
        pods.wait_for_phase(cluster, ns, "p", {"Running"}, timeout=90)
        during = _snapshot(node, bin_dir)
    finally:
        cluster.stop()
    after = cluster.host_after  # taken before the lock went (another session may start a node next)
    assert after is not None

    # The node really changed the host (so the comparison below can fail) ...
    changed = "\n".join(before.differences(during))
    for what in ("sysctls[kernel.panic]", "netfilter[iptables-save]", "netfilter[ip6tables-save]",
                 "cgroups[", "mounts", "paths[/var/lib/kubelet]", "processes", "links"):
        assert what in changed, f"expected the running node to change {what}; it changed:\n{changed}"
    # ... and teardown put all of it back.
    assert before.differences(after) == []


# A node whose owner dies by SIGKILL cannot tear down: its children get
# SIGTERM (they die with their parent) but containers and their shims stay,
# and every host setting stays changed. The next node start finds the record
# of the host it left behind and restores it first.
CRASHING_OWNER = """
import time
from sidekey.localcluster import node
c = node.NodeCluster(lock_wait=900)
c.start()
c.kubectl("run", "p", "--image=" + node.PAUSE_IMAGE, "--image-pull-policy=Never", "--restart=Never")
c.kubectl("wait", "--for=condition=Ready", "--timeout=90s", "pod/p")
print("up", flush=True)
time.sleep(600)
"""


def test_the_next_node_restores_what_a_killed_one_left_behind() -> None:
    import signal
    import subprocess
    import sys

    from sidekey.localcluster import binaries, hoststate, node

    bin_dir = binaries.find_node().directory
    owner = subprocess.Popen([sys.executable, "-c", CRASHING_OWNER], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        line = owner.stdout.readline()
        assert line.strip() == "up", (line, owner.stderr.read() if owner.poll() is not None else "")
        before = hoststate.HostState.from_json(node.HOST_RECORD.read_text())  # what the owner found
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait(30)
    left = _snapshot(node, bin_dir)
    orphans = [pid for pid, exe in hoststate.node_processes([bin_dir]) if exe.endswith("containerd-shim-runc-v2")]
    assert node.HOST_RECORD.exists()
    assert orphans, left.processes  # the pod's shim outlived its containerd
    assert left.differences(before)

    cluster = node.NodeCluster(lock_wait=LOCK_WAIT)
    try:
        cluster.start()  # recovers first: kills the orphans, restores the host, then starts afresh
        assert not [pid for pid in orphans if Path(f"/proc/{pid}").exists()]
    finally:
        cluster.stop()
    assert cluster.host_after is not None
    assert before.differences(cluster.host_after) == []
