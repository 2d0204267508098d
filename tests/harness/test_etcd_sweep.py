"""The harness cleans up etcd data dirs that a killed session left in RAM."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from sidekey.localcluster import cluster


def _aged(path: Path, seconds: float) -> Path:
    past = time.time() - seconds
    os.utime(path, (past, past))
    return path


def test_an_orphaned_dir_goes_a_used_or_young_one_stays(tmp_path: Path) -> None:
    orphan = tmp_path / f"{cluster.ETCD_DIR_PREFIX}orphan"
    used = tmp_path / f"{cluster.ETCD_DIR_PREFIX}used"
    young = tmp_path / f"{cluster.ETCD_DIR_PREFIX}young"
    other = tmp_path / "not-ours"
    for d in (orphan, used, young, other):
        (d / "member").mkdir(parents=True)
    for d in (orphan, used, other):
        _aged(d, cluster.ORPHAN_MIN_AGE + 60)
    # a live process whose command line names `used` as its data dir, as etcd's does
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"--data-dir={used}"])
    try:
        # until it has exec'd, the child's /proc cmdline is pytest's (a loaded machine showed it)
        cmdline = Path(f"/proc/{holder.pid}/cmdline")
        deadline = time.monotonic() + 10
        while f"--data-dir={used}".encode() not in cmdline.read_bytes():
            assert time.monotonic() < deadline, "the holder never showed its --data-dir"
            time.sleep(0.01)
        removed = cluster.sweep_orphaned_etcd_dirs(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert removed == [orphan]
    assert not orphan.exists()
    assert used.is_dir() and young.is_dir() and other.is_dir()
