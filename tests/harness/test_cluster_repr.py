"""A failing test prints the cluster it used (pytest shows the arguments); never its CA's private key."""

from __future__ import annotations

from pathlib import Path

from localcluster import cluster
from sidekey.core import certificates


def test_the_clusters_repr_holds_no_private_key(tmp_path: Path) -> None:
    ca = certificates.make_ca("a test cluster's CA")
    c = cluster.LocalCluster(workdir=tmp_path, build=False)
    c._ca = ca
    text = repr(c)
    assert "PRIVATE KEY" not in text and ca.key_pem.decode() not in text
    assert "LocalCluster(" in text  # still says which cluster it was
