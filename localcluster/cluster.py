"""Run etcd, kube-apiserver and kube-controller-manager on loopback.

The flags follow envtest's defaults with the differences sidekey needs: the
ServiceAccount admission plugin stays **on** (it mounts the
``kube-api-access-*`` token that the webhook must see and remove), a
service-account issuer and signing key make TokenRequest and OIDC discovery
work, and the controller-manager turns the API into a cluster (garbage
collection, namespace deletion, ``default`` service accounts,
``kube-root-ca.crt``, Deployments → ReplicaSets → Pods).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from sidekey.core import certificates
from sidekey.localcluster import binaries, processes


class KubectlFailed(subprocess.CalledProcessError):
    """A kubectl command that failed, with what kubectl said in its message: a CI log
    that shows only the exception line must still say why (a refused admission, a
    missing CRD), not just the exit status."""

    def __str__(self) -> str:
        said = (self.stderr or "").strip()
        return f"{super().__str__()}: {said[-800:]}" if said else super().__str__()


ETCD_DIR_PREFIX = "sidekey-etcd-"
#: A data dir this young may belong to a session that has not started its etcd yet.
ORPHAN_MIN_AGE = 120.0


def sweep_orphaned_etcd_dirs(root: Path) -> list[Path]:
    """Remove etcd data dirs in ``root`` that no running process names.

    They live in /dev/shm (RAM) for speed, ~125 MB each, and a SIGKILLed test
    session (a CI timeout, a killed pytest) leaves its dir behind: no running
    etcd has it on its command line. A dir younger than ``ORPHAN_MIN_AGE``
    is left alone, since another session may be about to start its etcd there.
    """
    in_use: set[bytes] = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            in_use.update(arg for arg in cmdline.read_bytes().split(b"\0") if arg.startswith(b"--data-dir="))
        except OSError:
            continue
    removed = []
    now = time.time()
    for candidate in root.glob(f"{ETCD_DIR_PREFIX}*"):
        try:
            young = now - candidate.stat().st_mtime < ORPHAN_MIN_AGE
        except OSError:
            continue
        if young or f"--data-dir={candidate}".encode() in in_use:
            continue
        shutil.rmtree(candidate, ignore_errors=True)
        removed.append(candidate)
    return removed


SERVICE_CIDR = "10.0.0.0/24"
LOOPBACK = "127.0.0.1"
# Controllers a pod-less cluster has no use for. A cluster with a node
# (node.NodeCluster) keeps nodelifecycle, which lifts the not-ready taint.
DISABLED_CONTROLLERS = ("nodeipam", "nodelifecycle", "cloud-node-lifecycle", "service-lb-controller",
                        "node-route-controller", "persistentvolume-binder", "attachdetach", "ttl")
START_TIMEOUT = float(os.environ.get("SIDEKEY_CONTROLPLANE_START_TIMEOUT", "90"))


class ControlPlaneError(RuntimeError):
    """A control-plane process failed; the message carries the tail of its log."""


def free_port() -> int:
    """A loopback port that was free a moment ago (callers retry on a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalCluster:
    """One local control plane. Use as a context manager, or call start()/stop()."""

    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="sidekey-cluster-")))
    keep_workdir: bool = False
    # Where the apiserver listens and what it advertises for the `kubernetes`
    # Service; a node's pods cannot reach loopback, so NodeCluster sets its bridge.
    address: str = LOOPBACK
    with_controller_manager: bool = True
    build: bool = True
    progress: bool = False

    url: str = ""
    issuer: str = ""
    bin_dir: Path = field(default_factory=Path)
    ca_file: Path = field(default_factory=Path)
    ca_key_file: Path = field(default_factory=Path)
    admin_cert_file: Path = field(default_factory=Path)
    admin_key_file: Path = field(default_factory=Path)
    kubeconfig: Path = field(default_factory=Path)
    sa_key_file: Path = field(default_factory=Path)
    sa_pub_file: Path = field(default_factory=Path)
    started_in: float = 0.0
    _procs: processes.Processes | None = None
    _etcd_dirs: list[Path] = field(default_factory=list)
    _binaries: binaries.Binaries | None = None
    _ca: certificates.KeyPair | None = field(default=None, repr=False)  # never in a failure report
    _cgroup: Path | None = None  # NodeCluster's egress guard matches on it

    # --- lifecycle ---------------------------------------------------------

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._binaries = binaries.find(build=self.build, progress=self.progress)
        self.bin_dir = self._binaries.directory
        began = time.monotonic()
        self._write_credentials()
        last: Exception | None = None
        for _attempt in range(3):  # "pick a free port, then bind" races; retry on fresh ports
            try:
                self._start_processes()
                break
            except ControlPlaneError as exc:
                last = exc
                self._stop_processes()
        else:
            assert last is not None
            raise last
        self.started_in = time.monotonic() - began

    def stop(self) -> None:
        self._stop_processes()
        if not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _stop_processes(self) -> None:
        if self._procs is not None:
            self._procs.stop_all()
        for d in self._etcd_dirs:
            shutil.rmtree(d, ignore_errors=True)
        self._etcd_dirs.clear()

    # --- credentials -------------------------------------------------------

    def _write_credentials(self) -> None:
        d = self.workdir / "pki"
        d.mkdir(parents=True, exist_ok=True)
        ca = certificates.make_ca("sidekey-local-ca")
        serving = certificates.issue(
            ca, "kube-apiserver",
            dns_names=["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                       "kubernetes.default.svc.cluster.local"],
            ip_addresses=sorted({LOOPBACK, self.address, "10.0.0.1"}),
        )
        self._ca = ca
        admin = certificates.issue(ca, "admin", organizations=["system:masters"], client=True, server=False)
        self.ca_file, self.ca_key_file = d / "ca.crt", d / "ca.key"
        self.admin_cert_file, self.admin_key_file = d / "admin.crt", d / "admin.key"
        self.sa_key_file, self.sa_pub_file = d / "sa.key", d / "sa.pub"
        files: dict[Path, bytes] = {
            self.ca_file: ca.cert_pem, self.ca_key_file: ca.key_pem,
            d / "apiserver.crt": serving.cert_pem, d / "apiserver.key": serving.key_pem,
            self.admin_cert_file: admin.cert_pem, self.admin_key_file: admin.key_pem,
        }
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        files[self.sa_key_file] = sa_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption())
        files[self.sa_pub_file] = sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        for path, data in files.items():
            path.write_bytes(data)
            path.chmod(0o600)

    def _write_kubeconfig(self) -> None:
        self.kubeconfig = self.workdir / "kubeconfig"
        config = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "sidekey-local", "cluster": {
                "server": self.url, "certificate-authority": str(self.ca_file)}}],
            "users": [{"name": "admin", "user": {
                "client-certificate": str(self.admin_cert_file),
                "client-key": str(self.admin_key_file)}}],
            "contexts": [{"name": "sidekey-local", "context": {
                "cluster": "sidekey-local", "user": "admin", "namespace": "default"}}],
            "current-context": "sidekey-local",
        }
        self.kubeconfig.write_text(yaml.safe_dump(config))
        self.kubeconfig.chmod(0o600)

    # --- processes ---------------------------------------------------------

    def _spawn(self, name: str, args: Sequence[str]) -> processes.Process:
        if self._procs is None:
            self._procs = processes.Processes(self.workdir, cgroup=self._cgroup)
        return self._procs.start(name, args)

    def _start_processes(self) -> None:
        assert self._binaries is not None
        b = self._binaries
        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        shm = Path("/dev/shm")
        if shm.is_dir():
            sweep_orphaned_etcd_dirs(shm)
        data_root = Path(tempfile.mkdtemp(prefix=ETCD_DIR_PREFIX, dir=shm if shm.is_dir() else None))
        etcd = self._spawn("etcd", [
            str(b.path("etcd")),
            f"--data-dir={data_root}",
            f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
            f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
            f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-cluster=default=http://127.0.0.1:{peer_port}",
            "--unsafe-no-fsync", "--log-level=warn", "--quota-backend-bytes=2147483648",
        ])
        self._etcd_dirs.append(data_root)
        self.url = f"https://{self.address}:{api_port}"
        self.issuer = self.url
        pki = self.workdir / "pki"
        api = self._spawn("kube-apiserver", [
            str(b.path("kube-apiserver")),
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            f"--bind-address={self.address}", f"--secure-port={api_port}",
            # "lease" keeps the `kubernetes` Endpoints pointing here, which pods need
            f"--advertise-address={self.address}",
            f"--endpoint-reconciler-type={'none' if self.address == LOOPBACK else 'lease'}",
            f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={self.ca_file}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            f"--service-account-issuer={self.issuer}",
            f"--service-account-signing-key-file={self.sa_key_file}",
            f"--service-account-key-file={self.sa_pub_file}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=true",
            "--enable-aggregator-routing=true",
            "--profiling=false",
            "--v=1",
            *self._apiserver_args(),
        ])
        self._write_kubeconfig()
        deadline = time.monotonic() + START_TIMEOUT
        self._wait_ready(deadline, etcd, api)
        if self.with_controller_manager:
            kcm = self._spawn("kube-controller-manager", [
                str(b.path("kube-controller-manager")),
                f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                f"--service-account-private-key-file={self.sa_key_file}",
                f"--root-ca-file={self.ca_file}",
                f"--cluster-signing-cert-file={self.ca_file}",
                f"--cluster-signing-key-file={self.ca_key_file}",
                "--use-service-account-credentials=false",
                "--leader-elect=false",
                "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--controllers=*," + ",".join(f"-{c}" for c in self._disabled_controllers()),
                "--concurrent-gc-syncs=5", "--namespace-sync-period=10s",
                "--v=1",
            ])
            self._wait_for(deadline, kcm, lambda: self._get("/api/v1/namespaces/default/serviceaccounts/default"),
                           "the controller-manager to create the default ServiceAccount")

    def _apiserver_args(self) -> list[str]:
        """Extra kube-apiserver flags; a subclass with a node adds the kubelet's."""
        return []

    def _disabled_controllers(self) -> Sequence[str]:
        return DISABLED_CONTROLLERS

    def _wait_ready(self, deadline: float, *procs: processes.Process) -> None:
        self._wait_for(deadline, procs[-1], lambda: self._get("/readyz"), "kube-apiserver /readyz", *procs)

    def _wait_for(self, deadline: float, proc: processes.Process, probe: Any, what: str, *others: processes.Process) -> None:
        last = ""
        while time.monotonic() < deadline:
            for p in (*others, proc):
                try:
                    p.check_alive()
                except processes.ProcessExited as exc:
                    raise ControlPlaneError(str(exc)) from None
            try:
                probe()
                return
            except (OSError, urllib.error.URLError, ssl.SSLError) as exc:
                last = str(exc)
            time.sleep(0.1)
        raise ControlPlaneError(f"timed out after {START_TIMEOUT:.0f}s waiting for {what} ({last});"
                                f" {proc.name} log:\n{proc.tail()}")

    # --- talking to it -----------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        ctx.load_cert_chain(str(self.admin_cert_file), str(self.admin_key_file))
        return ctx

    def _get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, context=self.ssl_context(), timeout=5) as resp:  # noqa: S310
            data: bytes = resp.read()
            return data

    def request(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        """A raw admin request, JSON in and out (for what the SDKs cannot express)."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,  # noqa: S310
                                     headers={"Content-Type": "application/json", "Accept": "application/json, application/jwk-set+json;q=0.9, */*;q=0.8"})
        with urllib.request.urlopen(req, context=self.ssl_context(), timeout=30) as resp:  # noqa: S310
            return json.loads(resp.read() or b"null")

    def env(self) -> dict[str, str]:
        """The environment for a subprocess that should talk to this cluster."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        assert self._binaries is not None
        proc = subprocess.run(
            [str(self._binaries.kubectl), f"--kubeconfig={self.kubeconfig}", *args],
            input=input, capture_output=True, text=True, timeout=120, check=False,
        )
        if check and proc.returncode != 0:
            raise KubectlFailed(proc.returncode, ["kubectl", *args], proc.stdout, proc.stderr)
        return proc.stdout if check else proc.stdout + proc.stderr

    def wait_established(self, *crds: str, timeout: float = 60.0) -> None:
        """Wait until each named CustomResourceDefinition is served (its ``Established`` condition).

        Not ``kubectl wait --for=condition=Established``: asked right after the apply,
        before the apiserver has written any condition, kubectl fails at once with
        ".status.conditions accessor error: <nil>" instead of waiting (seen in a benchmark run).
        """
        deadline = time.monotonic() + timeout
        for name in crds:
            while True:
                crd = self.request("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
                conditions = (crd.get("status") or {}).get("conditions") or []
                if any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"CRD {name} not established within {timeout:.0f} s: {conditions}")
                time.sleep(0.1)

    def token(
        self,
        namespace: str,
        service_account: str,
        *,
        audience: str,
        pod_name: str | None = None,
        pod_uid: str | None = None,
        seconds: int = 600,
    ) -> str:
        """Mint a token with TokenRequest, as the kubelet does for a projected volume."""
        spec: dict[str, Any] = {"audiences": [audience], "expirationSeconds": seconds}
        if pod_name is not None:
            spec["boundObjectRef"] = {"kind": "Pod", "apiVersion": "v1", "name": pod_name, "uid": pod_uid}
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        result = self.request(
            "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token", body)
        token: str = result["status"]["token"]
        return token

    def describe(self) -> str:
        return (f"apiserver  {self.url}\nkubeconfig {self.kubeconfig}\nbinaries   {self.bin_dir}\n"
                f"started in {self.started_in:.1f}s")


@contextlib.contextmanager
def running(**kwargs: Any) -> Iterator[LocalCluster]:
    cluster = LocalCluster(**kwargs)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()

