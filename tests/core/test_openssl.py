"""core/openssl: libcrypto through ctypes verifies what cryptography signs, and nothing else.

The keys and signatures are made here by ``cryptography`` (a test may load it;
the sidecar does not) and checked through the validator's own schemes
(``tokens._ALGORITHMS``), so the DER the JWK's numbers are turned into, the
``r || s`` to DER conversion and the PSS parameters are all on the path. Each
failure is also checked to leave OpenSSL's error queue empty.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from sidekey.core import openssl, tokens

MESSAGE = b"eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJodHRwczovL2syIn0"
HASHES: dict[str, type[hashes.HashAlgorithm]] = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}
CURVES: dict[str, tuple[str, ec.EllipticCurve, int]] = {
    "ES256": ("P-256", ec.SECP256R1(), 32), "ES384": ("P-384", ec.SECP384R1(), 48), "ES512": ("P-521", ec.SECP521R1(), 66),
}
#: The prime of P-256's field.
P256_FIELD = 2**256 - 2**224 + 2**192 + 2**96 - 1


def b64(number: int, length: int | None = None) -> str:
    raw = number.to_bytes(length or max(1, (number.bit_length() + 7) // 8), "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def rsa_jwk(public: rsa.RSAPublicKey) -> dict[str, Any]:
    numbers = public.public_numbers()
    return {"kty": "RSA", "kid": "k", "n": b64(numbers.n), "e": b64(numbers.e)}


def ec_jwk(public: ec.EllipticCurvePublicKey, crv: str, size: int) -> dict[str, Any]:
    numbers = public.public_numbers()
    return {"kty": "EC", "kid": "k", "crv": crv, "x": b64(numbers.x, size), "y": b64(numbers.y, size)}


def verifies(key: tokens.PublicKey, alg: str, signature: bytes, message: bytes = MESSAGE) -> bool:
    valid = tokens._ALGORITHMS[alg].verify(key, message, signature)
    assert openssl.peek_error() == 0, f"OpenSSL's error queue holds {openssl.peek_error():#x}"
    return valid


def rsa_sign(private: rsa.RSAPrivateKey, alg: str, message: bytes = MESSAGE) -> bytes:
    digest = HASHES[alg[2:]]()
    if alg.startswith("PS"):
        return private.sign(message, padding.PSS(padding.MGF1(digest), digest.digest_size), digest)
    return private.sign(message, padding.PKCS1v15(), digest)


def ec_sign(private: ec.EllipticCurvePrivateKey, alg: str, message: bytes = MESSAGE) -> bytes:
    size = CURVES[alg][2]
    r, s = utils.decode_dss_signature(private.sign(message, ec.ECDSA(HASHES[alg[2:]]())))
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def flips(signature: bytes) -> list[bytes]:
    """The signature with one bit flipped, at the start, in the middle and at the end of each half."""
    out = []
    for index in sorted({0, len(signature) // 4, len(signature) // 2 - 1, len(signature) // 2, len(signature) - 1}):
        for bit in (0x01, 0x80):
            flipped = bytearray(signature)
            flipped[index] ^= bit
            out.append(bytes(flipped))
    return out


RSA_KEYS = {bits: rsa.generate_private_key(65537, bits) for bits in (1024, 2048, 3072, 4096)}
OTHER_RSA = rsa.generate_private_key(65537, 2048)
EC_KEYS = {alg: ec.generate_private_key(curve) for alg, (_, curve, _) in CURVES.items()}
RSA_ALGS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]


# --- loading the library ------------------------------------------------------------------------------


def test_the_soname_comes_from_the_openssl_version_ssl_was_built_with() -> None:
    assert openssl.soname((3, 0, 0, 19, 0), "linux") == "libcrypto.so.3"
    assert openssl.soname((3, 5, 2, 0, 0), "linux") == "libcrypto.so.3"
    assert openssl.soname((4, 0, 0, 0, 0), "linux") == "libcrypto.so.4"
    with pytest.raises(ImportError, match="OpenSSL 3"):
        openssl.soname((1, 1, 1, 23, 15), "linux")


def test_the_library_is_the_one_ssl_mapped_and_no_tool_is_run_to_find_it() -> None:
    """One libcrypto in the process (the one _ssl and _hashlib link), and ctypes.util (which runs
    ldconfig or gcc to find libraries) never imported."""
    script = (
        "import json, sys\n"
        "from sidekey.core import openssl, tokens\n"
        "maps = {line.split()[-1] for line in open('/proc/self/maps') if 'libcrypto' in line}\n"
        "print(json.dumps({'maps': sorted(maps), 'util': 'ctypes.util' in sys.modules,\n"
        "                  'cryptography': 'cryptography' in sys.modules}))\n"
    )
    out = json.loads(subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, check=True,
                                    timeout=60, env={**os.environ}).stdout)
    assert len(out["maps"]) == 1 and out["maps"][0].endswith("/" + openssl.soname()), out
    assert not out["util"] and not out["cryptography"], out


# --- the DER built from a JWK's numbers ------------------------------------------------------------------


@pytest.mark.parametrize("bits", sorted(RSA_KEYS))
def test_an_rsa_jwk_becomes_the_subject_public_key_info_cryptography_writes(bits: int) -> None:
    public = RSA_KEYS[bits].public_key()
    key = tokens.import_jwk(rsa_jwk(public))
    assert key.public.der == public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize("alg", sorted(CURVES))
def test_an_ec_jwk_becomes_the_subject_public_key_info_cryptography_writes(alg: str) -> None:
    crv, _, size = CURVES[alg]
    for _ in range(20):  # some coordinates have leading zero bytes, some a high bit set
        public = ec.generate_private_key(CURVES[alg][1]).public_key()
        key = tokens.import_jwk(ec_jwk(public, crv, size))
        assert key.public.der == public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize("value", [0, 1, 127, 128, 255, 256, 2**64 - 1, 2**2048 - 1, 2**2047])
def test_der_integers_and_ecdsa_signatures_are_those_cryptography_encodes(value: int) -> None:
    size = max(1, (value.bit_length() + 7) // 8)
    raw = value.to_bytes(size, "big")
    assert openssl.ecdsa_signature(raw, raw) == utils.encode_dss_signature(value, value)
    assert openssl.ecdsa_signature(b"\0" + raw, raw) == utils.encode_dss_signature(value, value)  # zeros dropped


# --- signatures ------------------------------------------------------------------------------------------


#: Every key size with every RSA algorithm, but PS512 on 1024 bits: PSS with SHA-512 and a salt
#: of its length needs 2 * 64 + 2 bytes, more than a 1024-bit key holds (no such token exists).
RSA_CASES = [(bits, alg) for bits in sorted(RSA_KEYS) for alg in RSA_ALGS if (bits, alg) != (1024, "PS512")]


@pytest.mark.parametrize(("bits", "alg"), RSA_CASES)
def test_rsa_signatures_by_cryptography_verify_and_altered_ones_do_not(bits: int, alg: str) -> None:
    private = RSA_KEYS[bits]
    key = tokens.import_jwk(rsa_jwk(private.public_key()))
    signature = rsa_sign(private, alg)
    assert verifies(key, alg, signature)
    assert not verifies(key, alg, signature, MESSAGE + b"x")
    assert not verifies(key, alg, signature, MESSAGE[:-1])
    for flipped in flips(signature):
        assert not verifies(key, alg, flipped)
    for altered in (signature[:-1], signature[1:], signature + b"\0", b"\0" + signature, b"", b"\0" * len(signature)):
        assert not verifies(key, alg, altered)
    other = {"RS": "PS", "PS": "RS"}[alg[:2]] + alg[2:]  # the other padding of the same digest
    assert not verifies(key, other, signature)
    for digest in {"256", "384", "512"} - {alg[2:]}:
        assert not verifies(key, alg[:2] + digest, signature)
    assert not verifies(tokens.import_jwk(rsa_jwk(OTHER_RSA.public_key())), alg, rsa_sign(private, alg))
    assert not verifies(key, alg, rsa_sign(OTHER_RSA, alg))


@pytest.mark.parametrize("alg", ["PS256", "PS384", "PS512"])
def test_pss_verifies_with_the_digests_length_as_salt_only(alg: str) -> None:
    private = RSA_KEYS[2048]
    key = tokens.import_jwk(rsa_jwk(private.public_key()))
    digest = HASHES[alg[2:]]()
    for salt in (0, digest.digest_size - 1, digest.digest_size + 1, padding.PSS.MAX_LENGTH):
        signature = private.sign(MESSAGE, padding.PSS(padding.MGF1(digest), salt), digest)
        assert not verifies(key, alg, signature), salt
    other_mgf = hashes.SHA224() if alg != "PS256" else hashes.SHA512()
    signature = private.sign(MESSAGE, padding.PSS(padding.MGF1(other_mgf), digest.digest_size), digest)
    assert not verifies(key, alg, signature)


@pytest.mark.parametrize("alg", sorted(CURVES))
def test_ec_signatures_by_cryptography_verify_and_altered_ones_do_not(alg: str) -> None:
    crv, curve, size = CURVES[alg]
    private = EC_KEYS[alg]
    key = tokens.import_jwk(ec_jwk(private.public_key(), crv, size))
    signature = ec_sign(private, alg)
    assert verifies(key, alg, signature)
    assert not verifies(key, alg, signature, MESSAGE + b"x")
    for flipped in flips(signature):
        assert not verifies(key, alg, flipped)
    assert not verifies(key, alg, signature[size:] + signature[:size])  # s || r
    other = ec.generate_private_key(curve)
    assert not verifies(tokens.import_jwk(ec_jwk(other.public_key(), crv, size)), alg, signature)
    assert not verifies(key, alg, ec_sign(other, alg))


@pytest.mark.parametrize("alg", sorted(CURVES))
def test_ec_signatures_with_r_or_s_zero_or_not_below_the_order_fail(alg: str) -> None:
    crv, curve, size = CURVES[alg]
    order = curve.group_order
    private = EC_KEYS[alg]
    key = tokens.import_jwk(ec_jwk(private.public_key(), crv, size))
    raw = ec_sign(private, alg)
    r, s = int.from_bytes(raw[:size], "big"), int.from_bytes(raw[size:], "big")

    def of(r: int, s: int) -> bytes:
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")

    assert verifies(key, alg, of(r, s))
    assert verifies(key, alg, of(r, order - s))  # ECDSA's other s: valid, as cryptography has it
    private.public_key().verify(utils.encode_dss_signature(r, order - s), MESSAGE, ec.ECDSA(HASHES[alg[2:]]()))
    cases = [(0, s), (r, 0), (0, 0), (order, s), (r, order), (order + 1, s), (r, order + 1),
             (2 ** (8 * size) - 1, s), (r, 2 ** (8 * size) - 1)]
    if r + order < 2 ** (8 * size):
        cases.append((r + order, s))  # congruent to r: refused, not reduced
    if s + order < 2 ** (8 * size):
        cases.append((r, s + order))
    for bad_r, bad_s in cases:
        assert not verifies(key, alg, of(bad_r, bad_s)), (bad_r == r, bad_s == s)


def test_verifying_from_many_threads_at_once_gives_every_answer_right() -> None:
    private = RSA_KEYS[2048]
    key = tokens.import_jwk(rsa_jwk(private.public_key()))
    ec_key = tokens.import_jwk(ec_jwk(EC_KEYS["ES256"].public_key(), "P-256", 32))
    good, bad, ec_good = rsa_sign(private, "PS256"), flips(rsa_sign(private, "PS256"))[3], ec_sign(EC_KEYS["ES256"], "ES256")
    failures: list[str] = []

    def work() -> None:
        for _ in range(300):
            if not tokens._ALGORITHMS["PS256"].verify(key, MESSAGE, good):
                failures.append("good")
            if tokens._ALGORITHMS["PS256"].verify(key, MESSAGE, bad):
                failures.append("bad")
            if not tokens._ALGORITHMS["ES256"].verify(ec_key, MESSAGE, ec_good):
                failures.append("ec")
            if openssl.peek_error():
                failures.append("queue")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


# --- keys OpenSSL or the checks before it refuse ------------------------------------------------------------


def _ec_public(alg: str = "ES256") -> dict[str, Any]:
    crv, _, size = CURVES[alg]
    return ec_jwk(EC_KEYS[alg].public_key(), crv, size)


@pytest.mark.parametrize("alg", sorted(CURVES))
def test_an_ec_point_off_the_curve_is_refused_at_import_naming_the_members(alg: str) -> None:
    crv, curve, size = CURVES[alg]
    document = _ec_public(alg)
    numbers = EC_KEYS[alg].public_key().public_numbers()
    for x, y in [(numbers.x ^ 1, numbers.y), (numbers.x, numbers.y ^ 1), (numbers.x, 0), (0, 0), (0, numbers.y)]:
        with pytest.raises(tokens.JWKError, match=r"members 'x' and 'y' are not a point of " + crv):
            tokens.import_jwk({**document, "x": b64(x, size), "y": b64(y, size)})
        assert openssl.peek_error() == 0
        with pytest.raises(ValueError):  # cryptography refuses the same points
            ec.EllipticCurvePublicNumbers(x, y, curve).public_key()


def test_openssls_parse_of_an_ec_key_alone_refuses_a_point_off_the_curve_or_beyond_the_field() -> None:
    """What the import relies on: d2i_PUBKEY itself (without EVP_PKEY_public_check) checks the point."""
    numbers = EC_KEYS["ES256"].public_key().public_numbers()
    oid, size = tokens._CURVES["P-256"].oid, 32
    openssl.PublicKey(openssl.ec_spki(oid, size, numbers.x, numbers.y))
    for x, y in [(numbers.x ^ 1, numbers.y), (P256_FIELD, numbers.y), (numbers.x, P256_FIELD + numbers.y)]:
        if y >= 2**256:
            continue
        with pytest.raises(openssl.RefusedKey):
            openssl.PublicKey(openssl.ec_spki(oid, size, x, y))
        assert openssl.peek_error() == 0


def test_ec_coordinates_longer_than_the_curve_are_refused_naming_the_members() -> None:
    document = _ec_public()
    numbers = EC_KEYS["ES256"].public_key().public_numbers()
    with pytest.raises(tokens.JWKError, match="'x' or 'y' is longer"):
        tokens.import_jwk({**document, "x": b64(numbers.x + 2**256)})
    with pytest.raises(tokens.JWKError, match="are not a point"):  # a coordinate past the field's prime
        tokens.import_jwk({**document, "x": b64(P256_FIELD + 1, 32)})


@pytest.mark.parametrize(("e", "n"), [(3, 5), (3, 4), (65537, 65539), (1, 5), (5, 5), (7, 5), (4, 9), (65537, 2),
                                      (3, 1), (65536, 2**2048 - 1), (3, 2**2048)])
def test_rsa_numbers_are_refused_exactly_when_cryptography_refuses_them(e: int, n: int) -> None:
    try:
        rsa.RSAPublicNumbers(e, n).public_key()
        theirs = True
    except ValueError:
        theirs = False
    document = {"kty": "RSA", "n": b64(n), "e": b64(e)}
    if theirs:
        tokens.import_jwk(document)
    else:
        with pytest.raises(tokens.JWKError, match=r"member '[ne]'"):
            tokens.import_jwk(document)
    assert openssl.peek_error() == 0


def test_an_even_modulus_cryptography_accepts_is_imported_and_fails_every_signature() -> None:
    n = RSA_KEYS[2048].public_key().public_numbers().n + 1
    key = tokens.import_jwk({"kty": "RSA", "n": b64(n), "e": b64(65537)})
    for alg in RSA_ALGS:
        assert not verifies(key, alg, rsa_sign(RSA_KEYS[2048], alg))


def test_der_openssl_cannot_read_is_refused_with_an_empty_error_queue() -> None:
    der = RSA_KEYS[2048].public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    for bad in (b"", b"\x30", der[:-1], der[:10], b"\x30\x00", b"\x00" * 64):
        with pytest.raises(openssl.RefusedKey):
            openssl.PublicKey(bad)
        assert openssl.peek_error() == 0


# --- memory ---------------------------------------------------------------------------------------------


def _rss_kb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def test_twenty_thousand_keys_imported_verified_and_dropped_keep_the_rss_within_a_few_mb() -> None:
    """Each key is freed when it goes (an EVP_PKEY of 2048 bits is kilobytes: 20,000 leaked would
    be tens of MB), and no pointer is truncated (they lie above 2**32: a cut one would crash)."""
    rsa_doc = rsa_jwk(RSA_KEYS[2048].public_key())
    ec_doc = _ec_public()
    rsa_signature, ec_signature = rsa_sign(RSA_KEYS[2048], "RS256"), ec_sign(EC_KEYS["ES256"], "ES256")
    highest = 0

    def rounds(count: int) -> None:
        nonlocal highest
        for i in range(count):
            rsa_key = tokens.import_jwk(rsa_doc)
            assert tokens._ALGORITHMS["RS256"].verify(rsa_key, MESSAGE, rsa_signature)
            assert not tokens._ALGORITHMS["RS256"].verify(rsa_key, MESSAGE, rsa_signature[:-1])
            if i % 4 == 0:
                ec_key = tokens.import_jwk(ec_doc)
                assert tokens._ALGORITHMS["ES256"].verify(ec_key, MESSAGE, ec_signature)
                highest = max(highest, rsa_key.public._pointer or 0, ec_key.public._pointer or 0)

    rounds(2_000)  # the allocators' arenas, warm
    before = _rss_kb()
    rounds(20_000)
    grown = _rss_kb() - before
    assert grown < 4096, f"RSS grew {grown} kB over 20,000 keys"
    assert highest > 2**32
    assert openssl.peek_error() == 0


@pytest.mark.parametrize("alg", ["PS256", "RS256"])
def test_an_rsa_signature_short_of_the_modulus_length_never_verifies(alg: str) -> None:
    """A signature whose first byte is zero, sent without it, is the same number: OpenSSL alone
    verifies it, the token check must not (RFC 8017, 8.2.2). PSS signs with a random salt, so
    one signature in 256 starts with a zero; PKCS #1 v1.5 is deterministic, so the messages vary."""
    private = RSA_KEYS[1024]
    key = tokens.import_jwk(rsa_jwk(private.public_key()))
    for attempt in range(20_000):
        message = MESSAGE + str(attempt).encode()
        signature = rsa_sign(private, alg, message)
        if signature[0] == 0:
            break
    else:
        raise AssertionError("no signature with a leading zero byte in 20,000")
    assert verifies(key, alg, signature, message)
    if alg.startswith("PS"):  # OpenSSL checks the length itself for PKCS #1 v1.5, not for PSS
        assert key.public.verify(tokens._ALGORITHMS[alg].digest, message, signature[1:], pss=True)
    assert not verifies(key, alg, signature[1:], message)
    assert not verifies(key, alg, b"\0" + signature, message)
