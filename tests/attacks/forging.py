"""Building JWTs by hand, byte for byte, so that every malformation is exactly the one intended.

A library would refuse to produce most of these (``alg: none``, HMAC keyed
with a public key, duplicate claims, non-UTF-8 payloads), so the compact
serialisation is assembled here from raw bytes and signed with
``cryptography`` directly. Tokens signed with the cluster's *real* signing
key (the local control plane's ``sa.key``) isolate one bad claim at a time:
the signature is good, so only that claim can be the reason for a refusal.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def unb64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def jwk_of(public: rsa.RSAPublicKey | ec.EllipticCurvePublicKey, kid: str | None = None) -> dict[str, Any]:
    if isinstance(public, rsa.RSAPublicKey):
        nums = public.public_numbers()
        doc: dict[str, Any] = {"kty": "RSA", "n": b64(nums.n.to_bytes((nums.n.bit_length() + 7) // 8, "big")),
                               "e": b64(nums.e.to_bytes(3, "big"))}
    else:
        pn = public.public_numbers()
        doc = {"kty": "EC", "crv": "P-256", "x": b64(pn.x.to_bytes(32, "big")), "y": b64(pn.y.to_bytes(32, "big"))}
    if kid:
        doc["kid"] = kid
    return doc


def self_signed(key: rsa.RSAPrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attacker")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


def sign(alg: str, key: Any, signing_input: bytes) -> bytes:
    """A JWS signature for ``alg`` with ``key`` (bytes for HS*)."""
    digest = {"256": hashes.SHA256(), "384": hashes.SHA384(), "512": hashes.SHA512()}[alg[2:]]
    if alg.startswith("HS"):
        return hmac.new(key, signing_input, getattr(hashlib, f"sha{alg[2:]}")).digest()
    if alg.startswith("RS"):
        return bytes(key.sign(signing_input, padding.PKCS1v15(), digest))
    if alg.startswith("PS"):
        return bytes(key.sign(signing_input, padding.PSS(padding.MGF1(digest), digest.digest_size), digest))
    if alg.startswith("ES"):
        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(digest)))
        size = (key.curve.key_size + 7) // 8
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")
    raise ValueError(alg)


def compact(header: dict[str, Any] | bytes, payload: dict[str, Any] | bytes, alg: str | None, key: Any) -> str:
    h = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    p = payload if isinstance(payload, bytes) else json.dumps(payload, separators=(",", ":")).encode()
    signing_input = f"{b64(h)}.{b64(p)}".encode()
    signature = sign(alg, key, signing_input) if alg else b""
    return f"{signing_input.decode()}.{b64(signature)}"


@dataclass
class Forger:
    """Everything needed to forge tokens for one pod of one cluster."""

    issuer: str
    namespace: str
    pod: str
    pod_uid: str
    service_account: str
    real_key: rsa.RSAPrivateKey  # the cluster's own signing key
    real_kid: str
    real_public_pem: bytes
    attacker: rsa.RSAPrivateKey
    attacker_ec: ec.EllipticCurvePrivateKey

    @classmethod
    def for_cluster(cls, cluster: Any, namespace: str, pod: str, pod_uid: str, sa: str, real_token: str) -> Forger:
        real_key = serialization.load_pem_private_key(Path(cluster.sa_key_file).read_bytes(), None)
        assert isinstance(real_key, rsa.RSAPrivateKey)
        kid = json.loads(unb64(real_token.split(".")[0]))["kid"]
        public_pem = Path(cluster.sa_pub_file).read_bytes()
        return cls(cluster.issuer, namespace, pod, pod_uid, sa, real_key, kid, public_pem,
                   rsa.generate_private_key(65537, 2048), ec.generate_private_key(ec.SECP256R1()))

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "aud": ["sidekey"], "exp": now + 600, "iat": now, "nbf": now, "iss": self.issuer,
            "kubernetes.io": {"namespace": self.namespace,
                              "pod": {"name": self.pod, "uid": self.pod_uid},
                              "serviceaccount": {"name": self.service_account, "uid": "sa-uid"}},
            "sub": f"system:serviceaccount:{self.namespace}:{self.service_account}",
        }
        for k, v in overrides.items():
            if v is DROP:
                claims.pop(k, None)
            else:
                claims[k] = v
        return claims

    def real(self, payload: dict[str, Any] | bytes | None = None, **header: Any) -> str:
        """Signed with the cluster's real key and kid: only the claims can be wrong."""
        return compact({"alg": "RS256", "kid": self.real_kid, **header},
                       self.claims() if payload is None else payload, "RS256", self.real_key)

    def by_attacker(self, payload: dict[str, Any] | None = None, **header: Any) -> str:
        head = {"alg": "RS256", "kid": "attacker", **header}
        return compact(head, payload or self.claims(), "RS256", self.attacker)


class _Drop:
    pass


#: Passed to ``Forger.claims`` to remove a claim.
DROP: Any = _Drop()
