//! JWKS documents turned into verification keys, and the rules that pair a token's `alg`
//! with a key.

use std::str::FromStr;
use std::sync::Arc;

use aws_lc_rs::signature::{self as sig, ParsedPublicKey, RsaPublicKeyComponents};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::Algorithm;
use serde::Deserialize;
use serde_json::Value;

/// RSA moduli shorter than this are skipped (NIST: 2048 bits minimum).
const MIN_RSA_BITS: usize = 2048;

/// The kinds of keys a token may be verified with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyType {
    Rsa,
    EcP256,
    EcP384,
}

impl KeyType {
    /// `true` when `alg` is a signature algorithm of this key type (RSA: RS*/PS*; EC: ES256
    /// on P-256, ES384 on P-384). HS* and EdDSA fit no key.
    pub(crate) fn fits(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        matches!(
            (self, alg),
            (KeyType::Rsa, RS256 | RS384 | RS512 | PS256 | PS384 | PS512)
                | (KeyType::EcP256, ES256)
                | (KeyType::EcP384, ES384)
        )
    }
}

/// Parses an algorithm name of `identity.oidc[].algorithms` or of a token header; only the
/// asymmetric algorithms this module verifies are accepted.
pub(crate) fn parse_algorithm(name: &str) -> Result<Algorithm, String> {
    if name.eq_ignore_ascii_case("none") {
        return Err(format!("{name} is not allowed (asymmetric only)"));
    }
    match Algorithm::from_str(name) {
        Ok(Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) => {
            Err(format!("{name} is not allowed (asymmetric only)"))
        }
        Ok(Algorithm::EdDSA) => Err(format!(
            "{name} is not supported (use RS256, RS384, RS512, PS256, PS384, PS512, ES256 or ES384)"
        )),
        Ok(alg) => Ok(alg),
        Err(_) => Err(format!(
            "unknown algorithm {name:?} (use RS256, RS384, RS512, PS256, PS384, PS512, ES256 or ES384)"
        )),
    }
}

/// The algorithms an RSA key may verify (when its JWK names no `alg`).
const RSA_ALGORITHMS: [Algorithm; 6] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

/// RSA verification parameters of a JWS algorithm: the same as jsonwebtoken's aws-lc backend
/// (moduli of 2048 to 8192 bits, checked at every verify).
fn rsa_parameters(alg: Algorithm) -> Option<&'static sig::RsaParameters> {
    Some(match alg {
        Algorithm::RS256 => &sig::RSA_PKCS1_2048_8192_SHA256,
        Algorithm::RS384 => &sig::RSA_PKCS1_2048_8192_SHA384,
        Algorithm::RS512 => &sig::RSA_PKCS1_2048_8192_SHA512,
        Algorithm::PS256 => &sig::RSA_PSS_2048_8192_SHA256,
        Algorithm::PS384 => &sig::RSA_PSS_2048_8192_SHA384,
        Algorithm::PS512 => &sig::RSA_PSS_2048_8192_SHA512,
        _ => return None,
    })
}

/// One key of a provider's JWKS, ready to verify signatures.
///
/// The key is parsed once per JWKS fetch into aws-lc's `ParsedPublicKey`, one per algorithm
/// the key may verify (aws-lc binds a parsed key to one algorithm): a verify then runs the
/// signature operation alone. jsonwebtoken's `crypto::verify` rebuilt the RSA key from
/// `{n, e}` — and its Montgomery constants — on every call, about half of a verify's cost.
pub(crate) struct VerifyKey {
    pub(crate) kid: Option<String>,
    pub(crate) key_type: KeyType,
    /// The JWK's own `alg`, when it names one: tokens must then use exactly that algorithm.
    pub(crate) alg: Option<Algorithm>,
    /// One parsed key per algorithm this key accepts (see [`VerifyKey::accepts`]).
    parsed: Vec<(Algorithm, ParsedPublicKey)>,
}

impl VerifyKey {
    fn accepts(&self, alg: Algorithm) -> bool {
        self.key_type.fits(alg) && self.alg.is_none_or(|a| a == alg)
    }

    /// Whether `signature_b64` (base64url, no padding) is a valid `alg` signature of
    /// `signing_input` by this key. `false` for an algorithm the key does not accept.
    pub(crate) fn verify(&self, alg: Algorithm, signing_input: &[u8], signature_b64: &str) -> bool {
        let Some((_, key)) = self.parsed.iter().find(|(a, _)| *a == alg) else {
            return false;
        };
        let Ok(signature) = URL_SAFE_NO_PAD.decode(signature_b64) else {
            return false;
        };
        key.verify_sig(signing_input, &signature).is_ok()
    }
}

/// The keys of one provider as of one fetch. Replaced whole, never mutated.
#[derive(Default)]
pub(crate) struct KeySet {
    /// Shared with the signature checks in flight ([`super::signature`]).
    pub(crate) keys: Vec<Arc<VerifyKey>>,
    /// Bumped by every successful fetch; lets concurrent misses notice that someone else
    /// fetched while they waited.
    pub(crate) generation: u64,
    /// Clock time of the fetch that produced these keys (`None`: never fetched).
    pub(crate) fetched_at: Option<u64>,
}

/// Result of looking a token's key up.
pub(crate) enum Lookup<'a> {
    Found(&'a Arc<VerifyKey>),
    /// The `kid` exists but its key does not fit the token's `alg` (no refetch: that is not
    /// a rotation, it is a forged or misconfigured token).
    WrongType,
    /// No `kid` in the token and more than one key fits its `alg`.
    Ambiguous,
    /// Nothing fits: worth one refetch.
    Missing,
}

impl KeySet {
    pub(crate) fn find(&self, kid: Option<&str>, alg: Algorithm) -> Lookup<'_> {
        match kid {
            Some(kid) => {
                let mut seen = false;
                for key in self.keys.iter().filter(|k| k.kid.as_deref() == Some(kid)) {
                    if key.accepts(alg) {
                        return Lookup::Found(key);
                    }
                    seen = true;
                }
                if seen {
                    Lookup::WrongType
                } else {
                    Lookup::Missing
                }
            }
            None => {
                let mut fitting = self.keys.iter().filter(|k| k.accepts(alg));
                match (fitting.next(), fitting.next()) {
                    (Some(key), None) => Lookup::Found(key),
                    (Some(_), Some(_)) => Lookup::Ambiguous,
                    _ => Lookup::Missing,
                }
            }
        }
    }
}

#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(rename = "use", default)]
    use_: Option<String>,
    #[serde(default)]
    key_ops: Option<Vec<String>>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
}

/// Turns a JWKS document (`{"keys": [...]}`) into verification keys. Keys this module
/// cannot or must not use (symmetric `oct`, OKP, encryption keys, weak RSA, unknown
/// curves) are skipped; a document with no usable key is an error so that the caller
/// keeps its last good keys.
pub(crate) fn parse_jwks(doc: &Value) -> Result<Vec<VerifyKey>, String> {
    let Some(items) = doc.get("keys").and_then(Value::as_array) else {
        return Err("the JWKS document has no \"keys\" array".to_string());
    };
    let mut keys = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        match parse_jwk(item) {
            Ok(key) => keys.push(key),
            Err(why) => log::debug!("JWKS key {i} skipped: {why}"),
        }
    }
    if keys.is_empty() {
        return Err(format!(
            "the JWKS document holds no usable RSA or EC signing key ({} keys)",
            items.len()
        ));
    }
    Ok(keys)
}

fn b64(field: &str, value: Option<&String>) -> Result<Vec<u8>, String> {
    let value = value.ok_or_else(|| format!("no {field:?}"))?;
    URL_SAFE_NO_PAD
        .decode(value.trim_end_matches('='))
        .map_err(|_| format!("{field:?} is not base64url"))
}

fn parse_jwk(item: &Value) -> Result<VerifyKey, String> {
    let jwk = RawJwk::deserialize(item).map_err(|e| format!("not a JWK: {e}"))?;
    if let Some(use_) = &jwk.use_ {
        if use_ != "sig" {
            return Err(format!("use is {use_:?}"));
        }
    }
    if let Some(ops) = &jwk.key_ops {
        if !ops.iter().any(|op| op == "verify") {
            return Err("key_ops lacks \"verify\"".to_string());
        }
    }
    let alg = match &jwk.alg {
        None => None,
        Some(name) => Some(parse_algorithm(name)?),
    };
    let (key_type, parsed) = match jwk.kty.as_str() {
        "RSA" => {
            let n = b64("n", jwk.n.as_ref())?;
            let e = b64("e", jwk.e.as_ref())?;
            let n = strip_leading_zeros(&n);
            let e = strip_leading_zeros(&e);
            let bits = n.len() * 8 - n.first().map_or(8, |b| b.leading_zeros() as usize);
            if bits < MIN_RSA_BITS {
                return Err(format!("RSA modulus of {bits} bits is too short"));
            }
            if e.is_empty() || e.len() > 8 {
                return Err("RSA exponent out of range".to_string());
            }
            let components = RsaPublicKeyComponents { n, e };
            let mut parsed = Vec::with_capacity(RSA_ALGORITHMS.len());
            for alg in RSA_ALGORITHMS
                .into_iter()
                .filter(|a| alg.is_none_or(|x| x == *a))
            {
                let params = rsa_parameters(alg).ok_or("no RSA parameters")?;
                let key = components
                    .to_parsed_public_key(params)
                    .map_err(|e| format!("RSA key rejected: {e}"))?;
                parsed.push((alg, key));
            }
            (KeyType::Rsa, parsed)
        }
        "EC" => {
            let (key_type, len, ec_alg, params) = match jwk.crv.as_deref() {
                Some("P-256") => (
                    KeyType::EcP256,
                    32,
                    Algorithm::ES256,
                    &sig::ECDSA_P256_SHA256_FIXED,
                ),
                Some("P-384") => (
                    KeyType::EcP384,
                    48,
                    Algorithm::ES384,
                    &sig::ECDSA_P384_SHA384_FIXED,
                ),
                other => return Err(format!("unsupported curve {other:?}")),
            };
            let x = b64("x", jwk.x.as_ref())?;
            let y = b64("y", jwk.y.as_ref())?;
            if x.len() != len || y.len() != len {
                return Err("EC coordinates of the wrong length".to_string());
            }
            let mut point = Vec::with_capacity(1 + 2 * len);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            let key = ParsedPublicKey::new(params, &point)
                .map_err(|e| format!("EC key rejected: {e}"))?;
            (key_type, vec![(ec_alg, key)])
        }
        other => return Err(format!("key type {other:?} is not used")),
    };
    if let Some(alg) = alg {
        if !key_type.fits(alg) {
            return Err(format!("alg {alg:?} does not fit a {key_type:?} key"));
        }
    }
    Ok(VerifyKey {
        kid: jwk.kid,
        key_type,
        alg,
        parsed,
    })
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let first = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    &bytes[first..]
}
