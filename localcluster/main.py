"""``sidekey cluster``: a local control plane for trying sidekey by hand."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from sidekey.localcluster import binaries
from sidekey.localcluster.cluster import ControlPlaneError, LocalCluster


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--for", dest="seconds", type=float, default=None,
                        help="stop after this many seconds (default: run until Ctrl-C)")


def run(args: argparse.Namespace) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print("starting etcd, kube-apiserver and kube-controller-manager "
          "(the first run builds them with Go, 10-25 minutes)...", file=sys.stderr)
    cluster = LocalCluster(progress=True)
    try:
        cluster.start()
    except (binaries.BinariesUnavailable, ControlPlaneError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        print(cluster.describe())
        print(f"try:       kubectl --kubeconfig {cluster.kubeconfig} get namespaces")
        stop.wait(args.seconds)
    finally:
        cluster.stop()
    return 0
