"""The soak's short CI version: 20 s of load with key rotations and policy edits.

The long one is a documented command (``python -m bench.soak --minutes 30``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import soak

pytestmark = pytest.mark.e2e


def test_twenty_seconds_of_load_with_rotations_and_edits_has_no_errors_and_no_growth(
        cluster: Any, crds: list[str], tmp_path: Path) -> None:
    report = soak.run(cluster, tmp_path, 20.0, concurrency=6, rotate_every=4.0, edit_every=5.0, warmup=8.0)
    summary = report.summary()
    assert report.errors == 0, (report.error_samples, summary)
    assert report.requests > 200 and report.denials > 20, summary
    assert report.rotations >= 2 and report.edits >= 2, summary
    assert report.newest_key_used, summary
    assert report.rss_growth < soak.MAX_RSS_GROWTH, summary
