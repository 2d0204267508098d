"""JSON logging for every sidekey process, and a writer for audit lines.

Logs are read by machines (Loki, Elasticsearch), so each record is one JSON
object on one line. Nothing here formats request data: callers pass only
values that are safe to log, and never a token or a secret.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import IO, Any


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and record.exc_info[0] is not None:
            doc["exception"] = record.exc_info[0].__name__
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            doc.update(fields)
        return json.dumps(doc, separators=(",", ":"), default=str)


def configure(level: str = "info", stream: IO[str] | None = None) -> None:
    """Route the root logger to one JSON line per record."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log duplicates the audit line; its server errors stay.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class AuditWriter:
    """One JSON object per line, written without the logging machinery's per-record cost.

    Lines are buffered and flushed by ``flush()`` (the caller runs it
    periodically and at shutdown), so a request costs one ``json.dumps`` and
    one buffered write.
    """

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream or sys.stdout
        self._dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode

    def write(self, record: Mapping[str, Any]) -> None:
        self._stream.write(self._dumps(record) + "\n")

    def write_line(self, line: str) -> None:
        """A line the caller encoded itself (one JSON object and its newline)."""
        self._stream.write(line)

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):  # a closed stdout must not kill the sidecar
            self._stream.flush()
