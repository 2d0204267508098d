"""Fixtures for the LLM e2e tests: the operator (which keeps the budget ledgers) runs once per module."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.loops import pytest_asyncio_loop_factories  # noqa: F401  (the sidecar's event loop)
from tests.support.operator import SIDECAR_IMAGE, RunningOperator, start_operator


@pytest.fixture(scope="module")
def operator(cluster: Any, crds: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningOperator]:
    op = start_operator(cluster, tmp_path_factory.mktemp("operator"), "--sidecar-image", SIDECAR_IMAGE)
    try:
        yield op
    finally:
        op.stop()
        cluster.kubectl("delete", "namespace", op.namespace, "--wait=false", check=False)
