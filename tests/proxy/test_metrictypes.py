"""The sidecar's own metric types expose exactly what prometheus_client exposed for the same updates."""

from __future__ import annotations

import re
from typing import Any

import prometheus_client
import pytest

from sidekey.proxy import metrics, metrictypes


def exercise(lib: Any) -> bytes:
    """The same families and updates, on prometheus_client or on metrictypes."""
    registry = lib.CollectorRegistry(auto_describe=True)
    counter = lib.Counter("t_requests", 'Help with \\ a backslash,\na newline and "quotes".', ["upstream", "code"],
                          registry=registry)
    counter.labels("openai", "200").inc()
    counter.labels("odd\"name\\with\nbreaks", "502").inc(2.5)
    counter.labels(upstream="named", code="404").inc()
    lib.Counter("t_plain", "No labels.", registry=registry).inc(1e22)
    lib.Counter("t_unused", "Labels, no children.", ["a"], registry=registry)
    gauge = lib.Gauge("t_gauge", "A gauge.", registry=registry)
    gauge.set(123456789.0)
    gauge.inc(2)
    gauge.dec()
    lib.Gauge("t_function", "From a function.", registry=registry).set_function(lambda: 7)
    labelled = lib.Gauge("t_remaining", "Labelled gauge.", ["scope"], registry=registry)
    labelled.labels("pod").set(float("inf"))
    labelled.labels("nan").set(float("nan"))
    hist = lib.Histogram("t_seconds", "A histogram.", ["upstream"], registry=registry,
                         buckets=(0.001, 0.005, 0.5, 1, 10, 300))
    for value in (0.0005, 0.001, 0.3, 0.3, 12.0, 301.0):
        hist.labels("openai").observe(value)
    lib.Histogram("t_plain_seconds", "Default buckets.", registry=registry).observe(0.2)
    assert registry.get_sample_value("t_requests_total", {"upstream": "openai", "code": "200"}) == 1
    assert registry.get_sample_value("t_seconds_bucket", {"upstream": "openai", "le": "0.5"}) == 4
    assert registry.get_sample_value("t_plain_total") == 1e22
    assert registry.get_sample_value("t_requests_total", {"upstream": "nobody", "code": "200"}) is None
    if lib is metrictypes:
        return metrictypes.generate_latest(registry)
    return prometheus_client.generate_latest(registry)


def normalised(text: bytes) -> list[str]:
    """Lines in a fixed order, ``_created`` timestamps blanked, each label set sorted."""
    lines = []
    for line in text.decode().splitlines():
        line = re.sub(r"^(\S+_created(?:\{.*\})?) \S+$", r"\1 T", line)
        match = re.match(r"^([^{ ]+)\{(.*)\} (\S+)$", line)
        if match:
            labels = sorted(re.findall(r'[a-z_]+="(?:[^"\\]|\\.)*"', match.group(2)))
            line = f"{match.group(1)}{{{','.join(labels)}}} {match.group(3)}"
        lines.append(line)
    return lines


def test_the_exposition_is_prometheus_clients_line_for_line() -> None:
    assert normalised(exercise(metrictypes)) == normalised(exercise(prometheus_client))


def test_the_number_format_is_gos() -> None:
    for value in (0, 1, 0.1, 2.5, 1e-9, 123456.0, 1234567.0, 1e22, -3.0, float("inf"), float("-inf")):
        assert metrictypes.go_float(value) == prometheus_client.utils.floatToGoString(value)


def test_misuse_is_a_clear_error() -> None:
    registry = metrictypes.CollectorRegistry()
    counter = metrictypes.Counter("t_x", "x", ["a"], registry=registry)
    with pytest.raises(ValueError, match="takes 1 label values, got 2"):
        counter.labels("1", "2")
    with pytest.raises(ValueError, match=r"use \.labels"):
        counter.inc()
    with pytest.raises(ValueError, match="only goes up"):
        counter.labels("1").inc(-1)
    with pytest.raises(ValueError, match="duplicated"):
        metrictypes.Counter("t_x", "again", registry=registry)


def test_the_sidecar_registry_is_served_in_the_text_format() -> None:
    text = metrics.exposition().decode()
    assert "# TYPE sidekey_requests_total counter\n" in text
    assert "# TYPE sidekey_request_duration_seconds histogram\n" in text
    assert re.search(r"^sidekey_ready [01]\.0$", text, re.M)
