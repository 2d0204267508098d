"""How kopf reaches the apiserver, and the kopf settings the operator relies on.

kopf's own login helpers read only the default kubeconfig; the operator takes
``--kubeconfig`` (tests, local runs) or the in-cluster service account, the
same way as the rest of sidekey (``apiconfig.ApiConfig``). kopf calls the login
handler again on a 401, which picks up a rotated token file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import kopf

from sidekey.core import apiconfig

#: The apiserver ends a watch after this long and kopf starts a new one, so a
#: watch that died silently (a dropped connection no one noticed) is replaced.
WATCH_SERVER_TIMEOUT = 300
WATCH_CLIENT_TIMEOUT = WATCH_SERVER_TIMEOUT + 30


def api_config(kubeconfig: Path | None) -> apiconfig.ApiConfig:
    if kubeconfig is not None:
        return apiconfig.ApiConfig.from_kubeconfig(kubeconfig)
    return apiconfig.ApiConfig.in_cluster()


def connection_info(kubeconfig: Path | None) -> kopf.ConnectionInfo:
    config = api_config(kubeconfig)
    token = config.token  # inline in a kubeconfig; a token file is read now
    if config.token_file is not None:
        try:
            token = config.token_file.read_text().strip() or None
        except OSError as exc:
            raise kopf.LoginError(f"cannot read the API token {config.token_file}: {exc}") from exc
    return kopf.ConnectionInfo(
        server=config.server,
        ca_path=str(config.ca_file) if config.ca_file else None,
        ca_data=config.ca_data,
        scheme="Bearer" if token else None,
        token=token,
        certificate_path=str(config.client_cert) if config.client_cert else None,
        certificate_data=config.client_cert_data,
        private_key_path=str(config.client_key) if config.client_key else None,
        private_key_data=config.client_key_data,
    )


def configure(settings: kopf.OperatorSettings) -> None:
    """kopf settings for one quiet, finalizer-free, single-instance operator."""
    settings.watching.server_timeout = WATCH_SERVER_TIMEOUT
    settings.watching.client_timeout = WATCH_CLIENT_TIMEOUT
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = 60
    settings.networking.connect_timeout = 10
    # One instance at a time is guaranteed by the Deployment (one replica,
    # Recreate), not by kopf peering: equal-priority peers freeze each other.
    settings.peering.standalone = True
    # kopf would turn its own log lines into Events on every Secret and Pod;
    # the operator posts its own Events, on transitions only.
    settings.posting.enabled = False
    settings.posting.level = logging.WARNING
