"""Counters, gauges and histograms for the sidecar, and their Prometheus text exposition.

``prometheus_client`` imports its HTTP servers, WSGI glue, ``urllib.request``
and ``gzip`` whenever it is imported (its package ``__init__`` loads the
exposition module): 4 to 5 MB of RSS in every agent pod for a registry the
sidecar serves itself, on its own health listener. This module is the part
the sidecar uses, with the same calls (``Counter(name, help, labels,
registry=)``, ``.labels(...)``, ``.inc``, ``.set``, ``.set_function``,
``.observe``, ``registry.get_sample_value``) and the same text (format 0.0.4,
``_total`` and ``_created`` samples, numbers as Go prints them), so scrapers,
dashboards and tests see no difference. The webhook and the operator keep
``prometheus_client``.

The sidecar is one event loop: updates take no lock (the resolver's threads
never touch a metric).
"""

from __future__ import annotations

import math
import time
from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final

_INF: Final = math.inf


def go_float(value: float) -> str:
    """A number as Prometheus' Go code prints it (``+Inf``, ``1.23456789e+08``), as prometheus_client does."""
    d = float(value)
    if d == _INF:
        return "+Inf"
    if d == -_INF:
        return "-Inf"
    if math.isnan(d):
        return "NaN"
    s = repr(d)
    dot = s.find(".")
    if d > 0 and dot > 6:  # Go switches to exponents sooner than Python
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return s


def _label_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


Sample = tuple[str, dict[str, str], float]


class CollectorRegistry:
    """The families to expose, in registration order."""

    def __init__(self, auto_describe: bool = True) -> None:
        self._families: list[_Family] = []
        self._names: set[str] = set()

    def register(self, family: _Family) -> None:
        if family.name in self._names:
            raise ValueError(f"duplicated metric name {family.name!r}")
        self._names.add(family.name)
        self._families.append(family)

    def samples(self) -> Iterator[tuple[_Family, list[Sample]]]:
        for family in self._families:
            yield family, list(family.samples())

    def get_sample_value(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        """The value of one sample (``name`` as exposed, with its suffix), or None; for tests."""
        want = dict(labels or {})
        for _, samples in self.samples():
            for sample_name, sample_labels, value in samples:
                if sample_name == name and sample_labels == want:
                    return value
        return None


class _Family:
    kind = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 registry: CollectorRegistry | None = None) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Any] = {}
        self._single: Any = None if self.labelnames else self._child()
        if registry is not None:
            registry.register(self)

    def _child(self) -> Any:
        raise NotImplementedError

    def labels(self, *values: str, **named: str) -> Any:
        """The child for one set of label values (positional, or all by name)."""
        if named:
            if values:
                raise ValueError("label values are either positional or named")
            values = tuple(named[n] for n in self.labelnames)
        key = tuple(str(v) for v in values)
        if len(key) != len(self.labelnames):
            raise ValueError(f"{self.name} takes {len(self.labelnames)} label values, got {len(key)}")
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._child()
        return child

    def _all(self) -> Iterator[tuple[dict[str, str], Any]]:
        if self._single is not None:
            yield {}, self._single
        for key, child in list(self._children.items()):
            yield dict(zip(self.labelnames, key, strict=True)), child

    def samples(self) -> Iterator[Sample]:
        raise NotImplementedError

    def _no_labels(self) -> Any:
        if self._single is None:
            raise ValueError(f"{self.name} has labels: use .labels(...)")
        return self._single


class CounterValue:
    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        self.value += amount


class Counter(_Family):
    kind = "counter"

    def _child(self) -> CounterValue:
        return CounterValue()

    def inc(self, amount: float = 1) -> None:
        self._no_labels().inc(amount)

    def samples(self) -> Iterator[Sample]:
        for labels, child in self._all():
            yield f"{self.name}_total", labels, child.value
        for labels, child in self._all():
            yield f"{self.name}_created", labels, child.created


class _GaugeValue:
    __slots__ = ("function", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.function: Callable[[], float] | None = None

    def set(self, value: float) -> None:
        self.value = float(value)

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount

    def set_function(self, function: Callable[[], float]) -> None:
        self.function = function

    def get(self) -> float:
        return float(self.function()) if self.function is not None else self.value


class Gauge(_Family):
    kind = "gauge"

    def _child(self) -> _GaugeValue:
        return _GaugeValue()

    def set(self, value: float) -> None:
        self._no_labels().set(value)

    def inc(self, amount: float = 1) -> None:
        self._no_labels().inc(amount)

    def dec(self, amount: float = 1) -> None:
        self._no_labels().dec(amount)

    def set_function(self, function: Callable[[], float]) -> None:
        self._no_labels().set_function(function)

    def samples(self) -> Iterator[Sample]:
        for labels, child in self._all():
            yield self.name, labels, child.get()


DEFAULT_BUCKETS: Final = (.005, .01, .025, .05, .075, .1, .25, .5, .75, 1.0, 2.5, 5.0, 7.5, 10.0)


class HistogramValue:
    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        #: Per bucket, not cumulative; C integers rather than a list of ints. An int above 256
        #: is a new object at every increment, and the last ones a burst of load makes stay
        #: wherever the allocator put them then: in the arenas the burst opened, each of which
        #: CPython keeps whole for one live object (python -m bench.burst names them).
        self.counts = array("q", [0]) * len(bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        self.sum += value
        bounds = self.bounds
        # the first bound >= value, by a compiled loop over C doubles: a latency lands in one of the
        # first few buckets, and bisect compared boxed floats through the generic protocol
        for i, bound in enumerate(bounds):
            if value <= bound:
                self.counts[i] += 1
                return
        # (NaN is in no bucket)


class Histogram(_Family):
    kind = "histogram"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 registry: CollectorRegistry | None = None, buckets: Sequence[float] = DEFAULT_BUCKETS) -> None:
        bounds = tuple(sorted(float(b) for b in buckets))
        self.bounds = bounds if bounds and bounds[-1] == _INF else (*bounds, _INF)
        super().__init__(name, documentation, labelnames, registry=registry)

    def _child(self) -> HistogramValue:
        return HistogramValue(self.bounds)

    def observe(self, value: float) -> None:
        self._no_labels().observe(value)

    def samples(self) -> Iterator[Sample]:
        for labels, child in self._all():
            total = 0
            for bound, count in zip(self.bounds, child.counts, strict=True):
                total += count
                yield f"{self.name}_bucket", {**labels, "le": go_float(bound)}, float(total)
            yield f"{self.name}_count", labels, float(total)
            yield f"{self.name}_sum", labels, child.sum
        for labels, child in self._all():
            yield f"{self.name}_created", labels, child.created


def generate_latest(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text format 0.0.4 (the lines prometheus_client writes)."""
    out: list[str] = []
    for family, samples in registry.samples():
        help_text = family.documentation.replace("\\", r"\\").replace("\n", r"\n")
        exposed = f"{family.name}_total" if family.kind == "counter" else family.name
        created = f"{family.name}_created"
        out.append(f"# HELP {exposed} {help_text}\n# TYPE {exposed} {family.kind}\n")
        tail: list[str] = []
        for name, labels, value in samples:
            text = ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items())
            line = f"{name}{{{text}}} {go_float(value)}\n" if text else f"{name} {go_float(value)}\n"
            (tail if name == created else out).append(line)
        if tail:
            out.append(f"# HELP {created} {help_text}\n# TYPE {created} gauge\n")
            out.extend(tail)
    return "".join(out).encode("utf-8")
