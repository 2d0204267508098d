"""The benchmark's sidecar is the image's: its venv, its compiled request path, its interpreter.

The arms must measure what a pod runs. These run the unpacked image's
interpreter and check where everything it imports comes from, and that the
check the harness makes on each sidecar process refuses any other interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import shipped

PROBE = ("import json, sys, os, platform, sidekey.proxy.decision as d, httptools, uvloop; "
         "print(json.dumps({'prefix': sys.prefix, 'base': sys.base_prefix, 'os': os.__file__, "
         "'decision': d.__file__, 'version': platform.python_version(), 'isolated': sys.flags.isolated}))")


@pytest.fixture(scope="module")
def image() -> shipped.Shipped:
    return shipped.shipped()


def test_the_venv_runs_on_the_images_interpreter_and_standard_library(image: shipped.Shipped) -> None:
    out = subprocess.run([*image.sidecar_command()[:2], "-c", PROBE], capture_output=True, text=True,
                         check=True, timeout=60)
    found = json.loads(out.stdout)
    root = image.venv.parents[1]
    assert Path(found["prefix"]) == image.venv
    assert Path(found["base"]) == root / "usr"  # the image's /usr, not this host's nor pyenv's
    assert Path(found["os"]).is_relative_to(root / "usr" / "lib" / "python3.11")
    # the request path as the image's wheel compiled it, not the tree's sources
    assert found["decision"].endswith(".so") and Path(found["decision"]).is_relative_to(image.venv)
    assert found["version"] == image.version and found["isolated"] == 1
    assert image.interpreter.resolve() != Path(sys.executable).resolve()


def test_the_check_on_a_sidecar_process_refuses_another_interpreter(image: shipped.Shipped) -> None:
    with pytest.raises(shipped.ShippedError, match="not the image's interpreter"):
        image.check_runs(os.getpid())
    child = subprocess.Popen([str(image.python), "-c", "import time; time.sleep(30)"])
    try:
        deadline = time.monotonic() + 10
        while Path(os.readlink(f"/proc/{child.pid}/exe")) != image.interpreter.resolve():
            assert time.monotonic() < deadline, "the child never exec'd the image's interpreter"
            time.sleep(0.01)
        image.check_runs(child.pid)
    finally:
        child.kill()
        child.wait()


def test_a_second_call_reuses_the_unpacked_image(image: shipped.Shipped) -> None:
    before = image.venv.stat().st_mtime_ns
    again = shipped.shipped()
    assert again == image and again.venv.stat().st_mtime_ns == before
