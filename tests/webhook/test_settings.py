"""The settings file: defaults, and errors that name the key to fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidekey.core import contract
from sidekey.webhook import settings


def test_an_empty_file_means_every_default(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text("")
    s = settings.load(f)
    assert s == settings.Settings()
    assert (s.port, s.health_port, s.audience) == (
        contract.DEFAULT_PROXY_PORT, contract.DEFAULT_HEALTH_PORT, contract.DEFAULT_AUDIENCE)


def test_the_chart_shaped_file_parses(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text("""
image: ghcr.io/sidekey/sidekey:0.2.0
imageAllowList: [ghcr.io/sidekey/sidekey:0.1.0]
imagePullPolicy: Always
port: 9000
healthPort: 9001
audience: agents.example.com
resources: {requests: {cpu: 10m, memory: 32Mi}, limits: {cpu: "1", memory: 64Mi}}
excludedNamespaces: [legacy]
logLevel: DEBUG
""")
    s = settings.load(f)
    assert s.allows_image("ghcr.io/sidekey/sidekey:0.2.0") and s.allows_image("ghcr.io/sidekey/sidekey:0.1.0")
    assert not s.allows_image("ghcr.io/sidekey/sidekey:evil")
    assert s.resources == settings.Resources("10m", "32Mi", "1", "64Mi")
    assert s.excluded_namespaces == {"legacy"} and s.log_level == "debug"


@pytest.mark.parametrize(("raw", "key"), [
    ({"imag": "x"}, "imag"),
    ({"port": "8787"}, "port"),
    ({"port": 0}, "port"),
    ({"port": 9000, "healthPort": 9000}, "healthPort"),
    ({"imagePullPolicy": "Sometimes"}, "imagePullPolicy"),
    ({"resources": {"requests": {"cpu": "fast"}}}, "resources.requests.cpu"),
    ({"resources": {"requests": {"gpu": "1"}}}, "resources.requests.gpu"),
    ({"audience": ""}, "audience"),
    ({"excludedNamespaces": "a,b"}, "excludedNamespaces"),
    ({"logLevel": "loud"}, "logLevel"),
])
def test_a_bad_value_names_its_key(raw: dict[str, object], key: str) -> None:
    with pytest.raises(settings.SettingsError) as caught:
        settings.from_mapping(raw)
    assert caught.value.key == key


def test_a_file_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(settings.SettingsError, match="mapping"):
        settings.load(f)
