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


def test_the_demo_says_why_and_takes_the_pod_less_path_where_no_node_can_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import argparse
    import contextlib

    from sidekey.demo import main, onnode

    parser = argparse.ArgumentParser()
    main.add_arguments(parser)
    args = parser.parse_args(["--workdir", str(tmp_path)])
    with contextlib.ExitStack() as stack:
        assert isinstance(main._choose(args, main.Output(), stack), onnode.NodeDemo)  # this machine can
        monkeypatch.setattr(node.os, "geteuid", lambda: 1000)
        chosen = main._choose(args, main.Output(), stack)
    assert type(chosen) is main.Demo
    assert "a real node cannot run here (not root" in capsys.readouterr().err
