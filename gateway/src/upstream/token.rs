//! The gateway's own bearer token for `credential: managed_identity` backends, obtained with
//! `azure_identity` (App Service endpoint through IDENTITY_ENDPOINT/IDENTITY_HEADER, IMDS on
//! a VM, workload identity, a client secret, or the Azure CLI). Cached and refreshed before
//! expiry by a background task, so requests never wait for it once the first token is in;
//! a failed refresh keeps the valid token and is retried with backoff.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use azure_core::credentials::{Secret, TokenCredential};
use azure_identity::{
    AzureCliCredential, ClientSecretCredential, ManagedIdentityCredential,
    ManagedIdentityCredentialOptions, UserAssignedId, WorkloadIdentityCredential,
    WorkloadIdentityCredentialOptions,
};

use crate::config::file::IdentitySource;
use crate::config::runtime::UpstreamIdentity;
use crate::observe::metrics::Metrics;

/// A token and when it expires (unix seconds).
#[derive(Debug)]
pub struct Token {
    /// `Bearer …`, ready for the header.
    pub header: String,
    pub expires_at: i64,
}

pub struct UpstreamToken {
    credential: Arc<dyn TokenCredential>,
    scope: String,
    current: ArcSwapOption<Token>,
    fetch_lock: tokio::sync::Mutex<()>,
    metrics: Arc<Metrics>,
}

fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// When to refresh a token that expires at `expires_at`: five minutes before, or at half
/// its remaining life for short-lived tokens.
pub fn refresh_at(now: i64, expires_at: i64) -> i64 {
    let life = (expires_at - now).max(0);
    if life > 600 {
        expires_at - 300
    } else {
        now + life / 2
    }
}

impl UpstreamToken {
    pub fn new(cfg: &UpstreamIdentity, metrics: Arc<Metrics>) -> Result<Arc<Self>, String> {
        let credential: Arc<dyn TokenCredential> = match cfg.source {
            IdentitySource::ManagedIdentity => {
                ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
                    user_assigned_id: cfg.client_id.clone().map(UserAssignedId::ClientId),
                    ..Default::default()
                }))
                .map_err(|e| e.to_string())?
            }
            IdentitySource::WorkloadIdentity => {
                WorkloadIdentityCredential::new(Some(WorkloadIdentityCredentialOptions {
                    client_id: cfg.client_id.clone(),
                    tenant_id: cfg.tenant_id.clone(),
                    ..Default::default()
                }))
                .map_err(|e| e.to_string())?
            }
            IdentitySource::ClientSecret => ClientSecretCredential::new(
                cfg.tenant_id.as_deref().unwrap_or_default(),
                cfg.client_id.clone().unwrap_or_default(),
                Secret::new(cfg.client_secret.clone().unwrap_or_default()),
                None,
            )
            .map_err(|e| e.to_string())?,
            IdentitySource::AzureCli => AzureCliCredential::new(None).map_err(|e| e.to_string())?,
        };
        Ok(Arc::new(UpstreamToken {
            credential,
            scope: cfg.scope.clone(),
            current: ArcSwapOption::empty(),
            fetch_lock: tokio::sync::Mutex::new(()),
            metrics,
        }))
    }

    /// The current token; fetched now only if there is no valid one (start-up, or every
    /// refresh failed until expiry). Concurrent callers share one fetch.
    pub async fn get(&self) -> Result<Arc<Token>, String> {
        if let Some(t) = self.valid() {
            return Ok(t);
        }
        let _guard = self.fetch_lock.lock().await;
        if let Some(t) = self.valid() {
            return Ok(t);
        }
        self.fetch().await
    }

    fn valid(&self) -> Option<Arc<Token>> {
        self.current
            .load_full()
            .filter(|t| t.expires_at > now_unix() + 5)
    }

    async fn fetch(&self) -> Result<Arc<Token>, String> {
        match self
            .credential
            .get_token(&[self.scope.as_str()], None)
            .await
        {
            Ok(at) => {
                self.metrics
                    .token_refreshes
                    .with_label_values(&["success"])
                    .inc();
                let t = Arc::new(Token {
                    header: format!("Bearer {}", at.token.secret()),
                    expires_at: at.expires_on.unix_timestamp(),
                });
                self.current.store(Some(t.clone()));
                Ok(t)
            }
            Err(e) => {
                self.metrics
                    .token_refreshes
                    .with_label_values(&["failure"])
                    .inc();
                // The error text of azure_identity names endpoints, never the token.
                Err(format!("could not get the upstream token: {e}"))
            }
        }
    }

    /// Keeps the token fresh; runs forever.
    pub async fn refresh_loop(self: Arc<Self>) {
        let mut backoff = Duration::from_secs(1);
        loop {
            let wait = match self.current.load_full() {
                Some(t) => {
                    let now = now_unix();
                    Duration::from_secs((refresh_at(now, t.expires_at) - now).max(0) as u64)
                }
                None => Duration::ZERO,
            };
            tokio::time::sleep(wait).await;
            let result = {
                let _guard = self.fetch_lock.lock().await;
                self.fetch().await
            };
            match result {
                Ok(_) => backoff = Duration::from_secs(1),
                Err(e) => {
                    log::warn!("{e}; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refreshes_before_expiry() {
        assert_eq!(refresh_at(1_000, 1_000 + 3_600), 1_000 + 3_300);
        assert_eq!(refresh_at(1_000, 1_000 + 400), 1_200);
        assert_eq!(refresh_at(1_000, 900), 1_000);
    }
}
