//! What became of a request: the typed result that the stages add to as they go, from which
//! the metrics and the audit line are made when the request ends (`observe::audit`).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use filters::identity::Identity;
use filters::limits::Admission;
use filters::tokens::Usage;
use filters::{AuthMethod, Operation};

use crate::errors::GatewayError;
use crate::http1::Text;
use crate::observe::request_id::RequestId;

/// Where the tokens charged for a request came from (the audit log's `usage_source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageSource {
    /// The backend reported usage (JSON body or the stream's usage chunk).
    Response,
    /// Counted by the gateway: a stream whose `api-version` takes no `stream_options`
    /// (SPEC §13), the prompt and the streamed completion estimated.
    Estimated,
    /// No usage could be had; the reservation stands as the charge.
    Reserved,
    None,
}

impl UsageSource {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageSource::Response => "response",
            UsageSource::Estimated => "estimated",
            UsageSource::Reserved => "reserved",
            UsageSource::None => "none",
        }
    }
}

/// The usage charged for a request, and its source: what the backend reported (or what the
/// gateway counted, `estimated`, where it could not be reported); else, when
/// a backend was tried for an operation that counts tokens and tokens were reserved, the
/// reservation; else nothing.
pub fn charged(
    reported: Option<Usage>,
    estimated: bool,
    attempted: bool,
    counts_tokens: bool,
    reserved: u64,
) -> (Option<Usage>, UsageSource) {
    match reported {
        Some(u) if estimated => (Some(u), UsageSource::Estimated),
        Some(u) => (Some(u), UsageSource::Response),
        None if attempted && counts_tokens && reserved > 0 => (
            Some(Usage {
                prompt: reserved,
                completion: 0,
                total: reserved,
                details: Default::default(),
            }),
            UsageSource::Reserved,
        ),
        None => (None, UsageSource::None),
    }
}

/// A background response seen completed for the first time: its reported usage replaces
/// the reservation charged when it was created (SPEC §11).
#[derive(Debug, Clone)]
pub struct Settle {
    /// The client's index (its limits).
    pub client: usize,
    pub deployment: Arc<str>,
    pub reserved: u64,
    pub created: std::time::SystemTime,
}

/// Who a request is attributed to: `anonymous` until identity succeeds.
#[derive(Debug, Clone)]
pub struct Caller {
    pub client: Arc<str>,
    /// The `client` metric label (one kept text per label value).
    pub label: Arc<str>,
    pub auth: AuthMethod,
    pub key_id: Option<Arc<str>>,
    pub user: Option<String>,
    pub provider: Option<Arc<str>>,
}

impl Caller {
    pub fn anonymous() -> Caller {
        static ANON: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
        let anon = ANON.get_or_init(|| Arc::from("anonymous")).clone();
        Caller {
            client: anon.clone(),
            label: anon,
            auth: AuthMethod::None,
            key_id: None,
            user: None,
            provider: None,
        }
    }

    pub fn identified(id: &Identity, label: Arc<str>, auth: AuthMethod) -> Caller {
        Caller {
            client: id.client_id.clone(),
            label,
            auth,
            key_id: id.key_id.clone(),
            user: id.user.clone(),
            provider: id.provider.clone(),
        }
    }
}

/// The backend that answered (or was tried last).
#[derive(Debug, Clone)]
pub struct Tried {
    pub backend: Arc<str>,
    pub region: Option<Arc<str>>,
}

/// How a request ended for its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Still being handled.
    Open,
    /// A response with this status was sent (or began to be).
    Answered(u16),
    /// The connection was closed before any response: counted as this status.
    Aborted(u16),
}

/// Everything the end of a request reports.
#[derive(Debug)]
pub struct Outcome {
    pub request_id: RequestId,
    pub method: Text,
    pub path: Text,
    pub client_ip: Option<IpAddr>,
    pub caller: Caller,
    pub operation: Option<Operation>,
    /// The client-facing deployment (configured names only).
    pub deployment: Option<Arc<str>>,
    pub stream: bool,
    pub admission: Option<Admission>,
    /// Tokens reserved for the limits (0 where no token limit applies).
    pub reserved: u64,
    pub attempts: u32,
    pub tried: Option<Tried>,
    pub upstream_request_id: Option<Text>,
    /// From the request's start to the chosen answer's head.
    pub ttfb: Option<Duration>,
    pub ending: Ending,
    /// The gateway's own refusal or error answer, if it gave one.
    pub error: Option<GatewayError>,
    /// What the backend reported (or the gateway counted, with `estimated`).
    pub usage: Option<Usage>,
    /// `usage` is the gateway's own count of a stream (SPEC §13).
    pub estimated: bool,
    /// A `/healthz` probe: neither traffic nor an audit event.
    pub probe: bool,
    /// The usage reported settles an earlier reservation instead of this request's.
    pub settle: Option<Settle>,
}

impl Outcome {
    pub fn new(request_id: RequestId) -> Outcome {
        Outcome {
            request_id,
            method: Text::default(),
            path: Text::default(),
            client_ip: None,
            caller: Caller::anonymous(),
            operation: None,
            deployment: None,
            stream: false,
            admission: None,
            reserved: 0,
            attempts: 0,
            tried: None,
            upstream_request_id: None,
            ttfb: None,
            ending: Ending::Open,
            error: None,
            usage: None,
            estimated: false,
            probe: false,
            settle: None,
        }
    }

    /// The status counted and logged.
    pub fn status(&self) -> u16 {
        match self.ending {
            Ending::Answered(s) | Ending::Aborted(s) => s,
            // Never reached a response: the connection failed under it.
            Ending::Open => 502,
        }
    }

    /// [`charged`] for this request.
    pub fn charged(&self) -> (Option<Usage>, UsageSource) {
        charged(
            self.usage,
            self.estimated,
            self.attempts > 0,
            self.operation.is_some_and(|o| o.counts_tokens()),
            self.reserved,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_source_table() {
        let u = Usage {
            prompt: 3,
            completion: 4,
            total: 7,
            details: Default::default(),
        };
        let r = |n: u64| Usage {
            prompt: n,
            completion: 0,
            total: n,
            details: Default::default(),
        };
        for (reported, estimated, attempted, counts, reserved, want) in [
            (
                Some(u),
                false,
                true,
                true,
                100,
                (Some(u), UsageSource::Response),
            ),
            (
                Some(u),
                false,
                true,
                false,
                0,
                (Some(u), UsageSource::Response),
            ),
            // The gateway's own count replaces the reservation too.
            (
                Some(u),
                true,
                true,
                true,
                100,
                (Some(u), UsageSource::Estimated),
            ),
            (
                None,
                false,
                true,
                true,
                100,
                (Some(r(100)), UsageSource::Reserved),
            ),
            (
                None,
                true,
                true,
                true,
                100,
                (Some(r(100)), UsageSource::Reserved),
            ),
            // No backend was tried (refused, or answered by the gateway): nothing charged.
            (None, false, false, true, 100, (None, UsageSource::None)),
            // An operation that counts no tokens, or nothing reserved.
            (None, false, true, false, 100, (None, UsageSource::None)),
            (None, false, true, true, 0, (None, UsageSource::None)),
        ] {
            assert_eq!(
                charged(reported, estimated, attempted, counts, reserved),
                want,
                "{reported:?} {estimated} {attempted} {counts} {reserved}"
            );
        }
    }

    #[test]
    fn status_of_each_ending() {
        let mut o = Outcome::new(RequestId::new());
        assert_eq!(o.status(), 502);
        o.ending = Ending::Answered(200);
        assert_eq!(o.status(), 200);
        o.ending = Ending::Aborted(502);
        assert_eq!(o.status(), 502);
        assert_eq!(o.caller.client.as_ref(), "anonymous");
        assert_eq!(UsageSource::Reserved.as_str(), "reserved");
        assert_eq!(UsageSource::Estimated.as_str(), "estimated");
    }
}
