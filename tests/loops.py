"""The event loop of tests that run the sidecar's code in-process: the sidecar's own (uvloop).

A conftest that imports ``pytest_asyncio_loop_factories`` from here runs its
directory's async tests on ``sidekey.proxy.main.new_loop``, so the transport,
the pool and the clients are tested on the loop they ship with. The webhook
and the operator keep asyncio's loop, as in their processes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest

from sidekey.proxy import main


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"sidecar-loop": main.new_loop}
