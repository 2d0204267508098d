"""A started sidecar as a test sees it: the ports, the tokens, the process, its logs and audit lines.

``localcluster.podplayer.RunningSidecar`` is what the kubelet-player returns;
tests that keep more beside it (the pod, the agent's token, the upstream)
subclass ``SidecarView`` and get the same attributes under the same names.
"""

from __future__ import annotations

import subprocess
from typing import Any

from sidekey.localcluster import podplayer


class SidecarView:
    """Delegates to ``running``; ``process`` is the ``Popen`` (tests signal it, wait for it, poll it)."""

    running: podplayer.RunningSidecar

    @property
    def port(self) -> int:
        return self.running.port

    @property
    def health_port(self) -> int:
        return self.running.health_port

    @property
    def url(self) -> str:
        return self.running.url

    @property
    def health_url(self) -> str:
        return self.running.health_url

    @property
    def api_token(self) -> str:
        return self.running.api_token

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self.running.process.popen

    def logs(self) -> str:
        return "\n".join(self.running.process.lines())

    def audit(self) -> list[dict[str, Any]]:
        return self.running.audit()

    def ready(self) -> bool:
        return podplayer.readyz(self.health_port)
