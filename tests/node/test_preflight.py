"""A machine that cannot run a node gets an error saying what it lacks, never a skip."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidekey.localcluster import node


def test_a_user_who_is_not_root_is_told_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node.os, "geteuid", lambda: 1000)
    problems = node.preflight()
    assert any("not root" in p for p in problems), problems


def test_a_missing_package_is_named_with_the_script_that_installs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node, "RUNC", Path("/nonexistent/runc"))
    problems = node.preflight()
    assert any("/nonexistent/runc" in p and "runc" in p and "hack/system-packages.sh" in p for p in problems)


def test_starting_on_such_a_machine_raises_with_every_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(node, "CNI_BIN_DIR", Path("/nonexistent/cni"))
    with pytest.raises(node.NodeUnavailable) as exc:
        node.NodeCluster().start()
    message = str(exc.value)
    assert message.startswith("a node cannot run on this machine: ")
    assert "not root" in message and "/nonexistent/cni/bridge" in message
