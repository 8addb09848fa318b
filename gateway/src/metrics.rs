//! Prometheus metrics with exactly the names and labels of SPEC §8. Label values come from
//! configuration (client ids, deployment and backend names) or from fixed sets — never from
//! tokens, paths or other user input. Unlisted OIDC applications are bounded to 1,000
//! distinct `client` values, then `unlisted:other`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use prometheus::{
    exponential_buckets, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry,
};

/// At most this many distinct unlisted-application labels.
pub const MAX_UNLISTED_LABELS: usize = 1000;

pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub ttfb: HistogramVec,
    pub tokens: IntCounterVec,
    pub rejections: IntCounterVec,
    pub upstream_attempts: IntCounterVec,
    pub backend_healthy: IntGaugeVec,
    pub backend_cooldown: prometheus::GaugeVec,
    pub cert_expiry: IntGaugeVec,
    pub key_expiry: IntGaugeVec,
    pub token_refreshes: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub limit_store_errors: IntCounter,
    pub tls_handshake_failures: IntCounterVec,
    unlisted: Mutex<HashSet<Arc<str>>>,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let registry = Registry::new();
        // 5 ms .. ~164 s: fits 20 ms embeddings and minute-long streams.
        let buckets = exponential_buckets(0.005, 2.0, 16).expect("valid buckets");
        let requests = IntCounterVec::new(
            Opts::new(
                "aoai_gateway_requests_total",
                "Requests by client, deployment, operation and status code.",
            ),
            &["client", "deployment", "operation", "code"],
        )
        .unwrap();
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "aoai_gateway_request_duration_seconds",
                "Whole request duration, streaming included.",
            )
            .buckets(buckets.clone()),
            &["client", "deployment", "operation"],
        )
        .unwrap();
        let ttfb = HistogramVec::new(
            HistogramOpts::new(
                "aoai_gateway_time_to_first_byte_seconds",
                "Time until the backend's first response byte.",
            )
            .buckets(buckets),
            &["deployment", "backend"],
        )
        .unwrap();
        let tokens = IntCounterVec::new(
            Opts::new(
                "aoai_gateway_tokens_total",
                "Tokens used, as reported by the backend (or reserved when it reported none).",
            ),
            &["client", "deployment", "backend", "type"],
        )
        .unwrap();
        let rejections = IntCounterVec::new(
            Opts::new(
                "aoai_gateway_rejections_total",
                "Requests the gateway refused itself.",
            ),
            &["client", "reason"],
        )
        .unwrap();
        let upstream_attempts = IntCounterVec::new(
            Opts::new(
                "aoai_gateway_upstream_attempts_total",
                "Attempts against backends; code is `error` when no response came.",
            ),
            &["backend", "deployment", "code"],
        )
        .unwrap();
        let backend_healthy = IntGaugeVec::new(
            Opts::new(
                "aoai_gateway_backend_healthy",
                "1 when the backend passes its health checks.",
            ),
            &["backend", "region"],
        )
        .unwrap();
        let backend_cooldown = prometheus::GaugeVec::new(
            Opts::new(
                "aoai_gateway_backend_cooldown_seconds",
                "Remaining cooldown of a (backend, deployment) pair.",
            ),
            &["backend", "deployment"],
        )
        .unwrap();
        let cert_expiry = IntGaugeVec::new(
            Opts::new(
                "aoai_gateway_client_certificate_expiry_timestamp_seconds",
                "notAfter of client certificates seen.",
            ),
            &["client", "fingerprint"],
        )
        .unwrap();
        let key_expiry = IntGaugeVec::new(
            Opts::new(
                "aoai_gateway_api_key_expiry_timestamp_seconds",
                "Expiry of configured API keys.",
            ),
            &["client", "key_id"],
        )
        .unwrap();
        let token_refreshes = IntCounterVec::new(
            Opts::new(
                "aoai_gateway_upstream_token_refreshes_total",
                "Managed-identity token fetches.",
            ),
            &["result"],
        )
        .unwrap();
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "aoai_gateway_config_reloads_total",
                "Configuration reloads.",
            ),
            &["result"],
        )
        .unwrap();
        let limit_store_errors = IntCounter::new(
            "aoai_gateway_limit_store_errors_total",
            "Errors talking to the shared limit store.",
        )
        .unwrap();
        let tls_handshake_failures = IntCounterVec::new(
            Opts::new(
                "aoai_gateway_tls_handshake_failures_total",
                "Client TLS handshakes refused (extension).",
            ),
            &["reason"],
        )
        .unwrap();
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(duration.clone()),
            Box::new(ttfb.clone()),
            Box::new(tokens.clone()),
            Box::new(rejections.clone()),
            Box::new(upstream_attempts.clone()),
            Box::new(backend_healthy.clone()),
            Box::new(backend_cooldown.clone()),
            Box::new(cert_expiry.clone()),
            Box::new(key_expiry.clone()),
            Box::new(token_refreshes.clone()),
            Box::new(config_reloads.clone()),
            Box::new(limit_store_errors.clone()),
            Box::new(tls_handshake_failures.clone()),
        ] {
            registry.register(c).expect("metric registered once");
        }
        // Both results exist from the start, so `increase()` sees the first failure.
        for r in ["success", "failure"] {
            token_refreshes.with_label_values(&[r]).inc_by(0);
            config_reloads.with_label_values(&[r]).inc_by(0);
        }
        Arc::new(Metrics {
            registry,
            requests,
            duration,
            ttfb,
            tokens,
            rejections,
            upstream_attempts,
            backend_healthy,
            backend_cooldown,
            cert_expiry,
            key_expiry,
            token_refreshes,
            config_reloads,
            limit_store_errors,
            tls_handshake_failures,
            unlisted: Mutex::new(HashSet::new()),
        })
    }

    /// The `client` label for a client id: configured ids as they are; unlisted
    /// applications bounded to [`MAX_UNLISTED_LABELS`] distinct values.
    pub fn client_label(&self, client_id: &Arc<str>) -> Arc<str> {
        if !client_id.starts_with("unlisted:") {
            return client_id.clone();
        }
        let mut seen = self.unlisted.lock().expect("not poisoned");
        if seen.contains(client_id) {
            return client_id.clone();
        }
        if seen.len() < MAX_UNLISTED_LABELS {
            seen.insert(client_id.clone());
            return client_id.clone();
        }
        Arc::from("unlisted:other")
    }

    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        use prometheus::Encoder;
        let mut out = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlisted_labels_are_bounded() {
        let m = Metrics::new();
        for i in 0..MAX_UNLISTED_LABELS {
            let id: Arc<str> = Arc::from(format!("unlisted:p:{i}").as_str());
            assert_eq!(m.client_label(&id), id);
        }
        let extra: Arc<str> = Arc::from("unlisted:p:new");
        assert_eq!(&*m.client_label(&extra), "unlisted:other");
        let seen: Arc<str> = Arc::from("unlisted:p:7");
        assert_eq!(m.client_label(&seen), seen);
        let listed: Arc<str> = Arc::from("support-bot");
        assert_eq!(m.client_label(&listed), listed);
    }

    #[test]
    fn names_are_the_spec_names() {
        let m = Metrics::new();
        m.requests.with_label_values(&["c", "d", "o", "200"]).inc();
        m.limit_store_errors.inc();
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text.contains(
            r#"aoai_gateway_requests_total{client="c",code="200",deployment="d",operation="o"} 1"#
        ));
        assert!(text.contains("aoai_gateway_limit_store_errors_total 1"));
    }
}
