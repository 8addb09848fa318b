//! Wiring: the Pingora server, its services (gateway listeners, admin listener) and the
//! background tasks (health checks, upstream token refresh, OIDC key refresh, SIGHUP reload).

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::apps::http_app::HttpServer;
use pingora::connectors::http::v1::Connector;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;

use crate::audit::AuditLog;
use crate::config;
use crate::health::HealthChecker;
use crate::metrics::Metrics;
use crate::proxy::Gateway;
use crate::state::Snapshot;
use crate::upstream_token::UpstreamToken;

/// Re-reads the configuration on SIGHUP; keeps the upstream token fresh; starts OIDC key
/// refresh for each loaded configuration.
struct Supervisor {
    path: PathBuf,
    state: Arc<ArcSwap<Snapshot>>,
    metrics: Arc<Metrics>,
    audit: AuditLog,
    token: Option<Arc<UpstreamToken>>,
}

impl Supervisor {
    /// Loads the file again and swaps it in; on any error the old configuration stays.
    pub async fn reload(&self) {
        let path = self.path.clone();
        let loaded = tokio::task::spawn_blocking(move || config::load_file(&path)).await;
        let cfg = match loaded {
            Ok(Ok(cfg)) => cfg,
            Ok(Err(errors)) => {
                for e in &errors {
                    log::error!("reload of {}: {e}", self.path.display());
                }
                log::error!("reload failed: the previous configuration stays in force");
                self.metrics
                    .config_reloads
                    .with_label_values(&["failure"])
                    .inc();
                return;
            }
            Err(e) => {
                log::error!("reload failed: {e}");
                self.metrics
                    .config_reloads
                    .with_label_values(&["failure"])
                    .inc();
                return;
            }
        };
        if cfg.needs_upstream_token() && self.token.is_none() {
            log::error!("reload failed: a managed_identity backend was added; restart (or upgrade) to start the token source");
            self.metrics
                .config_reloads
                .with_label_values(&["failure"])
                .inc();
            return;
        }
        let prev = self.state.load_full();
        match Snapshot::build(cfg, Some(&prev), &self.metrics) {
            Ok(snap) => {
                if let Some(o) = &snap.oidc {
                    o.start().await;
                }
                self.state.store(Arc::new(snap));
                self.audit.reopen();
                self.metrics
                    .config_reloads
                    .with_label_values(&["success"])
                    .inc();
                log::info!("configuration reloaded from {}", self.path.display());
            }
            Err(e) => {
                log::error!("reload failed: {e}; the previous configuration stays in force");
                self.metrics
                    .config_reloads
                    .with_label_values(&["failure"])
                    .inc();
            }
        }
    }
}

#[async_trait]
impl BackgroundService for Supervisor {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                log::error!("cannot listen for SIGHUP: {e}");
                return;
            }
        };
        if let Some(o) = &self.state.load().oidc {
            o.start().await;
        }
        if let Some(t) = &self.token {
            if let Err(e) = t.get().await {
                log::error!("{e}");
            }
            tokio::spawn(t.clone().refresh_loop());
        }
        loop {
            tokio::select! {
                _ = hup.recv() => self.reload().await,
                _ = shutdown.changed() => return,
            }
        }
    }
}

pub struct RunOptions {
    pub config: PathBuf,
    pub upgrade: bool,
    pub daemon: bool,
}

/// Starts serving; never returns.
pub fn run(opts: RunOptions) -> Result<(), String> {
    let cfg = config::load_file(&opts.config).map_err(|errors| {
        errors
            .iter()
            .map(|e| format!("{}: {e}", opts.config.display()))
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    let metrics = Metrics::new();
    let audit = AuditLog::start(&cfg.audit_path)
        .map_err(|e| format!("audit log {}: {e}", cfg.audit_path))?;
    let token = if cfg.needs_upstream_token() {
        Some(UpstreamToken::new(&cfg.upstream_identity, metrics.clone())?)
    } else {
        None
    };
    let server_cfg = cfg.server.clone();
    let snap = Snapshot::build(cfg, None, &metrics)?;
    let state = Arc::new(ArcSwap::from_pointee(snap));

    let mut conf = ServerConf {
        threads: server_cfg.threads,
        daemon: opts.daemon,
        // A drained instance stops soon after its last request; Front Door has already moved
        // traffic away by then (its probes see /healthz of the new instance).
        grace_period_seconds: Some(1),
        graceful_shutdown_timeout_seconds: Some(server_cfg.request_timeout.as_secs().min(30)),
        ..Default::default()
    };
    let id = {
        use sha2::Digest;
        let abs = std::fs::canonicalize(&opts.config).unwrap_or(opts.config.clone());
        hex::encode(&sha2::Sha256::digest(abs.to_string_lossy().as_bytes())[..6])
    };
    conf.upgrade_sock = std::env::var("AOAI_GATEWAY_UPGRADE_SOCK")
        .unwrap_or_else(|_| format!("/tmp/aoai-gateway-{id}.upgrade.sock"));
    conf.pid_file = format!("/tmp/aoai-gateway-{id}.pid");
    let opt = Opt {
        upgrade: opts.upgrade,
        daemon: opts.daemon,
        nocapture: false,
        test: false,
        conf: None,
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let gateway = Gateway {
        state: state.clone(),
        connector: Connector::new(None),
        token: token.clone(),
        metrics: metrics.clone(),
        audit: audit.clone(),
    };
    let mut proxy = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        gateway,
        "aoai-gateway",
    );
    for l in &server_cfg.listeners {
        match &l.tls {
            None => proxy.add_tcp(&l.address),
            Some(tls) => {
                crate::tls::add_tls_listener(&mut proxy, &l.address, tls, &metrics, &state)?
            }
        }
    }
    server.add_service(proxy);

    if let Some(addr) = &server_cfg.admin_address {
        let mut admin = Service::new(
            "aoai-gateway admin".to_string(),
            HttpServer::new_app(crate::admin::Admin {
                state: state.clone(),
                metrics: metrics.clone(),
            }),
        );
        admin.add_tcp(addr);
        server.add_service(admin);
    }
    server.add_service(background_service(
        "health checks",
        HealthChecker {
            state: state.clone(),
            token: token.clone(),
            metrics: metrics.clone(),
            connector: Connector::new(None),
        },
    ));
    server.add_service(background_service(
        "supervisor",
        Supervisor {
            path: opts.config.clone(),
            state,
            metrics,
            audit,
            token,
        },
    ));
    server.run_forever();
}
