"""What a node changes on its host: recorded before it starts, put back after.

A kubelet, containerd and kube-proxy treat the machine as theirs: the kubelet
sets kernel sysctls and makes ``kubepods`` cgroups under every controller,
the bridge plugin turns on forwarding, kube-proxy writes KUBE-* chains for
IPv4 and IPv6, containerd mounts overlays and network namespaces, and several
paths outside any configured folder appear (``/var/lib/kubelet``,
``/var/log/containers``, ``/var/lib/cni``, ``/run/containerd``). A test host is
shared, so :class:`HostState` records exactly those things and :func:`restore`
puts each one back; a test compares two snapshots, before and after.

Only what a node can touch is recorded, not the whole machine: other test
runs create their own network namespaces and veths at the same time.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Every sysctl a node is known to write (kubelet's kernel tunables, the bridge
# plugin's forwarding, kube-proxy's route_localnet and conntrack limits).
SYSCTLS = (
    "kernel.panic", "kernel.panic_on_oops", "vm.overcommit_memory", "vm.panic_on_oom",
    "kernel.keys.root_maxkeys", "kernel.keys.root_maxbytes",
    "net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding", "net.ipv4.conf.all.route_localnet",
    "net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables",
    "net.netfilter.nf_conntrack_max", "net.netfilter.nf_conntrack_tcp_timeout_established",
    "net.netfilter.nf_conntrack_tcp_timeout_close_wait",
)
# Paths the kubelet, containerd and the CNI plugins use whatever their flags say.
FIXED_PATHS = (
    "/var/lib/kubelet", "/var/log/pods", "/var/log/containers", "/var/lib/cni", "/run/containerd",
    "/var/lib/containerd", "/opt/containerd", "/run/nri", "/etc/cni", "/etc/containerd",
    "/etc/kubernetes", "/var/lib/kube-proxy", "/run/runc", "/usr/libexec/kubernetes", "/etc/cdi", "/run/cdi",
    "/etc/nri", "/opt/nri",
)
NETFILTER = ("iptables-save", "ip6tables-save")
CGROUP_ROOT = Path("/sys/fs/cgroup")
KUBEPODS = "kubepods"
_CNI_VETH = re.compile(r"^veth[0-9a-f]{8}$")
# kube-proxy's and the kubelet's chains, and the node's own egress guard.
CHAIN_PREFIXES = ("KUBE-", "SIDEKEY-")


@dataclass
class HostState:
    """The host settings a node can change, in comparable form."""

    sysctls: dict[str, str | None] = field(default_factory=dict)
    netfilter: dict[str, list[str]] = field(default_factory=dict)
    mounts: list[str] = field(default_factory=list)
    cgroups: dict[str, list[str]] = field(default_factory=dict)
    paths: dict[str, list[str] | None] = field(default_factory=dict)
    links: list[str] = field(default_factory=list)
    processes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> HostState:
        return cls(**json.loads(text))

    def differences(self, other: HostState) -> list[str]:
        """Human-readable lines, one per setting that differs (empty: identical)."""
        out: list[str] = []
        mine, theirs = asdict(self), asdict(other)
        for key in mine:
            a, b = mine[key], theirs[key]
            if a == b:
                continue
            if isinstance(a, dict):
                for k in sorted(set(a) | set(b)):
                    if a.get(k) != b.get(k):
                        out.append(f"{key}[{k}]: {_short(a.get(k))} -> {_short(b.get(k))}")
            else:
                gone, new = sorted(set(a) - set(b)), sorted(set(b) - set(a))
                out.append(f"{key}: gone {gone}, new {new}")
        return out


def _short(value: object) -> str:
    if isinstance(value, list):
        return f"{len(value)} entries: {value[:12]}"
    return repr(value)


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def read_sysctl(name: str) -> str | None:
    try:
        return _sysctl_path(name).read_text().strip()
    except OSError:
        return None


def _netfilter(tool: str) -> list[str]:
    """The ruleset minus counters and timestamps, so that two runs compare equal."""
    if shutil.which(tool) is None:
        return []
    proc = subprocess.run([tool], capture_output=True, text=True, timeout=30, check=False)
    lines = []
    for line in proc.stdout.splitlines():
        if line.startswith("#"):
            continue
        lines.append(re.sub(r" \[\d+:\d+\]$", "", line))
    return lines


def node_mount(mount_point: str, fstype: str, roots: Sequence[str]) -> bool:
    """Whether a mount is one a node could have made."""
    if fstype == "overlay" or mount_point.startswith("/run/netns/cni-"):
        return True
    return any(mount_point == r or mount_point.startswith(r.rstrip("/") + "/") for r in roots)


def mount_points(roots: Sequence[str]) -> list[str]:
    """Mount points under ``roots`` (and every overlay), innermost last."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        point = fields[4].encode().decode("unicode_escape")
        if node_mount(point, fields[sep + 1], roots):
            found.append(point)
    return found


def cgroup_hierarchies() -> list[Path]:
    """Every mounted cgroup hierarchy (v1 controllers, the named systemd one, the unified one)."""
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _dev, point, fstype, *_ = line.split()
        if fstype in ("cgroup", "cgroup2"):
            out.append(Path(point))
    return out


def _cgroups() -> dict[str, list[str]]:
    """The top two levels of each hierarchy, and anything under kubepods."""
    out: dict[str, list[str]] = {}
    for root in cgroup_hierarchies():
        names = []
        with contextlib.suppress(OSError):
            for child in root.iterdir():
                if not child.is_dir():
                    continue
                names.append(child.name)
                if child.name == KUBEPODS:
                    names.extend(str(Path(d).relative_to(root)) for d in _dirs_below(child))
        out[str(root)] = sorted(names)
    return out


def _dirs_below(top: Path) -> list[str]:
    """Every folder under ``top``, deepest first; folders vanishing meanwhile are skipped
    (cgroups disappear as their pods stop, so ``rglob`` would raise half-way)."""
    return [os.path.join(d, n) for d, names, _files in os.walk(top, topdown=False) for n in names]


def _paths(paths: Iterable[str]) -> dict[str, list[str] | None]:
    out: dict[str, list[str] | None] = {}
    for p in paths:
        try:
            out[p] = sorted(os.listdir(p))
        except FileNotFoundError:
            out[p] = None
        except NotADirectoryError:
            out[p] = []
    return out


def _links(bridge: str) -> list[str]:
    proc = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=10, check=False)
    names = []
    for line in proc.stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name == bridge or _CNI_VETH.match(name):
            names.append(name)
    return sorted(names)


def node_processes(bin_dirs: Sequence[Path]) -> list[tuple[int, str]]:
    """Processes running a node binary (any folder in ``bin_dirs``) or runc."""
    dirs = {str(d.resolve()) for d in bin_dirs}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            exe = os.readlink(entry / "exe")
        except OSError:
            continue
        if os.path.dirname(exe) in dirs or os.path.basename(exe) == "runc":
            found.append((int(entry.name), exe))
    return sorted(found)


def snapshot(*, state_dir: Path, bridge: str, bin_dirs: Sequence[Path]) -> HostState:
    roots = [str(state_dir), *FIXED_PATHS]
    return HostState(
        sysctls={name: read_sysctl(name) for name in SYSCTLS},
        netfilter={tool: _netfilter(tool) for tool in NETFILTER},
        mounts=mount_points(roots),
        cgroups=_cgroups(),
        paths=_paths([*FIXED_PATHS, str(state_dir)]),
        links=_links(bridge),
        processes=[exe for _pid, exe in node_processes(bin_dirs)],
    )


# --- putting it back ---------------------------------------------------------

def kill_kubepods() -> int:
    """SIGKILL every process in a kubepods cgroup (the node's containers), until none is left."""
    killed = 0
    for _round in range(50):
        pids: set[int] = set()
        for root in cgroup_hierarchies():
            top = root / KUBEPODS
            if not top.is_dir():
                continue
            for d in [*_dirs_below(top), str(top)]:
                with contextlib.suppress(OSError, ValueError):
                    pids.update(int(p) for p in Path(d, "cgroup.procs").read_text().split())
        pids.discard(os.getpid())
        if not pids:
            return killed
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        time.sleep(0.1)
    return killed


def remove_kubepods_cgroups(patience: float = 5.0) -> list[str]:
    """rmdir every kubepods tree bottom-up, in rounds over all of them (a folder whose
    last task is still exiting goes a moment later); returns the ones that would not go."""
    deadline = time.monotonic() + patience
    while True:
        left = []
        for root in cgroup_hierarchies():
            top = root / KUBEPODS
            if not top.is_dir():
                continue
            for d in [*map(Path, _dirs_below(top)), top]:
                try:
                    d.rmdir()
                except FileNotFoundError:
                    pass
                except OSError:
                    left.append(str(d))
        if not left or time.monotonic() > deadline:
            return left
        kill_kubepods()
        time.sleep(0.05)


def unmount_all(roots: Sequence[str]) -> None:
    """Detach every mount under ``roots`` (and CNI netns mounts), innermost first."""
    for _round in range(5):
        points = [p for p in mount_points(roots) if p not in ("/",)]
        # Overlays elsewhere are not ours (other users of the machine may have some).
        points = [p for p in points if any(p == r or p.startswith(r.rstrip("/") + "/") for r in roots)
                  or p.startswith("/run/netns/cni-")]
        if not points:
            return
        for p in sorted(points, key=lambda p: -p.count("/")):
            _detach(p)


MNT_DETACH = 2


def _detach(point: str) -> None:
    """``umount --lazy``, as a system call: a pod's volumes are dozens of mounts."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        if libc.umount2(point.encode(), MNT_DETACH) == 0:
            return
    except OSError:
        pass
    subprocess.run(["umount", "--lazy", point], capture_output=True, timeout=10, check=False)


def unified_hierarchy() -> Path | None:
    """The cgroup v2 hierarchy (``/sys/fs/cgroup`` on v2 hosts, ``.../unified`` on hybrid ones)."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _dev, point, fstype, *_ = line.split()
        if fstype == "cgroup2":
            return Path(point)
    return None


def kill_cgroup(cgroup: Path) -> None:
    """SIGKILL every process in ``cgroup`` and remove it."""
    for _round in range(50):
        try:
            pids = [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return
        pids = [p for p in pids if p != os.getpid()]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    for _try in range(20):
        try:
            cgroup.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)


def _ours(word: str) -> bool:
    return word.startswith(CHAIN_PREFIXES)


def remove_netfilter(bridge: str) -> None:
    """Delete the KUBE-* and SIDEKEY-* chains and every jump to them, and the bridge's FORWARD guards."""
    for save, cmd in (("iptables-save", "iptables"), ("ip6tables-save", "ip6tables")):
        if shutil.which(save) is None:
            continue
        out = subprocess.run([save], capture_output=True, text=True, timeout=30, check=False).stdout
        table = ""
        chains: dict[str, list[str]] = {}
        deletes: list[tuple[str, str]] = []  # (table, the rule as iptables-save wrote it)
        for line in out.splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith(":") and _ours(line[1:]):
                chains.setdefault(table, []).append(line[1:].split()[0])
            elif line.startswith("-A ") and not _ours(line.split()[1]):
                words = shlex.split(line)
                if any(_ours(w) for w in words[2:]) or bridge in words:
                    deletes.append((table, line))
        # One iptables-restore per family (a command per rule takes seconds); if it
        # refuses the batch, the same commands one at a time.
        batch = []
        for t in dict.fromkeys([t for t, _ in deletes] + list(chains)):
            batch.append(f"*{t}")
            batch += ["-D" + rule[2:] for table_, rule in deletes if table_ == t]
            batch += [f"-F {n}" for n in chains.get(t, [])] + [f"-X {n}" for n in chains.get(t, [])]
            batch.append("COMMIT")
        if not batch:
            continue
        restored = subprocess.run([f"{cmd}-restore", "-w", "--noflush"], input="\n".join(batch) + "\n",
                                  capture_output=True, text=True, timeout=60, check=False)
        if restored.returncode == 0:
            continue
        for t, rule in deletes:
            subprocess.run([cmd, "-w", "-t", t, "-D", *shlex.split(rule)[1:]], capture_output=True, timeout=30,
                           check=False)
        for t, names in chains.items():
            for n in names:
                subprocess.run([cmd, "-w", "-t", t, "-F", n], capture_output=True, timeout=30, check=False)
            for n in names:
                subprocess.run([cmd, "-w", "-t", t, "-X", n], capture_output=True, timeout=30, check=False)


NFT_FAMILY = {"iptables-save": "ip", "ip6tables-save": "ip6"}


def _tables(lines: Sequence[str]) -> dict[str, list[str]]:
    tables: dict[str, list[str]] = {}
    current: list[str] = []
    for line in lines:
        if line.startswith("*"):
            current = tables.setdefault(line[1:], [])
        elif line != "COMMIT":
            current.append(line)
    return tables


def remove_new_tables(before: HostState) -> None:
    """Delete the nftables tables iptables-nft made for the node, once they hold nothing.

    Emptying a table leaves it registered (``iptables-save`` still lists it);
    only ``nft`` deletes one. A table that existed before, or still holds a
    rule or a chain of its own, is left alone.
    """
    if shutil.which("nft") is None:
        return
    for tool, family in NFT_FAMILY.items():
        had = _tables(before.netfilter.get(tool, []))
        for name, lines in _tables(_netfilter(tool)).items():
            # only built-in chains (a policy, not "-") and no rule
            empty = all(line.startswith(":") and line.split()[1] != "-" for line in lines)
            if name not in had and empty:
                subprocess.run(["nft", "delete", "table", family, name], capture_output=True, timeout=30, check=False)


def restore_sysctls(before: HostState) -> None:
    for name, value in before.sysctls.items():
        if value is None or read_sysctl(name) == value:
            continue
        with contextlib.suppress(OSError):
            _sysctl_path(name).write_text(value + "\n")


def remove_new_paths(before: HostState) -> None:
    """Remove each fixed path the node created; one that existed before keeps its old entries only."""
    for path, entries in before.paths.items():
        if path not in FIXED_PATHS:
            continue
        p = Path(path)
        if entries is None:
            if p.is_symlink() or p.is_file():
                p.unlink(missing_ok=True)
            else:
                shutil.rmtree(p, ignore_errors=True)
            continue
        with contextlib.suppress(OSError):
            for child in p.iterdir():
                if child.name not in entries:
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child, ignore_errors=True)
                    else:
                        child.unlink(missing_ok=True)
