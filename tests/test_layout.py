"""The package layout: top-level component folders, one distribution, no shadowing."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

from sidekey import cli

ROOT = Path(__file__).resolve().parent.parent
COMPONENTS = ("proxy", "webhook", "operator")


def test_component_folders_have_no_init_that_could_shadow_the_stdlib() -> None:
    for folder in COMPONENTS:
        assert (ROOT / folder).is_dir(), f"{folder}/ is missing"
        assert not (ROOT / folder / "__init__.py").exists(), f"{folder}/__init__.py would shadow imports"


def test_the_stdlib_operator_module_still_imports_from_the_repo_root() -> None:
    code = "import operator, dataclasses; print(operator.add(2, 3))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "5"


def test_components_import_as_subpackages_of_one_distribution() -> None:
    for name in ("sidekey.core.contract", "sidekey.core.policies", "sidekey.proxy.main",
                 "sidekey.webhook.main", "sidekey.operator.main", "sidekey.localcluster.cluster"):
        module = importlib.import_module(name)
        assert module.__name__ == name
    operator_main = importlib.import_module("sidekey.operator.main")
    assert Path(operator_main.__file__ or "").resolve().parent == ROOT / "operator"


def test_the_console_script_reports_its_version() -> None:
    script = Path(sys.executable).with_name("sidekey")  # the console script installed with this Python
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"sidekey {cli.version()}"


def test_every_top_level_folder_the_design_names_exists() -> None:
    for entry in ("proxy", "webhook", "operator", "core", "charts", "crds", "tests",
                  "pyproject.toml", "README.md"):
        assert (ROOT / entry).exists(), entry
