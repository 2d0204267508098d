"""The shared core: what the webhook, proxy and operator must agree on.

Import modules, not names (``from sidekey.core import contract``), so a call
site shows where a thing lives. The core never imports a component, kopf or
the ``kubernetes`` client (see the import-linter contracts in pyproject.toml).
"""
