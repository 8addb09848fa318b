//! One loaded configuration with everything built from it — filters, pool state, upstream
//! peers, limiter — swapped atomically on reload so each request sees one consistent view.

use std::net::ToSocketAddrs;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use filters::authz::AuthzFilter;
use filters::estimate::{EstimateMode, PromptEstimator};
use filters::identity::{IdentityFilter, IdentityResolver, JwtVerifier, VerifiedJwt};
use filters::limits::{Limiter, OnStoreFailure};
use filters::limits_filter::LimitsFilter;
use filters::objects::ObjectStore;
use filters::oidc::OidcVerifier;
use filters::store::{ConnOptions, Store, StoreKind};
use filters::{FilterChain, FilterError};
use pingora::upstreams::peer::HttpPeer;

use crate::config::file::{OnStoreFailureFile, PromptEstimateFile, StoreKindFile};
use crate::config::runtime::{Backend, Config};
use crate::observe::metrics::Metrics;
use crate::upstream::pool::Upstreams;
use crate::upstream::select::PoolState;

pub struct Snapshot {
    pub cfg: Config,
    pub chain: FilterChain,
    pub pool: PoolState,
    /// By backend index. Re-resolved by the health checker when the host's address changes.
    pub peers: Vec<arc_swap::ArcSwap<Peer>>,
    pub estimator: Arc<PromptEstimator>,
    pub limiter: Arc<Limiter>,
    /// Stored-object records (SPEC §11), on the same store as the limiter's counters.
    pub objects: Arc<ObjectStore>,
    pub oidc: Option<Arc<OidcVerifier>>,
    /// Shared with the other gateways of the fleet (SPEC §14): one per process, kept across
    /// reloads.
    pub fleet: Arc<crate::fleet::Fleet>,
}

/// Lets the identity filter verify JWTs with the OIDC module.
struct OidcJwt(Arc<OidcVerifier>);

#[async_trait]
impl JwtVerifier for OidcJwt {
    async fn verify(&self, token: &str) -> Result<VerifiedJwt, FilterError> {
        let v = self.0.verify(token).await?;
        Ok(VerifiedJwt {
            provider: v.provider,
            client_value: v.client_value,
            user: v.user,
            grants: v.grants,
        })
    }
}

/// Whether a reload keeps the state store (and with it the counters, records and the Redis
/// connection).
fn same_store(a: &Config, b: &Config) -> bool {
    a.state.store == b.state.store
        && a.state.redis_url == b.state.redis_url
        && a.limits.on_store_failure == b.limits.on_store_failure
}

/// A backend's peer and its connection pool key ([`Upstreams::key`]), hashed once per
/// address rather than per request.
pub struct Peer {
    pub http: HttpPeer,
    pub key: u64,
}

impl Peer {
    pub fn new(http: HttpPeer) -> Peer {
        let key = Upstreams::key(&http);
        Peer { http, key }
    }
}

/// Builds the upstream peer of a backend: resolved address (pingora's `HttpPeer::new` with a
/// host name would resolve on the request path), TLS with SNI, private CA if configured.
pub fn build_peer(b: &Backend) -> Result<HttpPeer, String> {
    let addr = (b.host.as_str(), b.port)
        .to_socket_addrs()
        .map_err(|e| format!("backend {}: cannot resolve {}: {e}", b.name, b.host))?
        .next()
        .ok_or_else(|| format!("backend {}: {} has no address", b.name, b.host))?;
    peer_at(b, addr)
}

/// The peer of a backend at a given address.
pub fn peer_at(b: &Backend, addr: std::net::SocketAddr) -> Result<HttpPeer, String> {
    let mut peer = HttpPeer::new(addr, b.tls, b.host.clone());
    peer.options.connection_timeout = Some(Duration::from_secs(5));
    peer.options.total_connection_timeout = Some(Duration::from_secs(10));
    peer.options.idle_timeout = Some(Duration::from_secs(90));
    if let Some(ca) = &b.ca_file {
        let pem =
            std::fs::read(ca).map_err(|e| format!("backend {}: cannot read {ca}: {e}", b.name))?;
        let certs = openssl::x509::X509::stack_from_pem(&pem)
            .map_err(|e| format!("backend {}: {ca} is not a PEM bundle: {e}", b.name))?;
        peer.options.ca = Some(Arc::new(certs.into_boxed_slice()));
    }
    Ok(peer)
}

/// Reads, in a background thread, the token tables that the configured names use.
fn warm_tables(estimator: &PromptEstimator, cfg: &Config) {
    estimator.warm(cfg.deployments.iter().flat_map(|(name, d)| {
        std::iter::once(name.as_str()).chain(d.members.iter().map(|m| &*m.upstream_deployment))
    }));
}

impl Snapshot {
    /// Reads the token tables this configuration's names use, in the background (at start,
    /// by the supervisor: see [`Snapshot::build`]).
    pub fn warm_tables(&self) {
        warm_tables(&self.estimator, &self.cfg);
    }

    /// Builds everything for `cfg`, reusing the limiter, estimator and pool state of `prev`
    /// where the configuration kept them.
    pub fn build(
        cfg: Config,
        prev: Option<&Snapshot>,
        metrics: &Arc<Metrics>,
    ) -> Result<Snapshot, String> {
        let peers = cfg
            .backends
            .iter()
            .map(|b| build_peer(b).map(|p| arc_swap::ArcSwap::from_pointee(Peer::new(p))))
            .collect::<Result<Vec<_>, _>>()?;
        let (limiter, objects) = match prev {
            Some(p) if same_store(&p.cfg, &cfg) => (p.limiter.clone(), p.objects.clone()),
            _ => {
                let kind = match cfg.state.store {
                    StoreKindFile::Memory => StoreKind::Memory,
                    StoreKindFile::Redis => StoreKind::Redis {
                        url: cfg.state.redis_url.clone().unwrap_or_default(),
                    },
                };
                let store =
                    Store::open(kind, &ConnOptions::default()).map_err(|e| format!("state.{e}"))?;
                let on_failure = match cfg.limits.on_store_failure {
                    OnStoreFailureFile::Local => OnStoreFailure::Local,
                    OnStoreFailureFile::Reject => OnStoreFailure::Reject,
                };
                let m = metrics.clone();
                let on_error: Arc<dyn Fn() + Send + Sync> =
                    Arc::new(move || m.limit_store_errors.inc());
                (
                    Arc::new(Limiter::on_store(
                        &store,
                        on_failure,
                        on_error.clone(),
                        &filters::limits::LimiterOptions::default().key_prefix,
                    )),
                    Arc::new(ObjectStore::new(&store, on_error)),
                )
            }
        };
        let estimator = match prev {
            Some(p) if p.cfg.limits.prompt_estimate == cfg.limits.prompt_estimate => {
                p.estimator.clone()
            }
            _ => Arc::new(PromptEstimator::new(match cfg.limits.prompt_estimate {
                PromptEstimateFile::Tokenizer => EstimateMode::Tokenizer,
                PromptEstimateFile::Bytes => EstimateMode::Bytes,
            })),
        };
        // The encodings the configured names use are read in the background: at start by the
        // supervisor ([`Snapshot::warm_tables`], after `run --daemon`'s fork — a thread started
        // before it would not exist in the serving process, and a table it was reading at the
        // fork would stay "being read" there for ever), on a reload here (one that adds a
        // deployment of another family reads that one too; each is read once).
        if prev.is_some() {
            warm_tables(&estimator, &cfg);
        }
        // Unchanged providers keep their verifier: cached keys (also while the IdP is
        // unreachable), verified tokens and the refetch budget survive a reload.
        let oidc = match prev {
            _ if cfg.oidc.is_empty() => None,
            Some(p)
                if p.cfg.oidc == cfg.oidc
                    && p.cfg.token_cache_entries == cfg.token_cache_entries
                    && p.cfg.verify_threads == cfg.verify_threads
                    && p.oidc.is_some() =>
            {
                p.oidc.clone()
            }
            _ => Some(Arc::new(
                OidcVerifier::new(cfg.oidc.clone())?
                    .with_token_cache(cfg.token_cache_entries)
                    .with_verify_threads(cfg.verify_threads)?,
            )),
        };
        let fleet = match prev {
            Some(p) => p.fleet.clone(),
            None => crate::fleet::Fleet::new(metrics),
        };
        let resolver = IdentityResolver {
            keys: cfg.keys.clone(),
            certs: cfg.certs.clone(),
            tokens: cfg.tokens.clone(),
            jwt: oidc
                .clone()
                .map(|v| Arc::new(OidcJwt(v)) as Arc<dyn JwtVerifier>),
            client_ids: cfg.clients.iter().map(|c| c.id.clone()).collect(),
            revoked: fleet.revoked.clone(),
        };
        let chain = FilterChain::new(
            IdentityFilter { resolver },
            AuthzFilter {
                policies: Arc::new(cfg.clients.iter().map(|c| c.policy.clone()).collect()),
            },
            LimitsFilter {
                limiter: limiter.clone(),
                limits: Arc::new(cfg.clients.iter().map(|c| c.limits.clone()).collect()),
            },
        );
        let pool = PoolState::for_config(&cfg, prev.map(|p| &p.pool), prev.map(|p| &p.cfg));
        let snap = Snapshot {
            cfg,
            chain,
            pool,
            peers,
            estimator,
            limiter,
            objects,
            oidc,
            fleet,
        };
        if prev.is_none() {
            snap.set_key_expiry_gauges(metrics);
        }
        Ok(snap)
    }

    /// `aoai_gateway_api_key_expiry_timestamp_seconds` for every key with an expiry.
    pub fn set_key_expiry_gauges(&self, metrics: &Metrics) {
        for c in &self.cfg.clients {
            for (key_id, exp) in &c.key_expiries {
                metrics
                    .key_expiry
                    .with_label_values(&[&*c.id, key_id.as_str()])
                    .set(*exp);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_keeps_the_pool_key_of_its_address() {
        let at = |addr: &str, tls: bool| {
            HttpPeer::new(
                addr.parse::<std::net::SocketAddr>().unwrap(),
                tls,
                "b".into(),
            )
        };
        for (addr, tls) in [("127.0.0.1:80", false), ("127.0.0.2:443", true)] {
            assert_eq!(Peer::new(at(addr, tls)).key, Upstreams::key(&at(addr, tls)));
        }
        // A re-resolved address is a new peer with its own key: its connections are not
        // pooled with the old address's.
        assert_ne!(
            Peer::new(at("127.0.0.1:80", false)).key,
            Peer::new(at("127.0.0.2:80", false)).key
        );
    }
}
