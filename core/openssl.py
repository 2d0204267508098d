"""Signature checks by the OpenSSL that Python's own ``ssl`` module uses, through ctypes.

core/tokens.py verifies the apiserver's JWS signatures (RSA PKCS #1 v1.5 and
PSS, ECDSA) here instead of with ``cryptography``: its Rust binding carries a
second copy of OpenSSL's code and cost every sidecar 7.8 MB of RSS, 2 MB of it
anonymous (private), and every agent pod runs a sidecar. ``_ssl`` and
``_hashlib`` have already mapped the system's libcrypto (OpenSSL 3), so this
module opens that same library by its soname, which the dynamic loader
answers with the copy already loaded, and calls its EVP API: ``ctypes`` and
this module add 0.5 MB, and a 2048-bit RSA check takes no longer than through
``cryptography`` (pure Python's ``pow`` alone would take 270 µs).

Every foreign function has its argument and result types declared, pointers
as ``c_void_p`` so that none is ever truncated to an ``int``. A public key is
parsed once from its DER SubjectPublicKeyInfo, built here from the JWK's
numbers, and freed when its ``PublicKey`` goes; each way it verifies keeps a
context initialised once, which every check copies. A failed check leaves nothing
on OpenSSL's (thread-local) error queue: it is cleared after every failure.
The library is found by name only, never with ``ctypes.util.find_library``,
which runs ``ldconfig`` or a compiler (the image has no shell).
"""

from __future__ import annotations

import ctypes
import ssl
import sys
from ctypes import POINTER, byref, c_char_p, c_int, c_long, c_size_t, c_ulong, c_void_p
from typing import Any, Final

#: ``RSA_PKCS1_PSS_PADDING`` (openssl/rsa.h).
_RSA_PKCS1_PSS_PADDING: Final = 6


def soname(version_info: tuple[int, ...] = ssl.OPENSSL_VERSION_INFO, platform: str = sys.platform) -> str:
    """The file name of the libcrypto ``ssl`` was built against: ``libcrypto.so.3`` for OpenSSL 3.x."""
    if version_info[0] < 3:
        raise ImportError(f"sidekey verifies signatures with OpenSSL 3 or later, Python's ssl uses "
                          f"{ssl.OPENSSL_VERSION}")
    if platform == "darwin":
        return f"libcrypto.{version_info[0]}.dylib"
    return f"libcrypto.so.{version_info[0]}"


def _declare(lib: ctypes.CDLL, name: str, restype: Any, *argtypes: Any) -> Any:
    function = getattr(lib, name)
    function.restype = restype
    function.argtypes = list(argtypes)
    return function


_lib: Final = ctypes.CDLL(soname())
#: The library opened must be the one ``ssl`` runs on, not another OpenSSL 3 of other bugs.
if (_version := _declare(_lib, "OpenSSL_version_num", c_ulong)()) != ssl.OPENSSL_VERSION_NUMBER:
    raise ImportError(f"{soname()} is OpenSSL {_version:#x}, Python's ssl runs on {ssl.OPENSSL_VERSION}")

_d2i_PUBKEY: Final = _declare(_lib, "d2i_PUBKEY", c_void_p, c_void_p, POINTER(c_char_p), c_long)
_EVP_PKEY_free: Final = _declare(_lib, "EVP_PKEY_free", None, c_void_p)
_EVP_PKEY_CTX_new: Final = _declare(_lib, "EVP_PKEY_CTX_new", c_void_p, c_void_p, c_void_p)
_EVP_PKEY_CTX_free: Final = _declare(_lib, "EVP_PKEY_CTX_free", None, c_void_p)
_EVP_PKEY_get_size: Final = _declare(_lib, "EVP_PKEY_get_size", c_int, c_void_p)
_EVP_PKEY_public_check: Final = _declare(_lib, "EVP_PKEY_public_check", c_int, c_void_p)
_EVP_MD_CTX_new: Final = _declare(_lib, "EVP_MD_CTX_new", c_void_p)
_EVP_MD_CTX_free: Final = _declare(_lib, "EVP_MD_CTX_free", None, c_void_p)
_EVP_MD_CTX_copy_ex: Final = _declare(_lib, "EVP_MD_CTX_copy_ex", c_int, c_void_p, c_void_p)
_EVP_DigestVerifyInit: Final = _declare(
    _lib, "EVP_DigestVerifyInit", c_int, c_void_p, POINTER(c_void_p), c_void_p, c_void_p, c_void_p)
_EVP_DigestVerify: Final = _declare(
    _lib, "EVP_DigestVerify", c_int, c_void_p, c_char_p, c_size_t, c_char_p, c_size_t)
_set_rsa_padding: Final = _declare(_lib, "EVP_PKEY_CTX_set_rsa_padding", c_int, c_void_p, c_int)
_set_rsa_pss_saltlen: Final = _declare(_lib, "EVP_PKEY_CTX_set_rsa_pss_saltlen", c_int, c_void_p, c_int)
_set_rsa_mgf1_md: Final = _declare(_lib, "EVP_PKEY_CTX_set_rsa_mgf1_md", c_int, c_void_p, c_void_p)
_ERR_clear_error: Final = _declare(_lib, "ERR_clear_error", None)
#: The oldest error on this thread's queue, 0 when it is empty (for the tests).
peek_error: Final = _declare(_lib, "ERR_peek_error", c_ulong)


class Digest:
    """One of OpenSSL's digests (``EVP_sha256()`` ...): static objects, never freed."""

    __slots__ = ("name", "pointer", "size")

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        pointer = _declare(_lib, f"EVP_{name}", c_void_p)()
        if not pointer:
            raise ImportError(f"libcrypto has no {name}")
        self.pointer: int = pointer

    def __repr__(self) -> str:
        return f"Digest({self.name!r})"


SHA256: Final = Digest("sha256", 32)
SHA384: Final = Digest("sha384", 48)
SHA512: Final = Digest("sha512", 64)


class RefusedKey(ValueError):
    """OpenSSL refused a public key (its DER, or the EC point is not on the curve)."""


class PublicKey:
    """An ``EVP_PKEY`` holding a public key, freed when this object goes.

    Each way it verifies (digest and padding) keeps one context initialised for it, a template
    each check copies (``EVP_MD_CTX_copy_ex``) instead of initialising its own: the
    initialisation (OpenSSL 3 fetches the algorithms) is a quarter of a 2048-bit RSA check.
    A template is only ever copied, never used itself, so threads can share it.
    """

    __slots__ = ("_pointer", "_templates", "der", "size")

    def __init__(self, der: bytes, *, check: bool = False) -> None:
        """Parse a DER SubjectPublicKeyInfo; ``check``: also ``EVP_PKEY_public_check`` (EC keys)."""
        self._pointer: int | None = None
        self._templates: dict[tuple[int, bool], int] = {}
        #: The SubjectPublicKeyInfo it was parsed from.
        self.der = der
        pointer = _d2i_PUBKEY(None, byref(c_char_p(der)), len(der))
        if not pointer:
            _ERR_clear_error()
            raise RefusedKey("OpenSSL refused the public key")
        self._pointer = pointer
        #: ``EVP_PKEY_get_size``: for RSA the modulus's length in bytes, the one length a
        #: signature may have (RFC 8017, 8.2.2)
        self.size: int = _EVP_PKEY_get_size(pointer)
        if check and not _public_check(pointer):
            raise RefusedKey("OpenSSL's check of the public key failed")

    def __del__(self, _free_ctx: Any = _EVP_MD_CTX_free, _free: Any = _EVP_PKEY_free) -> None:
        templates, self._templates = self._templates, {}
        for ctx in templates.values():  # each holds a reference to the key: freed first
            _free_ctx(ctx)
        pointer, self._pointer = self._pointer, None
        if pointer:
            _free(pointer)

    def verify(self, digest: Digest, message: bytes, signature: bytes, *, pss: bool = False) -> bool:
        """Whether ``signature`` (PKCS #1 v1.5 or, with ``pss``, PSS with MGF1 of ``digest`` and a
        salt of its length; a DER ECDSA-Sig-Value for EC keys) signs ``message``.

        Any failure, OpenSSL's errors included, is False, with the error queue cleared.
        """
        template = self._templates.get((digest.pointer, pss)) or self._template(digest, pss)
        if not template:
            return False
        ctx = _EVP_MD_CTX_new()
        if not ctx:
            _ERR_clear_error()
            raise MemoryError("EVP_MD_CTX_new")
        try:
            valid: bool = (_EVP_MD_CTX_copy_ex(ctx, template) == 1
                           and _EVP_DigestVerify(ctx, signature, len(signature), message, len(message)) == 1)
        finally:
            _EVP_MD_CTX_free(ctx)
        if not valid:
            _ERR_clear_error()
        return valid

    def _template(self, digest: Digest, pss: bool) -> int:
        """A context initialised to verify with ``digest`` (and PSS), made once; 0 if OpenSSL fails."""
        ctx = _EVP_MD_CTX_new()
        if not ctx:
            _ERR_clear_error()
            raise MemoryError("EVP_MD_CTX_new")
        pctx = c_void_p()  # owned by ctx
        ready: bool = _EVP_DigestVerifyInit(ctx, byref(pctx), digest.pointer, None, self._pointer) == 1
        if ready and pss:
            ready = (_set_rsa_padding(pctx, _RSA_PKCS1_PSS_PADDING) == 1
                     and _set_rsa_pss_saltlen(pctx, digest.size) == 1
                     and _set_rsa_mgf1_md(pctx, digest.pointer) == 1)
        if not ready:
            _EVP_MD_CTX_free(ctx)
            _ERR_clear_error()
            return 0
        kept = self._templates.setdefault((digest.pointer, pss), ctx)
        if kept != ctx:  # another thread made one first
            _EVP_MD_CTX_free(ctx)
        return kept


def _public_check(pointer: int) -> bool:
    ctx = _EVP_PKEY_CTX_new(pointer, None)
    if not ctx:
        _ERR_clear_error()
        raise MemoryError("EVP_PKEY_CTX_new")
    try:
        valid: bool = _EVP_PKEY_public_check(ctx) == 1
    finally:
        _EVP_PKEY_CTX_free(ctx)
    if not valid:
        _ERR_clear_error()
    return valid


# --- DER, the little of it a SubjectPublicKeyInfo and an ECDSA signature need ------------------------

_RSA_ENCRYPTION: Final = bytes.fromhex("300d06092a864886f70d0101010500")  # SEQUENCE{rsaEncryption, NULL}
_EC_PUBLIC_KEY: Final = bytes.fromhex("06072a8648ce3d0201")  # id-ecPublicKey


def _der(tag: int, body: bytes) -> bytes:
    """A DER TLV: the length in short form below 128, else in long form."""
    length = len(body)
    if length < 0x80:
        return bytes((tag, length)) + body
    octets = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(octets))) + octets + body


def der_integer(value: int) -> bytes:
    """A non-negative INTEGER, minimal: one leading zero byte exactly when the top bit is set."""
    if value < 0:
        raise ValueError("negative")
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def rsa_spki(n: int, e: int) -> bytes:
    """The SubjectPublicKeyInfo of an RSA key (RFC 8017 A.1.1, RFC 5280 4.1)."""
    rsa_public_key = _der(0x30, der_integer(n) + der_integer(e))
    return _der(0x30, _RSA_ENCRYPTION + _der(0x03, b"\0" + rsa_public_key))


def ec_spki(curve_oid: bytes, size: int, x: int, y: int) -> bytes:
    """The SubjectPublicKeyInfo of an EC key on a named curve: the uncompressed point ``04 || x || y``
    (RFC 5480). OverflowError when a coordinate does not fit the curve's size."""
    point = b"\x04" + x.to_bytes(size, "big") + y.to_bytes(size, "big")
    return _der(0x30, _der(0x30, _EC_PUBLIC_KEY + curve_oid) + _der(0x03, b"\0" + point))


def ecdsa_signature(r: bytes, s: bytes) -> bytes:
    """JWS's raw ``r`` and ``s`` (big-endian) as the DER ECDSA-Sig-Value OpenSSL verifies (RFC 3279)."""
    return _der(0x30, der_integer(int.from_bytes(r, "big")) + der_integer(int.from_bytes(s, "big")))
