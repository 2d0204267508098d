"""The project's image, built from Debian packages and requirements.lock, with no Docker.

The Dockerfile is the recipe for users with a container engine. This module
builds an image with the same layout (``/opt/sidekey/bin/sidekey`` as the entry
point, numeric user 65532, no shell, nothing written at run time) on machines
that have neither an engine nor a registry: the local node imports it into its
containerd, and a user can push the OCI archive it writes with ``skopeo`` or
``crane``. Debian's packages come through ``mmdebstrap``, and Python's only
from the lock, every file hash-checked.

Layers, bottom up. Each is cached under ``~/.cache/sidekey/images`` by what it
is made of, so a code change rebuilds only the top one (about a second):

``runtime``
    Debian's ``python3`` and ``ca-certificates`` and the packages they need to
    *run*, as dpkg lists their files: no dpkg, apt, shell or coreutils (what
    the distroless base of the Dockerfile leaves out). Key: the Debian recipe.
``deps``
    A venv at ``/opt/sidekey`` holding requirements.lock. Key: the lock's bytes.
``app``
    The sidekey wheel, and the launcher ``/opt/sidekey/bin/sidekey`` whose
    interpreter runs isolated (``python -I``): no ``PYTHON*`` variable and no
    ``PATH`` entry can change what the entry point runs.

The test agent image shares ``runtime``, adds the rest of the minimal Debian
system (a shell and coreutils, so a test can ``kubectl exec`` into it) and a
venv from ``localcluster/images/agent.lock`` with the ``openai`` and
``anthropic`` SDKs and sidekey's client.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import fcntl
import gzip
import hashlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator, Sequence, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

#: The checkout: the image is built from the working tree (an installed sidekey has no lock).
ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
DATA = ROOT / "localcluster" / "images"
AGENT_LOCK = DATA / "agent.lock"
LAUNCHER = DATA / "sidekey"

#: The name every build gets; ``dev`` because it is whatever the working tree holds.
REPOSITORY = "sidekey.local/sidekey"
AGENT_REPOSITORY = "sidekey.local/agent"
UID = GID = 65532  # contract.SIDECAR_UID; the Dockerfile's USER
AGENT_UID = 1000
#: The venvs are the /opt folders themselves, as in the Dockerfile: /opt/sidekey/bin/python
#: is the venv's interpreter, which finds /opt/sidekey/pyvenv.cfg next to its folder.
VENV = "/opt/sidekey"
AGENT_VENV = "/opt/agent"
ENTRYPOINT = "/opt/sidekey/bin/sidekey"

#: The Debian side of the recipe; changing any of it changes the runtime layer's key.
SUITE = "bookworm"
PACKAGES = ("python3", "ca-certificates")
#: Needed to install or configure the packages, never to run them.
INSTALL_ONLY = frozenset({"dpkg", "debconf", "mawk"})  # base-files' postinst needs awk
#: Packages kept besides the closure of PACKAGES: /etc/os-release, the FHS dirs.
ALSO_KEPT = ("base-files",)
DPKG_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*", "/usr/share/info/*",
                 "/usr/share/lintian/*")
DPKG_INCLUDES = ("/usr/share/doc/*/copyright",)  # the licences stay
#: Files no package owns that the runtime still needs (made by maintainer scripts).
RUNTIME_UNOWNED = re.compile(
    r"^(bin|lib|lib64|sbin)$"                   # usrmerge's links
    r"|^etc/(passwd|group|nsswitch\.conf|ld\.so\.cache|hostname)$"
    r"|^etc/ssl/certs(/.*)?$"                   # update-ca-certificates
    r"|(^|/)__pycache__(/.*)?$"                 # py3compile: the stdlib's bytecode
)
#: The lock's entries that build the project's wheel (setup.py compiles the request path
#: with mypyc) and never run in the image: the builder has them, the deps layer not.
BUILD_ONLY = frozenset({"setuptools", "wheel", "mypy", "mypy-extensions", "ast-serialize", "librt", "pathspec"})
#: Built wheels kept in the cache, newest first (each holds the compiled request path, ~1.5 MB).
WHEELS_KEPT = 8
#: Bumped when the way a layer is made changes, so old cache entries are not reused.
RECIPE_VERSION = 1

EPOCH = int(os.environ.get("SOURCE_DATE_EPOCH", "1767225600"))  # 2026-01-01: files we write
ENV = ("PATH=/opt/sidekey/bin:/usr/local/bin:/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1")
PORTS = (8443, 8787, 8788, 8080, 9090)

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


class ImageError(RuntimeError):
    """The image cannot be built here; the message says what is missing or failed."""


def cache_dir() -> Path:
    return Path(os.environ.get("SIDEKEY_IMAGE_CACHE", Path.home() / ".cache" / "sidekey" / "images"))


def project_version() -> str:
    version: str = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    return version


def tag() -> str:
    return f"{project_version()}-dev"


def reference(repository: str = REPOSITORY) -> str:
    """What the chart's ``image.repository``/``image.tag`` name: ``sidekey.local/sidekey:0.1.0-dev``."""
    return f"{repository}:{tag()}"


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([RECIPE_VERSION, *parts], default=str).encode()).hexdigest()[:16]


def _run(argv: Sequence[str], what: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False, **kwargs)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-30:])
        raise ImageError(f"{what} failed ({proc.returncode}): {' '.join(argv[:3])} ...\n{tail}")
    return proc


def _log(message: str) -> None:
    print(f"[sidekey image] {message}", file=sys.stderr, flush=True)


# --- layers -------------------------------------------------------------------


class _Hashing(io.RawIOBase):
    """A write-only stream that hashes and counts what passes to the file under it."""

    def __init__(self, target: IO[bytes]) -> None:
        self.target, self.digest, self.size = target, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self.digest.update(chunk)
        self.size += len(chunk)
        self.target.write(chunk)
        return len(chunk)


@dataclass(frozen=True)
class Layer:
    """A gzip'd layer blob: ``digest`` names the blob, ``diff_id`` its uncompressed tar."""

    path: Path
    digest: str
    diff_id: str
    size: int
    comment: str

    def save(self) -> None:
        self.path.with_suffix(".json").write_text(json.dumps(
            {"digest": self.digest, "diff_id": self.diff_id, "size": self.size, "comment": self.comment}))

    @classmethod
    def load(cls, path: Path) -> Layer | None:
        meta = path.with_suffix(".json")
        if not (path.exists() and meta.exists()):
            return None
        data = json.loads(meta.read_text())
        return cls(path, data["digest"], data["diff_id"], data["size"], data["comment"])


@contextlib.contextmanager
def _layer_writer(path: Path, comment: str, done: list[Layer]) -> Iterator[tarfile.TarFile]:
    """Write a layer tar into ``path`` (gzip, reproducible), then record it in ``done``."""
    part = path.with_name(path.name + ".part")
    with part.open("wb") as raw:
        outer = _Hashing(raw)
        # Level 6: 12 s of CPU for the two big layers, once per recipe and lock, against
        # 1 s for level 1, whose deps layer is a third larger (38 MB, not 29) on every push.
        with gzip.GzipFile(fileobj=outer, mode="wb", compresslevel=6, mtime=0, filename="") as gz:
            inner = _Hashing(cast(IO[bytes], gz))
            with tarfile.open(fileobj=cast(IO[bytes], inner), mode="w|", format=tarfile.PAX_FORMAT) as tar:
                yield tar
    part.rename(path)
    layer = Layer(path, "sha256:" + outer.digest.hexdigest(), "sha256:" + inner.digest.hexdigest(),
                  outer.size, comment)
    layer.save()
    done.append(layer)


def _cached(name: str, key: str, comment: str, make: Callable[[tarfile.TarFile], None]) -> Layer:
    path = cache_dir() / "layers" / f"{name}-{key}.tar.gz"
    found = Layer.load(path)
    if found is not None:
        return found
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    done: list[Layer] = []
    with _layer_writer(path, comment, done) as tar:
        make(tar)
    _log(f"layer {name}: {done[0].size / 1e6:.1f} MB in {time.monotonic() - started:.1f} s")
    return done[0]


def _add_tree(tar: tarfile.TarFile, stage: Path, *, owners: dict[str, int] | None = None) -> None:
    """Add ``stage`` as the image's ``/``: root-owned, not group/other-writable, fixed mtime."""
    owners = owners or {}
    for path in sorted(stage.rglob("*"), key=lambda p: p.relative_to(stage).parts):
        name = path.relative_to(stage).as_posix()
        info = tar.gettarinfo(str(path), arcname=name)
        info.uid = info.gid = owners.get(name, 0)
        info.uname = info.gname = ""
        info.mtime = EPOCH
        info.mode &= 0o7755
        if info.isreg():
            with path.open("rb") as f:
                tar.addfile(info, f)
        else:
            tar.addfile(info)


# --- the Debian rootfs --------------------------------------------------------


def _architecture() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def debian_rootfs() -> Path:
    """``mmdebstrap --variant=minbase`` with PACKAGES, from the machine's apt sources (cached)."""
    args = ["--variant=minbase", f"--include={','.join(PACKAGES)}", f"--architectures={_architecture()}",
            *(f"--dpkgopt=path-exclude={p}" for p in DPKG_EXCLUDES),
            *(f"--dpkgopt=path-include={p}" for p in DPKG_INCLUDES)]
    path = cache_dir() / "rootfs" / f"{SUITE}-{_key(SUITE, args)}.tar"
    if path.exists():
        return path
    if shutil.which("mmdebstrap") is None:
        raise ImageError("mmdebstrap is missing: run hack/system-packages.sh as root "
                         "(or apt-get install mmdebstrap)")
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(".part.tar")
    started = time.monotonic()
    _log(f"mmdebstrap {SUITE} with {', '.join(PACKAGES)} (about a minute, once)")
    _run(["mmdebstrap", *args, SUITE, str(part)], "mmdebstrap", timeout=1800)
    part.rename(path)
    _log(f"rootfs: {path.stat().st_size / 1e6:.0f} MB in {time.monotonic() - started:.0f} s")
    return path


@dataclass
class Packages:
    """What dpkg knows about a rootfs: each package's fields and the paths it owns."""

    fields: dict[str, dict[str, str]] = field(default_factory=dict)
    owners: dict[str, set[str]] = field(default_factory=dict)  # path (no leading /) -> packages
    stanzas: dict[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls, tar: tarfile.TarFile) -> Packages:
        """Parse the dpkg database. Paths in the lists are as the packages ship them
        (``/lib/...``); the rootfs has them where usrmerge's links put them (``usr/lib/...``)."""
        found = cls()
        merged = {_name(m): m.linkname.removeprefix("./").rstrip("/") for m in tar.getmembers()
                  if m.issym() and "/" not in _name(m) and m.linkname.removeprefix("./").startswith("usr/")}
        for member in tar.getmembers():
            name = _name(member)
            if name == "var/lib/dpkg/status":
                found._parse_status(_text(tar, member))
            elif name.startswith("var/lib/dpkg/info/") and name.endswith(".list"):
                package = name.removeprefix("var/lib/dpkg/info/").removesuffix(".list").split(":")[0]
                for line in _text(tar, member).splitlines():
                    path = line.strip().lstrip("/")
                    top, _, rest = path.partition("/")
                    if top in merged and rest:
                        path = f"{merged[top]}/{rest}"
                    if path and path != ".":
                        found.owners.setdefault(path, set()).add(package)
        return found

    def _parse_status(self, text: str) -> None:
        for stanza in text.split("\n\n"):
            fields: dict[str, str] = {}
            last = ""
            for line in stanza.splitlines():
                if line[:1] in (" ", "\t") and last:
                    fields[last] += "\n" + line
                elif ":" in line:
                    last, _, value = line.partition(":")
                    fields[last] = value.strip()
            if "Package" in fields and "installed" in fields.get("Status", ""):
                self.fields[fields["Package"]] = fields
                self.stanzas[fields["Package"]] = stanza.strip() + "\n"

    def depends(self, package: str) -> list[str]:
        """The installed packages ``package`` depends on (first installed alternative of each)."""
        provides: dict[str, str] = {}
        for name, fields in self.fields.items():
            for item in fields.get("Provides", "").split(","):
                if item.strip():
                    provides.setdefault(item.split()[0], name)
        out = []
        for key in ("Pre-Depends", "Depends"):
            for clause in self.fields[package].get(key, "").split(","):
                for alternative in clause.split("|"):
                    dep = alternative.strip().split(" ")[0].split(":")[0]
                    if dep in self.fields or dep in provides:
                        out.append(dep if dep in self.fields else provides[dep])
                        break
        return out

    def closure(self, roots: Iterable[str], cut: frozenset[str]) -> set[str]:
        seen: set[str] = set()
        todo = [r for r in roots if r in self.fields]
        while todo:
            package = todo.pop()
            if package in seen or package in cut:
                continue
            seen.add(package)
            todo.extend(self.depends(package))
        return seen


def _name(member: tarfile.TarInfo) -> str:
    return member.name.removeprefix("./").rstrip("/")


def _text(tar: tarfile.TarFile, member: tarfile.TarInfo) -> str:
    f = tar.extractfile(member)
    return f.read().decode() if f else ""


def runtime_packages(packages: Packages) -> set[str]:
    return packages.closure([*PACKAGES, *ALSO_KEPT], INSTALL_ONLY)


def _in_runtime(name: str, packages: Packages, kept: set[str]) -> bool:
    owners = packages.owners.get(name)
    if owners is not None:
        return bool(owners & kept)
    return bool(RUNTIME_UNOWNED.search(name))


def _split_rootfs(rootfs: Path, runtime: bool) -> Callable[[tarfile.TarFile], None]:
    """The runtime part of the rootfs (``runtime=True``) or everything else but /dev's nodes."""

    def make(out: tarfile.TarFile) -> None:
        with tarfile.open(rootfs) as tar:
            packages = Packages.read(tar)
            kept = runtime_packages(packages)
            members = [m for m in tar.getmembers() if _name(m) and not _name(m).startswith("dev/")]
            chosen = {_name(m) for m in members if _in_runtime(_name(m), packages, kept) == runtime}
            if runtime:  # the parent directories of what is kept
                chosen |= {"/".join(n.split("/")[:i]) for n in list(chosen) for i in range(1, n.count("/") + 1)}
            written: set[str] = set()
            for member in members:
                name = _name(member)
                if name not in chosen:
                    continue
                info = copy.copy(member)
                if member.islnk() and member.linkname.removeprefix("./") not in written:
                    info = copy.copy(tar.getmember(member.linkname))  # the target lives in another layer
                elif member.islnk():
                    info.linkname = member.linkname.removeprefix("./")
                info.name = name
                if runtime and name in ("etc/passwd", "etc/group"):
                    _add_text(out, info, _text(tar, member) + _account_line(name))
                elif info.isreg():
                    out.addfile(info, tar.extractfile(member.linkname if member.islnk() else member))
                else:
                    out.addfile(info)
                written.add(name)
            if runtime:
                _add_runtime_extras(out, packages, kept)

    return make


def _account_line(name: str) -> str:
    if name == "etc/passwd":
        return f"nonroot:x:{UID}:{GID}:nonroot:/home/nonroot:/usr/sbin/nologin\n"
    return f"nonroot:x:{GID}:\n"


def _add_text(tar: tarfile.TarFile, info: tarfile.TarInfo, text: str) -> None:
    data = text.encode()
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _add_runtime_extras(tar: tarfile.TarFile, packages: Packages, kept: set[str]) -> None:
    """The nonroot user's home, and dpkg's record of what is kept (status.d, as distroless
    writes it, so image scanners see the packages)."""
    home = tarfile.TarInfo("home/nonroot")
    home.type, home.mode, home.uid, home.gid, home.mtime = tarfile.DIRTYPE, 0o700, UID, GID, EPOCH
    tar.addfile(home)
    for name in ("var/lib/dpkg", "var/lib/dpkg/status.d"):
        d = tarfile.TarInfo(name)
        d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, EPOCH
        tar.addfile(d)
    for package in sorted(kept):
        info = tarfile.TarInfo(f"var/lib/dpkg/status.d/{package}")
        info.mode, info.mtime = 0o644, EPOCH
        _add_text(tar, info, packages.stanzas[package])


def runtime_layer() -> Layer:
    rootfs = debian_rootfs()
    return _cached("runtime", _key(rootfs.name, PACKAGES, sorted(INSTALL_ONLY), ALSO_KEPT, RUNTIME_UNOWNED.pattern),
                   f"Debian {SUITE}: {', '.join(PACKAGES)} and what they need to run", _split_rootfs(rootfs, True))


def tools_layer() -> Layer:
    rootfs = debian_rootfs()
    return _cached("tools", _key(rootfs.name, PACKAGES, sorted(INSTALL_ONLY), ALSO_KEPT, RUNTIME_UNOWNED.pattern),
                   f"Debian {SUITE} minbase: the rest (shell, coreutils, dpkg, apt)", _split_rootfs(rootfs, False))


# --- Python: the venv and the project -----------------------------------------


@dataclass(frozen=True)
class Target:
    """The image's interpreter and platform, read from the rootfs: what pip must pick wheels for."""

    python: str  # "3.11"
    python_full: str  # "3.11.2"
    glibc: tuple[int, int]
    machine: str  # "x86_64"

    @classmethod
    def of(cls, rootfs: Path) -> Target:
        """Read once per rootfs (it takes seconds), then from the JSON next to it."""
        known = rootfs.with_suffix(".target.json")
        if known.exists():
            data = json.loads(known.read_text())
            return cls(data["python"], data["python_full"], tuple(data["glibc"]), data["machine"])
        with tarfile.open(rootfs) as tar:
            fields = Packages.read(tar).fields
        full = fields["python3"]["Version"].split("-")[0]
        major, minor = re.findall(r"\d+", fields["libc6"]["Version"])[:2]
        target = cls(".".join(full.split(".")[:2]), full, (int(major), int(minor)), platform.machine())
        known.write_text(json.dumps(dataclasses.asdict(target)))
        return target

    def pip_args(self) -> list[str]:
        tags = [f"manylinux_2_{m}_{self.machine}" for m in range(self.glibc[1], 16, -1)]
        tags += [f"manylinux2014_{self.machine}"]
        if self.machine == "x86_64":
            tags += ["manylinux2010_x86_64", "manylinux1_x86_64"]
        args = ["--python-version", self.python, "--implementation", "cp", "--abi", f"cp{self.python.replace('.', '')}"]
        for t in tags:
            args += ["--platform", t]
        return args

    @property
    def site_packages(self) -> str:
        return f"lib/python{self.python}/site-packages"


def _host_python(target: Target) -> str:
    """An interpreter of the image's version, for bytecode the image's Python accepts."""
    if f"{sys.version_info.major}.{sys.version_info.minor}" == target.python:
        return sys.executable
    found = shutil.which(f"python{target.python}")
    if found is None:
        raise ImageError(f"the image runs Python {target.python}; install python{target.python} here to build it")
    return found


def builder(target: Target) -> str:
    """A venv of the image's Python version with pip, and the lock's build tools (BUILD_ONLY,
    hash-checked) as the build backend of the project's wheel. Returns its python."""
    # wheel needs packaging, mypy typing-extensions: in the lock, and kept in the image too
    tools = _lock_entries(LOCK, BUILD_ONLY | {"packaging", "typing-extensions"})
    root = cache_dir() / f"builder-{_key(tools, target.python)}"
    python = root / "bin" / "python"
    if python.exists():
        return str(python)
    part = root.with_name(root.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    _run([_host_python(target), "-m", "venv", str(part)], "python -m venv (the builder)")
    locked = part / "build-tools.txt"
    locked.write_text(tools)
    _run([str(part / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
          "--require-hashes", "--only-binary=:all:", "--requirement", str(locked)], "pip install (the builder)",
         timeout=600)
    part.rename(root)  # venv scripts name the .part path; only its python -m is ever used
    return str(python)


def _compile(stage: Path, python: str) -> None:
    """Bytecode next to the sources, stamped with the paths the image has (tracebacks) and
    checked by nothing at run time: the files never change and the root is read-only."""
    _run([python, "-c", "import compileall, sys, py_compile; ok = compileall.compile_dir("
          "sys.argv[1], quiet=1, stripdir=sys.argv[1], prependdir='/', workers=2, "
          "invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH); sys.exit(0 if ok else 1)",
          str(stage)], "compileall")


def _lock_entries(lock: Path, names: Set[str], *, keep: bool = True) -> str:
    """The lock's entries (with their hashes) for ``names``, or all but them (``keep=False``)."""
    out, taking = [], False
    for line in lock.read_text().splitlines():
        if match := re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", line):
            taking = (match.group(1).lower().replace("_", "-") in names) == keep
        elif not line.startswith(" "):
            taking = False
        if taking:
            out.append(line)
    return "\n".join(out) + "\n"


def _venv_skeleton(stage: Path, venv: str, target: Target) -> Path:
    """What ``python -m venv`` makes on Debian, written by hand: the image's interpreter
    by symlink, and pyvenv.cfg (which makes site-packages the only one on sys.path)."""
    root = stage / venv.lstrip("/")
    (root / "bin").mkdir(parents=True)
    (root / target.site_packages).mkdir(parents=True)
    (root / "lib64").symlink_to("lib")
    (root / "bin" / "python").symlink_to(f"/usr/bin/python{target.python}")
    for alias in ("python3", f"python{target.python}"):
        (root / "bin" / alias).symlink_to("python")
    (root / "pyvenv.cfg").write_text(f"home = /usr/bin\ninclude-system-site-packages = false\n"
                                     f"version = {target.python_full}\n")
    return root / target.site_packages


def _pip_install(site_packages: Path, target: Target, *args: str) -> None:
    _run([builder(target), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
          "--no-compile", "--only-binary=:all:", "--target", str(site_packages), *target.pip_args(), *args],
         "pip install", timeout=1800)
    shutil.rmtree(site_packages / "bin", ignore_errors=True)  # console scripts with the host's shebang


def deps_layer(name: str, lock: Path, venv: str, target: Target) -> Layer:
    """A venv at ``venv`` holding exactly the lock, every file hash-checked."""
    # the build tools are in the lock to build the project; the Dockerfile removes them too
    requirements = _lock_entries(lock, BUILD_ONLY, keep=False)

    def make(tar: tarfile.TarFile) -> None:
        with tempfile.TemporaryDirectory(prefix="sidekey-image-") as tmp:
            stage = Path(tmp) / "root"
            site = _venv_skeleton(stage, venv, target)
            locked = Path(tmp) / "requirements.txt"
            locked.write_text(requirements)
            _log(f"pip install --require-hashes -r {lock.name} into {venv}")
            _pip_install(site, target, "--require-hashes", "--requirement", str(locked))
            _compile(stage, builder(target))
            _add_tree(tar, stage)

    return _cached(name, _key(requirements, venv, target), f"{venv}: {lock.name}", make)


def _project_source(tmp: Path) -> Path:
    """The files the Dockerfile copies, so the wheel holds the package folders and nothing else."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for folder in sorted(set(package_dirs.values())):
        # not the extensions an editable install wrote in place: the wheel compiles its own
        shutil.copytree(ROOT / folder, src / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "*.so"))
    return src


def _wheel(src: Path, target: Target) -> Path:
    """The sidekey wheel of ``src``, built once per source tree and builder (cached): the
    build compiles the request path (setup.py, about 40 s), and the sidekey and agent
    images, and a rebuild of the same tree, take the same wheel."""
    python = builder(target)
    wheels = cache_dir() / "wheels" / _key(hashlib.sha256(_tree_bytes(src)).hexdigest(), python)
    found = sorted(wheels.glob("sidekey-*.whl"))
    if found:
        return found[0]
    part = wheels.with_name(wheels.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    _run([python, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps",
          "--no-build-isolation", "--wheel-dir", str(part), str(src)], "pip wheel", timeout=600)
    part.rename(wheels)  # the build lock is held: no other build makes this entry meanwhile
    kept = sorted((p for p in wheels.parent.iterdir() if p.is_dir() and not p.name.endswith(".part")),
                  key=lambda p: p.stat().st_mtime, reverse=True)
    for old in kept[WHEELS_KEPT:]:  # a dev tree makes one per edit
        shutil.rmtree(old, ignore_errors=True)
    return next(wheels.glob("sidekey-*.whl"))


def app_layer(venv: str, target: Target, *, launcher: bool) -> Layer:
    """The sidekey wheel in ``venv`` (no dependencies: the lock's are below it) and the launcher.

    It is staged in a fixed folder (the build lock is held), since pip records the
    wheel's path in direct_url.json: the same tree then gives the same layer."""
    work = cache_dir() / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, work, True)
        tmp = str(work)
        stage = Path(tmp) / "root"
        site = stage / venv.lstrip("/") / target.site_packages
        site.mkdir(parents=True)
        wheel = _wheel(_project_source(Path(tmp)), target)
        # the wheel holds the request path's extensions, built here for the image's Python
        # and glibc (the builder's Python is the image's version): tagged linux_<machine>
        _pip_install(site, target, "--no-deps", "--platform", f"linux_{target.machine}", str(wheel))
        _forget_wheel_origin(site)
        if launcher:
            bin_dir = stage / venv.lstrip("/") / "bin"
            bin_dir.mkdir(parents=True)
            shutil.copyfile(LAUNCHER, bin_dir / "sidekey")
            (bin_dir / "sidekey").chmod(0o755)
        # The key is the installed tree before compiling (marshal's output is not
        # reproducible): the same sources reuse the same blob, so containerd and
        # registries keep one copy.
        key = _key(wheel.name, hashlib.sha256(_tree_bytes(stage)).hexdigest(), launcher)

        def make(tar: tarfile.TarFile) -> None:
            _compile(stage, builder(target))
            _add_tree(tar, stage)

        return _cached(f"app-{venv.strip('/').replace('/', '-')}", key, f"{venv}: {wheel.name}", make)


def _forget_wheel_origin(site: Path) -> None:
    """Drop pip's direct_url.json: it names the wheel's path and hash on the build
    machine (the hash changes with every build's zip timestamps), which mean nothing
    in the image and would make each build's layer different."""
    for record in site.glob("sidekey-*.dist-info/RECORD"):
        (record.parent / "direct_url.json").unlink(missing_ok=True)
        lines = record.read_text().splitlines(keepends=True)
        record.write_text("".join(line for line in lines if "/direct_url.json," not in line))


def _tree_bytes(stage: Path) -> bytes:
    out = io.BytesIO()
    for path in sorted(stage.rglob("*")):
        out.write(path.relative_to(stage).as_posix().encode() + b"\0")
        if path.is_symlink():
            out.write(os.readlink(path).encode())
        elif path.is_file():
            out.write(path.read_bytes())
    return out.getvalue()


# --- the OCI image layout -----------------------------------------------------


@dataclass(frozen=True)
class Image:
    """An OCI image layout archive on disk, and what it is called."""

    name: str  # repository:tag
    archive: Path
    manifest_digest: str
    config_digest: str  # the image ID containerd and the kubelet report
    layers: tuple[Layer, ...]
    config: dict[str, Any]


def _image_config(layers: Sequence[Layer], config: dict[str, Any]) -> dict[str, Any]:
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(EPOCH)),
        "architecture": _architecture(),
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created_by": f"sidekey.localcluster.image: {layer.comment}"} for layer in layers],
    }


def write_archive(name: str, layers: Sequence[Layer], config: dict[str, Any], archive: Path) -> Image:
    """An OCI image layout (oci-layout, index.json, blobs/) as one tar, ready for
    ``ctr images import``, ``skopeo copy oci-archive:...`` or ``crane push``."""
    config_blob = json.dumps(_image_config(layers, config), sort_keys=True).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": _sha256(config_blob), "size": len(config_blob)},
        "layers": [{"mediaType": MEDIA_LAYER, "digest": layer.digest, "size": layer.size} for layer in layers],
    }
    manifest_blob = json.dumps(manifest, sort_keys=True).encode()
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": MEDIA_MANIFEST, "digest": _sha256(manifest_blob), "size": len(manifest_blob),
            "platform": {"architecture": _architecture(), "os": "linux"},
            "annotations": {"io.containerd.image.name": name,
                            "org.opencontainers.image.ref.name": name.rpartition(":")[2]},
        }],
    }
    archive.parent.mkdir(parents=True, exist_ok=True)
    part = archive.with_name(archive.name + ".part")
    with tarfile.open(part, "w", format=tarfile.PAX_FORMAT) as tar:
        def add(path: str, data: bytes) -> None:
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), 0o644, EPOCH
            tar.addfile(info, io.BytesIO(data))

        add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add("index.json", json.dumps(index, sort_keys=True).encode())
        add(f"blobs/sha256/{_sha256(config_blob)[7:]}", config_blob)
        add(f"blobs/sha256/{_sha256(manifest_blob)[7:]}", manifest_blob)
        for layer in layers:
            info = tarfile.TarInfo(f"blobs/sha256/{layer.digest[7:]}")
            info.size, info.mode, info.mtime = layer.size, 0o644, EPOCH
            with layer.path.open("rb") as f:
                tar.addfile(info, f)
    part.rename(archive)
    return Image(name, archive, _sha256(manifest_blob), _sha256(config_blob), tuple(layers), config)


def read_archive(archive: Path) -> tuple[dict[str, Any], dict[str, Any], list[Path]]:
    """(index.json, the image config, the layer blobs in order) of an archive unpacked
    into a folder next to it: what a registry or containerd would read."""
    layout = archive.with_name(archive.name.removesuffix(".tar") + ".layout")
    shutil.rmtree(layout, ignore_errors=True)
    with tarfile.open(archive) as tar:
        tar.extractall(layout, filter="data")

    def blob(digest: str) -> Path:
        return layout / "blobs" / "sha256" / digest.removeprefix("sha256:")

    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(blob(index["manifests"][0]["digest"]).read_text())
    config = json.loads(blob(manifest["config"]["digest"]).read_text())
    return index, config, [blob(layer["digest"]) for layer in manifest["layers"]]


def unpack(archive: Path, rootfs: Path) -> None:
    """The image's filesystem, layer over layer, with the owners and modes it declares
    (as root; no whiteouts: these layers never delete)."""
    rootfs.mkdir(parents=True, exist_ok=True)
    for layer in read_archive(archive)[2]:
        with tarfile.open(layer) as tar:
            tar.extractall(rootfs, numeric_owner=True, filter="tar")


def sidekey_config() -> dict[str, Any]:
    """The Dockerfile's runtime settings, the same values."""
    return {
        "User": f"{UID}:{GID}",
        "Entrypoint": [ENTRYPOINT],
        "Cmd": ["--help"],
        "Env": list(ENV),
        "WorkingDir": "/",
        "ExposedPorts": {f"{port}/tcp": {} for port in PORTS},
        "Labels": {"org.opencontainers.image.title": "sidekey",
                   "org.opencontainers.image.version": tag(),
                   "org.opencontainers.image.source": "https://github.com/sidekey/sidekey"},
    }


def agent_config() -> dict[str, Any]:
    return {
        "User": f"{AGENT_UID}:{AGENT_UID}",
        "Entrypoint": [f"{AGENT_VENV}/bin/python"],
        "Env": [f"PATH={AGENT_VENV}/bin:/usr/local/bin:/usr/bin:/bin", "PYTHONUNBUFFERED=1"],
        "WorkingDir": "/tmp",
        "Labels": {"org.opencontainers.image.title": "sidekey test agent (openai, anthropic)"},
    }


@contextlib.contextmanager
def _build_lock() -> Iterator[None]:
    """One build at a time per cache (a test and the node fixture may both ask)."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with (cache_dir() / ".lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_sidekey(output: Path) -> Image:
    """The project's image: runtime, the lock's venv, the project."""
    with _build_lock():
        started = time.monotonic()
        runtime = runtime_layer()
        target = Target.of(debian_rootfs())
        layers = [runtime, deps_layer("deps", LOCK, VENV, target), app_layer(VENV, target, launcher=True)]
        image = write_archive(reference(), layers, sidekey_config(), output / f"sidekey-{tag()}.oci.tar")
        _log(f"{image.name}: {image.archive} ({image.archive.stat().st_size / 1e6:.0f} MB) "
             f"in {time.monotonic() - started:.1f} s")
        return image


def build_agent(output: Path) -> Image:
    """The test agent: the same runtime, the rest of minbase, the SDKs, sidekey's client."""
    with _build_lock():
        started = time.monotonic()
        target = Target.of(debian_rootfs())
        layers = [runtime_layer(), tools_layer(), deps_layer("agent-deps", AGENT_LOCK, AGENT_VENV, target),
                  app_layer(AGENT_VENV, target, launcher=False)]
        image = write_archive(reference(AGENT_REPOSITORY), layers, agent_config(),
                              output / f"agent-{tag()}.oci.tar")
        _log(f"{image.name}: {image.archive} ({image.archive.stat().st_size / 1e6:.0f} MB) "
             f"in {time.monotonic() - started:.1f} s")
        return image


def import_into_containerd(image: Image, *, ctr: Path, address: Path, namespace: str = "k8s.io") -> None:
    """``ctr images import``: the kubelet then finds the image with no registry (pull policy
    IfNotPresent or Never). containerd keeps the name; a rebuilt image replaces it."""
    _run([str(ctr), "--address", str(address), "--namespace", namespace, "images", "import", str(image.archive)],
         f"ctr images import {image.name}", timeout=600)


def default_output() -> Path:
    return ROOT / "dist"


def node_containerd() -> tuple[Path, Path | None]:
    """The local node's containerd socket (localcluster/node.py) and the ctr built with it."""
    state = Path(os.environ.get("SIDEKEY_NODE_STATE", "/var/tmp/sidekey-node"))
    cached = subprocess.run(["bash", str(ROOT / "localcluster" / "build-node-binaries.sh"), "--check"],
                            capture_output=True, text=True, check=False)
    ctr = Path(cached.stdout.strip()) / "ctr" if cached.returncode == 0 else None
    return state / "run" / "containerd.sock", ctr


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hack/image",
        description=f"Build {reference()} (and the test agent image) as OCI archives, with no Docker.")
    parser.add_argument("--output", type=Path, default=default_output(), help="where the archives go (default: dist/)")
    parser.add_argument("--agent", action="store_true", help="also build the test agent image")
    parser.add_argument("--import", dest="import_to", metavar="SOCKET", type=Path, nargs="?", const=Path(),
                        help="import into the containerd on SOCKET, k8s.io namespace (default: the local "
                             "node's, localcluster/node.py)")
    parser.add_argument("--ctr", type=Path, default=None,
                        help="the ctr binary for --import (default: the node's build, else PATH)")
    args = parser.parse_args(argv)
    try:
        images = [build_sidekey(args.output)]
        if args.agent:
            images.append(build_agent(args.output))
        if args.import_to is not None:
            socket, node_ctr = node_containerd()
            address = args.import_to if args.import_to != Path() else socket
            found = args.ctr or node_ctr or shutil.which("ctr")
            if found is None:
                raise ImageError("no ctr: pass --ctr, or build the node's binaries (localcluster/build-node-binaries.sh)")
            if not address.exists():
                raise ImageError(f"no containerd socket at {address}: is the local node up?")
            for built in images:
                import_into_containerd(built, ctr=Path(found), address=address)
                _log(f"imported {built.name} into {address}")
    except ImageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for built in images:
        print(f"{built.name} {built.archive}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
