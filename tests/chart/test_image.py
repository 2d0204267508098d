"""The Dockerfile and its lock file agree with the project, the chart and hack/image.

No container engine runs here, so the Dockerfile cannot be built in the tests;
what can be checked is that every path and number it uses is the one the chart,
the webhook and ``hack/image`` use (tests/image/ builds that image and checks
it), and that every dependency is pinned with hashes.
"""

from __future__ import annotations

import re
import tomllib

from sidekey.core import contract
from sidekey.localcluster import helm, image

DOCKERFILE = (helm.ROOT / "Dockerfile").read_text()
LOCK = (helm.ROOT / "requirements.lock").read_text()


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _pins() -> dict[str, list[str]]:
    """name -> hashes, from the lock."""
    pins: dict[str, list[str]] = {}
    current = None
    for line in LOCK.splitlines():
        if m := re.match(r"^([A-Za-z0-9_.-]+)==\S+ \\$", line):
            current = m.group(1).lower().replace("_", "-")
            pins[current] = []
        elif current and (m := re.search(r"--hash=sha256:([0-9a-f]{64})", line)):
            pins[current].append(m.group(1))
    return pins


def test_every_dependency_is_pinned_with_hashes() -> None:
    project = tomllib.loads((helm.ROOT / "pyproject.toml").read_text())
    pins = _pins()
    wanted = [_name(r) for r in project["project"]["dependencies"]]
    wanted += [_name(r) for r in project["build-system"]["requires"]]
    for name in wanted:
        assert name in pins, f"{name} is not in requirements.lock; regenerate it (see the Dockerfile)"
    assert all(pins.values()), [n for n, h in pins.items() if not h]


def test_the_image_installs_only_hash_checked_files_from_the_lock() -> None:
    assert "--require-hashes" in DOCKERFILE
    assert "--requirement /src/requirements.lock" in DOCKERFILE
    assert "--no-deps" in DOCKERFILE  # the project itself adds nothing unlocked


def test_the_image_runs_as_the_charts_numeric_user() -> None:
    user = re.search(r"^USER (\d+):(\d+)$", DOCKERFILE, re.M)
    assert user, "USER must be numeric, so runAsNonRoot can verify it"
    uid = int(user.group(1))
    assert uid == contract.SIDECAR_UID
    for doc in helm.template():
        if doc["kind"] == "Deployment":
            assert doc["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == uid


def test_the_sidekey_command_is_the_entrypoint_and_injected_by_absolute_path() -> None:
    assert f'ENTRYPOINT ["{image.ENTRYPOINT}"]' in DOCKERFILE
    assert re.search(r"PATH=/opt/sidekey/bin:", DOCKERFILE)
    # PATH can shadow nothing: the sidecar's command names the launcher itself.
    assert contract.SIDECAR_COMMAND[0] == image.ENTRYPOINT
    for doc in helm.template():
        if doc["kind"] == "Deployment":
            args = doc["spec"]["template"]["spec"]["containers"][0]["args"]
            assert args[0] in ("operator", "webhook"), args


def test_the_dockerfile_installs_the_isolated_launcher_hack_image_uses() -> None:
    copy = re.search(r"^COPY --chmod=755 (\S+) (\S+)$", DOCKERFILE, re.M)
    assert copy, "the Dockerfile must install the launcher"
    assert (helm.ROOT / copy.group(1)).resolve() == image.LAUNCHER.resolve()
    assert copy.group(2) == image.ENTRYPOINT
    assert image.LAUNCHER.read_text().splitlines()[0] == f"#!{image.VENV}/bin/python -IBu"
    assert re.search(rf"python3 -m venv {image.VENV}$", DOCKERFILE, re.M)


def test_the_dockerfile_and_hack_image_declare_the_same_runtime_settings() -> None:
    config = image.sidekey_config()
    assert re.search(rf"^USER {config['User']}$", DOCKERFILE, re.M)
    env = dict(item.split("=", 1) for item in config["Env"])
    block = re.search(r"^ENV (.+?)\n(?!\s)", DOCKERFILE, re.M | re.S)
    assert block
    assert dict(re.findall(r"(\w+)=(\S+)", block.group(1))) == env
    exposed = re.search(r"^EXPOSE (.+)$", DOCKERFILE, re.M)
    assert exposed
    assert {f"{p}/tcp" for p in exposed.group(1).split()} == set(config["ExposedPorts"])


def test_the_dockerfile_copies_every_package_folder() -> None:
    project = tomllib.loads((helm.ROOT / "pyproject.toml").read_text())
    folders = set(project["tool"]["setuptools"]["package-dir"].values())
    copied = {m.split()[0] for m in re.findall(r"^COPY (\S+) /src/\S+$", DOCKERFILE, re.M)}
    assert folders <= copied, f"pip install /src would fail without {sorted(folders - copied)}"


def test_every_copied_path_exists_and_is_in_the_build_context() -> None:
    ignore = (helm.ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for source in re.findall(r"^COPY (?!--from)(?:--\S+ )*(.+) \S+$", DOCKERFILE, re.M):
        for path in source.split():
            assert (helm.ROOT / path).exists(), path
            assert path.split("/")[0] in allowed, f"{path} is excluded by .dockerignore"
