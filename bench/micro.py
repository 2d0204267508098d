"""``python -m bench.micro``: in-process timings of single hot-path functions.

The end-to-end arms cannot resolve a few microseconds on a shared machine;
these can, because each is CPU time (``time.process_time``) of one function
called many times, median of five rounds. Used for the before/after numbers
of changes to the hot path (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from joserfc import jwk, jwt

from sidekey.core import openssl, tokens
from sidekey.proxy import paths, scrubbing

KEY = "sk-bench-FAKE-0123456789abcdef0123456789abcdef"
EVENT = b'data: {"choices":[{"index":0,"delta":{"content":"token 42"}}]}\n\n'
ISSUER = "https://127.0.0.1:6443"


def per_call_us(fn: Callable[[], object], n: int) -> float:
    rounds = []
    for _ in range(5):
        started = time.process_time()
        for _ in range(n):
            fn()
        rounds.append((time.process_time() - started) / n * 1e6)
    return statistics.median(rounds)


def _token() -> tuple[str, jwk.Key]:
    key = jwk.RSAKey.generate_key(2048, parameters={"kid": "k1", "alg": "RS256", "use": "sig"})
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": ["sidekey"], "sub": "system:serviceaccount:team:agent",
              "exp": now + 600, "iat": now, "nbf": now,
              "kubernetes.io": {"namespace": "team", "pod": {"name": "agent-0", "uid": "uid-0"},
                                "serviceaccount": {"name": "agent", "uid": "sa-uid"}}}
    return jwt.encode({"alg": "RS256", "kid": "k1"}, claims, key), key


def _rsa_verify(token: str, key: tokens.PublicKey) -> Callable[[], object]:
    """The floor under a full validation: the token's RS256 signature checked by libcrypto alone
    (the call core/tokens makes, through ctypes)."""
    head, body, signature = token.split(".")
    message, raw = f"{head}.{body}".encode(), base64.urlsafe_b64decode(signature + "==")
    return lambda: key.public.verify(openssl.SHA256, message, raw)


def _rsa_verify_by_cryptography(token: str, key: tokens.PublicKey) -> Callable[[], object]:
    """The same check by ``cryptography``, which the sidecar verified with before core/openssl."""
    public = serialization.load_der_public_key(key.public.der)
    head, body, signature = token.split(".")
    message, raw = f"{head}.{body}".encode(), base64.urlsafe_b64decode(signature + "==")
    assert isinstance(public, rsa.RSAPublicKey)
    return lambda: public.verify(raw, message, padding.PKCS1v15(), hashes.SHA256())


async def _validators() -> tuple[str, tokens.Validator, tokens.Validator]:
    token, key = _token()

    async def fetch() -> Mapping[str, Any]:
        return {"keys": [key.as_dict(private=False)]}
    keys = tokens.KeySet(fetch)
    await keys.refresh()
    binding = tokens.Binding(issuer=ISSUER, audience="sidekey", namespace="team", pod_name="agent-0",
                             pod_uid="uid-0", service_account="agent")
    cached = tokens.Validator(keys, binding)
    await cached.validate(token)
    uncached = tokens.Validator(keys, binding, cache_size=1)
    return token, cached, uncached


def main() -> int:
    results: dict[str, float] = {}
    scrubber = scrubbing.Scrubber([KEY])
    stream = scrubber.stream()
    results["scrub: stream feed, one SSE event"] = per_call_us(lambda: stream.feed(EVENT), 50_000)
    results["scrub: held_back, one SSE event"] = per_call_us(lambda: scrubber.held_back(EVENT), 50_000)
    results["paths: parse /openai/v1/chat/completions"] = per_call_us(
        lambda: paths.parse("/openai/v1/chat/completions"), 50_000)

    async def tokens_part() -> None:
        token, cached, uncached = await _validators()
        results["tokens: cached lookup"] = per_call_us(lambda: cached.cached(token), 50_000)

        def full() -> None:
            uncached._cache.clear()
            coro = uncached.validate(token)
            with contextlib.suppress(StopIteration):  # never awaits: the key is known
                coro.send(None)

        def unseen_header() -> None:
            uncached._headers.clear()  # as for the first token a new signing key signs
            full()
        results["tokens: full validation (cache miss)"] = per_call_us(full, 2_000)
        results["tokens: full validation, header not seen before"] = per_call_us(unseen_header, 2_000)
        results["tokens: of which RSA-2048 verify alone (libcrypto)"] = per_call_us(
            _rsa_verify(token, uncached.keys.keys["k1"]), 2_000)
        results["tokens: RSA-2048 verify by cryptography instead"] = per_call_us(
            _rsa_verify_by_cryptography(token, uncached.keys.keys["k1"]), 2_000)
    asyncio.run(tokens_part())

    import sidekey.proxy.main
    import sidekey.proxy.sidecar
    gc.collect()
    started = time.perf_counter()
    gc.collect()
    del sidekey
    results["gc: full collection after the sidecar's imports"] = (
        time.perf_counter() - started) * 1e6
    width = max(len(k) for k in results)
    for name, value in results.items():
        print(f"{name:{width}}  {value:9.2f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
