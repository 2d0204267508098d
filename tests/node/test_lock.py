"""One node per machine: a second one fails at once and says who holds the machine."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.node]

SECOND_NODE = """
from sidekey.localcluster import node
try:
    node.NodeCluster().start()
except node.NodeBusy as exc:
    print(exc)
    raise SystemExit(3)
raise SystemExit("a second node started")
"""


def test_a_second_node_from_another_process_is_refused_naming_the_holder(node_cluster: Any) -> None:
    proc = subprocess.run([sys.executable, "-c", SECOND_NODE], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "another sidekey node is up on this machine" in proc.stdout
    assert f"pid {os.getpid()}" in proc.stdout  # the holder, so one can tell whose it is
    # ... and the refused attempt changed nothing of the running node.
    assert node_cluster.request("GET", f"/api/v1/nodes/{node_cluster.node_name}")["metadata"]["name"]


def test_a_second_node_in_the_same_process_is_refused_at_once(node_cluster: Any) -> None:
    from sidekey.localcluster import node

    with pytest.raises(node.NodeBusy, match="this process already runs a node"):
        node.NodeCluster(lock_wait=600).start()
