"""Where the apiserver is and who we are to it: in-cluster config and kubeconfigs.

A pod finds the apiserver from ``KUBERNETES_SERVICE_HOST`` (or
``SIDEKEY_API_SERVER``) and its projected token directory; the tools and
tests read a kubeconfig. Either way the result is an ``ApiConfig`` that
``kubeapi.ApiClient`` connects with and the operator hands to kopf.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidekey.core import contract


@dataclass(frozen=True)
class ApiConfig:
    """Where the apiserver is and who we are to it.

    ``token_file`` is a path, not a token: the kubelet rotates the projected
    token, so the file is re-read whenever it changes and never kept for the
    process's life. A kubeconfig's inline credentials (``*-data``, ``token``)
    stay in memory (``ca_data``, ``client_cert_data``, ``client_key_data``,
    ``token``): written to a temp dir they would outlive the process, a
    client key and a token left on disk.
    """

    server: str
    ca_file: Path | None
    token_file: Path | None
    client_cert: Path | None = None
    client_key: Path | None = None
    ca_data: bytes | None = None
    client_cert_data: bytes | None = None
    client_key_data: bytes | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    @classmethod
    def in_cluster(cls, token_dir: Path | None = None, server: str | None = None) -> ApiConfig:
        """The apiserver as a pod sees it, trusting only the CA mounted with the token.

        An https apiserver is verified against ``ca.crt`` from the token
        directory and nothing else: without it the start fails instead of
        falling back to the system store, because the token this client sends
        reads the policy's Secret, and a system store accepts any host with a
        public certificate (a pod spec that points ``KUBERNETES_SERVICE_HOST``
        elsewhere and drops the ``kube-root-ca.crt`` source would collect it).
        A plain-http server (``SIDEKEY_API_SERVER``, tests only) needs no CA.
        """
        if token_dir is None:
            token_dir = Path(os.environ.get(contract.ENV_API_TOKEN_DIR) or contract.API_TOKEN_DIR)
        if server is None:
            server = os.environ.get(contract.ENV_API_SERVER) or None
        if server is None:
            host = os.environ.get("KUBERNETES_SERVICE_HOST")
            port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
            if not host:
                raise ValueError(
                    f"no apiserver address: set {contract.ENV_API_SERVER} or KUBERNETES_SERVICE_HOST"
                )
            if ":" in host and not host.startswith("["):
                host = f"[{host}]"
            server = f"https://{host}:{port}"
        ca = token_dir / contract.API_CA_FILENAME
        https = server.lower().startswith("https://")
        if https and not ca.is_file():
            raise ValueError(
                f"no cluster CA at {ca}: the sidecar verifies the apiserver against the "
                f"{contract.API_CA_FILENAME} mounted with its API token (the kube-root-ca.crt "
                "source of the projected volume) and never against the system store"
            )
        return cls(
            server=server.rstrip("/"),
            ca_file=ca if https else None,
            token_file=token_dir / contract.API_TOKEN_FILENAME,
        )

    @classmethod
    def from_kubeconfig(cls, path: Path) -> ApiConfig:
        """The current context of a kubeconfig; inline ``*-data`` and tokens are kept in memory."""
        import base64

        import yaml  # only tools and tests use kubeconfigs; the sidecar never imports yaml

        doc = yaml.safe_load(path.read_text())
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: not a kubeconfig")
        current = doc.get("current-context")
        contexts = {c["name"]: c.get("context", {}) for c in doc.get("contexts") or []}
        if current not in contexts:
            raise ValueError(f"{path}: current-context {current!r} is not defined")
        ctx = contexts[current]
        clusters = {c["name"]: c.get("cluster", {}) for c in doc.get("clusters") or []}
        users = {u["name"]: u.get("user", {}) or {} for u in doc.get("users") or []}
        cluster = clusters.get(ctx.get("cluster"))
        if cluster is None:
            raise ValueError(f"{path}: cluster {ctx.get('cluster')!r} is not defined")
        user = users.get(ctx.get("user"), {})

        def file(key: str, source: Mapping[str, Any]) -> Path | None:
            if not source.get(key):
                return None
            p = Path(source[key])
            return p if p.is_absolute() else path.parent / p

        def data(key: str, source: Mapping[str, Any]) -> bytes | None:
            return base64.b64decode(source[key]) if source.get(key) else None

        return cls(
            server=str(cluster["server"]).rstrip("/"),
            ca_file=file("certificate-authority", cluster),
            token_file=Path(user["tokenFile"]) if user.get("tokenFile") else None,
            client_cert=file("client-certificate", user),
            client_key=file("client-key", user),
            ca_data=None if cluster.get("certificate-authority") else data("certificate-authority-data", cluster),
            client_cert_data=None if user.get("client-certificate") else data("client-certificate-data", user),
            client_key_data=None if user.get("client-key") else data("client-key-data", user),
            token=None if user.get("tokenFile") else (str(user["token"]) if user.get("token") else None),
        )

    def ssl_context(self) -> ssl.SSLContext:
        """Verify the server against ``ca_file`` alone when one is set.

        ``create_default_context(cafile=...)`` loads only that file, not the
        system store; the store is used only when a kubeconfig names no CA (as
        kubectl does). A CA file that does not parse is a ``ValueError`` that
        names it, so a start-up with a broken mount says what is wrong.
        """
        try:
            ctx = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None,
                                             cadata=self.ca_data.decode() if self.ca_data else None)
        except (ssl.SSLError, OSError, UnicodeDecodeError) as exc:
            where = self.ca_file or "the kubeconfig's certificate-authority-data"
            raise ValueError(f"cannot load the cluster CA from {where}: {getattr(exc, 'strerror', None) or exc}"
                             ) from exc
        if self.client_cert is not None:
            ctx.load_cert_chain(str(self.client_cert), str(self.client_key) if self.client_key else None)
        elif self.client_cert_data is not None:
            import tempfile  # ssl loads a chain from files only; they exist just long enough to be read

            with tempfile.TemporaryDirectory(prefix="sidekey-client-cert-") as tmp:
                cert, key = Path(tmp) / "client.crt", Path(tmp) / "client.key"
                cert.write_bytes(self.client_cert_data)  # the directory is the user's alone (0700)
                key.write_bytes(self.client_key_data or b"")
                ctx.load_cert_chain(str(cert), str(key) if self.client_key_data else None)
        return ctx
