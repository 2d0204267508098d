"""``sidekey cluster``: a local control plane (or, with ``--node``, a real node) for trying sidekey by hand."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from sidekey.localcluster import binaries, node
from sidekey.localcluster.cluster import ControlPlaneError, LocalCluster


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--for", dest="seconds", type=float, default=None,
                        help="stop after this many seconds (default: run until Ctrl-C)")
    parser.add_argument("--node", action="store_true",
                        help="also run a real node (containerd, kubelet, kube-proxy; needs root), so pods run")


def run(args: argparse.Namespace) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if args.node:
        print("starting a node: bridge, containerd, the control plane, kubelet, kube-proxy, kube-scheduler "
              "(the first run builds them with Go)...", file=sys.stderr)
        cluster: LocalCluster = node.NodeCluster(progress=True)
    else:
        print("starting etcd, kube-apiserver and kube-controller-manager "
              "(the first run builds them with Go, 10-25 minutes)...", file=sys.stderr)
        cluster = LocalCluster(progress=True)
    try:
        cluster.start()
    except (binaries.BinariesUnavailable, ControlPlaneError, node.NodeUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        print(cluster.describe())
        print(f"try:       kubectl --kubeconfig {cluster.kubeconfig} get {'nodes' if args.node else 'namespaces'}")
        if isinstance(cluster, node.NodeCluster):
            print(f"images:    {cluster.node_bin_dir / 'ctr'} --address {cluster.containerd_socket} "
                  "-n k8s.io images import IMAGE.oci.tar   (nothing is pulled)")
        stop.wait(args.seconds)
    finally:
        cluster.stop()
    return 0
