"""Keys, JWKS and JWTs for the OIDC tests, made with PyJWT and `cryptography` only (nothing
here shares code with the gateway's verifier).

- `SigningKey.rsa(kid)` / `SigningKey.ec(kid)`: a fresh RSA-2048 or EC P-256 key with its kid.
- `jwks(*keys)`: the JWKS document (`{"keys": [...]}`) of their public halves.
- `mint(key, claims, ...)`: a JWT signed by PyJWT (`alg` RS256 / ES256 by default).
- Hand-made tokens that PyJWT refuses to produce: `unsigned` (`alg: none`) and
  `hs256_with_secret` (HMAC over the header and payload with an arbitrary secret, for the
  HS256-with-the-public-key confusion).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64json(obj: Any) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


@dataclass
class SigningKey:
    kid: str
    private_key: Any
    alg: str

    @classmethod
    def rsa(cls, kid: str, alg: str = "RS256") -> "SigningKey":
        return cls(kid, rsa.generate_private_key(public_exponent=65537, key_size=2048), alg)

    @classmethod
    def ec(cls, kid: str) -> "SigningKey":
        return cls(kid, ec.generate_private_key(ec.SECP256R1()), "ES256")

    @property
    def public_key(self):
        return self.private_key.public_key()

    def public_pem(self) -> bytes:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def jwk(self) -> dict:
        if isinstance(self.private_key, rsa.RSAPrivateKey):
            d = RSAAlgorithm.to_jwk(self.public_key, as_dict=True)
        else:
            d = ECAlgorithm.to_jwk(self.public_key, as_dict=True)
        d.update({"kid": self.kid, "use": "sig", "alg": self.alg})
        return d


def jwks(*keys: SigningKey) -> dict:
    return {"keys": [k.jwk() for k in keys]}


def claims(issuer: str, audience: str | list[str] = "api://aoai-gateway", *,
           azp: str = "app-listed", lifetime: int = 3600, **extra) -> dict:
    """Typical access-token claims (Entra v2 style), valid now for `lifetime` seconds.
    `extra` adds or (with value None) removes claims."""
    now = int(time.time())
    c: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "azp": azp,
        "appid": azp,
        "sub": azp,
        "oid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"user:{azp}")),
        "roles": ["AOAI.Reader", "AOAI.Inference"],
        "iat": now,
        "nbf": now - 5,
        "exp": now + lifetime,
        "jti": uuid.uuid4().hex,  # every token distinct (no verified-token cache hit)
    }
    for k, v in extra.items():
        if v is None:
            c.pop(k, None)
        else:
            c[k] = v
    return c


def mint(key: SigningKey, payload: dict, *, alg: str | None = None, kid: str | None = "",
         headers: dict | None = None) -> str:
    """A JWT signed by `key` with PyJWT. `kid=""` uses the key's kid, None omits it."""
    h = dict(headers or {})
    if kid == "":
        kid = key.kid
    if kid is not None:
        h["kid"] = kid
    return jwt.encode(payload, key.private_key, algorithm=alg or key.alg, headers=h)


def unsigned(payload: dict, kid: str | None = None) -> str:
    """`alg: none`, empty signature (RFC 7519 §6.1)."""
    header = {"alg": "none", "typ": "JWT"}
    if kid:
        header["kid"] = kid
    return f"{b64json(header)}.{b64json(payload)}."


def hs256_with_secret(payload: dict, secret: bytes, kid: str | None = None) -> str:
    """HS256 over header.payload with `secret` (e.g. an RSA public key's PEM)."""
    header = {"alg": "HS256", "typ": "JWT"}
    if kid:
        header["kid"] = kid
    signing_input = f"{b64json(header)}.{b64json(payload)}"
    sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(sig)}"


def tamper_signature(token: str) -> str:
    """Flip one bit in the middle of the signature (re-encoded canonically)."""
    head, payload, sig = token.split(".")
    raw = bytearray(b64url_decode(sig))
    raw[len(raw) // 2] ^= 0x01
    return f"{head}.{payload}.{b64url(bytes(raw))}"


def tamper_payload(token: str, **changes) -> str:
    """Change claims and keep the original signature."""
    head, payload, sig = token.split(".")
    c = json.loads(b64url_decode(payload))
    c.update(changes)
    return f"{head}.{b64json(c)}.{sig}"


def claims_of(token: str) -> dict:
    """The payload, unverified (for assertions)."""
    return json.loads(b64url_decode(token.split(".")[1]))
