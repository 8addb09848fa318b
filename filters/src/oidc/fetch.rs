//! Where keys come from: the [`JwksSource`] seam and its HTTP implementation (OIDC
//! discovery, then the JWKS), plus the URL rule for both.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use reqwest::Url;
use serde_json::Value;

use super::OidcProviderConfig;

/// Timeout of each HTTP request (connect included).
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest discovery or JWKS document accepted.
pub const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

/// Fetches a provider's current JWKS. The verifier calls it at start, every refresh
/// interval and (rate-limited) when a token names an unknown key; tests substitute a fake.
#[async_trait::async_trait]
pub trait JwksSource: Send + Sync {
    /// The JWKS document, `{"keys": [...]}`. The error is a human-readable reason for logs.
    async fn fetch(&self) -> Result<Value, String>;
}

/// `https://` anywhere; `http://` only on loopback hosts (127.0.0.0/8, ::1, localhost).
pub fn check_url(url: &str) -> Result<Url, String> {
    let parsed = Url::parse(url).map_err(|e| format!("{url:?} is not a valid URL: {e}"))?;
    match parsed.scheme() {
        "https" if parsed.host().is_some() => Ok(parsed),
        "http" if is_loopback(&parsed) => Ok(parsed),
        "http" => Err(format!(
            "{url} uses http:// on a non-loopback host; use https:// (http:// is allowed only for 127.0.0.0/8, ::1 and localhost)"
        )),
        _ => Err(format!("{url} must be an https:// URL")),
    }
}

fn is_loopback(url: &Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    // `host_str` keeps IPv6 literals in brackets.
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    literal.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The discovery URL of a provider that does not set `jwks_url`.
pub(crate) fn discovery_url(cfg: &OidcProviderConfig) -> String {
    match &cfg.discovery_url {
        Some(url) => url.clone(),
        // OpenID Connect Discovery 1.0 §4: strip a trailing "/" from the issuer first.
        None => format!(
            "{}/.well-known/openid-configuration",
            cfg.issuer.trim_end_matches('/')
        ),
    }
}

/// Reads a PEM bundle of trusted roots (`ca_file`).
pub(crate) fn load_ca_file(path: &Path) -> Result<Vec<reqwest::Certificate>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| format!("{}: {}", path.display(), error_chain(&e)))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

/// The real source: `GET` discovery (unless `jwks_url` is set), then `GET jwks_uri`.
pub struct HttpJwksSource {
    client: reqwest::Client,
    issuer: String,
    discovery_url: Option<String>,
    jwks_url: Option<String>,
    /// `jwks_uri` of the last good discovery document, used when discovery fails.
    last_jwks_uri: Mutex<Option<String>>,
}

impl HttpJwksSource {
    pub fn new(cfg: &OidcProviderConfig) -> Result<Self, String> {
        // TLS: reqwest's rustls backend (see the workspace Cargo.toml). With `ca_file` the
        // bundle *replaces* the system roots (`tls_certs_only`), as `backends[].ca_file` does:
        // a private IdP is trusted through its CA and nothing else.
        let mut builder = reqwest::Client::builder()
            .timeout(HTTP_TIMEOUT)
            .connect_timeout(HTTP_TIMEOUT)
            .user_agent(concat!("aoai-gateway/", env!("CARGO_PKG_VERSION")))
            // Fetches are rare (≤ 1 a minute); no idle connections also means no pooled
            // connection outlives the runtime that opened it.
            .pool_max_idle_per_host(0)
            .redirect(reqwest::redirect::Policy::custom(|attempt| {
                if attempt.previous().len() >= 5 {
                    attempt.error("too many redirects")
                } else if let Err(why) = check_url(attempt.url().as_str()) {
                    attempt.error(why)
                } else {
                    attempt.follow()
                }
            }));
        if let Some(path) = &cfg.ca_file {
            builder = builder.tls_certs_only(load_ca_file(path)?);
        }
        let client = builder
            .build()
            .map_err(|e| format!("HTTP client: {}", error_chain(&e)))?;
        let (discovery_url, jwks_url) = match &cfg.jwks_url {
            Some(url) => (None, Some(url.clone())),
            None => (Some(discovery_url(cfg)), None),
        };
        Ok(Self {
            client,
            issuer: cfg.issuer.clone(),
            discovery_url,
            jwks_url,
            last_jwks_uri: Mutex::new(None),
        })
    }

    async fn get_json(&self, url: &str) -> Result<Value, String> {
        check_url(url)?;
        let mut resp = self
            .client
            .get(url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| format!("GET {url}: {}", error_chain(&e)))?;
        if !resp.status().is_success() {
            return Err(format!("GET {url}: HTTP {}", resp.status()));
        }
        if resp
            .content_length()
            .is_some_and(|len| len > MAX_DOCUMENT_BYTES as u64)
        {
            return Err(format!(
                "GET {url}: document over {MAX_DOCUMENT_BYTES} bytes"
            ));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| format!("GET {url}: {}", error_chain(&e)))?
        {
            if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
                return Err(format!(
                    "GET {url}: document over {MAX_DOCUMENT_BYTES} bytes"
                ));
            }
            body.extend_from_slice(&chunk);
        }
        serde_json::from_slice(&body).map_err(|e| format!("GET {url}: not JSON: {e}"))
    }

    async fn discover(&self, discovery_url: &str) -> Result<String, String> {
        let found = self.get_json(discovery_url).await.and_then(|doc| {
            let uri = doc
                .get("jwks_uri")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("{discovery_url}: no jwks_uri"))?;
            check_url(uri).map_err(|why| format!("{discovery_url}: jwks_uri {why}"))?;
            if doc.get("issuer").and_then(Value::as_str) != Some(self.issuer.as_str()) {
                log::warn!(
                    "OIDC discovery {discovery_url}: its issuer differs from the configured {:?}",
                    self.issuer
                );
            }
            Ok(uri.to_string())
        });
        let mut last = self.last_jwks_uri.lock().unwrap_or_else(|p| p.into_inner());
        match found {
            Ok(uri) => {
                *last = Some(uri.clone());
                Ok(uri)
            }
            Err(why) => match last.clone() {
                Some(uri) => {
                    log::warn!("{why}; using the last known jwks_uri {uri}");
                    Ok(uri)
                }
                None => Err(why),
            },
        }
    }
}

#[async_trait::async_trait]
impl JwksSource for HttpJwksSource {
    async fn fetch(&self) -> Result<Value, String> {
        let jwks_uri = match (&self.jwks_url, &self.discovery_url) {
            (Some(url), _) => url.clone(),
            (None, Some(discovery)) => self.discover(discovery).await?,
            (None, None) => return Err("no discovery_url nor jwks_url".to_string()),
        };
        self.get_json(&jwks_uri).await
    }
}

/// An error with its sources ("error sending request: connection refused"): reqwest's own
/// Display hides the cause.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}
