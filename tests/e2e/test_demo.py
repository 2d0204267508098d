"""The README's Quickstart command, run end to end and checked from the outside."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def _processes_mentioning(marker: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            blob = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in blob:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\x00", b" ")[:200]
            found.append(f"{entry.name}: {cmdline!r}")
    return found


@pytest.mark.timeout(600)
def test_the_demo_shows_the_whole_flow_and_leaves_nothing_running(tmp_path: Path) -> None:
    record = tmp_path / "upstream.jsonl"
    workdir = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "sidekey", "demo", "--record", str(record), "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=540, check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]

    received = [json.loads(line) for line in record.read_text().splitlines()]
    chats = [r for r in received if r["path"] == "/v1/chat/completions"]
    assert chats and chats[0]["key"] == "first", received
    assert received[-1]["key"] == "rotated", "the rotated key never reached the upstream"
    assert all(r["key"] in ("first", "rotated") for r in received), "a call arrived without the key"
    assert not any(r["caller_token_seen"] for r in received), "the agent's token reached the upstream"
    assert not any(r["path"].endswith("/embeddings") for r in received), "a forbidden call got through"

    for claim in ("no key anywhere in the pod spec", "the upstream received the real key",
                  "403", "401 pod agent's token replayed", "401 a token minted for another audience",
                  "by the apiserver", "rotated key", "the stream was ended at the token budget",
                  "no key in any log line or metric"):
        assert claim in output, f"the demo did not show: {claim}"
    assert _processes_mentioning(str(workdir)) == []
