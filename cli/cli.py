"""The ``sidekey`` console script: one binary, one subcommand per part.

Only the chosen subcommand's module is imported, so the sidecar never pays for
the operator's imports (kopf, the kubernetes client) and vice versa: every
agent pod carries the proxy's memory footprint.

``sidekey`` itself is a namespace package, with no ``__init__.py``: the
component folders are namespace portions too (``operator/`` must never shadow
the stdlib), and import-linter's graph builder only walks into them when the
root is a namespace as well. That also keeps ``importlib.metadata`` (0.8 MB)
out of every sidecar: the version is looked up only for ``--version``.

For the same reason the sidecar's own command line, ``sidekey proxy`` and nothing
else (the webhook injects exactly that; the sidecar reads its environment only),
goes to ``sidekey.proxy.main.main()`` before ``argparse`` is imported: with the
``locale`` and ``gettext`` it pulls in, that is 0.33 MB of RssAnon in every agent
pod (``python -IB -c "import sidekey.cli, sidekey.proxy.main"``, 14.90 MB before,
14.57 after). Any other command line, ``sidekey proxy --help`` included, is parsed.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast

if TYPE_CHECKING:
    import argparse

# subcommand -> (module, help). Each module exposes ``add_arguments(parser)``
# and ``run(args) -> int``; a module named in BARE also ``main() -> int``.
COMMANDS: dict[str, tuple[str, str]] = {
    "proxy": ("sidekey.proxy.main", "run the sidecar proxy (injected into agent pods)"),
    "webhook": ("sidekey.webhook.main", "run the mutating admission webhook"),
    "operator": ("sidekey.operator.main", "run the AgentPolicy operator (kopf)"),
    "demo": ("sidekey.demo.main", "run the whole flow on an embedded control plane"),
    "cluster": ("sidekey.localcluster.main", "start a local control plane and print how to reach it"),
}

#: Command lines run without argparse: ``(command,)`` -> the module whose ``main()`` runs it.
BARE: dict[tuple[str, ...], str] = {("proxy",): "sidekey.proxy.main"}


def version() -> str:
    from importlib import metadata  # here, not at load: see the module docstring

    try:
        return metadata.version("sidekey")
    except metadata.PackageNotFoundError:  # a bare checkout, not installed
        return "0.0.0+unknown"


class Command(Protocol):
    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...
    def run(self, args: argparse.Namespace) -> int: ...


def _top_parser() -> argparse.ArgumentParser:
    import argparse  # here, not at load: see the module docstring

    class Version(argparse.Action):
        """``--version``, looked up only when asked for (argparse's own wants the string up front)."""

        def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
            super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                             help="show the version and exit")

        def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                     values: object, option_string: str | None = None) -> None:
            print(f"sidekey {version()}")
            parser.exit()

    parser = argparse.ArgumentParser(
        prog="sidekey",
        description="Keeps long-lived API keys out of AI agents on Kubernetes.",
        epilog="\n".join(f"  {name:10} {help_text}" for name, (_, help_text) in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=Version)
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND", help="see below")
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def _load(name: str) -> Command | None:
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None
        raise
    if not (hasattr(module, "run") and hasattr(module, "add_arguments")):
        return None
    return cast(Command, module)


def main(argv: Sequence[str] | None = None) -> int:
    bare = BARE.get(tuple(sys.argv[1:] if argv is None else argv))
    if bare is not None:
        return int(importlib.import_module(bare).main())
    import argparse

    top = _top_parser().parse_args(argv)
    command = _load(top.command)
    if command is None:
        print(f"sidekey {top.command}: not implemented yet", file=sys.stderr)
        return 3
    parser = argparse.ArgumentParser(prog=f"sidekey {top.command}", description=COMMANDS[top.command][1])
    command.add_arguments(parser)
    return int(command.run(parser.parse_args(top.args)))
