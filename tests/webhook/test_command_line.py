"""`sidekey webhook` start-up errors say what to fix and exit non-zero, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def sidekey(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidekey", "webhook", *args],
                          capture_output=True, text=True, timeout=60, check=False)


def test_a_bad_settings_file_names_the_key(tmp_path: Path) -> None:
    f = tmp_path / "settings.yaml"
    f.write_text("port: eighty\n")
    out = sidekey("--tls-dir", str(tmp_path), "--settings", str(f))
    assert out.returncode == 2
    assert "settings port" in out.stderr and "Traceback" not in out.stderr


def test_a_missing_certificate_is_reported(tmp_path: Path) -> None:
    out = sidekey("--tls-dir", str(tmp_path / "nothing"), "--kubeconfig", str(tmp_path / "none"))
    assert out.returncode == 2
    assert "tls.crt" in out.stderr and "Traceback" not in out.stderr
