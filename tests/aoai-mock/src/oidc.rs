//! A minimal OIDC provider: discovery document, JWKS, and a client-credentials
//! token endpoint that signs RS256 access tokens.

use crate::util::{form_pairs, hex, pair};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use bytes::Bytes;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// The role every minted token carries.
pub const ROLE: &str = "AOAI.Inference";
/// The tenant id of every minted token.
pub const TENANT_ID: &str = "00000000-0000-4000-8000-00000000a0a1";
/// Lifetime of minted tokens.
pub const TOKEN_LIFETIME: u64 = 3600;

pub struct Oidc {
    pub kid: String,
    key: EncodingKey,
    pub issuer: String,
    discovery: Bytes,
    generated_jwks: Bytes,
    override_jwks: Mutex<Option<Bytes>>,
    down: AtomicBool,
}

/// `{keys:[{kty:"RSA", kid, use:"sig", alg:"RS256", n, e}]}` (base64url, no padding).
pub fn jwks_json(kid: &str, n: &[u8], e: &[u8]) -> Value {
    json!({"keys":[{
        "kty": "RSA",
        "kid": kid,
        "use": "sig",
        "alg": "RS256",
        "n": URL_SAFE_NO_PAD.encode(n),
        "e": URL_SAFE_NO_PAD.encode(e),
    }]})
}

/// The discovery document.
pub fn discovery_json(issuer: &str, base: &str) -> Value {
    json!({
        "issuer": issuer,
        "jwks_uri": format!("{base}/jwks"),
        "token_endpoint": format!("{base}/oauth2/token"),
        "authorization_endpoint": format!("{base}/oauth2/authorize"),
        "response_types_supported": ["code", "id_token", "token"],
        "subject_types_supported": ["pairwise"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
        "grant_types_supported": ["client_credentials"],
    })
}

/// A stable, UUID-shaped object id derived from a client id.
pub fn stable_oid(client_id: &str) -> String {
    let d = Sha256::digest(format!("aoai-mock-oid:{client_id}").as_bytes());
    let h = hex(&d[..16]);
    format!(
        "{}-{}-4{}-8{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// The audience of a scope: the first scope without a trailing `/.default`.
pub fn audience_of(scope: &str) -> &str {
    let first = scope.split_whitespace().next().unwrap_or("");
    first.strip_suffix("/.default").unwrap_or(first)
}

/// The claims of an access token for `client_id`.
pub fn claims(issuer: &str, client_id: &str, scope: &str, now: u64) -> Value {
    json!({
        "iss": issuer,
        "aud": audience_of(scope),
        "azp": client_id,
        "appid": client_id,
        "sub": client_id,
        "oid": stable_oid(client_id),
        "tid": TENANT_ID,
        "roles": [ROLE],
        "ver": "2.0",
        "iat": now,
        "nbf": now,
        "exp": now + TOKEN_LIFETIME,
    })
}

/// A client-credentials token request.
#[derive(Debug, PartialEq, Eq)]
pub struct TokenRequest {
    pub client_id: String,
    pub scope: String,
}

/// A token-endpoint error: status, OAuth error code, description.
pub type TokenError = (u16, &'static str, String);

/// Parses a form body (and an optional `Authorization: Basic` header).
pub fn parse_token_request(
    body: &str,
    authorization: Option<&str>,
) -> Result<TokenRequest, TokenError> {
    let p = form_pairs(body);
    let grant = pair(&p, "grant_type").unwrap_or("");
    if grant != "client_credentials" {
        return Err((
            400,
            "unsupported_grant_type",
            format!("AADSTS70003: grant_type '{grant}' is not supported; use client_credentials."),
        ));
    }
    let basic = authorization
        .and_then(|a| {
            let (scheme, rest) = a.split_once(' ')?;
            scheme.eq_ignore_ascii_case("basic").then_some(rest.trim())
        })
        .and_then(|b| STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| {
            s.split_once(':')
                .map(|(i, c)| (crate::util::form_decode(i), crate::util::form_decode(c)))
        });
    let (client_id, secret) = match (&basic, pair(&p, "client_id")) {
        (Some((i, s)), _) => (i.clone(), s.clone()),
        (None, Some(i)) => (
            i.to_string(),
            pair(&p, "client_secret")
                .or(pair(&p, "client_assertion"))
                .unwrap_or("")
                .to_string(),
        ),
        (None, None) => (String::new(), String::new()),
    };
    if client_id.is_empty() {
        return Err((
            400,
            "invalid_request",
            "AADSTS900144: The request body must contain the following parameter: 'client_id'."
                .into(),
        ));
    }
    if secret.is_empty() {
        return Err((
            401,
            "invalid_client",
            "AADSTS7000216: 'client_assertion', 'client_secret' or 'request' is required for the 'client_credentials' grant type.".into(),
        ));
    }
    let scope = pair(&p, "scope").unwrap_or("").trim().to_string();
    if scope.is_empty() {
        return Err((
            400,
            "invalid_scope",
            "AADSTS900144: The request body must contain the following parameter: 'scope'.".into(),
        ));
    }
    Ok(TokenRequest { client_id, scope })
}

/// An OAuth error body.
pub fn token_error_body(code: &str, description: &str) -> String {
    json!({"error": code, "error_description": description}).to_string()
}

impl Oidc {
    /// Generates an RSA-2048 key. `base` is the mock's own URL; the issuer is
    /// `issuer` if given, else `base`.
    pub fn generate(base: &str, issuer: Option<&str>) -> Result<Self, String> {
        let rsa = openssl::rsa::Rsa::generate(2048).map_err(|e| e.to_string())?;
        let der = rsa.private_key_to_der().map_err(|e| e.to_string())?;
        let n = rsa.n().to_vec();
        let e = rsa.e().to_vec();
        let kid = format!("mock-{}", &hex(&Sha256::digest(&n))[..16]);
        let issuer = issuer.unwrap_or(base).to_string();
        Ok(Oidc {
            key: EncodingKey::from_rsa_der(&der),
            generated_jwks: Bytes::from(jwks_json(&kid, &n, &e).to_string()),
            discovery: Bytes::from(discovery_json(&issuer, base).to_string()),
            kid,
            issuer,
            override_jwks: Mutex::new(None),
            down: AtomicBool::new(false),
        })
    }

    pub fn discovery(&self) -> Bytes {
        self.discovery.clone()
    }

    /// The JWKS served: the override if set, else the generated key.
    pub fn jwks(&self) -> Bytes {
        match &*self.override_jwks.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(b) => b.clone(),
            None => self.generated_jwks.clone(),
        }
    }

    pub fn set_jwks(&self, jwks: Option<Bytes>) {
        *self.override_jwks.lock().unwrap_or_else(|e| e.into_inner()) = jwks;
    }

    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::Relaxed);
    }

    /// Mints a signed access token.
    pub fn mint(&self, req: &TokenRequest, now: u64) -> Result<String, String> {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.kid.clone());
        header.typ = Some("JWT".into());
        jsonwebtoken::encode(
            &header,
            &claims(&self.issuer, &req.client_id, &req.scope, now),
            &self.key,
        )
        .map_err(|e| e.to_string())
    }

    /// The token endpoint's success body.
    pub fn token_body(&self, req: &TokenRequest, now: u64) -> Result<String, String> {
        let token = self.mint(req, now)?;
        Ok(json!({
            "token_type": "Bearer",
            "expires_in": TOKEN_LIFETIME,
            "ext_expires_in": TOKEN_LIFETIME,
            "access_token": token,
        })
        .to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    #[test]
    fn token_request_parsing() {
        let r = parse_token_request(
            "grant_type=client_credentials&client_id=app1&client_secret=s&scope=api%3A%2F%2Faoai-gateway%2F.default",
            None,
        )
        .unwrap();
        assert_eq!(
            r,
            TokenRequest {
                client_id: "app1".into(),
                scope: "api://aoai-gateway/.default".into()
            }
        );
        let basic = format!("Basic {}", STANDARD.encode("app2:sec"));
        let r = parse_token_request("grant_type=client_credentials&scope=x", Some(&basic)).unwrap();
        assert_eq!(r.client_id, "app2");
        assert_eq!(
            parse_token_request("grant_type=password", None)
                .unwrap_err()
                .1,
            "unsupported_grant_type"
        );
        assert_eq!(
            parse_token_request("grant_type=client_credentials&scope=x", None)
                .unwrap_err()
                .1,
            "invalid_request"
        );
        assert_eq!(
            parse_token_request("grant_type=client_credentials&client_id=a&scope=x", None)
                .unwrap_err()
                .0,
            401
        );
        assert_eq!(
            parse_token_request(
                "grant_type=client_credentials&client_id=a&client_secret=b",
                None
            )
            .unwrap_err()
            .1,
            "invalid_scope"
        );
    }

    #[test]
    fn claims_shape() {
        assert_eq!(
            audience_of("api://aoai-gateway/.default"),
            "api://aoai-gateway"
        );
        assert_eq!(audience_of("api://x"), "api://x");
        let c = claims("http://iss", "app1", "api://aoai-gateway/.default", 100);
        assert_eq!(c["aud"], "api://aoai-gateway");
        assert_eq!(c["azp"], "app1");
        assert_eq!(c["appid"], "app1");
        assert_eq!(c["sub"], "app1");
        assert_eq!(c["roles"], json!([ROLE]));
        assert_eq!(c["exp"], 100 + TOKEN_LIFETIME);
        assert_eq!(stable_oid("app1"), stable_oid("app1"));
        assert_ne!(stable_oid("app1"), stable_oid("app2"));
        assert_eq!(stable_oid("app1").len(), 36);
    }

    #[test]
    fn minted_tokens_verify_against_the_jwks() {
        let o = Oidc::generate("http://127.0.0.1:1", None).unwrap();
        let jwks: Value = serde_json::from_slice(&o.jwks()).unwrap();
        let k = &jwks["keys"][0];
        assert_eq!(k["kid"], o.kid.as_str());
        assert_eq!(k["kty"], "RSA");
        assert_eq!(k["alg"], "RS256");
        assert_eq!(k["e"], "AQAB");
        let req = TokenRequest {
            client_id: "app1".into(),
            scope: "api://aoai-gateway/.default".into(),
        };
        let now = crate::util::now_secs();
        let token = o.mint(&req, now).unwrap();
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.kid.as_deref(), Some(o.kid.as_str()));
        let dk =
            DecodingKey::from_rsa_components(k["n"].as_str().unwrap(), k["e"].as_str().unwrap())
                .unwrap();
        let mut v = Validation::new(Algorithm::RS256);
        v.set_audience(&["api://aoai-gateway"]);
        v.set_issuer(&["http://127.0.0.1:1"]);
        let data = jsonwebtoken::decode::<Value>(&token, &dk, &v).unwrap();
        assert_eq!(data.claims["oid"], stable_oid("app1"));
        let disc: Value = serde_json::from_slice(&o.discovery()).unwrap();
        assert_eq!(disc["jwks_uri"], "http://127.0.0.1:1/jwks");
        assert_eq!(disc["token_endpoint"], "http://127.0.0.1:1/oauth2/token");
        assert_eq!(
            disc["id_token_signing_alg_values_supported"],
            json!(["RS256"])
        );

        o.set_jwks(Some(Bytes::from_static(b"{\"keys\":[]}")));
        assert_eq!(&o.jwks()[..], b"{\"keys\":[]}");
        o.set_jwks(None);
        assert_eq!(o.jwks(), o.generated_jwks);
    }
}
