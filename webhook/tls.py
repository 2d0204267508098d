"""The serving certificate, reloaded from disk when it changes.

The operator (or cert-manager) rotates the certificate in a Secret that the
kubelet projects into the pod by swapping a symlink; a webhook that read it
once would serve an expired certificate and every admission would fail
(``failurePolicy: Fail``). The files are polled (stat follows the symlink)
and loaded into the *same* SSLContext, which OpenSSL applies to new
handshakes. A half-written pair fails to load and the old one stays until
the next poll.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from pathlib import Path
from typing import Final

from sidekey.core import contract
from sidekey.webhook import metrics as metrics_mod

log = logging.getLogger("sidekey.webhook.tls")

POLL_SECONDS: Final = 2.0

Fingerprint = tuple[tuple[int, int, int], tuple[int, int, int]]


class ReloadingTLS:
    def __init__(self, directory: Path, metrics: metrics_mod.Metrics | None = None) -> None:
        self.cert_file = directory / contract.TLS_CERT_KEY
        self.key_file = directory / contract.TLS_KEY_KEY
        self.metrics = metrics
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._seen: Fingerprint | None = None
        if not self.reload_if_changed():
            raise FileNotFoundError(
                f"no usable certificate in {directory}: need {contract.TLS_CERT_KEY} and "
                f"{contract.TLS_KEY_KEY} (PEM)")

    def _fingerprint(self) -> Fingerprint:
        a, b = os.stat(self.cert_file), os.stat(self.key_file)
        return ((a.st_ino, a.st_mtime_ns, a.st_size), (b.st_ino, b.st_mtime_ns, b.st_size))

    def reload_if_changed(self) -> bool:
        """Load the pair if it changed since the last load; True when a new pair is in use."""
        try:
            seen = self._fingerprint()
        except OSError as exc:
            log.warning("serving certificate not readable: %s", exc)
            return False
        if seen == self._seen:
            return False
        try:
            self.context.load_cert_chain(self.cert_file, self.key_file)
        except (ssl.SSLError, OSError) as exc:
            log.warning("serving certificate not loaded (keeping the previous one): %s", exc)
            if self.metrics:
                self.metrics.tls_reloads.labels(result="error").inc()
            return False
        first = self._seen is None
        self._seen = seen
        if self.metrics and not first:
            self.metrics.tls_reloads.labels(result="ok").inc()
        if not first:
            log.info("serving certificate reloaded from %s", self.cert_file.parent)
        return True

    async def watch(self, interval: float = POLL_SECONDS) -> None:
        while True:
            await asyncio.sleep(interval)
            self.reload_if_changed()
