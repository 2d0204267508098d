"""Fixtures of the attack catalogues: one attacker's world shared by the read-only catalogues.

The world (a subject account, its Secret and AgentPolicy, a recording
upstream, a trap standing for the attacker's host, and a running sidecar) is
package-scoped: the token, exfiltration, flow-back and leak catalogues only
send requests to it. Tests that break things (faults, drain) build their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.attacks import world
from tests.attacks.world import World
from tests.loops import pytest_asyncio_loop_factories  # noqa: F401  (the sidecar's event loop)
from tests.support.namespaces import make_namespace


@pytest.fixture(scope="package")
def attack_world(cluster: Any, crds: list[str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    trap = world.Trap()
    namespace = make_namespace(cluster, "skattack")
    try:
        with world.running_upstream(trap) as up:
            uid = world.subject(cluster, namespace, up.url)
            sc = world.launch(cluster, namespace, uid, tmp_path_factory.mktemp("attack-sidecar"))
            try:
                yield World(cluster, namespace, uid, up, trap, sc)
            finally:
                sc.stop()
    finally:
        trap.close()
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


@pytest.fixture
def fresh(attack_world: World) -> Iterator[World]:
    """The shared world, with the check every catalogue ends on: nothing reached the trap."""
    before = len(attack_world.trap.hits)
    yield attack_world
    assert attack_world.trap.hits[before:] == [], "a request reached the attacker's host"
