//! Identity: which configured client is calling, from the credentials the request presents.
//!
//! Credentials accepted (SPEC §5): `api-key: KEY`; `Authorization: Bearer KEY` where KEY
//! starts with `agw_`; `Authorization: Bearer JWT`; the client certificate of an mTLS
//! listener. Every presented credential must pass: one that fails rejects the request even
//! if another would pass.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;

use crate::apikey::{KeyStore, KEY_PREFIX};
use crate::cert::{CertMap, PeerCert};
use crate::{AuthMethod, FilterError};

/// The credentials a request presents, taken from its headers and TLS session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Presented<'a> {
    pub api_key: Option<&'a str>,
    pub jwt: Option<&'a str>,
    pub certificate: Option<PeerCert>,
}

impl<'a> Presented<'a> {
    /// Reads `api-key` and `Authorization` header values. A malformed `Authorization`
    /// (not `Bearer <something>`) is an invalid credential.
    pub fn from_headers(
        api_key: Option<&'a [u8]>,
        authorization: Option<&'a [u8]>,
    ) -> Result<Presented<'a>, FilterError> {
        fn text(v: Option<&[u8]>) -> Result<Option<&str>, FilterError> {
            v.map(|v| std::str::from_utf8(v).map_err(|_| FilterError::InvalidCredential))
                .transpose()
        }
        Presented::from_text(text(api_key)?, text(authorization)?)
    }

    /// [`Presented::from_headers`] for values already known to be UTF-8 (a request head
    /// that was checked as a whole): the same reading without checking them again.
    pub fn from_text(
        api_key: Option<&'a str>,
        authorization: Option<&'a str>,
    ) -> Result<Presented<'a>, FilterError> {
        let mut p = Presented::default();
        if let Some(s) = api_key {
            p.api_key = Some(s.trim());
        }
        if let Some(s) = authorization {
            let (scheme, rest) = s
                .trim()
                .split_once(' ')
                .ok_or(FilterError::InvalidCredential)?;
            if !scheme.eq_ignore_ascii_case("bearer") {
                return Err(FilterError::InvalidCredential);
            }
            let token = rest.trim();
            if token.is_empty() {
                return Err(FilterError::InvalidCredential);
            }
            if token.starts_with(KEY_PREFIX) {
                if p.api_key.is_some_and(|k| k != token) {
                    // Two different keys: refuse rather than guess.
                    return Err(FilterError::InvalidCredential);
                }
                p.api_key = Some(token);
            } else {
                p.jwt = Some(token);
            }
        }
        Ok(p)
    }

    pub fn is_empty(&self) -> bool {
        self.api_key.is_none() && self.jwt.is_none() && self.certificate.is_none()
    }

    /// The method named in the audit log, also when the credential failed.
    pub fn method(&self) -> AuthMethod {
        if self.certificate.is_some() {
            AuthMethod::Certificate
        } else if self.api_key.is_some() {
            AuthMethod::ApiKey
        } else if self.jwt.is_some() {
            AuthMethod::Oidc
        } else {
            AuthMethod::None
        }
    }
}

/// A JWT that passed signature and claim checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedJwt {
    pub provider: Arc<str>,
    /// Value of the provider's `client_claim`.
    pub client_value: Arc<str>,
    pub user: Option<String>,
    /// The provider's grants the token matched (`None`: the provider has none).
    pub grants: Option<crate::grants::Granted>,
}

/// Verifies JWTs (the OIDC module implements it; tests use fakes).
#[async_trait]
pub trait JwtVerifier: Send + Sync {
    async fn verify(&self, token: &str) -> Result<VerifiedJwt, FilterError>;
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Index of the client (or unlisted-clients template) in the runtime client table.
    pub client: usize,
    /// The client's name in logs, metrics and limit keys: the configured id, or
    /// `unlisted:<provider>:<value>` for an unlisted OIDC application.
    pub client_id: Arc<str>,
    pub auth: AuthMethod,
    pub key_id: Option<Arc<str>>,
    pub user: Option<String>,
    pub provider: Option<Arc<str>>,
    /// The request was authenticated by a JWT (it may then be forwarded to `forward` backends).
    pub jwt_authenticated: bool,
    /// What the token's claims were granted (`identity.oidc[].grants`): narrows the
    /// client's `allow`. `None`: `allow` alone decides.
    pub grants: Option<crate::grants::Granted>,
}

/// Maps OIDC applications to clients.
#[derive(Debug, Default, Clone)]
pub struct TokenMap {
    /// provider -> client_claim value -> client index (looked up by `&str`, no allocation)
    listed: HashMap<Arc<str>, HashMap<String, usize>>,
    /// provider -> index of its unlisted-clients template
    pub unlisted: HashMap<Arc<str>, usize>,
}

impl TokenMap {
    /// Lists an application; returns `false` if it was already listed.
    pub fn add_listed(&mut self, provider: &str, client_value: &str, client: usize) -> bool {
        self.listed
            .entry(Arc::from(provider))
            .or_default()
            .insert(client_value.to_string(), client)
            .is_none()
    }

    /// The pure mapping decision of SPEC §5.
    pub fn client_of(&self, jwt: &VerifiedJwt) -> Result<(usize, Option<String>), FilterError> {
        let listed = self
            .listed
            .get(&*jwt.provider)
            .and_then(|apps| apps.get(&*jwt.client_value));
        if let Some(&c) = listed {
            return Ok((c, None));
        }
        match self.unlisted.get(&jwt.provider) {
            Some(&c) => Ok((
                c,
                Some(format!("unlisted:{}:{}", jwt.provider, jwt.client_value)),
            )),
            None => Err(FilterError::Forbidden),
        }
    }
}

/// Resolves the identity of a request: every presented credential must pass and name the
/// same client.
pub struct IdentityResolver {
    pub keys: KeyStore,
    pub certs: CertMap,
    pub tokens: TokenMap,
    pub jwt: Option<Arc<dyn JwtVerifier>>,
    /// Configured client ids, by index.
    pub client_ids: Vec<Arc<str>>,
    /// Revoked key ids (SPEC §14), kept current by the gateway's fleet task.
    pub revoked: Arc<crate::fleet::RevokedKeys>,
}

impl IdentityResolver {
    pub async fn resolve(&self, p: &Presented<'_>, now_unix: i64) -> Result<Identity, FilterError> {
        if p.is_empty() {
            return Err(FilterError::MissingCredential);
        }
        let mut found: Option<Identity> = None;
        let mut agree = |id: Identity| -> Result<(), FilterError> {
            match &found {
                Some(prev) if prev.client_id != id.client_id => Err(FilterError::InvalidCredential),
                Some(_) => Ok(()),
                None => {
                    found = Some(id);
                    Ok(())
                }
            }
        };
        if let Some(cert) = &p.certificate {
            let c = self.certs.client_of(cert).ok_or(FilterError::Forbidden)?;
            agree(self.identity(c, None, AuthMethod::Certificate))?;
        }
        if let Some(key) = &p.api_key {
            let rec = self.keys.lookup(key, now_unix)?;
            if self.revoked.is_revoked(&rec.key_id) {
                return Err(FilterError::RevokedKey {
                    key_id: rec.key_id.clone(),
                });
            }
            let mut id = self.identity(rec.client, None, AuthMethod::ApiKey);
            id.key_id = Some(rec.key_id.clone());
            agree(id)?;
        }
        if let Some(token) = &p.jwt {
            let verifier = self.jwt.as_ref().ok_or(FilterError::InvalidCredential)?;
            let v = verifier.verify(token).await?;
            let (c, unlisted_id) = self.tokens.client_of(&v)?;
            let mut id = self.identity(c, unlisted_id, AuthMethod::Oidc);
            id.user = v.user;
            id.grants = v.grants;
            id.provider = Some(v.provider);
            id.jwt_authenticated = true;
            agree(id)?;
        }
        found.ok_or(FilterError::MissingCredential)
    }

    fn identity(&self, client: usize, unlisted_id: Option<String>, auth: AuthMethod) -> Identity {
        Identity {
            client,
            client_id: unlisted_id
                .map(Arc::from)
                .unwrap_or_else(|| self.client_ids[client].clone()),
            auth,
            key_id: None,
            user: None,
            provider: None,
            jwt_authenticated: false,
            grants: None,
        }
    }
}

/// The identity filter: the caller's [`Identity`], or why the credentials fail.
pub struct IdentityFilter {
    pub resolver: IdentityResolver,
}

impl<'a> crate::RequestFilter<crate::Credentials<'a>> for IdentityFilter {
    type Pass = Identity;

    async fn apply(&self, c: &crate::Credentials<'a>) -> Result<Identity, FilterError> {
        self.resolver.resolve(c.presented, c.now_unix()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apikey::{hash_key, parse_hash, KeyRecord};

    struct FakeJwt;
    #[async_trait]
    impl JwtVerifier for FakeJwt {
        async fn verify(&self, token: &str) -> Result<VerifiedJwt, FilterError> {
            match token.split_once('.') {
                Some(("good", app)) => Ok(VerifiedJwt {
                    provider: Arc::from("idp"),
                    client_value: Arc::from(app),
                    user: Some("u1".into()),
                    grants: None,
                }),
                Some(("noroles", _)) => Err(FilterError::Forbidden),
                _ => Err(FilterError::InvalidCredential),
            }
        }
    }

    fn resolver() -> IdentityResolver {
        let mut keys = KeyStore::default();
        keys.insert(
            parse_hash(&hash_key("agw_a")).unwrap(),
            KeyRecord {
                client: 0,
                expires_at: None,
                key_id: "aaaaaaaa".into(),
            },
        );
        let mut tokens = TokenMap::default();
        assert!(tokens.add_listed("idp", "app-b", 1));
        assert!(!tokens.add_listed("idp", "app-b", 1), "listed twice");
        tokens.unlisted.insert(Arc::from("idp"), 2);
        IdentityResolver {
            keys,
            certs: CertMap::default(),
            tokens,
            jwt: Some(Arc::new(FakeJwt)),
            client_ids: vec![Arc::from("a"), Arc::from("b"), Arc::from("unlisted")],
            revoked: Default::default(),
        }
    }

    fn rt<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn headers_are_classified() {
        let p = Presented::from_headers(Some(b"agw_x"), None).unwrap();
        assert_eq!(p.api_key, Some("agw_x"));
        let p = Presented::from_headers(None, Some(b"Bearer agw_y")).unwrap();
        assert_eq!(p.api_key, Some("agw_y"));
        let p = Presented::from_headers(None, Some(b"bearer eyJ.a.b")).unwrap();
        assert_eq!(p.jwt, Some("eyJ.a.b"));
        assert_eq!(p.method(), AuthMethod::Oidc);
        assert_eq!(
            Presented::from_headers(None, Some(b"Basic abc")),
            Err(FilterError::InvalidCredential)
        );
        assert_eq!(
            Presented::from_headers(None, Some(b"Bearer ")),
            Err(FilterError::InvalidCredential)
        );
        assert_eq!(
            Presented::from_headers(Some(b"agw_1"), Some(b"Bearer agw_2")),
            Err(FilterError::InvalidCredential)
        );
    }

    #[test]
    fn nothing_presented_is_missing() {
        let r = resolver();
        assert_eq!(
            rt(r.resolve(&Presented::default(), 0)),
            Err(FilterError::MissingCredential)
        );
    }

    #[test]
    fn api_key_names_its_client() {
        let r = resolver();
        let p = Presented::from_headers(Some(b"agw_a"), None).unwrap();
        let id = rt(r.resolve(&p, 0)).unwrap();
        assert_eq!(&*id.client_id, "a");
        assert_eq!(id.key_id.as_deref(), Some("aaaaaaaa"));
        assert_eq!(id.auth, AuthMethod::ApiKey);
    }

    #[test]
    fn a_revoked_key_fails_with_its_id_until_unrevoked() {
        let r = resolver();
        let p = Presented::from_headers(Some(b"agw_a"), None).unwrap();
        r.revoked.replace(["aaaaaaaa".to_string()].into());
        assert_eq!(
            rt(r.resolve(&p, 0)),
            Err(FilterError::RevokedKey {
                key_id: "aaaaaaaa".into()
            })
        );
        // Another revoked id does not touch this key.
        r.revoked.replace(["bbbbbbbb".to_string()].into());
        assert_eq!(&*rt(r.resolve(&p, 0)).unwrap().client_id, "a");
        r.revoked.replace(Default::default());
        assert_eq!(&*rt(r.resolve(&p, 0)).unwrap().client_id, "a");
    }

    #[test]
    fn failing_credential_rejects_even_with_a_good_one() {
        let r = resolver();
        let p = Presented {
            api_key: Some("agw_a"),
            jwt: Some("bad.token"),
            certificate: None,
        };
        assert_eq!(rt(r.resolve(&p, 0)), Err(FilterError::InvalidCredential));
    }

    #[test]
    fn listed_and_unlisted_apps() {
        let r = resolver();
        let p = Presented {
            jwt: Some("good.app-b"),
            ..Default::default()
        };
        let id = rt(r.resolve(&p, 0)).unwrap();
        assert_eq!(&*id.client_id, "b");
        assert!(id.jwt_authenticated);
        assert_eq!(id.user.as_deref(), Some("u1"));
        let p = Presented {
            jwt: Some("good.app-z"),
            ..Default::default()
        };
        let id = rt(r.resolve(&p, 0)).unwrap();
        assert_eq!(&*id.client_id, "unlisted:idp:app-z");
        assert_eq!(id.client, 2);
    }

    #[test]
    fn unlisted_without_policy_is_forbidden() {
        let mut r = resolver();
        r.tokens.unlisted.clear();
        let p = Presented {
            jwt: Some("good.app-z"),
            ..Default::default()
        };
        assert_eq!(rt(r.resolve(&p, 0)), Err(FilterError::Forbidden));
    }

    #[test]
    fn credentials_naming_different_clients_are_refused() {
        let r = resolver();
        let p = Presented {
            api_key: Some("agw_a"),
            jwt: Some("good.app-b"),
            certificate: None,
        };
        assert_eq!(rt(r.resolve(&p, 0)), Err(FilterError::InvalidCredential));
    }

    #[test]
    fn unmapped_certificate_is_forbidden() {
        let r = resolver();
        let p = Presented {
            certificate: Some(PeerCert {
                fingerprint: "00".repeat(32),
                subject: "CN=x".into(),
                not_after: 0,
            }),
            ..Default::default()
        };
        assert_eq!(rt(r.resolve(&p, 0)), Err(FilterError::Forbidden));
    }
}
