"""The console script loads only what the chosen subcommand needs."""

from __future__ import annotations

import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"import sys\n{code}\nprint(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True, timeout=60)
    return set(out.stdout.split())


def test_parsing_a_command_never_imports_importlib_metadata() -> None:
    """The version is read for ``--version`` only: the sidecar's start-up does not pay for it."""
    loaded = _modules_after("from sidekey import cli\ncli._top_parser().parse_args(['proxy'])")
    assert "importlib.metadata" not in loaded


def test_the_version_flag_still_prints_the_installed_version() -> None:
    from sidekey import cli

    out = subprocess.run([sys.executable, "-m", "sidekey", "--version"], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == f"sidekey {cli.version()}"


def test_the_sidecars_command_line_never_imports_argparse() -> None:
    """``sidekey proxy``, as injected, runs the sidecar without parsing (0.33 MB of every pod)."""
    out = subprocess.run([sys.executable, "-c", "import sys\nfrom sidekey import cli\nrc = cli.main(['proxy'])\n"
                          "print(rc, 'argparse' in sys.modules)"],
                         capture_output=True, text=True, timeout=60, env={}, check=True)
    assert out.stdout.split() == ["2", "False"]  # ran the sidecar, which found no environment
    assert "sidekey proxy: POD_NAME: is not set" in out.stderr


def test_the_sidecars_help_is_still_parsed() -> None:
    out = subprocess.run([sys.executable, "-m", "sidekey", "proxy", "--help"], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.startswith("usage: sidekey proxy") and "Configured by environment variables" in out.stdout
