"""Where the apiserver is and who we are to it: in-cluster config, kubeconfigs, TLS."""

from __future__ import annotations

import base64
import ssl
import tempfile
from pathlib import Path

import pytest
import yaml

from sidekey.core import apiconfig, certificates, contract, kubeapi


def test_in_cluster_config_reads_the_token_dir_and_server_from_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "token").write_text("t")
    (tmp_path / "ca.crt").write_text("ca")
    monkeypatch.setenv(contract.ENV_API_TOKEN_DIR, str(tmp_path))
    monkeypatch.setenv(contract.ENV_API_SERVER, "https://127.0.0.1:6443/")
    cfg = apiconfig.ApiConfig.in_cluster()
    assert cfg.server == "https://127.0.0.1:6443"
    assert cfg.token_file == tmp_path / "token"
    assert cfg.ca_file == tmp_path / "ca.crt"


def test_in_cluster_config_falls_back_to_the_service_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(contract.ENV_API_SERVER, raising=False)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    (tmp_path / "ca.crt").write_bytes(certificates.make_ca("cluster").cert_pem)
    cfg = apiconfig.ApiConfig.in_cluster(token_dir=tmp_path)
    assert cfg.server == "https://10.0.0.1:443"
    assert cfg.ca_file == tmp_path / "ca.crt"


def test_in_cluster_config_without_the_mounted_ca_refuses_to_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the system store would accept any host with a public certificate
    monkeypatch.delenv(contract.ENV_API_SERVER, raising=False)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    with pytest.raises(ValueError, match=r"no cluster CA at .*ca\.crt.*never against the system store"):
        apiconfig.ApiConfig.in_cluster(token_dir=tmp_path)


def test_in_cluster_config_for_a_plain_http_test_server_needs_no_ca(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(contract.ENV_API_SERVER, "http://127.0.0.1:8001")
    cfg = apiconfig.ApiConfig.in_cluster(token_dir=tmp_path)
    assert cfg.ca_file is None


def test_the_ssl_context_trusts_the_cluster_ca_alone(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_bytes(certificates.make_ca("cluster").cert_pem)
    ctx = apiconfig.ApiConfig(server="https://10.0.0.1:443", ca_file=ca, token_file=None).ssl_context()
    subjects = [dict(x[0] for x in c["subject"]) for c in ctx.get_ca_certs()]
    assert subjects == [{"commonName": "cluster"}]


def test_an_unreadable_cluster_ca_is_a_value_error_naming_the_file(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("not a certificate")
    config = apiconfig.ApiConfig(server="https://10.0.0.1:443", ca_file=ca, token_file=None)
    with pytest.raises(ValueError, match=r"cannot load the cluster CA from .*ca\.crt"):
        config.ssl_context()


def test_in_cluster_config_without_any_server_says_what_to_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(contract.ENV_API_SERVER, raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ValueError, match=contract.ENV_API_SERVER):
        apiconfig.ApiConfig.in_cluster(token_dir=tmp_path)


def test_kubeconfig_inline_data_is_written_to_private_files(tmp_path: Path) -> None:
    kc = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "c",
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
        "clusters": [
            {
                "name": "k",
                "cluster": {
                    "server": "https://127.0.0.1:1",
                    "certificate-authority-data": base64.b64encode(b"CA").decode(),
                },
            }
        ],
        "users": [
            {
                "name": "u",
                "user": {
                    "client-certificate-data": base64.b64encode(b"CERT").decode(),
                    "client-key-data": base64.b64encode(b"KEY").decode(),
                },
            }
        ],
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(kc))
    cfg = apiconfig.ApiConfig.from_kubeconfig(path)
    assert cfg.server == "https://127.0.0.1:1"
    assert cfg.ca_data == b"CA" and cfg.ca_file is None
    assert cfg.client_cert_data == b"CERT" and cfg.client_key_data == b"KEY"
    assert cfg.client_key is None  # kept as data, never a path to a file left behind


def test_kubeconfig_with_a_token_and_relative_ca(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    kc = {
        "current-context": "c",
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
        "clusters": [
            {"name": "k", "cluster": {"server": "https://h:1", "certificate-authority": "ca.pem"}}
        ],
        "users": [{"name": "u", "user": {"token": "abc"}}],
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(kc))
    cfg = apiconfig.ApiConfig.from_kubeconfig(path)
    assert cfg.ca_file == tmp_path / "ca.pem"
    assert cfg.token == "abc" and cfg.token_file is None
    assert "abc" not in repr(cfg)


def test_inline_kubeconfig_credentials_leave_no_file_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kubeconfig's client key and token stay in memory: nothing is left in the temp dir."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    ca = certificates.make_ca("kubeconfig-ca")
    client = certificates.issue(ca, "admin", client=True, server=False)
    kc = {
        "current-context": "c",
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
        "clusters": [{"name": "k", "cluster": {"server": "https://127.0.0.1:1",
                                               "certificate-authority-data": base64.b64encode(ca.cert_pem).decode()}}],
        "users": [{"name": "u", "user": {"client-certificate-data": base64.b64encode(client.cert_pem).decode(),
                                         "client-key-data": base64.b64encode(client.key_pem).decode(),
                                         "token": "tok-123"}}],
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(kc))
    cfg = apiconfig.ApiConfig.from_kubeconfig(path)
    ctx = cfg.ssl_context()  # loads the CA from memory and the client chain through a transient file
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert list(temp.iterdir()) == [], "a credential was left on disk"
    assert kubeapi._TokenFile(cfg.token_file, static=cfg.token).header() == "Bearer tok-123"
