//! Prometheus metrics with exactly the names and labels of SPEC §8. Label values come from
//! configuration (client ids, deployment and backend names) or from fixed sets — never from
//! tokens, paths or other user input. Unlisted OIDC applications are bounded to 1,000
//! distinct `client` values, then `unlisted:other`.
//!
//! Gauges of state (`backend_healthy`, `backend_cooldown_seconds`) are read from the pool
//! when `/metrics` is scraped ([`PoolReading`]): a cooldown shows as soon as a 429 starts
//! it and counts down between scrapes, and the series of a backend or pair that a reload
//! removed are gone with it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use prometheus::core::{Collector, Desc, Describer};
use prometheus::proto::MetricFamily;
use prometheus::{
    exponential_buckets, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGaugeVec, Opts, Registry,
};

/// At most this many distinct unlisted-application labels.
pub const MAX_UNLISTED_LABELS: usize = 1000;

pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub ttfb: HistogramVec,
    pub tokens: IntCounterVec,
    pub token_details: IntCounterVec,
    pub rejections: IntCounterVec,
    pub upstream_attempts: IntCounterVec,
    /// `aoai_gateway_upstream_skips_total{backend,deployment,reason}` (SPEC §14): members
    /// passed over for a request; `reason` is `capacity`.
    pub upstream_skips: IntCounterVec,
    /// Where `backend_healthy` and `backend_cooldown_seconds` are read from.
    pool_reader: Arc<RwLock<Option<PoolReader>>>,
    pub cert_expiry: IntGaugeVec,
    pub key_expiry: IntGaugeVec,
    pub token_refreshes: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub limit_store_errors: IntCounter,
    pub tls_handshake_failures: IntCounterVec,
    pub downstream_errors: IntCounterVec,
    /// `aoai_gateway_downstream_handshakes_total{result}` (TLS listeners).
    pub downstream_handshakes: IntCounterVec,
    pub downstream_handshakes_in_progress: prometheus::IntGauge,
    /// Realtime WebSocket sessions open now (extension, SPEC §12).
    pub realtime_sessions: prometheus::IntGauge,
    /// Realtime session durations, from the 101 to the end (extension).
    pub realtime_duration: prometheus::Histogram,
    unlisted: Mutex<HashSet<Arc<str>>>,
    request_series: SeriesCache<RequestSeries, 4>,
    attempt_series: SeriesCache<AttemptSeries, 3>,
    token_series: SeriesCache<TokenSeries, 3>,
    token_detail_series: SeriesCache<TokenDetailSeries, 2>,
}

/// The pool's state at one instant: what `backend_healthy` and
/// `backend_cooldown_seconds` show.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PoolReading {
    /// (backend, region, healthy) of every backend.
    pub healthy: Vec<(Arc<str>, Arc<str>, bool)>,
    /// (backend, client-facing deployment, remaining cooldown in seconds) of every member.
    pub cooldowns: Vec<(Arc<str>, Arc<str>, f64)>,
}

type PoolReader = Box<dyn Fn() -> PoolReading + Send + Sync>;

/// The collector of the pool's gauges: asks the reader at every gather, so the values are
/// those of the scrape's instant (nothing on the request path or in the health checker
/// has to keep them current).
struct PoolGauges {
    healthy_opts: Opts,
    cooldown_opts: Opts,
    descs: Vec<Desc>,
    reader: Arc<RwLock<Option<PoolReader>>>,
}

const HEALTHY_LABELS: [&str; 2] = ["backend", "region"];
const COOLDOWN_LABELS: [&str; 2] = ["backend", "deployment"];

impl PoolGauges {
    fn new(reader: Arc<RwLock<Option<PoolReader>>>) -> PoolGauges {
        let healthy_opts = Opts::new(
            "aoai_gateway_backend_healthy",
            "1 when the backend passes its health checks.",
        );
        let cooldown_opts = Opts::new(
            "aoai_gateway_backend_cooldown_seconds",
            "Remaining cooldown of a (backend, deployment) pair.",
        );
        let descs = [
            (&healthy_opts, &HEALTHY_LABELS),
            (&cooldown_opts, &COOLDOWN_LABELS),
        ]
        .into_iter()
        .map(|(o, labels)| {
            o.clone()
                .variable_labels(labels.iter().map(|l| l.to_string()).collect())
                .describe()
                .expect("valid metric description")
        })
        .collect();
        PoolGauges {
            healthy_opts,
            cooldown_opts,
            descs,
            reader,
        }
    }
}

impl Collector for PoolGauges {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let reading = match &*self.reader.read().expect("not poisoned") {
            Some(read) => read(),
            None => return Vec::new(),
        };
        let healthy =
            IntGaugeVec::new(self.healthy_opts.clone(), &HEALTHY_LABELS).expect("valid gauge");
        for (backend, region, up) in &reading.healthy {
            healthy
                .with_label_values(&[&**backend, &**region])
                .set(i64::from(*up));
        }
        let cooldown =
            GaugeVec::new(self.cooldown_opts.clone(), &COOLDOWN_LABELS).expect("valid gauge");
        for (backend, deployment, seconds) in &reading.cooldowns {
            // Two members of a deployment on one backend share a series: the longer wait.
            let g = cooldown.with_label_values(&[&**backend, &**deployment]);
            g.set(g.get().max(*seconds));
        }
        let mut families = healthy.collect();
        families.extend(cooldown.collect());
        families
    }
}

/// Where one request's outcome is counted: `requests_total` and `request_duration_seconds`
/// of its (client, deployment, operation[, code]).
#[derive(Clone)]
pub struct RequestSeries {
    pub requests: IntCounter,
    pub duration: Histogram,
}

/// Where one answered attempt is counted: `upstream_attempts_total` of its (backend,
/// deployment, code) and `time_to_first_byte_seconds` of its (deployment, backend).
#[derive(Clone)]
pub struct AttemptSeries {
    pub attempts: IntCounter,
    pub ttfb: Histogram,
}

/// `tokens_total` of a (client, deployment, backend), prompt and completion.
#[derive(Clone)]
pub struct TokenSeries {
    pub prompt: IntCounter,
    pub completion: IntCounter,
}

/// `token_details_total` of a (client, deployment), one counter per type, in the order of
/// [`filters::tokens::Details::by_type`].
#[derive(Clone)]
pub struct TokenDetailSeries {
    pub by_type: [IntCounter; 4],
}

/// A label value as the series caches see it: text from configuration (shared) or a static
/// string. Its address and length identify it, so a lookup hashes two words per label
/// instead of the text. That is sound because a cache entry keeps the `Config` texts it was
/// made for alive: no other text can be at that address while the entry exists. Two
/// entries for equal texts at different addresses (a reload makes new ones) get the same
/// series: the series themselves are found by value, by the metric family.
#[derive(Clone, Copy)]
pub enum Label<'a> {
    Config(&'a Arc<str>),
    Static(&'static str),
}

impl<'a> Label<'a> {
    fn as_str(self) -> &'a str {
        match self {
            Label::Config(s) => s,
            Label::Static(s) => s,
        }
    }

    fn id(self) -> (usize, usize) {
        let s = self.as_str();
        (s.as_ptr() as usize, s.len())
    }
}

/// The series of a metric family found once per combination of label values:
/// `with_label_values` hashes every label string and takes a lock, per call and series.
struct SeriesCache<V, const N: usize> {
    map: RwLock<HashMap<Key<N>, Cached<V>, foldhash::fast::FixedState>>,
}

/// The [`Label::id`]s of an entry's label values.
type Key<const N: usize> = [(usize, usize); N];

/// The configuration texts an entry was made for (kept alive, see [`Label`]), its series.
type Cached<V> = (Vec<Arc<str>>, V);

/// Distinct label combinations cached per group; the cache starts over beyond it (label
/// values come from configuration, so this is only reached across many reloads).
const MAX_CACHED_SERIES: usize = 16_384;

impl<V: Clone, const N: usize> SeriesCache<V, N> {
    fn new() -> Self {
        SeriesCache {
            map: RwLock::new(HashMap::default()),
        }
    }

    fn get<'l>(&self, labels: [Label<'l>; N], make: impl FnOnce([&'l str; N]) -> V) -> V {
        let key = labels.map(|l| l.id());
        if let Some((_, v)) = self.map.read().expect("not poisoned").get(&key) {
            return v.clone();
        }
        let v = make(labels.map(|l| l.as_str()));
        let keep = labels
            .iter()
            .filter_map(|l| match l {
                Label::Config(s) => Some(Arc::clone(s)),
                Label::Static(_) => None,
            })
            .collect();
        let mut map = self.map.write().expect("not poisoned");
        if map.len() >= MAX_CACHED_SERIES {
            map.clear();
        }
        map.entry(key).or_insert_with(|| (keep, v.clone()));
        v
    }
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
        let token_details = IntCounterVec::new(
            Opts::new(
                "aoai_gateway_token_details_total",
                "Itemized parts of the tokens used, as reported by the backend: cached prompt, reasoning, audio prompt and audio completion tokens.",
            ),
            &["client", "deployment", "type"],
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
        let upstream_skips = IntCounterVec::new(
            Opts::new(
                "aoai_gateway_upstream_skips_total",
                "Members passed over for a request; reason `capacity`: their last capacity report could not cover it.",
            ),
            &["backend", "deployment", "reason"],
        )
        .unwrap();
        let pool_reader = Arc::new(RwLock::new(None));
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
        let downstream_errors = IntCounterVec::new(
            Opts::new(
                "aoai_gateway_downstream_errors_total",
                "Client connections that ended in an error of the client's making.",
            ),
            &["kind"],
        )
        .unwrap();
        let downstream_handshakes = IntCounterVec::new(
            Opts::new(
                "aoai_gateway_downstream_handshakes_total",
                "Client TLS handshakes, by result.",
            ),
            &["result"],
        )
        .unwrap();
        let downstream_handshakes_in_progress = prometheus::IntGauge::new(
            "aoai_gateway_downstream_handshakes_in_progress",
            "Client TLS handshakes under way (waiting for a turn included).",
        )
        .unwrap();
        let realtime_sessions = prometheus::IntGauge::new(
            "aoai_gateway_realtime_sessions",
            "Realtime WebSocket sessions open now.",
        )
        .unwrap();
        let realtime_duration = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "aoai_gateway_realtime_session_duration_seconds",
                "Realtime session duration, from the upgrade to the end of the session.",
            )
            // 1 s .. ~2.3 h.
            .buckets(exponential_buckets(1.0, 2.0, 14).expect("valid buckets")),
        )
        .unwrap();
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(realtime_sessions.clone()),
            Box::new(realtime_duration.clone()),
            Box::new(duration.clone()),
            Box::new(ttfb.clone()),
            Box::new(tokens.clone()),
            Box::new(token_details.clone()),
            Box::new(rejections.clone()),
            Box::new(upstream_attempts.clone()),
            Box::new(upstream_skips.clone()),
            Box::new(PoolGauges::new(pool_reader.clone())),
            Box::new(cert_expiry.clone()),
            Box::new(key_expiry.clone()),
            Box::new(token_refreshes.clone()),
            Box::new(config_reloads.clone()),
            Box::new(limit_store_errors.clone()),
            Box::new(tls_handshake_failures.clone()),
            Box::new(downstream_errors.clone()),
            Box::new(downstream_handshakes.clone()),
            Box::new(downstream_handshakes_in_progress.clone()),
        ] {
            registry.register(c).expect("metric registered once");
        }
        // Both results exist from the start, so `increase()` sees the first failure.
        for r in ["success", "failure"] {
            token_refreshes.with_label_values(&[r]).inc_by(0);
            config_reloads.with_label_values(&[r]).inc_by(0);
            downstream_handshakes.with_label_values(&[r]).inc_by(0);
        }
        for kind in ["handshake", "timeout", "malformed", "client_closed"] {
            downstream_errors.with_label_values(&[kind]).inc_by(0);
        }
        Arc::new(Metrics {
            registry,
            requests,
            duration,
            ttfb,
            tokens,
            token_details,
            rejections,
            upstream_attempts,
            upstream_skips,
            pool_reader,
            cert_expiry,
            key_expiry,
            token_refreshes,
            config_reloads,
            limit_store_errors,
            tls_handshake_failures,
            downstream_errors,
            downstream_handshakes,
            downstream_handshakes_in_progress,
            realtime_sessions,
            realtime_duration,
            unlisted: Mutex::new(HashSet::new()),
            request_series: SeriesCache::new(),
            attempt_series: SeriesCache::new(),
            token_series: SeriesCache::new(),
            token_detail_series: SeriesCache::new(),
        })
    }

    /// `requests_total{client,deployment,operation,code}` and
    /// `request_duration_seconds{client,deployment,operation}`.
    pub fn request_series(
        &self,
        client: Label<'_>,
        deployment: Label<'_>,
        operation: &'static str,
        code: &'static str,
    ) -> RequestSeries {
        let labels = [
            client,
            deployment,
            Label::Static(operation),
            Label::Static(code),
        ];
        self.request_series
            .get(labels, |[client, deployment, operation, code]| {
                RequestSeries {
                    requests: self
                        .requests
                        .with_label_values(&[client, deployment, operation, code]),
                    duration: self
                        .duration
                        .with_label_values(&[client, deployment, operation]),
                }
            })
    }

    /// `upstream_attempts_total{backend,deployment,code}` and
    /// `time_to_first_byte_seconds{deployment,backend}`.
    pub fn attempt_series(
        &self,
        backend: &Arc<str>,
        deployment: &Arc<str>,
        code: &'static str,
    ) -> AttemptSeries {
        let labels = [
            Label::Config(backend),
            Label::Config(deployment),
            Label::Static(code),
        ];
        self.attempt_series
            .get(labels, |[backend, deployment, code]| AttemptSeries {
                attempts: self
                    .upstream_attempts
                    .with_label_values(&[backend, deployment, code]),
                ttfb: self.ttfb.with_label_values(&[deployment, backend]),
            })
    }

    /// `tokens_total{client,deployment,backend,type}` for both types.
    pub fn token_series(
        &self,
        client: Label<'_>,
        deployment: Label<'_>,
        backend: &Arc<str>,
    ) -> TokenSeries {
        let labels = [client, deployment, Label::Config(backend)];
        self.token_series
            .get(labels, |[client, deployment, backend]| TokenSeries {
                prompt: self
                    .tokens
                    .with_label_values(&[client, deployment, backend, "prompt"]),
                completion: self.tokens.with_label_values(&[
                    client,
                    deployment,
                    backend,
                    "completion",
                ]),
            })
    }

    /// `token_details_total{client,deployment,type}` for the four types.
    pub fn token_detail_series(
        &self,
        client: Label<'_>,
        deployment: Label<'_>,
    ) -> TokenDetailSeries {
        self.token_detail_series
            .get([client, deployment], |[client, deployment]| {
                TokenDetailSeries {
                    by_type: filters::tokens::Details::default().by_type().map(|(t, _)| {
                        self.token_details
                            .with_label_values(&[client, deployment, t])
                    }),
                }
            })
    }

    /// The `client` label for a client id: configured ids as they are; unlisted
    /// applications bounded to [`MAX_UNLISTED_LABELS`] distinct values. An unlisted id's
    /// label is the one text kept for it (the id itself is made per request), so that the
    /// series caches, which go by a label text's address, find it again.
    pub fn client_label(&self, client_id: &Arc<str>) -> Arc<str> {
        static OTHER: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
        if !client_id.starts_with("unlisted:") {
            return client_id.clone();
        }
        let mut seen = self.unlisted.lock().expect("not poisoned");
        if let Some(kept) = seen.get(client_id) {
            return kept.clone();
        }
        if seen.len() < MAX_UNLISTED_LABELS {
            seen.insert(client_id.clone());
            return client_id.clone();
        }
        OTHER.get_or_init(|| Arc::from("unlisted:other")).clone()
    }

    /// Reads `backend_healthy` and `backend_cooldown_seconds` with `read` whenever the
    /// metrics are gathered (replacing any earlier reader).
    pub fn read_pool_with(&self, read: impl Fn() -> PoolReading + Send + Sync + 'static) {
        *self.pool_reader.write().expect("not poisoned") = Some(Box::new(read));
    }

    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        use prometheus::Encoder;
        let mut out = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

/// The status as a label: static strings, built once, so no allocation per request and no
/// unbounded label values.
pub fn status_label(status: u16) -> &'static str {
    static CODES: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
    let codes = CODES.get_or_init(|| {
        (100..600u16)
            .map(|c| &*Box::leak(c.to_string().into_boxed_str()))
            .collect()
    });
    if (100..600).contains(&status) {
        codes[(status - 100) as usize]
    } else {
        "error"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_labels_are_static_and_bounded() {
        assert_eq!(status_label(200), "200");
        assert_eq!(status_label(429), "429");
        assert_eq!(status_label(599), "599");
        assert_eq!(status_label(0), "error");
        assert_eq!(status_label(700), "error");
    }

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
        // The same text each time (the series caches go by its address).
        assert!(Arc::ptr_eq(
            &m.client_label(&seen),
            &m.client_label(&Arc::from("unlisted:p:7"))
        ));
        assert!(Arc::ptr_eq(
            &m.client_label(&extra),
            &m.client_label(&Arc::from("unlisted:x"))
        ));
        let listed: Arc<str> = Arc::from("support-bot");
        assert_eq!(m.client_label(&listed), listed);
    }

    #[test]
    fn cached_series_are_the_labelled_series() {
        let m = Metrics::new();
        let (c, d, b): (Arc<str>, Arc<str>, Arc<str>) = ("c".into(), "d".into(), "b".into());
        let (client, dep) = (Label::Config(&c), Label::Config(&d));
        for _ in 0..3 {
            let s = m.request_series(client, dep, "chat.completions", "200");
            s.requests.inc();
            s.duration.observe(0.01);
        }
        m.request_series(client, dep, "chat.completions", "429")
            .requests
            .inc();
        // No deployment (refused before one was known): the empty label.
        m.request_series(client, Label::Static(""), "chat.completions", "401")
            .requests
            .inc();
        let a = m.attempt_series(&b, &d, "200");
        a.attempts.inc();
        a.ttfb.observe(0.02);
        let t = m.token_series(client, dep, &b);
        t.prompt.inc_by(12);
        t.completion.inc_by(4);
        m.token_series(client, dep, &b).prompt.inc_by(1);
        let details = m.token_detail_series(client, dep);
        for (counter, n) in details.by_type.iter().zip([1920, 256, 7, 9]) {
            counter.inc_by(n);
        }
        m.token_detail_series(client, dep).by_type[0].inc_by(128);
        let text = String::from_utf8(m.render()).unwrap();
        for line in [
            r#"aoai_gateway_requests_total{client="c",code="200",deployment="d",operation="chat.completions"} 3"#,
            r#"aoai_gateway_requests_total{client="c",code="429",deployment="d",operation="chat.completions"} 1"#,
            r#"aoai_gateway_requests_total{client="c",code="401",deployment="",operation="chat.completions"} 1"#,
            r#"aoai_gateway_request_duration_seconds_count{client="c",deployment="d",operation="chat.completions"} 3"#,
            r#"aoai_gateway_upstream_attempts_total{backend="b",code="200",deployment="d"} 1"#,
            r#"aoai_gateway_time_to_first_byte_seconds_count{backend="b",deployment="d"} 1"#,
            r#"aoai_gateway_tokens_total{backend="b",client="c",deployment="d",type="prompt"} 13"#,
            r#"aoai_gateway_tokens_total{backend="b",client="c",deployment="d",type="completion"} 4"#,
            r#"aoai_gateway_token_details_total{client="c",deployment="d",type="cached_prompt"} 2048"#,
            r#"aoai_gateway_token_details_total{client="c",deployment="d",type="reasoning"} 256"#,
            r#"aoai_gateway_token_details_total{client="c",deployment="d",type="audio_prompt"} 7"#,
            r#"aoai_gateway_token_details_total{client="c",deployment="d",type="audio_completion"} 9"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }

    #[test]
    fn equal_texts_from_two_configurations_count_in_one_series() {
        let m = Metrics::new();
        // A reload makes new texts with the same values.
        let before: Arc<str> = "team-a".into();
        let after: Arc<str> = "team-a".into();
        assert!(!Arc::ptr_eq(&before, &after));
        for client in [&before, &after, &before] {
            m.request_series(
                Label::Config(client),
                Label::Static(""),
                "models.read",
                "200",
            )
            .requests
            .inc();
        }
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text.contains(
            r#"aoai_gateway_requests_total{client="team-a",code="200",deployment="",operation="models.read"} 3"#
        ), "{text}");
    }

    #[test]
    fn a_cache_tells_labels_apart_and_keeps_their_texts_alive() {
        let c: SeriesCache<u32, 2> = SeriesCache::new();
        let (a, bc, ab, cc): (Arc<str>, Arc<str>, Arc<str>, Arc<str>) =
            ("a".into(), "bc".into(), "ab".into(), "c".into());
        assert_eq!(c.get([Label::Config(&a), Label::Config(&bc)], |_| 1), 1);
        // Same bytes, other split: another entry.
        assert_eq!(c.get([Label::Config(&ab), Label::Config(&cc)], |_| 2), 2);
        assert_eq!(c.get([Label::Config(&a), Label::Config(&bc)], |_| 99), 1);
        assert_eq!(c.get([Label::Config(&ab), Label::Config(&cc)], |_| 99), 2);
        // The series are made from the texts, in order.
        assert_eq!(
            c.get([Label::Static("x"), Label::Config(&a)], |[x, a]| {
                assert_eq!((x, a), ("x", "a"));
                3
            }),
            3
        );
        // Each entry holds its texts, so their addresses stay theirs (`a` is in two).
        assert_eq!(Arc::strong_count(&a), 3);
        assert_eq!(Arc::strong_count(&cc), 2);
    }

    #[test]
    fn pool_gauges_are_read_when_gathered() {
        let m = Metrics::new();
        let text = String::from_utf8(m.render()).unwrap();
        assert!(
            !text.contains("aoai_gateway_backend_"),
            "no reader, no series:\n{text}"
        );
        // A reader whose values change between scrapes, as the pool's do.
        let left = Arc::new(std::sync::atomic::AtomicU64::new(8_000));
        let l = left.clone();
        m.read_pool_with(move || {
            let ms = l.load(std::sync::atomic::Ordering::Relaxed);
            PoolReading {
                healthy: vec![
                    ("b".into(), "eastus".into(), true),
                    ("c".into(), "".into(), false),
                ],
                cooldowns: vec![
                    ("b".into(), "d".into(), ms as f64 / 1000.0),
                    ("c".into(), "d".into(), 0.0),
                    // Two members of `d` on backend `c`: the longer wait.
                    ("c".into(), "d".into(), 2.5),
                ],
            }
        });
        let text = String::from_utf8(m.render()).unwrap();
        for line in [
            "# TYPE aoai_gateway_backend_healthy gauge",
            "# TYPE aoai_gateway_backend_cooldown_seconds gauge",
            r#"aoai_gateway_backend_healthy{backend="b",region="eastus"} 1"#,
            r#"aoai_gateway_backend_healthy{backend="c",region=""} 0"#,
            r#"aoai_gateway_backend_cooldown_seconds{backend="b",deployment="d"} 8"#,
            r#"aoai_gateway_backend_cooldown_seconds{backend="c",deployment="d"} 2.5"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        left.store(6_500, std::sync::atomic::Ordering::Relaxed);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(
            text.contains(
                r#"aoai_gateway_backend_cooldown_seconds{backend="b",deployment="d"} 6.5"#
            ),
            "{text}"
        );
        // What the reader no longer reports (a reload removed it) is gone.
        m.read_pool_with(PoolReading::default);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(!text.contains("aoai_gateway_backend_"), "{text}");
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
