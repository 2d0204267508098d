"""Fresh namespaces on the session's control plane."""

from __future__ import annotations

from collections.abc import Mapping

from sidekey.localcluster import subjects
from sidekey.localcluster.cluster import LocalCluster


def make_namespace(cluster: LocalCluster, prefix: str = "sk", labels: Mapping[str, str] | None = None) -> str:
    """A namespace with a unique name whose ``default`` ServiceAccount exists already."""
    return subjects.namespace(cluster, prefix, labels)
