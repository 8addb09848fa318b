//! OIDC / JWT identity (SPEC §3 `identity.oidc`, §5): bearer JWTs verified against the
//! JWKS of one of several configured providers.
//!
//! - A token is routed to its provider by its (unverified) `iss`; the provider then checks
//!   everything: signature by a JWKS key, `alg` in `algorithms` and fitting the key, `iss`
//!   exactly, `aud`, `exp` (required), `nbf` (when present), `required_claims`.
//! - Keys are fetched at start and every [`REFRESH_INTERVAL`]; a token naming an unknown
//!   `kid` triggers a refetch at most once per [`MIN_REFETCH_INTERVAL_SECONDS`] per provider
//!   (the first at once), shared by every concurrent miss. Failed fetches keep the last good
//!   keys.
//! - Verified tokens are cached (bounded, keyed by SHA-256, until `exp`): see [`cache`]
//!   for what it saves and why it stays correct.
//! - The clock and the key source are injectable ([`Clock`], [`JwksSource`]) so the rate
//!   limit is testable without sleeping.
//!
//! Tokens are never logged nor returned; errors carry static reasons only.

pub mod cache;
mod fetch;
mod keys;
mod signature;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::Algorithm;
use serde::Deserialize;
use serde_json::{Map, Value};

use cache::TokenCache;
pub use cache::DEFAULT_TOKEN_CACHE_CAPACITY;
pub use fetch::{check_url, HttpJwksSource, JwksSource, HTTP_TIMEOUT, MAX_DOCUMENT_BYTES};
use keys::{KeySet, Lookup};
use signature::Signatures;
pub use signature::{DEFAULT_VERIFY_THREADS, MAX_VERIFY_THREADS};

use crate::FilterError;

/// Tokens longer than this are refused before any parsing.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Period of the background JWKS refresh started by [`OidcVerifier::start`].
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(600);
/// Minimum spacing of the refetches that unknown `kid`s trigger, per provider.
pub const MIN_REFETCH_INTERVAL_SECONDS: u64 = 60;

/// One `identity.oidc[]` entry, as loaded from YAML.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OidcProviderConfig {
    pub name: String,
    pub issuer: String,
    pub audiences: Vec<String>,
    pub discovery_url: Option<String>,
    pub jwks_url: Option<String>,
    pub ca_file: Option<PathBuf>,
    /// As written in YAML, e.g. `"RS256"`.
    pub algorithms: Vec<String>,
    pub clock_skew_seconds: u64,
    pub required_claims: BTreeMap<String, Vec<String>>,
    /// `azp` | `appid` | `client_id` | `sub` | any claim.
    pub client_claim: String,
    pub user_claim: Option<String>,
    /// `grants` (validated by the loader): `None` = not configured, `allow` alone decides.
    pub grants: Option<Arc<crate::grants::Grants>>,
}

/// Checks one provider at load. Returns every problem as `(field, message)`, the field
/// relative to the provider (`"algorithms[1]"`, `"required_claims.roles"`), so the config
/// loader can prefix its YAML path and report them all at once. Empty: valid.
pub fn validate_provider(cfg: &OidcProviderConfig) -> Vec<(String, String)> {
    let mut errors: Vec<(String, String)> = Vec::new();
    let mut err = |field: &str, message: String| errors.push((field.to_string(), message));

    if cfg.name.trim().is_empty() {
        err("name", "must not be empty".into());
    }
    if cfg.issuer.trim().is_empty() {
        err("issuer", "must not be empty".into());
    } else if cfg.discovery_url.is_none() && cfg.jwks_url.is_none() {
        // Discovery goes to {issuer}/.well-known/openid-configuration.
        if let Err(why) = check_url(&cfg.issuer) {
            err("issuer", why);
        }
    }
    if let Some(url) = &cfg.discovery_url {
        if let Err(why) = check_url(url) {
            err("discovery_url", why);
        }
    }
    if let Some(url) = &cfg.jwks_url {
        if let Err(why) = check_url(url) {
            err("jwks_url", why);
        }
        if cfg.discovery_url.is_some() {
            err(
                "jwks_url",
                "set either discovery_url or jwks_url, not both".into(),
            );
        }
    }
    if cfg.audiences.is_empty() {
        err("audiences", "at least one audience is required".into());
    }
    for (i, aud) in cfg.audiences.iter().enumerate() {
        if aud.trim().is_empty() {
            err(&format!("audiences[{i}]"), "must not be empty".into());
        }
    }
    if cfg.algorithms.is_empty() {
        err("algorithms", "at least one algorithm is required".into());
    }
    for (i, alg) in cfg.algorithms.iter().enumerate() {
        if let Err(why) = keys::parse_algorithm(alg) {
            err(&format!("algorithms[{i}]"), why);
        }
    }
    for (claim, values) in &cfg.required_claims {
        if claim.trim().is_empty() {
            err("required_claims", "a claim name must not be empty".into());
        } else if values.is_empty() {
            err(
                &format!("required_claims.{claim}"),
                "list at least one accepted value".into(),
            );
        }
    }
    if cfg.client_claim.trim().is_empty() {
        err("client_claim", "must not be empty".into());
    }
    if cfg
        .user_claim
        .as_deref()
        .is_some_and(|c| c.trim().is_empty())
    {
        err("user_claim", "must not be empty".into());
    }
    if let Some(path) = &cfg.ca_file {
        if let Err(why) = fetch::load_ca_file(path) {
            err("ca_file", why);
        }
    }
    errors
}

/// A verified token: who called, on behalf of whom, until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    /// The provider's `name`.
    pub provider: Arc<str>,
    /// Value of the provider's `client_claim` (shared with the cache: a hit copies no string).
    pub client_value: Arc<str>,
    /// Value of the provider's `user_claim`, when configured and present as a string.
    pub user: Option<String>,
    /// The token's `exp` (Unix seconds).
    pub expires_at: u64,
    /// The provider's grants the token's claims match (`None`: the provider has none).
    pub grants: Option<crate::grants::Granted>,
}

/// Why a token was refused. Never carries the token nor any of its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OidcError {
    /// Malformed, unknown issuer, bad signature, expired, wrong audience, …: 401.
    #[error("invalid token: {0}")]
    Invalid(&'static str),
    /// Signature and standard claims are valid but `required_claims` do not hold: 403.
    #[error("the token does not satisfy the provider's required claims")]
    ClaimsNotSatisfied,
    /// The provider's `client_claim` is absent (or not a non-empty string): 401.
    #[error("the token has no client claim")]
    ClientClaimMissing,
    /// The provider has `grants` and the token's claims match none of them: 403.
    #[error("the token's claims match none of the provider's grants")]
    NoGrant,
}

impl From<OidcError> for FilterError {
    fn from(err: OidcError) -> Self {
        match err {
            OidcError::Invalid(_) | OidcError::ClientClaimMissing => FilterError::InvalidCredential,
            OidcError::ClaimsNotSatisfied | OidcError::NoGrant => FilterError::Forbidden,
        }
    }
}

/// Current time in Unix seconds. Injectable for tests.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    })
}

/// A provider's key state, for `/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderStatus {
    pub name: Arc<str>,
    pub issuer: String,
    /// Usable keys currently held.
    pub keys: usize,
    /// Clock time of the fetch that produced them (`None`: never fetched successfully).
    pub fetched_at: Option<u64>,
}

struct Provider {
    name: Arc<str>,
    issuer: String,
    audiences: Vec<String>,
    algorithms: Vec<Algorithm>,
    leeway: u64,
    required_claims: Vec<(String, Vec<String>)>,
    client_claim: String,
    user_claim: Option<String>,
    grants: Option<Arc<crate::grants::Grants>>,
    source: Arc<dyn JwksSource>,
    /// Current keys; swapped whole, never held across an await.
    keys: RwLock<Arc<KeySet>>,
    /// Serialises fetches: concurrent misses queue here and then reuse the result.
    fetch: tokio::sync::Mutex<FetchState>,
}

#[derive(Default)]
struct FetchState {
    /// Clock time of the last refetch triggered by a key miss.
    last_miss_fetch: Option<u64>,
}

impl Provider {
    fn current_keys(&self) -> Arc<KeySet> {
        self.keys
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

/// Every configured provider. Cheap to share behind an `Arc`.
pub struct OidcVerifier {
    providers: Vec<Provider>,
    by_issuer: HashMap<String, usize>,
    clock: Clock,
    started: AtomicBool,
    cache: TokenCache,
    /// Every claim name some provider reads (see [`wanted_claims`]): the others are skipped
    /// unparsed.
    wanted: Vec<String>,
    /// Tokens answered from the cache / looked up there and not found (then verified).
    hits: AtomicU64,
    misses: AtomicU64,
    /// Where misses' signatures are checked (`identity.verify_threads`).
    signatures: Signatures,
}

/// The verified-token cache's figures, for `/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenCacheStats {
    /// Tokens held now.
    pub entries: usize,
    /// Tokens answered from the cache since start.
    pub hits: u64,
    /// Tokens not found in the cache since start (verified, or refused).
    pub misses: u64,
}

impl fmt::Debug for OidcVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OidcVerifier")
            .field(
                "providers",
                &self.providers.iter().map(|p| &*p.name).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl OidcVerifier {
    /// Builds the verifier with HTTP key sources and the system clock. Fails on any
    /// [`validate_provider`] problem, a duplicate name or issuer, or an unusable `ca_file`.
    pub fn new(providers: Vec<OidcProviderConfig>) -> Result<Self, String> {
        let mut with_sources = Vec::with_capacity(providers.len());
        for cfg in providers {
            check_provider(&cfg)?;
            let source = HttpJwksSource::new(&cfg)
                .map_err(|why| format!("identity.oidc {:?}: {why}", cfg.name))?;
            with_sources.push((cfg, Arc::new(source) as Arc<dyn JwksSource>));
        }
        Self::with_sources(with_sources, system_clock())
    }

    /// Builds the verifier with explicit key sources and clock (tests, embedding).
    pub fn with_sources(
        providers: Vec<(OidcProviderConfig, Arc<dyn JwksSource>)>,
        clock: Clock,
    ) -> Result<Self, String> {
        let mut built = Vec::with_capacity(providers.len());
        let mut by_issuer = HashMap::new();
        for (i, (cfg, source)) in providers.into_iter().enumerate() {
            check_provider(&cfg)?;
            if built.iter().any(|p: &Provider| *p.name == *cfg.name) {
                return Err(format!(
                    "identity.oidc: duplicate provider name {:?}",
                    cfg.name
                ));
            }
            if by_issuer.insert(cfg.issuer.clone(), i).is_some() {
                return Err(format!(
                    "identity.oidc {:?}: issuer {:?} is already used by another provider",
                    cfg.name, cfg.issuer
                ));
            }
            let mut algorithms = Vec::new();
            for name in &cfg.algorithms {
                let alg = keys::parse_algorithm(name)?;
                if !algorithms.contains(&alg) {
                    algorithms.push(alg);
                }
            }
            built.push(Provider {
                name: Arc::from(cfg.name.as_str()),
                issuer: cfg.issuer,
                audiences: cfg.audiences,
                algorithms,
                leeway: cfg.clock_skew_seconds,
                required_claims: cfg.required_claims.into_iter().collect(),
                client_claim: cfg.client_claim,
                user_claim: cfg.user_claim,
                grants: cfg.grants,
                source,
                keys: RwLock::new(Arc::new(KeySet::default())),
                fetch: tokio::sync::Mutex::new(FetchState::default()),
            });
        }
        let wanted = wanted_claims(&built);
        Ok(Self {
            wanted,
            providers: built,
            by_issuer,
            clock,
            started: AtomicBool::new(false),
            cache: TokenCache::new(DEFAULT_TOKEN_CACHE_CAPACITY),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            signatures: Signatures::Inline,
        })
    }

    /// Sets the capacity of the verified-token cache (default
    /// [`DEFAULT_TOKEN_CACHE_CAPACITY`]; 0 disables it).
    pub fn with_token_cache(mut self, capacity: usize) -> Self {
        self.cache = TokenCache::new(capacity);
        self
    }

    /// Checks the signatures of tokens not in the cache on `threads` threads of their own
    /// (`identity.verify_threads`; 0: on the event loop, the default of [`Self::with_sources`]).
    pub fn with_verify_threads(mut self, threads: usize) -> Result<Self, String> {
        self.signatures = Signatures::new(threads)?;
        Ok(self)
    }

    /// Number of tokens currently cached.
    pub fn cached_tokens(&self) -> usize {
        self.cache.len()
    }

    /// Entries, hits and misses of the verified-token cache.
    pub fn cache_stats(&self) -> TokenCacheStats {
        TokenCacheStats {
            entries: self.cache.len(),
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
        }
    }

    /// Fetches discovery + JWKS of every provider once (concurrently; failures are logged,
    /// not fatal: keys are then fetched on first use), then spawns the periodic refresh
    /// (every [`REFRESH_INTERVAL`], last good keys kept on failure) on the current tokio
    /// runtime. The refresh task ends when the verifier is dropped. Calling `start` again
    /// does nothing.
    pub async fn start(self: &Arc<Self>) {
        if self.started.swap(true, Ordering::SeqCst) {
            return;
        }
        self.refresh_all().await;
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let first = tokio::time::Instant::now() + REFRESH_INTERVAL;
            let mut ticks = tokio::time::interval_at(first, REFRESH_INTERVAL);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(verifier) = weak.upgrade() else {
                    break;
                };
                verifier.refresh_all().await;
            }
        });
    }

    /// Refetches every provider's keys now (concurrently), keeping the last good keys of
    /// those whose fetch fails.
    pub async fn refresh_all(self: &Arc<Self>) {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..self.providers.len() {
            let me = Arc::clone(self);
            tasks.spawn(async move {
                let provider = &me.providers[i];
                let _serial = provider.fetch.lock().await;
                me.fetch_keys(provider).await;
            });
        }
        while tasks.join_next().await.is_some() {}
    }

    /// Key state of every provider, in configuration order.
    pub fn status(&self) -> Vec<ProviderStatus> {
        self.providers
            .iter()
            .map(|p| {
                let keys = p.current_keys();
                ProviderStatus {
                    name: p.name.clone(),
                    issuer: p.issuer.clone(),
                    keys: keys.keys.len(),
                    fetched_at: keys.fetched_at,
                }
            })
            .collect()
    }

    /// Fetches and installs a provider's keys. The caller holds `provider.fetch`.
    async fn fetch_keys(&self, provider: &Provider) -> Arc<KeySet> {
        let fetched = provider
            .source
            .fetch()
            .await
            .and_then(|doc| keys::parse_jwks(&doc));
        let mut slot = provider
            .keys
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match fetched {
            Ok(keys) => {
                log::info!(
                    "OIDC provider {}: {} signing keys loaded",
                    provider.name,
                    keys.len()
                );
                *slot = Arc::new(KeySet {
                    keys: keys.into_iter().map(Arc::new).collect(),
                    generation: slot.generation + 1,
                    fetched_at: Some((self.clock)()),
                });
            }
            Err(why) => log::warn!(
                "OIDC provider {}: JWKS fetch failed, keeping the {} keys held: {why}",
                provider.name,
                slot.keys.len()
            ),
        }
        slot.clone()
    }

    /// After a key miss on keys of generation `seen`: the keys to retry with. Fetches at
    /// most once per [`MIN_REFETCH_INTERVAL_SECONDS`]; concurrent misses wait for the
    /// fetch in flight and reuse its result.
    async fn keys_after_miss(&self, provider: &Provider, seen: u64) -> Arc<KeySet> {
        let mut state = provider.fetch.lock().await;
        let current = provider.current_keys();
        if current.generation != seen {
            return current; // fetched by someone else while we waited
        }
        let now = (self.clock)();
        if let Some(last) = state.last_miss_fetch {
            if now < last.saturating_add(MIN_REFETCH_INTERVAL_SECONDS) {
                return current;
            }
        }
        state.last_miss_fetch = Some(now);
        self.fetch_keys(provider).await
    }

    /// Verifies a bearer JWT. Network I/O only on a key miss (rate-limited).
    pub async fn verify(&self, token: &str) -> Result<VerifiedToken, OidcError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(OidcError::Invalid("token larger than 16 KiB"));
        }
        let now = (self.clock)();
        let cache_key = cache::cache_key(token);
        if let Some(hit) = self.cache.get(&cache_key, now, |i| {
            self.providers[i].current_keys().generation
        }) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(hit);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);

        let parsed = ParsedToken::parse(token, &self.wanted)?;
        let Some(Value::String(iss)) = parsed.claims.get("iss") else {
            return Err(OidcError::Invalid("no iss claim"));
        };
        let index = *self
            .by_issuer
            .get(iss.as_str())
            .ok_or(OidcError::Invalid("unknown issuer"))?;
        let provider = &self.providers[index];

        let alg = token_algorithm(&parsed.header.alg)?;
        if !provider.algorithms.contains(&alg) {
            return Err(OidcError::Invalid(
                "algorithm not allowed for this provider",
            ));
        }

        let kid = parsed.header.kid.as_deref();
        let mut keys = provider.current_keys();
        let mut refetched = false;
        loop {
            match keys.find(kid, alg) {
                Lookup::Found(key) => {
                    let valid = self
                        .signatures
                        .verify(key, alg, parsed.signing_input, parsed.signature)
                        .await;
                    if !valid {
                        return Err(OidcError::Invalid("bad signature"));
                    }
                    break;
                }
                Lookup::WrongType => {
                    return Err(OidcError::Invalid("algorithm does not match the key"))
                }
                Lookup::Ambiguous => {
                    return Err(OidcError::Invalid("no kid and several keys fit"));
                }
                Lookup::Missing if !refetched => {
                    refetched = true;
                    keys = self.keys_after_miss(provider, keys.generation).await;
                }
                Lookup::Missing => return Err(OidcError::Invalid("no key for the token's kid")),
            }
        }
        let generation = keys.generation;
        drop(keys);

        let now = (self.clock)(); // a refetch may have taken a while
        let verified = check_claims(provider, &parsed.claims, now)?;
        self.cache.insert(
            cache_key,
            verified.clone(),
            index,
            generation,
            verified.expires_at.saturating_add(provider.leeway),
            now,
        );
        Ok(verified)
    }
}

fn check_provider(cfg: &OidcProviderConfig) -> Result<(), String> {
    let problems = validate_provider(cfg);
    if problems.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = problems
        .into_iter()
        .map(|(field, message)| format!("{field}: {message}"))
        .collect();
    Err(format!("identity.oidc {:?}: {}", cfg.name, list.join("; ")))
}

/// The header fields this module reads. Unknown fields are ignored, except `crit`, which
/// names extensions we would have to understand (RFC 7515 §4.1.11): refused.
#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crit: Option<Value>,
}

struct ParsedToken<'t> {
    header: Header,
    /// The claims some provider reads (see [`wanted_claims`]); the others were skipped.
    claims: Map<String, Value>,
    /// `header.payload`, the signed bytes.
    signing_input: &'t str,
    signature: &'t str,
}

impl<'t> ParsedToken<'t> {
    /// Splits and decodes `token`, keeping the claims named in `wanted` (all claims are
    /// still parsed as JSON: a malformed payload is refused whatever it names).
    fn parse(token: &'t str, wanted: &[String]) -> Result<Self, OidcError> {
        let mut parts = token.split('.');
        let (Some(header_b64), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(OidcError::Invalid("not a compact JWS (three parts)"));
        };
        if signature.is_empty() {
            return Err(OidcError::Invalid("unsigned token"));
        }
        let header_json = URL_SAFE_NO_PAD
            .decode(header_b64)
            .map_err(|_| OidcError::Invalid("header is not base64url"))?;
        let header: Header = serde_json::from_slice(&header_json)
            .map_err(|_| OidcError::Invalid("header is not a JSON object with alg"))?;
        if header.crit.is_some() {
            return Err(OidcError::Invalid("crit header is not supported"));
        }
        let payload_json = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| OidcError::Invalid("payload is not base64url"))?;
        let claims = wanted_from_json(&payload_json, wanted)
            .map_err(|_| OidcError::Invalid("payload is not a JSON object"))?;
        let signing_input = &token[..header_b64.len() + 1 + payload.len()];
        Ok(Self {
            header,
            claims,
            signing_input,
            signature,
        })
    }
}

/// The claim names the verifier may read, over every provider: `iss` (the routing), `exp`,
/// `nbf`, `aud`, and each provider's `client_claim`, `user_claim`, `required_claims` and
/// grant claims. A token's other claims (`jti`, `iat`, `oid`, `tid`, …: most of an Entra ID
/// token) are skipped without building a JSON value for them.
fn wanted_claims(providers: &[Provider]) -> Vec<String> {
    let mut names: Vec<String> = ["iss", "exp", "nbf", "aud"].map(String::from).into();
    for p in providers {
        names.push(p.client_claim.clone());
        names.extend(p.user_claim.clone());
        names.extend(p.required_claims.iter().map(|(claim, _)| claim.clone()));
        if let Some(g) = &p.grants {
            names.extend(g.list.iter().map(|g| g.claim.clone()));
        }
    }
    names.sort_unstable();
    names.dedup();
    names
}

/// A JSON object's members named in `wanted`, the others parsed and dropped (a repeated
/// name: the last one counts, as `serde_json::Map` does). Fails unless `json` is exactly one
/// JSON object.
fn wanted_from_json(json: &[u8], wanted: &[String]) -> serde_json::Result<Map<String, Value>> {
    use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
    use std::borrow::Cow;

    /// A member name, borrowed from the input unless it had escapes.
    struct Name<'de>(Cow<'de, str>);
    impl<'de> Deserialize<'de> for Name<'de> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Name<'de>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a member name")
                }
                fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Name<'de>, E> {
                    Ok(Name(Cow::Borrowed(v)))
                }
                fn visit_str<E>(self, v: &str) -> Result<Name<'de>, E> {
                    Ok(Name(Cow::Owned(v.to_string())))
                }
            }
            d.deserialize_str(V)
        }
    }

    struct Wanted<'w>(&'w [String]);
    impl<'de> Visitor<'de> for Wanted<'_> {
        type Value = Map<String, Value>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut members: A) -> Result<Self::Value, A::Error> {
            let mut out = Map::new();
            while let Some(Name(name)) = members.next_key()? {
                if self.0.iter().any(|w| *w == *name) {
                    let value: Value = members.next_value()?;
                    out.insert(name.into_owned(), value);
                } else {
                    members.next_value::<IgnoredAny>()?;
                }
            }
            Ok(out)
        }
    }
    impl<'de> DeserializeSeed<'de> for Wanted<'_> {
        type Value = Map<String, Value>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }
    }

    let mut de = serde_json::Deserializer::from_slice(json);
    let claims = Wanted(wanted).deserialize(&mut de)?;
    de.end()?;
    Ok(claims)
}

/// The token's `alg`, refusing `none`, HS* (alg confusion: an HMAC "signed" with the
/// public key) and anything else this module does not verify.
fn token_algorithm(name: &str) -> Result<Algorithm, OidcError> {
    if name.eq_ignore_ascii_case("none") {
        return Err(OidcError::Invalid("alg none is refused"));
    }
    keys::parse_algorithm(name).map_err(|_| OidcError::Invalid("algorithm not allowed"))
}

/// A NumericDate: a non-negative JSON number (fractions truncated).
fn numeric_date(value: &Value) -> Option<u64> {
    match value {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0 && *f < u64::MAX as f64)
                .map(|f| f as u64)
        }),
        _ => None,
    }
}

/// A claim value compared with configured strings: strings as is, booleans and numbers
/// in their JSON spelling (`true`, `42`).
fn scalar_matches(value: &Value, accepted: &[String]) -> bool {
    match value {
        Value::String(s) => accepted.iter().any(|a| a == s),
        Value::Bool(b) => accepted
            .iter()
            .any(|a| a == if *b { "true" } else { "false" }),
        Value::Number(n) => accepted.contains(&n.to_string()),
        _ => false,
    }
}

/// Standard claims (after the signature), then `required_claims`, then the client claim.
fn check_claims(
    provider: &Provider,
    claims: &Map<String, Value>,
    now: u64,
) -> Result<VerifiedToken, OidcError> {
    // `iss` already equals the provider's issuer exactly: that is how it was found.
    let exp = claims
        .get("exp")
        .ok_or(OidcError::Invalid("no exp claim"))
        .and_then(|v| numeric_date(v).ok_or(OidcError::Invalid("exp is not a number")))?;
    if now > exp.saturating_add(provider.leeway) {
        return Err(OidcError::Invalid("token expired"));
    }
    if let Some(nbf) = claims.get("nbf") {
        let nbf = numeric_date(nbf).ok_or(OidcError::Invalid("nbf is not a number"))?;
        if nbf > now.saturating_add(provider.leeway) {
            return Err(OidcError::Invalid("token not yet valid (nbf)"));
        }
    }
    let audience_ok = match claims.get("aud") {
        Some(Value::String(aud)) => provider.audiences.iter().any(|a| a == aud),
        Some(Value::Array(auds)) => auds.iter().any(|aud| {
            aud.as_str()
                .is_some_and(|aud| provider.audiences.iter().any(|a| a == aud))
        }),
        _ => false,
    };
    if !audience_ok {
        return Err(OidcError::Invalid("audience not accepted"));
    }

    for (claim, accepted) in &provider.required_claims {
        let holds = match claims.get(claim) {
            Some(Value::Array(items)) => items.iter().any(|v| scalar_matches(v, accepted)),
            Some(value) => scalar_matches(value, accepted),
            None => false,
        };
        if !holds {
            return Err(OidcError::ClaimsNotSatisfied);
        }
    }

    let client_value = match claims.get(&provider.client_claim) {
        Some(Value::String(s)) if !s.is_empty() => Arc::from(s.as_str()),
        _ => return Err(OidcError::ClientClaimMissing),
    };
    let grants = match &provider.grants {
        Some(g) => Some(crate::grants::Granted::new(g.clone(), claims).ok_or(OidcError::NoGrant)?),
        None => None,
    };
    let user = provider
        .user_claim
        .as_ref()
        .and_then(|claim| claims.get(claim))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string);
    Ok(VerifiedToken {
        provider: provider.name.clone(),
        client_value,
        user,
        expires_at: exp,
        grants,
    })
}
