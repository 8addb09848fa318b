//! Run-time state shared by all connections: fault settings and counters,
//! the request recorder and the statistics. Everything on the request path is
//! atomics (the recorder is a ring of atomically swapped slots).

use arc_swap::ArcSwapOption;
use http::HeaderMap;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The fault settings, as shown by `GET /_mock/faults`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FaultValues {
    pub latency_ms: u64,
    pub chunk_delay_ms: u64,
    pub fail_429_count: u64,
    pub fail_429_share: f64,
    pub retry_after_ms: u64,
    pub fail_status: u16,
    pub fail_count: u64,
    pub reset_count: u64,
    pub stall_count: u64,
    pub stall_ms: u64,
    pub health_status: u16,
    /// The managed-identity endpoint answers this status instead of a token (0 = off).
    pub identity_status: u16,
}

/// A partial update (`POST /_mock/faults`): only the fields present change.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultPatch {
    pub latency_ms: Option<u64>,
    pub chunk_delay_ms: Option<u64>,
    pub fail_429_count: Option<u64>,
    pub fail_429_share: Option<f64>,
    pub retry_after_ms: Option<u64>,
    pub fail_status: Option<u16>,
    pub fail_count: Option<u64>,
    pub reset_count: Option<u64>,
    pub stall_count: Option<u64>,
    pub stall_ms: Option<u64>,
    pub health_status: Option<u16>,
    pub identity_status: Option<u16>,
}

/// What an injected fault makes of a data-plane request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// Close the connection without an answer.
    Reset,
    /// Answer this status with a JSON error body.
    Status(u16),
    /// Answer 429 with these `retry-after-ms`.
    TooMany(u64),
}

/// The decision for one data-plane request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub fault: Fault,
    /// Total sleep before the answer: latency plus stall.
    pub sleep_ms: u64,
    pub chunk_delay_ms: u64,
}

/// Fault settings and counters, all atomics.
#[derive(Default)]
pub struct Faults {
    latency_ms: AtomicU64,
    chunk_delay_ms: AtomicU64,
    fail_429_count: AtomicU64,
    fail_429_share_bits: AtomicU64,
    retry_after_ms: AtomicU64,
    fail_status: AtomicU64,
    fail_count: AtomicU64,
    reset_count: AtomicU64,
    stall_count: AtomicU64,
    stall_ms: AtomicU64,
    health_status: AtomicU64,
    identity_status: AtomicU64,
    /// Requests that reached the 429-share check.
    share_seq: AtomicU64,
}

/// Takes one from a counter if it is positive.
fn take(c: &AtomicU64) -> bool {
    // A plain load first: the common case (zero) costs no read-modify-write.
    c.load(Ordering::Relaxed) > 0
        && c.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1))
            .is_ok()
}

/// Whether the `n`-th request (from 0) of a share `f` gets a 429: exactly
/// `floor(n * f)` of the first `n` requests do, evenly spread (f = 0.25: every
/// 4th request, the 4th, 8th, …).
pub fn share_hit(n: u64, f: f64) -> bool {
    if f <= 0.0 {
        return false;
    }
    if f >= 1.0 {
        return true;
    }
    ((n + 1) as f64 * f).floor() > (n as f64 * f).floor()
}

impl Faults {
    pub fn new(v: &FaultValues) -> Result<Self, String> {
        let f = Faults::default();
        f.set(v)?;
        Ok(f)
    }

    fn validate(v: &FaultValues) -> Result<(), String> {
        if !(0.0..=1.0).contains(&v.fail_429_share) || v.fail_429_share.is_nan() {
            return Err("fail_429_share must be within 0..1".into());
        }
        if !(100..=599).contains(&v.fail_status) {
            return Err("fail_status must be an HTTP status (100..599)".into());
        }
        if v.health_status != 0 && !(100..=599).contains(&v.health_status) {
            return Err("health_status must be 0 or an HTTP status (100..599)".into());
        }
        if v.identity_status != 0 && !(100..=599).contains(&v.identity_status) {
            return Err("identity_status must be 0 or an HTTP status (100..599)".into());
        }
        Ok(())
    }

    /// Replaces every setting.
    pub fn set(&self, v: &FaultValues) -> Result<(), String> {
        Self::validate(v)?;
        let r = Ordering::Release;
        self.latency_ms.store(v.latency_ms, r);
        self.chunk_delay_ms.store(v.chunk_delay_ms, r);
        self.fail_429_count.store(v.fail_429_count, r);
        self.fail_429_share_bits
            .store(v.fail_429_share.to_bits(), r);
        self.retry_after_ms.store(v.retry_after_ms, r);
        self.fail_status.store(u64::from(v.fail_status), r);
        self.fail_count.store(v.fail_count, r);
        self.reset_count.store(v.reset_count, r);
        self.stall_count.store(v.stall_count, r);
        self.stall_ms.store(v.stall_ms, r);
        self.health_status.store(u64::from(v.health_status), r);
        self.identity_status.store(u64::from(v.identity_status), r);
        self.share_seq.store(0, r);
        Ok(())
    }

    /// Replaces the fields present in `p`; a new share restarts its sequence.
    pub fn apply(&self, p: &FaultPatch) -> Result<FaultValues, String> {
        let mut v = self.snapshot();
        macro_rules! upd {
            ($($f:ident),*) => { $( if let Some(x) = p.$f { v.$f = x; } )* };
        }
        upd!(
            latency_ms,
            chunk_delay_ms,
            fail_429_count,
            fail_429_share,
            retry_after_ms,
            fail_status,
            fail_count,
            reset_count,
            stall_count,
            stall_ms,
            health_status,
            identity_status
        );
        Self::validate(&v)?;
        let r = Ordering::Release;
        macro_rules! store {
            ($($f:ident),*) => { $( if p.$f.is_some() { self.$f.store(v.$f, r); } )* };
        }
        store!(
            latency_ms,
            chunk_delay_ms,
            fail_429_count,
            retry_after_ms,
            fail_count,
            reset_count,
            stall_count,
            stall_ms
        );
        if p.fail_status.is_some() {
            self.fail_status.store(u64::from(v.fail_status), r);
        }
        if p.health_status.is_some() {
            self.health_status.store(u64::from(v.health_status), r);
        }
        if p.identity_status.is_some() {
            self.identity_status.store(u64::from(v.identity_status), r);
        }
        if p.fail_429_share.is_some() {
            self.share_seq.store(0, r);
            self.fail_429_share_bits
                .store(v.fail_429_share.to_bits(), r);
        }
        Ok(self.snapshot())
    }

    pub fn snapshot(&self) -> FaultValues {
        let a = Ordering::Acquire;
        FaultValues {
            latency_ms: self.latency_ms.load(a),
            chunk_delay_ms: self.chunk_delay_ms.load(a),
            fail_429_count: self.fail_429_count.load(a),
            fail_429_share: f64::from_bits(self.fail_429_share_bits.load(a)),
            retry_after_ms: self.retry_after_ms.load(a),
            fail_status: self.fail_status.load(a) as u16,
            fail_count: self.fail_count.load(a),
            reset_count: self.reset_count.load(a),
            stall_count: self.stall_count.load(a),
            stall_ms: self.stall_ms.load(a),
            health_status: self.health_status.load(a) as u16,
            identity_status: self.identity_status.load(a) as u16,
        }
    }

    /// The status `/openai/models` answers, if set.
    pub fn health_status(&self) -> Option<u16> {
        match self.health_status.load(Ordering::Relaxed) {
            0 => None,
            s => Some(s as u16),
        }
    }

    /// The status the managed-identity endpoint answers instead of a token, if set.
    pub fn identity_status(&self) -> Option<u16> {
        match self.identity_status.load(Ordering::Relaxed) {
            0 => None,
            s => Some(s as u16),
        }
    }

    /// Consumes the counters for one data-plane request. The first of reset,
    /// fail_status, 429 count, 429 share that applies wins (only its counter is
    /// consumed); a stall is consumed independently and adds to the latency.
    pub fn decide(&self) -> Decision {
        let r = Ordering::Relaxed;
        let fault = if take(&self.reset_count) {
            Fault::Reset
        } else if take(&self.fail_count) {
            Fault::Status(self.fail_status.load(r) as u16)
        } else if take(&self.fail_429_count) {
            Fault::TooMany(self.retry_after_ms.load(r))
        } else {
            let share = f64::from_bits(self.fail_429_share_bits.load(r));
            if share > 0.0 && share_hit(self.share_seq.fetch_add(1, r), share) {
                Fault::TooMany(self.retry_after_ms.load(r))
            } else {
                Fault::None
            }
        };
        let mut sleep_ms = self.latency_ms.load(r);
        if take(&self.stall_count) {
            sleep_ms += self.stall_ms.load(r);
        }
        Decision {
            fault,
            sleep_ms,
            chunk_delay_ms: self.chunk_delay_ms.load(r),
        }
    }
}

/// One recorded data-plane request.
pub struct Record {
    pub seq: u64,
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body_len: usize,
    pub body_sha256: [u8; 32],
    pub model: Value,
    pub stream: Value,
    pub stream_options: Value,
    pub status: u16,
}

impl Record {
    pub fn to_json(&self) -> Value {
        let mut headers = Map::new();
        for name in self.headers.keys() {
            let vals: Vec<String> = self
                .headers
                .get_all(name)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect();
            headers.insert(name.as_str().to_string(), Value::String(vals.join(", ")));
        }
        serde_json::json!({
            "seq": self.seq,
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": headers,
            "body_len": self.body_len,
            "body_sha256": crate::util::hex(&self.body_sha256),
            "model": self.model,
            "stream": self.stream,
            "stream_options": self.stream_options,
            "status": self.status,
        })
    }
}

/// The last `capacity` data-plane requests, in a ring of atomic slots.
pub struct Recorder {
    slots: Vec<ArcSwapOption<Record>>,
    next: AtomicU64,
}

impl Recorder {
    pub fn new(capacity: usize) -> Self {
        Recorder {
            slots: (0..capacity.max(1))
                .map(|_| ArcSwapOption::empty())
                .collect(),
            next: AtomicU64::new(0),
        }
    }

    pub fn push(&self, mut r: Record) {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        r.seq = seq;
        self.slots[(seq % self.slots.len() as u64) as usize].store(Some(Arc::new(r)));
    }

    /// The recorded requests, oldest first.
    pub fn list(&self) -> Vec<Arc<Record>> {
        let mut v: Vec<Arc<Record>> = self.slots.iter().filter_map(|s| s.load_full()).collect();
        v.sort_by_key(|r| r.seq);
        v
    }

    pub fn clear(&self) {
        for s in &self.slots {
            s.store(None);
        }
    }
}

/// Request counters shown by `GET /_mock/stats`.
#[derive(Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub health_requests: AtomicU64,
    pub token_requests: AtomicU64,
    pub oidc_token_requests: AtomicU64,
    pub jwks_requests: AtomicU64,
    pub discovery_requests: AtomicU64,
}

impl Stats {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn to_json(&self) -> Value {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "requests": g(&self.requests),
            "health_requests": g(&self.health_requests),
            "token_requests": g(&self.token_requests),
            "oidc_token_requests": g(&self.oidc_token_requests),
            "jwks_requests": g(&self.jwks_requests),
            "discovery_requests": g(&self.discovery_requests),
        })
    }

    pub fn clear(&self) {
        for c in [
            &self.requests,
            &self.health_requests,
            &self.token_requests,
            &self.oidc_token_requests,
            &self.jwks_requests,
            &self.discovery_requests,
        ] {
            c.store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> FaultValues {
        FaultValues {
            retry_after_ms: 1500,
            fail_status: 500,
            stall_ms: 100,
            ..Default::default()
        }
    }

    #[test]
    fn no_faults_by_default() {
        let f = Faults::new(&base()).unwrap();
        for _ in 0..10 {
            assert_eq!(
                f.decide(),
                Decision {
                    fault: Fault::None,
                    sleep_ms: 0,
                    chunk_delay_ms: 0
                }
            );
        }
    }

    #[test]
    fn counters_are_consumed_exactly() {
        let f = Faults::new(&FaultValues {
            fail_429_count: 2,
            ..base()
        })
        .unwrap();
        assert_eq!(f.decide().fault, Fault::TooMany(1500));
        assert_eq!(f.decide().fault, Fault::TooMany(1500));
        assert_eq!(f.decide().fault, Fault::None);
        assert_eq!(f.snapshot().fail_429_count, 0);
    }

    #[test]
    fn priority_reset_then_status_then_429() {
        let f = Faults::new(&FaultValues {
            fail_429_count: 1,
            fail_status: 503,
            fail_count: 1,
            reset_count: 1,
            ..base()
        })
        .unwrap();
        assert_eq!(f.decide().fault, Fault::Reset);
        assert_eq!(f.decide().fault, Fault::Status(503));
        assert_eq!(f.decide().fault, Fault::TooMany(1500));
        assert_eq!(f.decide().fault, Fault::None);
    }

    #[test]
    fn stall_is_independent_and_adds_to_latency() {
        let f = Faults::new(&FaultValues {
            latency_ms: 5,
            stall_count: 1,
            fail_count: 1,
            ..base()
        })
        .unwrap();
        let d = f.decide();
        assert_eq!(d.fault, Fault::Status(500));
        assert_eq!(d.sleep_ms, 105);
        assert_eq!(f.decide().sleep_ms, 5);
    }

    #[test]
    fn share_is_deterministic() {
        let hits: Vec<u64> = (0..12).filter(|&n| share_hit(n, 0.25)).collect();
        assert_eq!(hits, vec![3, 7, 11]);
        assert_eq!((0..1000).filter(|&n| share_hit(n, 0.1)).count(), 100);
        assert_eq!((0..1000).filter(|&n| share_hit(n, 1.0 / 3.0)).count(), 333);
        assert!((0..10).all(|n| share_hit(n, 1.0)));
        assert!((0..10).all(|n| !share_hit(n, 0.0)));

        let f = Faults::new(&FaultValues {
            fail_429_share: 0.5,
            ..base()
        })
        .unwrap();
        let got: Vec<bool> = (0..4).map(|_| f.decide().fault != Fault::None).collect();
        assert_eq!(got, vec![false, true, false, true]);
    }

    #[test]
    fn patch_replaces_only_given_fields() {
        let f = Faults::new(&FaultValues {
            latency_ms: 7,
            ..base()
        })
        .unwrap();
        let p: FaultPatch =
            serde_json::from_str(r#"{"fail_status":502,"fail_count":3,"health_status":500}"#)
                .unwrap();
        let v = f.apply(&p).unwrap();
        assert_eq!(v.latency_ms, 7);
        assert_eq!(v.fail_status, 502);
        assert_eq!(v.fail_count, 3);
        assert_eq!(f.health_status(), Some(500));
        let p: FaultPatch = serde_json::from_str(r#"{"health_status":0}"#).unwrap();
        f.apply(&p).unwrap();
        assert_eq!(f.health_status(), None);
        assert_eq!(f.identity_status(), None);
        let p: FaultPatch = serde_json::from_str(r#"{"identity_status":503}"#).unwrap();
        assert_eq!(f.apply(&p).unwrap().identity_status, 503);
        assert_eq!(f.identity_status(), Some(503));
        assert_eq!(f.snapshot().fail_status, 502, "other fields kept");
        let p: FaultPatch = serde_json::from_str(r#"{"identity_status":0}"#).unwrap();
        f.apply(&p).unwrap();
        assert_eq!(f.identity_status(), None);
        let bad: FaultPatch = serde_json::from_str(r#"{"identity_status":1000}"#).unwrap();
        assert!(f.apply(&bad).is_err());
        assert!(serde_json::from_str::<FaultPatch>(r#"{"nope":1}"#).is_err());
        let bad: FaultPatch = serde_json::from_str(r#"{"fail_429_share":1.5}"#).unwrap();
        assert!(f.apply(&bad).is_err());
        let bad: FaultPatch = serde_json::from_str(r#"{"fail_status":42}"#).unwrap();
        assert!(f.apply(&bad).is_err());
        assert_eq!(f.snapshot().fail_status, 502);
    }

    fn rec(path: &str) -> Record {
        let mut headers = HeaderMap::new();
        headers.insert("api-key", "k".parse().unwrap());
        headers.append("x-multi", "a".parse().unwrap());
        headers.append("x-multi", "b".parse().unwrap());
        Record {
            seq: 0,
            method: "POST".into(),
            path: path.into(),
            query: None,
            headers,
            body_len: 0,
            body_sha256: [0; 32],
            model: Value::Null,
            stream: Value::Null,
            stream_options: Value::Null,
            status: 200,
        }
    }

    #[test]
    fn recorder_keeps_the_last_n_in_order() {
        let r = Recorder::new(3);
        for i in 0..5 {
            r.push(rec(&format!("/p{i}")));
        }
        let paths: Vec<String> = r.list().iter().map(|x| x.path.clone()).collect();
        assert_eq!(paths, vec!["/p2", "/p3", "/p4"]);
        let j = r.list()[0].to_json();
        assert_eq!(j["headers"]["api-key"], "k");
        assert_eq!(j["headers"]["x-multi"], "a, b");
        assert_eq!(j["query"], Value::Null);
        assert_eq!(j["body_sha256"].as_str().unwrap().len(), 64);
        r.clear();
        assert!(r.list().is_empty());
    }

    #[test]
    fn stats_json() {
        let s = Stats::default();
        Stats::inc(&s.requests);
        Stats::inc(&s.jwks_requests);
        let j = s.to_json();
        assert_eq!(j["requests"], 1);
        assert_eq!(j["jwks_requests"], 1);
        assert_eq!(j["token_requests"], 0);
        s.clear();
        assert_eq!(s.to_json()["requests"], 0);
    }
}
