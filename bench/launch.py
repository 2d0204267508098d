"""``sidekey`` started with bench-only patches, for what the proxy cannot yet be told by env.

- ``BENCH_NO_TOKEN_CACHE=1``: the token-validation cache is patched out, so
  every request pays the full signature and claims check (what a cache miss
  costs: the first call with each freshly rotated token). Used only while the
  proxy has no ``SIDEKEY_TOKEN_CACHE`` knob.
- The apiserver answers ``/openid/v1/jwks`` only as ``application/jwk-set+json``
  (406 to ``Accept: application/json`` alone). If the API client does not
  accept it (``BENCH_JWKS_ACCEPT=1``, set by the harness after reading the
  source), the sidecar can never become ready; this adds the type so the
  benchmark can run until ``core/kubeapi.py`` is fixed. The results say so
  whenever it was needed.
"""

from __future__ import annotations

import os
import sys

from sidekey import cli
from sidekey.core import kubeapi, tokens

ACCEPT = "application/json, application/jwk-set+json;q=0.9"


def main() -> int:
    if os.environ.get("BENCH_NO_TOKEN_CACHE") == "1":
        tokens.Validator.cached = lambda self, token: None  # type: ignore[method-assign]
        tokens.Validator._remember = lambda self, token, identity: None  # type: ignore[method-assign]
    if os.environ.get("BENCH_JWKS_ACCEPT") == "1":
        original = kubeapi.ApiClient._headers

        def headers(self: kubeapi.ApiClient) -> dict[str, str]:
            h = original(self)
            h["Accept"] = ACCEPT
            return h
        kubeapi.ApiClient._headers = headers  # type: ignore[method-assign]
    return int(cli.main(sys.argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
