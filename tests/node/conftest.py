"""The real node, for the test modules that need pods to run (marker ``node``).

A module opts in by asking for ``node_cluster`` (and marking itself
``pytestmark = [pytest.mark.e2e, pytest.mark.node]``); the node starts once,
for the first such test, and stops at the end of the session, so a run of the
pod-less suite never starts one. There is one node per machine: if another
session holds it, the fixture waits for it (``SIDEKEY_NODE_LOCK_WAIT``
seconds, default 15 minutes). If the node cannot run here (not root, no
cgroups, a missing package) the fixture *fails* with what is missing; node
tests are never skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.namespaces import make_namespace

LOCK_WAIT = float(os.environ.get("SIDEKEY_NODE_LOCK_WAIT", "900"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the host-restored check before any module starts the session's node.

    That test brings up and tears down a node of its own, and there can be
    only one at a time. Node tests may wait for another session's node (the
    lock) before their own work, so their time limit covers that wait.
    """
    for item in items:
        if item.path.parent.name == "node" and item.get_closest_marker("node") is not None:
            item.add_marker(pytest.mark.timeout(LOCK_WAIT + 300))
    first = [i for i in items if i.path.name == "test_host_restored.py" and i.path.parent.name == "node"]
    if first:
        rest = [i for i in items if i not in first]
        at = next((n for n, i in enumerate(rest) if i.path.parent.name == "node"
                   and i.path.parent.parent.name == "tests"), len(rest))
        items[:] = rest[:at] + first + rest[at:]


@pytest.fixture(scope="session")
def node_cluster() -> Iterator[Any]:
    from sidekey.localcluster import binaries, node
    from sidekey.localcluster.cluster import ControlPlaneError

    cluster = node.NodeCluster(lock_wait=LOCK_WAIT, keep_workdir=bool(os.environ.get("SIDEKEY_KEEP_CLUSTER")))
    try:
        cluster.start()
    except (node.NodeUnavailable, binaries.BinariesUnavailable, ControlPlaneError) as exc:
        pytest.fail(f"no node for the node tests: {exc}", pytrace=False)
    refused = 0
    try:
        yield cluster
    finally:
        try:
            refused = cluster.rejected_egress()
        finally:
            cluster.stop()
            print(f"\nnode: {cluster.timings}")
    # Whatever the flows did (installs, debug containers, killed pods), nothing
    # tried to leave the machine and the host is as it was.
    if refused:
        pytest.fail(f"the node's egress guard refused {refused} packets to outside addresses during the "
                    "session (see localcluster/node.py, NODE_CGROUP)", pytrace=False)
    if cluster.host_before is not None and cluster.host_after is not None:
        left = cluster.host_before.differences(cluster.host_after)
        if left:
            pytest.fail("the session's node left the host changed:\n" + "\n".join(left), pytrace=False)


@pytest.fixture
def node_namespace(node_cluster: Any) -> Iterator[str]:
    """A fresh namespace on the node's cluster whose `default` ServiceAccount exists; deleted afterwards."""
    name = make_namespace(node_cluster, "nd")
    try:
        yield name
    finally:
        node_cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)



@pytest.fixture(scope="session")
def sidekey_image(node_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The project's image, built by localcluster/image.py (as hack/image does) and imported into the node."""
    return _built_and_imported(node_cluster, tmp_path_factory, "build_sidekey")


@pytest.fixture(scope="session")
def agent_image(node_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The test agent image (Python with the openai and anthropic SDKs), imported into the node."""
    return _built_and_imported(node_cluster, tmp_path_factory, "build_agent")


def _built_and_imported(node_cluster: Any, tmp_path_factory: pytest.TempPathFactory, build: str) -> Any:
    from sidekey.localcluster import image

    try:
        built = getattr(image, build)(tmp_path_factory.mktemp("images"))
    except image.ImageError as exc:
        pytest.fail(f"cannot build the image for the node tests: {exc}", pytrace=False)
    node_cluster.import_image(built.archive)
    return built
