"""Keys and tokens for load-tests/jwt.sh: a fresh RSA-2048 key, its JWKS, and N distinct RS256
access tokens (one a line, differing in `jti`), valid for LIFETIME seconds, signed on every
core. Usage: python3 load-tests/jwt_tokens.py DIR N ISSUER [LIFETIME]
Writes DIR/jwks.json and DIR/tokens.txt. Needs PyJWT and cryptography (tests/integration's
requirements)."""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from multiprocessing import Pool

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from jwt.algorithms import RSAAlgorithm

KID = "bench-1"
_key = None
_head = None
_claims = None


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _init(pem: bytes, claims: dict) -> None:
    global _key, _head, _claims
    _key = serialization.load_pem_private_key(pem, password=None)
    _head = b64(json.dumps({"alg": "RS256", "kid": KID, "typ": "JWT"}, separators=(",", ":")).encode())
    _claims = claims


def _sign(rng: range) -> list[str]:
    out = []
    for i in rng:
        body = b64(json.dumps({**_claims, "jti": f"bench-{i}"}, separators=(",", ":")).encode())
        signing_input = f"{_head}.{body}".encode()
        sig = _key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        out.append(f"{_head}.{body}.{b64(sig)}")
    return out


def main() -> None:
    out_dir, n, issuer = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    lifetime = int(sys.argv[4]) if len(sys.argv) > 4 else 3 * 3600
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwk.update({"kid": KID, "use": "sig", "alg": "RS256"})
    with open(os.path.join(out_dir, "jwks.json"), "w") as f:
        json.dump({"keys": [jwk]}, f)
    now = int(time.time())
    claims = {"iss": issuer, "aud": "api://aoai-gateway", "azp": "bench-app", "iat": now,
              "nbf": now - 60, "exp": now + lifetime}
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    step = 2000
    parts = [range(i, min(i + step, n)) for i in range(0, n, step)]
    with Pool(os.cpu_count() or 1, initializer=_init, initargs=(pem, claims)) as pool:
        with open(os.path.join(out_dir, "tokens.txt"), "w") as f:
            for chunk in pool.imap(_sign, parts):
                f.write("\n".join(chunk))
                f.write("\n")


if __name__ == "__main__":
    main()
