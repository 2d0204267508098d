"""Session fixtures: one real control plane for every e2e test (helpers are in tests/support/).

The control plane is started lazily, by the first test that asks for it, so a
run of unit tests alone needs no binaries. If the binaries cannot be had, the
fixture *fails* with instructions; e2e tests are never skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.namespaces import make_namespace

ROOT = Path(__file__).resolve().parent.parent
CRDS = ROOT / "crds"


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to test a request path whose C extensions were not built from these sources
    (setup.py): the tests would pass or fail on the code an edit replaced."""
    from bench.compiled import advice

    problem = advice()
    if problem is not None:
        raise pytest.UsageError(problem)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Any]:
    from sidekey.localcluster import binaries
    from sidekey.localcluster.cluster import LocalCluster

    try:
        c = LocalCluster(keep_workdir=bool(os.environ.get("SIDEKEY_KEEP_CLUSTER")))
        c.start()
    except binaries.BinariesUnavailable as exc:
        pytest.fail(f"no control plane for the e2e tests: {exc}", pytrace=False)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def kube(cluster: Any) -> Iterator[Any]:
    from kubernetes import config

    api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    try:
        yield api
    finally:
        api.close()


@pytest.fixture(scope="session")
def crds(cluster: Any) -> list[str]:
    """Apply every CRD in crds/ and wait until the apiserver serves them."""
    names: list[str] = []
    files = sorted(CRDS.glob("*.yaml"))
    if not files:
        pytest.fail(f"no CRD manifests in {CRDS}", pytrace=False)
    for f in files:
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(f))
        for doc in yaml.safe_load_all(f.read_text()):
            if doc and doc.get("kind") == "CustomResourceDefinition":
                names.append(doc["metadata"]["name"])
    for name in names:
        cluster.wait_established(name)
    return names


@pytest.fixture
def namespace(cluster: Any) -> Iterator[str]:
    """A fresh namespace whose `default` ServiceAccount exists; deleted afterwards."""
    name = make_namespace(cluster)
    try:
        yield name
    finally:
        cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)
