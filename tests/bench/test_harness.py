"""The benchmark harness runs end to end in its quick mode and reports every arm and metric.

Numbers from a one-second run mean nothing; what this proves is that one
command still drives every arm (a real apiserver, nginx, the sidecar with
and without its token cache) and that the result document and the table
are complete, so the full run cannot silently lose a metric.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROXY_METRICS = ("rps_c16", "rps_c64", "cpu_us_per_req_c16", "cpu_us_per_req_c64", "cpu_us_per_req_500",
                 "p50_us_500", "p99_us_500", "added_p50_us_500", "added_p99_us_500", "sse_ttfb_us",
                 "added_sse_ttfb_us", "sse_cpu_us_per_event", "rss_idle_mib", "rss_loaded_mib",
                 "rss_anon_loaded_mib", "core_share_c16", "p999_us_500", "added_p999_us_500", "steal_pct_500")


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_the_quick_run_reports_every_arm_and_metric(tmp_path: Path) -> None:
    out = tmp_path / "quick.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--no-externals", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=110, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    medians = result["medians"]
    required = {"direct", "nginx", "aiohttp-floor", "llhttp-floor", "sidekey", "sidekey-nocache", "sidekey-llm"}
    assert set(medians) == required  # LiteLLM's arm (a pip install) is the full run's only
    assert any("LiteLLM's arm was left out" in note for note in result["notes"])  # and says so
    # the sidecar and the floors ran on the image's interpreter (bench/shipped.py), and the result says so
    assert result["machine"]["image"].startswith("sha256:") and result["machine"]["arm_python"].startswith("3.")
    assert any("ran on the image's Python" in note for note in result["notes"])
    for arm in set(medians) - {"direct"}:
        missing = [m for m in PROXY_METRICS if not isinstance(medians[arm].get(m), int | float)]
        assert not missing, f"{arm} lacks {missing}"
        assert medians[arm]["rps_c16"] > 0 and medians[arm]["cpu_us_per_req_c16"] > 0
    for m in ("rps_c16", "rps_c64", "p50_us_500", "p99_us_500", "sse_ttfb_us"):
        assert medians["direct"][m] > 0
    for arm in medians:  # the paced tail: p99 <= p99.9, and the proxy core's steal read as a share
        assert medians[arm]["p99_us_500"] <= medians[arm]["p999_us_500"]
        assert 0 <= medians[arm]["steal_pct_500"] <= 100
    assert 0 < medians["sidekey"]["ready_s"] < 30
    for arm in ("nginx", "sidekey"):  # the scaling rows of the quick plan
        for metric in ("cpu_us_per_req_c1", "rss_c1_mib", "sse_cpu_us_per_event_s1", "sse_cpu_us_per_event_s10",
                       "rss_s10_mib"):
            assert medians[arm][metric] > 0, (arm, metric)
    assert {t["key"] for t in result["targets"]} >= {"cpu", "efficiency", "p99", "sse_ttfb", "sse_cpu",
                                                     "rss", "ready", "webhook"}
    if importlib.util.find_spec("matplotlib") is not None:  # the bench extra
        assert out.with_suffix(".png").stat().st_size > 10_000
    table = proc.stdout
    assert table.lstrip().startswith("### sidekey benchmark")
    assert "| CPU on the full path" in table and "| vs nginx |" in table
    assert "| CPU us/request at 1 conns |" in table and "| CPU us/SSE event, 10 streams |" in table
