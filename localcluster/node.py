"""A real node on this machine: containerd, runc, the CNI bridge, kubelet, kube-proxy, kube-scheduler.

The pod-less :class:`~sidekey.localcluster.cluster.LocalCluster` stops where
the kubelet would begin; :class:`NodeCluster` adds the rest, so that pods run
for real: images, projected tokens written (and rotated) by the kubelet with
the file modes the pod's security context implies, native sidecars gated by
their startup probe, SIGTERM and the grace period, ``kubectl logs`` and
``kubectl debug``. Bring-up order, each step needing the one before:

1. a bridge (``sidekey0``, 10.244.0.1/24) and a FORWARD guard, so that pod
   traffic can reach the host and other pods, and nothing else;
2. containerd with a private root, state and socket, and the pause image
   imported from a local archive (nothing is ever pulled: every registry
   points at a closed loopback port, so a pull fails fast and no DNS query
   leaves the machine);
3. the control plane, listening on the bridge address (pods cannot reach
   loopback), asking the kubelet for logs by its InternalIP (its name would be
   resolved by the host's resolver, an outside address);
4. a cluster DNS on the bridge (:mod:`~sidekey.localcluster.clusterdns`)
   that answers Service names and refuses every other name;
5. the kubelet with its own node certificate (the Node authorizer and
   NodeRestriction apply as in a cluster), kube-proxy and kube-scheduler;
   the controller-manager's nodelifecycle controller lifts the not-ready taint.

The node treats the host as its own (sysctls, iptables, cgroups, fixed paths
such as ``/var/lib/kubelet``), so there is one per machine, guarded by a lock,
and :mod:`~sidekey.localcluster.hoststate` records the host before and puts
it back after, also after a run that died without tearing down.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sidekey.core import certificates
from sidekey.localcluster import binaries, clusterdns, hoststate, processes
from sidekey.localcluster.cluster import DISABLED_CONTROLLERS, ControlPlaneError, LocalCluster, free_port

BRIDGE = "sidekey0"
GATEWAY = "10.244.0.1"
POD_CIDR = "10.244.0.0/24"
NODE_NAME = "sidekey-node"
PAUSE_IMAGE = "registry.k8s.io/pause:3.10.2"
CNI_BIN_DIR = Path("/usr/lib/cni")
RUNC = Path("/usr/sbin/runc")
STATE_DIR = Path(os.environ.get("SIDEKEY_NODE_STATE", "/var/tmp/sidekey-node"))
LOCK_FILE = Path("/run/lock/sidekey-node.lock")
HOST_RECORD = Path("/run/lock/sidekey-node.host.json")
READY_TIMEOUT = float(os.environ.get("SIDEKEY_NODE_READY_TIMEOUT", "120"))
# Where a pull would go: a closed loopback port, so that it fails at once.
NO_REGISTRY = "http://127.0.0.1:9"
# Every node process (control plane included) runs in this cgroup v2 group, and
# netfilter rejects whatever it sends to an address that is not loopback, the
# bridge or a Service: a misconfiguration fails loudly instead of leaving the machine.
NODE_CGROUP = "sidekey-node"
EGRESS_CHAIN = "SIDEKEY-NODE-EGRESS"
LOCAL_DESTINATIONS = {"iptables": ("127.0.0.0/8", POD_CIDR, "10.0.0.0/24"), "ip6tables": ("::1/128",)}


_lock_held_here = False


class NodeUnavailable(RuntimeError):
    """A node cannot run on this machine; the message says what is missing."""


class NodeBusy(NodeUnavailable):
    """Another node holds this machine's lock."""


def preflight() -> list[str]:
    """What this machine lacks for a node (empty when it can run one)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("not root (the kubelet, containerd and the CNI plugins need root)")
    hierarchies = {p.name for p in hoststate.cgroup_hierarchies()}
    if not hierarchies:
        problems.append("no cgroup hierarchy is mounted under /sys/fs/cgroup")
    elif not ({"memory", "cpu", "pids"} <= hierarchies or "unified" in hierarchies or Path("/sys/fs/cgroup/cgroup.controllers").exists()):
        problems.append(f"cgroup controllers memory, cpu and pids are not mounted (found {sorted(hierarchies)})")
    for path, package in ((RUNC, "runc"), (CNI_BIN_DIR / "bridge", "containernetworking-plugins"),
                          (CNI_BIN_DIR / "host-local", "containernetworking-plugins")):
        if not os.access(path, os.X_OK):
            problems.append(f"no {path} (Debian package {package}; hack/system-packages.sh installs it)")
    for tool, package in (("iptables", "iptables"), ("ip6tables", "iptables"), ("conntrack", "conntrack"), ("ip", "iproute2")):
        if shutil.which(tool) is None:
            problems.append(f"no {tool} on PATH (Debian package {package})")
    if hoststate.unified_hierarchy() is None:
        problems.append("no cgroup v2 hierarchy (the node's egress guard matches its processes by one)")
    with contextlib.suppress(OSError):
        if "overlay" not in Path("/proc/filesystems").read_text():
            problems.append("the kernel has no overlay filesystem (containerd's snapshotter)")
    return problems


def _run(*argv: str | Path, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise NodeUnavailable(f"{' '.join(map(str, argv))} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def oci_archive(name: str, files: dict[str, tuple[bytes, int]], config: dict[str, Any]) -> bytes:
    """An OCI image layout as a tar: one uncompressed layer of ``files`` (path -> data, mode).

    Enough for ``ctr images import``: the layer's digest is its diff_id, and
    the index names the image with containerd's annotation.
    """
    layer_buf = io.BytesIO()
    with tarfile.open(fileobj=layer_buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, (data, mode) in sorted(files.items()):
            info = tarfile.TarInfo(path.lstrip("/"))
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, io.BytesIO(data))
    layer = layer_buf.getvalue()

    def digest(data: bytes) -> str:
        return "sha256:" + hashlib.sha256(data).hexdigest()

    image_config = json.dumps({
        "architecture": "amd64", "os": "linux", "config": config,
        "rootfs": {"type": "layers", "diff_ids": [digest(layer)]},
    }, sort_keys=True).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": digest(image_config), "size": len(image_config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": digest(layer), "size": len(layer)}],
    }, sort_keys=True).encode()
    index = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": digest(manifest), "size": len(manifest),
                       "platform": {"architecture": "amd64", "os": "linux"},
                       "annotations": {"io.containerd.image.name": name,
                                       "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1]}}],
    }, sort_keys=True).encode()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        entries = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}', "index.json": index}
        for blob in (layer, image_config, manifest):
            entries[f"blobs/sha256/{digest(blob)[7:]}"] = blob
        for path, data in entries.items():
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@dataclass
class NodeCluster(LocalCluster):
    """A control plane on the bridge address with one real node. One per machine."""

    workdir: Path = field(default_factory=Path)
    address: str = GATEWAY
    state_dir: Path = STATE_DIR
    node_name: str = NODE_NAME
    lock_wait: float = 0.0

    node_bin_dir: Path = field(default_factory=Path)
    containerd_socket: Path = field(default_factory=Path)
    host_before: hoststate.HostState | None = None
    host_after: hoststate.HostState | None = None  # taken at stop, still holding the lock
    timings: dict[str, float] = field(default_factory=dict)
    _node_procs: processes.Processes | None = None
    _node_binaries: binaries.Binaries | None = None
    _lock_fd: int | None = None
    _dns: clusterdns.ClusterDNS | None = None

    # --- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        began = time.monotonic()
        problems = preflight()
        if problems:
            raise NodeUnavailable("a node cannot run on this machine: " + "; ".join(problems))
        self._node_binaries = binaries.find_node(build=self.build, progress=self.progress)
        self.node_bin_dir = self._node_binaries.directory
        self._acquire_lock()
        try:
            self._recover()
            self.host_before = hoststate.snapshot(state_dir=self.state_dir, bridge=BRIDGE,
                                                  bin_dirs=[self.node_bin_dir])
            HOST_RECORD.write_text(self.host_before.to_json())
            self.state_dir.mkdir(parents=True)
            self.workdir = self.state_dir / "controlplane"
            unified = hoststate.unified_hierarchy()
            assert unified is not None  # preflight
            self._cgroup = unified / NODE_CGROUP
            self._node_procs = processes.Processes(self.state_dir / "logs", cgroup=self._cgroup)
            self._step("bridge", self._start_network)
            self._step("containerd", self._start_containerd)
            self._step("control plane", super().start)
            self._step("cluster DNS", self._start_dns)
            self._step("node Ready", self._start_node)
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - began

    def _start_dns(self) -> None:
        try:
            self._dns = clusterdns.ClusterDNS(GATEWAY, lambda: self.request("GET", "/api/v1/services"))
        except OSError as exc:
            raise NodeUnavailable(f"the cluster DNS cannot listen on {GATEWAY}:53: {exc}") from None

    def _step(self, name: str, action: Any) -> None:
        t = time.monotonic()
        action()
        self.timings[name] = round(time.monotonic() - t, 2)

    def stop(self) -> None:
        """Stop everything and put the host back as it was; safe to call twice.

        The host is restored even when stopping a process fails (the error is
        raised after), so a failed teardown never leaves the host changed.
        """
        if self._lock_fd is None:
            return
        try:
            with contextlib.ExitStack() as later:  # callbacks run last-in first-out
                later.callback(self._restore_host)
                later.callback(self._step, "stop: control plane", self._stop_processes)
                self._step("stop: node", self._stop_node)
        finally:
            self._release_lock()

    def _restore_host(self) -> None:
        before = self.host_before
        if before is not None:
            self._step("stop: host restored", lambda: self._restore(before))
            self.host_after = hoststate.snapshot(state_dir=self.state_dir, bridge=BRIDGE,
                                                 bin_dirs=[self.node_bin_dir])

    def _stop_node(self) -> None:
        if self._node_procs is not None:
            for name in ("kube-scheduler", "kube-proxy", "kubelet"):  # the kubelet would restart what we kill
                with contextlib.suppress(StopIteration):
                    self._node_procs.get(name).stop()
        hoststate.kill_kubepods()
        if self._node_procs is not None:
            self._node_procs.stop_all()
        if self._dns is not None:
            self._dns.stop()
            self._dns = None

    def _restore(self, before: hoststate.HostState) -> None:
        hoststate.kill_kubepods()
        unified = hoststate.unified_hierarchy()
        if unified is not None:
            hoststate.kill_cgroup(unified / NODE_CGROUP)
        for pid, _exe in hoststate.node_processes([self.node_bin_dir]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # containerd's shims, which detach from containerd by design
        roots = [str(self.state_dir), "/run/containerd", "/var/lib/kubelet"]
        hoststate.unmount_all(roots)
        hoststate.remove_kubepods_cgroups()
        hoststate.remove_netfilter(BRIDGE)
        hoststate.remove_new_tables(before)
        _run("ip", "link", "del", BRIDGE, check=False)
        hoststate.restore_sysctls(before)
        hoststate.remove_new_paths(before)
        if not self.keep_workdir:
            shutil.rmtree(self.state_dir, ignore_errors=True)
        HOST_RECORD.unlink(missing_ok=True)

    def _acquire_lock(self) -> None:
        global _lock_held_here
        if _lock_held_here:  # waiting would wait for ourselves
            raise NodeBusy(f"this process already runs a node (lock {LOCK_FILE}); stop it before starting another")
        LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.lock_wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = Path(LOCK_FILE).read_text().strip() or "unknown"
                    os.close(fd)
                    raise NodeBusy(f"another sidekey node is up on this machine ({holder}; lock {LOCK_FILE}); "
                                   "there can be one at a time: wait for it to stop") from None
                time.sleep(1)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, state {self.state_dir}, since {time.strftime('%H:%M:%S')}\n".encode())
        self._lock_fd = fd
        _lock_held_here = True

    def _release_lock(self) -> None:
        global _lock_held_here
        if self._lock_fd is not None:
            _lock_held_here = False
            with contextlib.suppress(OSError):
                os.ftruncate(self._lock_fd, 0)
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def _recover(self) -> None:
        """A previous node died without tearing down (its record survives): put the host back first."""
        if not HOST_RECORD.exists():
            if self.state_dir.exists():
                shutil.rmtree(self.state_dir)
            return
        before = hoststate.HostState.from_json(HOST_RECORD.read_text())
        self._restore(before)
        shutil.rmtree(self.state_dir, ignore_errors=True)

    # --- the bridge --------------------------------------------------------

    def _start_network(self) -> None:
        assert self._cgroup is not None
        self._cgroup.mkdir()
        for tool, allowed in LOCAL_DESTINATIONS.items():
            _run(tool, "-w", "-N", EGRESS_CHAIN)
            for cidr in allowed:
                _run(tool, "-w", "-A", EGRESS_CHAIN, "-d", cidr, "-j", "RETURN")
            _run(tool, "-w", "-A", EGRESS_CHAIN, "-j", "REJECT")
            _run(tool, "-w", "-I", "OUTPUT", "1", "-m", "cgroup", "--path", NODE_CGROUP, "-j", EGRESS_CHAIN)
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        _run("ip", "addr", "add", f"{GATEWAY}/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        # The bridge plugin turns forwarding on (pod -> Service -> pod is routed
        # back onto the bridge). The host then forwards bridge to bridge only:
        # nothing from a pod is routed anywhere else, nothing from elsewhere to a
        # pod, and nothing between the host's other interfaces (as before).
        _run("iptables", "-w", "-I", "FORWARD", "1", "!", "-o", BRIDGE, "-j", "DROP")
        _run("iptables", "-w", "-I", "FORWARD", "1", "!", "-i", BRIDGE, "-j", "DROP")

    # --- containerd --------------------------------------------------------

    def _start_containerd(self) -> None:
        s = self.state_dir
        self.containerd_socket = s / "run" / "containerd.sock"
        for d in ("containerd/root", "containerd/state", "run", "cni/net.d", "cni/ipam", "runc", "opt",
                  "containerd/certs.d/_default"):
            (s / d).mkdir(parents=True, exist_ok=True)
        (s / "containerd/certs.d/_default/hosts.toml").write_text(
            f'server = "{NO_REGISTRY}"\n[host."{NO_REGISTRY}"]\n  capabilities = ["pull", "resolve"]\n')
        (s / "cni/net.d/10-sidekey.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "sidekey",
            "plugins": [{
                "type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False, "hairpinMode": True,
                "ipam": {"type": "host-local", "dataDir": str(s / "cni/ipam"),
                         "ranges": [[{"subnet": POD_CIDR, "gateway": GATEWAY, "rangeStart": "10.244.0.10"}]],
                         "routes": [{"dst": "0.0.0.0/0"}]},
            }],
        }, indent=1))
        config = s / "containerd/config.toml"
        config.write_text(self._containerd_config())
        assert self._node_binaries is not None
        b = self._node_binaries
        proc = self._spawn_node("containerd", [str(b.path("containerd")), "--config", str(config)])
        deadline = time.monotonic() + 30
        while True:
            proc.check_alive()
            if self.containerd_socket.exists() and self.ctr("version", check=False).returncode == 0:
                break
            if time.monotonic() > deadline:
                raise NodeUnavailable(f"containerd did not answer on {self.containerd_socket}:\n{proc.tail()}")
            time.sleep(0.1)
        pause = (self.state_dir / "pause.tar")
        pause.write_bytes(oci_archive(PAUSE_IMAGE, {"/pause": (b.path("pause").read_bytes(), 0o755)},
                                      {"Entrypoint": ["/pause"], "User": "65535:65535"}))
        self.import_image(pause)

    def _containerd_config(self) -> str:
        s = self.state_dir
        return f"""\
version = 3
root = "{s}/containerd/root"
state = "{s}/containerd/state"
[grpc]
  address = "{self.containerd_socket}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{s}/opt"
[plugins."io.containerd.nri.v1.nri"]
  disable = true
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{PAUSE_IMAGE}"
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "{s}/containerd/certs.d"
[plugins."io.containerd.cri.v1.runtime"]
  enable_selinux = false
  enable_cdi = false
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "{RUNC}"
        Root = "{s}/runc"
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{CNI_BIN_DIR}"]
    conf_dir = "{s}/cni/net.d"
    max_conf_num = 1
"""

    def ctr(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run ``ctr`` against this node's containerd, in the CRI's namespace."""
        assert self._node_binaries is not None
        proc = subprocess.run([str(self._node_binaries.path("ctr")), "--address", str(self.containerd_socket),
                               "--namespace", "k8s.io", *args],
                              capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise NodeUnavailable(f"ctr {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def import_image(self, archive: Path) -> None:
        """Import an OCI or Docker archive so that pods can use it with no pull."""
        self.ctr("images", "import", "--platform", "linux/amd64", str(archive))

    # --- the control plane, on the bridge ----------------------------------

    def _write_credentials(self) -> None:
        super()._write_credentials()
        assert self._ca is not None
        ca, pki = self._ca, self.workdir / "pki"
        pairs = {
            # The apiserver's identity towards the kubelet (logs, exec, attach, port-forward).
            "apiserver-kubelet-client": certificates.issue(
                ca, "kube-apiserver-kubelet-client", organizations=["system:masters"], client=True, server=False),
            "kubelet-client": certificates.issue(
                ca, f"system:node:{self.node_name}", organizations=["system:nodes"], client=True, server=False),
            "kubelet-serving": certificates.issue(
                ca, self.node_name, dns_names=[self.node_name], ip_addresses=[GATEWAY]),
            "kube-proxy": certificates.issue(ca, "system:kube-proxy", client=True, server=False),
            "kube-scheduler": certificates.issue(ca, "system:kube-scheduler", client=True, server=False),
        }
        for name, pair in pairs.items():
            for suffix, data in (("crt", pair.cert_pem), ("key", pair.key_pem)):
                path = pki / f"{name}.{suffix}"
                path.write_bytes(data)
                path.chmod(0o600)

    def _apiserver_args(self) -> list[str]:
        pki = self.workdir / "pki"
        return [
            # By IP: the node's name would go to the host's resolver, an outside address.
            "--kubelet-preferred-address-types=InternalIP",
            f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
            f"--kubelet-certificate-authority={self.ca_file}",
        ]

    def _disabled_controllers(self) -> Sequence[str]:
        return [c for c in DISABLED_CONTROLLERS if c != "nodelifecycle"]

    def _component_kubeconfig(self, name: str) -> Path:
        pki = self.workdir / "pki"
        path = self.workdir / f"{name}.kubeconfig"
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "local", "cluster": {"server": self.url, "certificate-authority": str(self.ca_file)}}],
            "users": [{"name": name, "user": {"client-certificate": str(pki / f"{name}.crt"),
                                              "client-key": str(pki / f"{name}.key")}}],
            "contexts": [{"name": "local", "context": {"cluster": "local", "user": name}}],
            "current-context": "local",
        }))
        path.chmod(0o600)
        return path

    # --- kubelet, kube-proxy, kube-scheduler -------------------------------

    def _spawn_node(self, name: str, argv: Sequence[str]) -> processes.Process:
        assert self._node_procs is not None
        path = f"{self.node_bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        return self._node_procs.start(name, argv, env={**os.environ, "PATH": path})

    def _start_node(self) -> None:
        assert self._node_binaries is not None
        b, s, pki = self._node_binaries, self.state_dir, self.workdir / "pki"
        kubelet_dir = s / "kubelet"
        kubelet_dir.mkdir(parents=True, exist_ok=True)
        # For pods with dnsPolicy Default (ClusterFirst ones get ClusterDNS):
        # no nameserver at all, so that nothing resolves outside.
        resolv = kubelet_dir / "resolv.conf"
        resolv.write_text("# sidekey test node: no nameserver, so no query leaves the machine\noptions ndots:1\n")
        kubelet_config = kubelet_dir / "config.yaml"
        kubelet_config.write_text(yaml.safe_dump({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "failCgroupV1": False,  # hybrid cgroup v1 hosts; only the config file spelling is honoured
            "cgroupDriver": "cgroupfs",
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            "address": GATEWAY, "port": 10250, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": 0,
            "tlsCertFile": str(pki / "kubelet-serving.crt"), "tlsPrivateKeyFile": str(pki / "kubelet-serving.key"),
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(self.ca_file)}},
            "authorization": {"mode": "Webhook"},
            "resolvConf": str(resolv),
            "clusterDNS": [GATEWAY], "clusterDomain": clusterdns.DOMAIN,  # ClusterDNS, on the bridge
            "failSwapOn": False,
            "makeIPTablesUtilChains": False,
            "podLogsDir": str(s / "log/pods"),
            "volumePluginDir": str(kubelet_dir / "volume-plugins"),
            "evictionHard": {"memory.available": "50Mi", "nodefs.available": "1%",
                             "nodefs.inodesFree": "1%", "imagefs.available": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False,
            "rotateCertificates": False,
            "syncFrequency": "10s", "fileCheckFrequency": "10s",
            "nodeStatusUpdateFrequency": "2s",
            "registerNode": True,
        }))
        self._spawn_node("kubelet", [
            str(b.path("kubelet")), f"--config={kubelet_config}",
            f"--kubeconfig={self._component_kubeconfig('kubelet-client')}",
            f"--root-dir={kubelet_dir}", f"--cert-dir={pki}",
            f"--node-ip={GATEWAY}", f"--hostname-override={self.node_name}", "--v=1",
        ])
        proxy_config = s / "kube-proxy.yaml"
        proxy_config.write_text(yaml.safe_dump({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "mode": "iptables",
            "clientConnection": {"kubeconfig": str(self._component_kubeconfig("kube-proxy"))},
            "hostnameOverride": self.node_name,
            "bindAddress": GATEWAY, "nodePortAddresses": [POD_CIDR], "clusterCIDR": POD_CIDR,
            "healthzBindAddress": f"127.0.0.1:{free_port()}", "metricsBindAddress": f"127.0.0.1:{free_port()}",
            # All zero: kube-proxy then writes no conntrack sysctls.
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s",
                          "udpTimeout": "0s", "udpStreamTimeout": "0s"},
            "iptables": {"localhostNodePorts": False, "minSyncPeriod": "0s", "syncPeriod": "30s"},
        }))
        self._spawn_node("kube-proxy", [str(b.path("kube-proxy")), f"--config={proxy_config}", "--v=1"])
        scheduler = self._component_kubeconfig("kube-scheduler")
        self._spawn_node("kube-scheduler", [
            str(b.path("kube-scheduler")), f"--kubeconfig={scheduler}",
            f"--authentication-kubeconfig={scheduler}", f"--authorization-kubeconfig={scheduler}",
            "--leader-elect=false", "--bind-address=127.0.0.1", f"--secure-port={free_port()}", "--v=1",
        ])
        self._wait_node_ready()

    def _wait_node_ready(self) -> None:
        assert self._node_procs is not None
        deadline = time.monotonic() + READY_TIMEOUT
        last = "not registered"
        while time.monotonic() < deadline:
            try:
                self._node_procs.alive()
            except processes.ProcessExited as exc:
                raise NodeUnavailable(str(exc)) from None
            try:
                node = self.request("GET", f"/api/v1/nodes/{self.node_name}")
            except OSError as exc:
                last = str(exc)
            else:
                ready = [c for c in node["status"].get("conditions", []) if c["type"] == "Ready"]
                taints = node["spec"].get("taints") or []
                if ready and ready[0]["status"] == "True" and not taints:
                    return
                last = f"Ready={ready[0]['status'] if ready else '?'} ({ready[0].get('message', '') if ready else ''}), taints {taints}"
            time.sleep(0.2)
        kubelet = self._node_procs.get("kubelet")
        raise NodeUnavailable(f"node {self.node_name} not Ready and untainted within {READY_TIMEOUT:.0f}s: {last}; "
                              f"kubelet log {kubelet.log}:\n{kubelet.tail(40)}")

    def rejected_egress(self) -> int:
        """Packets the egress guard refused so far (anything else than 0 is a bug to find)."""
        total = 0
        for tool in LOCAL_DESTINATIONS:
            out = _run(tool, "-w", "-L", EGRESS_CHAIN, "-v", "-x", "-n").stdout
            total += sum(int(line.split()[0]) for line in out.splitlines() if "REJECT" in line)
        return total

    def describe(self) -> str:
        steps = ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items())
        return f"{super().describe()}\nnode       {self.node_name} on {BRIDGE} {GATEWAY} ({steps})\nstate      {self.state_dir}"


@contextlib.contextmanager
def running(**kwargs: Any) -> Iterator[NodeCluster]:
    cluster = NodeCluster(**kwargs)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


__all__ = ["ControlPlaneError", "NodeBusy", "NodeCluster", "NodeUnavailable", "preflight", "running"]
