"""Allows ``python -m sidekey``."""

from sidekey.cli import main

raise SystemExit(main())
