"""The image ``hack/image`` builds keeps the Dockerfile's promises, read from the archive.

The archive is built here (or its cached layers reused: a warm build takes a
few seconds) and read as a registry or containerd would: the OCI layout, the
config, each layer's file list. The running checks unpack it and start the
entry point in a private mount namespace, chrooted into the image's root
mounted read-only, as UID 65532, so "a read-only root filesystem works" and
"no shell needed" are shown by running it, not by reading the Dockerfile.
The chart's pods run this image on a real node in tests/node/test_install.py.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from sidekey.core import contract
from sidekey.localcluster import image

pytestmark = pytest.mark.timeout(1800)  # a cold build runs mmdebstrap and pip: a few minutes

SHELLS = {"sh", "bash", "dash", "rbash", "zsh", "ash", "busybox", "ksh", "csh", "tcsh", "fish"}
EVIL = '''
import pathlib
pathlib.Path("/tmp/work/ran").write_text(__name__)
class Hook(Warning):
    pass
'''


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> image.Image:
    return image.build_sidekey(tmp_path_factory.mktemp("image"))


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> image.Image:
    return image.build_agent(tmp_path_factory.mktemp("agent-image"))


@pytest.fixture(scope="module")
def layout(built: image.Image) -> tuple[dict[str, Any], dict[str, Any], list[Path]]:
    return image.read_archive(built.archive)


@pytest.fixture(scope="module")
def members(layout: tuple[dict[str, Any], dict[str, Any], list[Path]]) -> dict[str, tarfile.TarInfo]:
    """Every path of the image, as the top layer holding it declares it."""
    found: dict[str, tarfile.TarInfo] = {}
    for blob in layout[2]:
        with tarfile.open(blob) as tar:
            for member in tar.getmembers():
                found[member.name] = member
    return found


@pytest.fixture(scope="module")
def rootfs(built: image.Image, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rootfs") / "root"
    image.unpack(built.archive, root)
    return root


def run_in(root: Path, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
           work: Path | None = None, user: str = "65532:65532") -> subprocess.CompletedProcess[str]:
    """``argv`` in the image: its root bind-mounted read-only, a writable /tmp (the chart's
    emptyDir) from ``work``, as ``user``, with exactly ``env``. The mounts live in a mount
    namespace of their own and go when the command ends."""
    assert os.geteuid() == 0, "the image checks need root (unshare --mount, chroot)"
    script = ('set -e; /usr/bin/mount --bind "$R" "$R"; /usr/bin/mount -o remount,bind,ro "$R"; '
              'if [ -n "$W" ]; then /usr/bin/mount --bind "$W" "$R/tmp"; fi; '
              'exec /usr/sbin/chroot --userspec="$U" "$R" "$@"')
    outer = {"R": str(root), "W": str(work or ""), "U": user, **(env or {})}
    return subprocess.run(["/usr/bin/unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", script,
                           "sh", *argv], env=outer, capture_output=True, text=True, timeout=120, check=False)


# --- the archive, as a registry or containerd reads it ------------------------


def test_the_archive_is_an_oci_layout_containerd_imports_by_name(
        built: image.Image, layout: tuple[dict[str, Any], dict[str, Any], list[Path]]) -> None:
    index, config, blobs = layout
    root = blobs[0].parents[2]
    assert json.loads((root / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    [entry] = index["manifests"]
    assert entry["annotations"]["io.containerd.image.name"] == image.reference() == built.name
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == image.tag()
    assert entry["platform"]["os"] == "linux"
    manifest_bytes = (root / "blobs" / "sha256" / entry["digest"].removeprefix("sha256:")).read_bytes()
    assert "sha256:" + hashlib.sha256(manifest_bytes).hexdigest() == entry["digest"]
    manifest = json.loads(manifest_bytes)
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    # Each blob is named by its digest, and each diff_id is the digest of the uncompressed layer.
    for described, blob, diff_id in zip(manifest["layers"], blobs, config["rootfs"]["diff_ids"], strict=True):
        data = blob.read_bytes()
        assert described["digest"] == "sha256:" + hashlib.sha256(data).hexdigest()
        assert described["size"] == len(data)
        assert diff_id == "sha256:" + hashlib.sha256(gzip.decompress(data)).hexdigest()
    assert len(blobs) == 3  # runtime, the lock's venv, the project


def test_the_config_keeps_the_dockerfiles_promises(
        layout: tuple[dict[str, Any], dict[str, Any], list[Path]]) -> None:
    config = layout[1]["config"]
    assert config["Entrypoint"] == [image.ENTRYPOINT] == ["/opt/sidekey/bin/sidekey"]
    assert contract.SIDECAR_COMMAND[0] == image.ENTRYPOINT  # what the webhook injects
    assert re.fullmatch(r"\d+:\d+", config["User"]), "a numeric user, so runAsNonRoot can verify it"
    assert config["User"] == f"{contract.SIDECAR_UID}:{contract.SIDECAR_UID}"
    assert "PATH=/opt/sidekey/bin:/usr/local/bin:/usr/bin:/bin" in config["Env"]
    assert layout[1]["architecture"] and layout[1]["os"] == "linux"


def test_the_image_holds_no_shell_and_no_package_manager(members: dict[str, tarfile.TarInfo]) -> None:
    names = {Path(name).name for name in members if not members[name].isdir()}
    assert not names & SHELLS, sorted(names & SHELLS)
    commands = {Path(name).name for name in members if re.match(r"(usr/(local/)?s?bin|opt/sidekey/bin)/", name)}
    assert not commands & {"dpkg", "apt", "apt-get", "perl", "mawk", "ls", "cat", "env"}, sorted(commands)
    # The entry point is a script whose interpreter is Python itself, by absolute path.
    assert members["opt/sidekey/bin/sidekey"].isreg()
    assert members["opt/sidekey/bin/python"].issym()
    assert members["usr/bin/python3.11"].isreg()


def test_every_file_is_root_owned_and_none_writable_by_the_runtime_user(
        members: dict[str, tarfile.TarInfo]) -> None:
    uid = contract.SIDECAR_UID
    assert {name for name, m in members.items() if m.uid != 0} == {"home/nonroot"}
    assert members["home/nonroot"].uid == uid and members["home/nonroot"].mode & 0o777 == 0o700
    group_writable = {n for n, m in members.items() if m.gid == uid and m.mode & 0o020 and not m.issym()}
    assert group_writable == set()
    world_writable = {n for n, m in members.items() if m.mode & 0o002 and not m.issym()}
    assert world_writable == {"tmp", "var/tmp"}, sorted(world_writable)
    assert all(members[n].mode & 0o1000 for n in world_writable)  # sticky, like any /tmp
    assert not {n for n, m in members.items() if m.mode & 0o6000 and not m.isdir()}  # no setuid/setgid
    # The code that runs is root's: the sidecar cannot change its own launcher or venv.
    assert all(m.uid == 0 and not m.mode & 0o022 for n, m in members.items()
               if n.startswith("opt/sidekey") and not m.issym())


def test_the_venv_holds_exactly_the_lock(rootfs: Path) -> None:
    pins = {m.group(1).lower().replace("_", "-"): m.group(2)
            for m in re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+) \\$", image.LOCK.read_text(), re.M)}
    for name in image.BUILD_ONLY:  # build tools only (setup.py's compile), as the Dockerfile removes them
        del pins[name]
    site = rootfs / "opt" / "sidekey" / "lib" / "python3.11" / "site-packages"
    installed = {}
    for dist in site.glob("*.dist-info"):
        meta = (dist / "METADATA").read_text()
        name = re.search(r"^Name: (.+)$", meta, re.M)
        version = re.search(r"^Version: (.+)$", meta, re.M)
        assert name and version
        installed[name.group(1).strip().lower().replace("_", "-")] = version.group(1).strip()
    assert installed.pop("sidekey") == image.project_version()
    assert installed == pins


# --- running it ---------------------------------------------------------------


def test_the_entry_point_runs_on_a_read_only_root_as_65532(rootfs: Path, tmp_path: Path) -> None:
    env = {"PATH": "/opt/sidekey/bin:/usr/bin:/bin"}
    version = run_in(rootfs, [image.ENTRYPOINT, "--version"], env=env, work=tmp_path)
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"sidekey {image.project_version()}"
    for part in ("proxy", "webhook", "operator"):  # each imports its whole module tree
        shown = run_in(rootfs, [image.ENTRYPOINT, part, "--help"], env=env, work=tmp_path)
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.startswith(f"usage: sidekey {part}")
    # The root really is read-only here, and the user really is 65532.
    probe = run_in(rootfs, ["/opt/sidekey/bin/python", "-c",
                            "import os\ntry:\n open('/opt/sidekey/x', 'w')\nexcept OSError as e:\n print(e.errno)\n"
                            "print(os.getuid(), os.getgid())"], env=env, work=tmp_path)
    assert probe.stdout.split() == ["30", "65532", "65532"], probe.stderr  # 30: EROFS
    # The bytecode is in the image: nothing was, or had to be, written.
    assert not list(tmp_path.iterdir())


def test_the_helm_test_pods_python_and_the_venv_work(rootfs: Path, tmp_path: Path) -> None:
    shown = run_in(rootfs, ["/opt/sidekey/bin/python", "-c",
                            "import ssl, urllib.request, kopf, kubernetes, aiohttp, cryptography, sidekey.core;"
                            "print(ssl.get_default_verify_paths().cafile)"],
                   env={"PATH": "/opt/sidekey/bin:/usr/bin:/bin"}, work=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == "/usr/lib/ssl/cert.pem"
    assert (rootfs / "etc" / "ssl" / "certs" / "ca-certificates.crt").stat().st_size > 100_000


_VERIFY_IN_IMAGE = """
import json, ssl, sys
from sidekey.core import openssl, tokens
cases = json.loads(sys.argv[1])
answers = [tokens._ALGORITHMS[alg].verify(tokens.import_jwk(jwk), msg.encode(), bytes.fromhex(sig))
           for jwk, alg, msg, sig in cases]
print(json.dumps({"answers": answers, "soname": openssl.soname(), "version": ssl.OPENSSL_VERSION,
                  "cryptography": "cryptography" in sys.modules}))
"""


_COMPILED_IN_IMAGE = """
import importlib, importlib.machinery, importlib.util, json, sys
out = {}
for name in json.loads(sys.argv[1]):
    package, _, leaf = name.rpartition(".")
    out[name] = importlib.machinery.PathFinder.find_spec(leaf, importlib.import_module(package).__path__).origin
from sidekey.proxy import fastpath, listener
out["exchange"] = issubclass(fastpath.Exchange, listener.Exchange)
out["build_tools"] = [m for m in ("mypy", "mypyc", "setuptools") if importlib.util.find_spec(m)]
print(json.dumps(out))
"""


def test_the_request_path_runs_compiled_on_the_images_own_python(rootfs: Path, tmp_path: Path) -> None:
    """setup.py's C extensions are in the wheel, built for the image's Python (3.11 of Debian,
    not the builder's): each compiled module imports as an extension there, and the compiler
    that built them is not in the image."""
    from bench.compiled import modules

    shown = run_in(rootfs, ["/opt/sidekey/bin/python", "-IB", "-c", _COMPILED_IN_IMAGE, json.dumps(modules())],
                   env={"PATH": "/opt/sidekey/bin:/usr/bin:/bin"}, work=tmp_path)
    assert shown.returncode == 0, shown.stderr
    out = json.loads(shown.stdout)
    assert out.pop("exchange") is True
    assert out.pop("build_tools") == []
    for name, origin in out.items():
        assert origin.startswith("/opt/sidekey/lib/python3.11/site-packages/sidekey/proxy/"), (name, origin)
        assert origin.endswith(".so") and ".cpython-311-" in origin, (name, origin)
    assert sorted(out) == sorted(modules())


def test_the_sidecar_verifies_signatures_with_the_images_own_libcrypto(rootfs: Path, tmp_path: Path) -> None:
    """core/openssl opens libcrypto by the soname of the OpenSSL the image's Python runs on (no
    ldconfig, no shell), and
    verifies RSA, PSS and EC signatures made here by cryptography, which the image's sidecar never loads."""
    import base64

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

    def b64(number: int, size: int) -> str:
        return base64.urlsafe_b64encode(number.to_bytes(size, "big")).rstrip(b"=").decode()

    message = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0"
    rsa_key, ec_key = rsa.generate_private_key(65537, 2048), ec.generate_private_key(ec.SECP256R1())
    rn, en = rsa_key.public_key().public_numbers(), ec_key.public_key().public_numbers()
    rsa_jwk = {"kty": "RSA", "n": b64(rn.n, 256), "e": b64(rn.e, 3)}
    ec_jwk = {"kty": "EC", "crv": "P-256", "x": b64(en.x, 32), "y": b64(en.y, 32)}
    rs256 = rsa_key.sign(message.encode(), padding.PKCS1v15(), hashes.SHA256())
    ps256 = rsa_key.sign(message.encode(), padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
    r, s = utils.decode_dss_signature(ec_key.sign(message.encode(), ec.ECDSA(hashes.SHA256())))
    es256 = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    cases = [(rsa_jwk, "RS256", message, rs256.hex()), (rsa_jwk, "PS256", message, ps256.hex()),
             (ec_jwk, "ES256", message, es256.hex()), (rsa_jwk, "RS256", message + "x", rs256.hex()),
             (ec_jwk, "ES256", message, (es256[:-1] + bytes([es256[-1] ^ 1])).hex())]
    shown = run_in(rootfs, ["/opt/sidekey/bin/python", "-IB", "-c", _VERIFY_IN_IMAGE, json.dumps(cases)],
                   env={"PATH": "/opt/sidekey/bin:/usr/bin:/bin"}, work=tmp_path)
    assert shown.returncode == 0, shown.stderr
    out = json.loads(shown.stdout)
    assert out["answers"] == [True, True, True, False, False]
    # the one Debian's libssl3 installs (the import checked its version is ssl's: there is no /proc to read)
    assert out["soname"] == "libcrypto.so.3" and out["version"].startswith("OpenSSL 3."), out
    assert list(rootfs.glob("usr/lib/*/libcrypto.so.3")), "no libcrypto.so.3 in the image"
    assert not out["cryptography"]


def test_the_entry_point_ignores_the_environment_and_path(rootfs: Path, tmp_path: Path) -> None:
    """Issue 14: a look-alike sidecar's env must not run code in the real sidecar's interpreter."""
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "evil.py").write_text(EVIL)
    for name in ("python", "python3", "python3.11", "sidekey"):  # PATH shadows, if PATH were asked
        (evil / name).write_text('#!/usr/bin/python3.11\nimport pathlib\npathlib.Path("/tmp/work/ran").write_text("path")\n')
        (evil / name).chmod(0o755)
    (tmp_path / "work").mkdir()
    for path in (tmp_path, evil, tmp_path / "work"):
        path.chmod(0o777)
    hostile = {
        "PATH": "/tmp/evil:/opt/sidekey/bin:/usr/bin:/bin",
        "PYTHONPATH": "/tmp/evil",
        "PYTHONWARNINGS": "ignore::evil.Hook",  # imports the module named at start-up
        "PYTHONSTARTUP": "/tmp/evil/evil.py",
        "PYTHONINSPECT": "1",
        "PYTHONHOME": "/tmp/evil",  # would break start-up altogether
        "PYTHONSAFEPATH": "",
        "PYTHONUSERBASE": "/tmp/evil",
    }
    # The control: the same env makes the venv's interpreter run the hostile module.
    control_env = {k: v for k, v in hostile.items() if k not in ("PYTHONHOME", "PYTHONINSPECT")}
    control = run_in(rootfs, ["/opt/sidekey/bin/python", "-c", "pass"], env=control_env, work=tmp_path)
    assert control.returncode == 0, control.stderr
    assert (tmp_path / "work" / "ran").read_text() == "evil"
    (tmp_path / "work" / "ran").unlink()

    isolated = run_in(rootfs, [image.ENTRYPOINT, "--version"], env=hostile, work=tmp_path)
    assert isolated.returncode == 0, isolated.stderr
    assert isolated.stdout.strip() == f"sidekey {image.project_version()}"
    assert not (tmp_path / "work" / "ran").exists()


# --- caching and the agent image ----------------------------------------------


def test_a_code_change_rebuilds_only_the_top_layer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = image.build_sidekey(tmp_path / "before")
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "requirements.lock"):
        shutil.copy2(image.ROOT / name, checkout / name)
    for folder in ("cli", "core", "proxy", "webhook", "operator", "client", "localcluster", "demo"):
        shutil.copytree(image.ROOT / folder, checkout / folder, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    with (checkout / "core" / "contract.py").open("a") as f:
        f.write("\n# a code change\n")
    monkeypatch.setattr(image, "ROOT", checkout)
    changed = image.build_sidekey(tmp_path / "out")
    assert [layer.digest for layer in changed.layers[:2]] == [layer.digest for layer in built.layers[:2]]
    assert changed.layers[2].digest != built.layers[2].digest
    monkeypatch.undo()
    again = image.build_sidekey(tmp_path / "again")
    assert again.manifest_digest == built.manifest_digest  # the same tree, the same image


def test_the_agent_image_has_the_sdks_and_shares_the_runtime_layer(
        agent: image.Image, built: image.Image, tmp_path: Path) -> None:
    assert agent.name == image.reference(image.AGENT_REPOSITORY)
    assert agent.layers[0].digest == built.layers[0].digest  # one copy in containerd
    root = tmp_path / "root"
    image.unpack(agent.archive, root)
    (tmp_path / "tmp").mkdir()
    shown = run_in(root, ["/opt/agent/bin/python", "-c",
                          "import openai, anthropic, httpx, sidekey.client as c; print(c.read_token.__name__)"],
                   env={"PATH": "/opt/agent/bin:/usr/bin:/bin"}, work=tmp_path / "tmp", user="1000:1000")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == "read_token"
    pins = dict(re.findall(r"^([a-z0-9_.-]+)==(\S+) \\$", image.AGENT_LOCK.read_text(), re.M))
    site = root / "opt" / "agent" / "lib" / "python3.11" / "site-packages"
    for sdk in ("openai", "anthropic"):
        assert (site / f"{sdk}-{pins[sdk]}.dist-info").is_dir()
    assert (root / "bin" / "sh").exists()  # the test agent keeps a shell, for kubectl exec


def test_hack_image_needs_neither_docker_nor_the_projects_venv(built: image.Image, tmp_path: Path) -> None:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": os.environ["HOME"]}
    if "SIDEKEY_IMAGE_CACHE" in os.environ:
        env["SIDEKEY_IMAGE_CACHE"] = os.environ["SIDEKEY_IMAGE_CACHE"]
    proc = subprocess.run([str(image.ROOT / "hack" / "image"), "--output", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr
    archive = tmp_path / f"sidekey-{image.tag()}.oci.tar"
    assert proc.stdout.split() == [image.reference(), str(archive)]
    assert image.read_archive(archive)[1]["config"] == built.config
