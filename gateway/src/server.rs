//! Wiring: the Pingora server, its services (gateway listeners, admin listener) and the
//! background tasks (health checks, upstream token refresh, OIDC key refresh, SIGHUP reload).

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::apps::http_app::HttpServer;
use pingora::connectors::http::v1::Connector;
use pingora::listeners::{L4BufferSettings, ListenerConfig, DEFAULT_L4_WRITE_BUFFER_SIZE};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;

use crate::config;
use crate::front::handshake::Handshakes;
use crate::front::Front;
use crate::observe::audit::AuditLog;
use crate::observe::metrics::Metrics;
use crate::pipeline::Gateway;
use crate::state::Snapshot;
use crate::upstream::health::HealthChecker;
use crate::upstream::pool::Upstreams;
use crate::upstream::token::UpstreamToken;

/// The read buffer of a TLS client connection: one whole TLS record (2^14 bytes of data plus
/// its header and the cipher's expansion) per read.
const TLS_READ_BUFFER: usize = 16 * 1024 + 512;

/// Re-reads the configuration on SIGHUP; keeps the upstream token fresh; starts OIDC key
/// refresh for each loaded configuration.
struct Supervisor {
    path: PathBuf,
    state: Arc<ArcSwap<Snapshot>>,
    metrics: Arc<Metrics>,
    audit: AuditLog,
    token: Option<Arc<UpstreamToken>>,
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
}

impl Supervisor {
    /// Loads the file again and swaps it in; on any error the old configuration stays.
    pub async fn reload(&self) {
        // The audit file is reopened on every SIGHUP (logrotate), whatever the reload's fate.
        self.audit.reopen();
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
                // Series of keys the new file dropped disappear; the current ones are set
                // again. (Health and cooldowns are read from the current pool when scraped.)
                self.metrics.key_expiry.reset();
                snap.set_key_expiry_gauges(&self.metrics);
                self.state.store(Arc::new(snap));
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
        // Started here, in the serving process (after `--daemon`'s fork): the token tables.
        self.state.load().warm_tables();
        // The token first: requests wait for its first fetch (and only for that one).
        if let Some(t) = &self.token {
            tokio::spawn(t.clone().refresh_loop());
        }
        if let Some(o) = &self.state.load().oidc {
            o.start().await;
        }
        loop {
            tokio::select! {
                _ = hup.recv() => self.reload().await,
                _ = shutdown.changed() => break,
            }
        }
        // SIGTERM or SIGQUIT (upgrade): the listeners have stopped accepting. Let the requests
        // in flight finish — streams included, up to request_timeout_seconds (Pingora's grace
        // period) — then exit at once instead of sleeping out the whole grace period.
        // Idle client connections still take a request for `SHUTDOWN_GRACE`: wait past it,
        // so that such a request is counted in flight before the check.
        tokio::time::sleep(
            crate::front::h1::SHUTDOWN_GRACE + std::time::Duration::from_millis(200),
        )
        .await;
        while self.in_flight.load(std::sync::atomic::Ordering::Acquire) > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        self.audit.sync(std::time::Duration::from_secs(5));
        log::info!("drained: exiting");
        std::process::exit(0);
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
    // Revoked keys are refused from the first request (SPEC §14).
    crate::fleet::initial_sync(&snap);
    let state = Arc::new(ArcSwap::from_pointee(snap));
    metrics.read_pool_with({
        let state = state.clone();
        move || {
            let snap = state.load();
            snap.pool
                .reading(&snap.cfg, crate::upstream::select::now_ms())
        }
    });

    let mut conf = ServerConf {
        threads: server_cfg.threads,
        // One single-threaded runtime per thread: no cross-thread task stealing and wakeups
        // on this short, I/O-bound request path.
        work_stealing: false,
        daemon: opts.daemon,
        // The longest a request in flight (or an open realtime session,
        // `shutdown_grace_seconds`) may still need; the supervisor exits as soon as the last
        // one is done, so this is an upper bound, not a wait.
        grace_period_seconds: Some(
            (server_cfg.request_timeout.as_secs() + 1).max(server_cfg.shutdown_grace.as_secs()),
        ),
        graceful_shutdown_timeout_seconds: Some(5),
        ..Default::default()
    };
    let id = {
        use sha2::Digest;
        let abs = std::fs::canonicalize(&opts.config).unwrap_or(opts.config.clone());
        hex::encode(&sha2::Sha256::digest(abs.to_string_lossy().as_bytes())[..6])
    };
    conf.upgrade_sock = std::env::var("AOAI_GATEWAY_UPGRADE_SOCK")
        .unwrap_or_else(|_| format!("/tmp/aoai-gateway-{id}.upgrade.sock"));
    conf.pid_file = std::env::var("AOAI_GATEWAY_PID_FILE")
        .unwrap_or_else(|_| format!("/tmp/aoai-gateway-{id}.pid"));
    let opt = Opt {
        upgrade: opts.upgrade,
        daemon: opts.daemon,
        nocapture: false,
        test: false,
        conf: None,
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let gateway = Gateway {
        in_flight: in_flight.clone(),
        state: state.clone(),
        // Idle backend connections close after server.backend_idle_seconds.
        upstreams: Upstreams::new(),
        token: token.clone(),
        metrics: metrics.clone(),
        audit: audit.clone(),
    };
    // TLS listeners are plain TCP to Pingora: the front runs (and counts) their handshakes.
    let mut tls_listeners = Vec::new();
    for l in &server_cfg.listeners {
        if let Some(tls) = &l.tls {
            let addr = l
                .address
                .parse()
                .map_err(|e| format!("listener {}: {e}", l.address))?;
            let listener = crate::tls::tls_listener(&l.address, tls, &metrics, &state)?;
            tls_listeners.push((addr, listener));
        }
    }
    let handshakes = Handshakes::new(
        tls_listeners,
        server_cfg.tls_handshakes_per_thread * server_cfg.threads,
        server_cfg.tls_handshake_pacing,
        server_cfg.threads,
        server_cfg.header_timeout,
        metrics.clone(),
    );
    let front = Front::new(Arc::new(gateway), handshakes);
    let mut proxy = Service::new("aoai-gateway".to_string(), front);
    for l in &server_cfg.listeners {
        let listener = ListenerConfig::tcp(l.address.as_str());
        proxy.add_listener(match &l.tls {
            // Plain listeners are read by the gateway's own HTTP/1 codec, which keeps its own
            // read buffer and writes whole responses: Pingora's 64 KiB read buffer in front of
            // it would only add a copy per read. TLS reads records: the buffer saves syscalls.
            None => listener.l4_buffer(L4BufferSettings::unbuffered()),
            // One TLS record (16 KiB and its framing) per read rather than Pingora's default
            // of 64 KiB, which every open TLS connection would hold for its whole life.
            Some(_) => listener.l4_buffer(L4BufferSettings::new(
                TLS_READ_BUFFER,
                DEFAULT_L4_WRITE_BUFFER_SIZE,
            )),
        });
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
            connector: Connector::new(None),
        },
    ));
    server.add_service(background_service(
        "fleet",
        crate::fleet::FleetSync {
            state: state.clone(),
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
            in_flight,
        },
    ));
    server.run_forever();
}
