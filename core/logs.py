"""JSON logging for every sidekey process, and a writer for audit lines.

Logs are read by machines (Loki, Elasticsearch), so each record is one JSON
object on one line. Nothing here formats request data: callers pass only
values that are safe to log, and never a token or a secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import IO, Any, Final


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


#: The audit stream's buffer: far more than one loop turn's lines.
AUDIT_BUFFER_BYTES: Final = 64 * 1024


def buffered_stdout() -> IO[str]:
    """Standard output with a buffer of its own, whatever ``-u`` made of ``sys.stdout``.

    The image runs the interpreter with ``-u`` (``PYTHONUNBUFFERED`` is ignored under
    ``-I``), which turns ``sys.stdout`` into a write-through stream: one ``write``
    syscall per audit line, per request. This stream shares the descriptor and keeps
    it open when it is garbage (``closefd=False``).
    """
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by a stream without one
        return sys.stdout
    raw = io.FileIO(fd, "w", closefd=False)
    return io.TextIOWrapper(io.BufferedWriter(raw, AUDIT_BUFFER_BYTES), encoding="utf-8", newline="\n")


class AuditWriter:
    """One JSON object per line, written without the logging machinery's per-record cost.

    An audit line must not wait for a timer: a sidecar killed (OOM, SIGKILL) would
    take the last second's lines with it, the ones an investigation needs most. Nor
    should each line cost a syscall. So the lines of one event-loop turn are written
    together, by one flush at the start of the next turn (``call_soon``): under load
    one ``write`` carries every request that ended in that turn, when idle a line
    leaves at once. Without a running loop (a tool, a test) lines wait for
    ``flush()``. Without a ``stream`` the lines go to standard output through a
    buffer of their own (``buffered_stdout``), also under ``python -u``.
    """

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream or buffered_stdout()
        self._dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode
        self._due = False  # a flush is scheduled for the next loop turn

    def write(self, record: Mapping[str, Any]) -> None:
        self.write_line(self._dumps(record) + "\n")

    def write_line(self, line: str) -> None:
        """A line the caller encoded itself (one JSON object and its newline)."""
        self._stream.write(line)
        if not self._due:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._due = True
            loop.call_soon(self.flush)

    def flush(self) -> None:
        self._due = False
        with contextlib.suppress(OSError, ValueError):  # a closed stdout must not kill the sidecar
            self._stream.flush()
