//! The audit log (SPEC §8): one JSON object per line per request, written after it ends by
//! a dedicated thread (the request path only sends a record over a channel). A file is
//! appended to and reopened on SIGHUP (logrotate); `-` is stdout.

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};

use serde::Serialize;

use filters::json::needs_escape;
use filters::tokens::Usage;

use crate::http1::Text;
use crate::observe::request_id::RequestId;
use crate::pipeline::outcome::{Outcome, UsageSource};

/// One request, as logged. `None` is written as `null`.
#[derive(Debug, Serialize, Default, Clone)]
pub struct AuditRecord {
    /// Written by the writer thread from `ended` (formatting stays off the request path).
    pub ts: String,
    /// When the request ended (the wall clock at its start plus its monotonic duration;
    /// turned into a date by the writer thread).
    #[serde(skip)]
    pub ended: Option<std::time::SystemTime>,
    pub request_id: RequestId,
    pub client: Arc<str>,
    pub auth: &'static str,
    pub key_id: Option<Arc<str>>,
    pub user: Option<String>,
    pub provider: Option<Arc<str>>,
    /// Formatted by the writer thread.
    pub client_ip: Option<std::net::IpAddr>,
    pub method: Text,
    pub path: Text,
    pub operation: Option<&'static str>,
    pub deployment: Option<Arc<str>>,
    pub backend: Option<Arc<str>>,
    pub region: Option<Arc<str>>,
    pub attempts: u32,
    pub status: u16,
    pub error_code: Option<&'static str>,
    pub stream: bool,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub total_tokens: Option<u64>,
    /// The prompt's cached part and the completion's reasoning part, where the backend
    /// itemized them (SPEC §13).
    pub cached_tokens: Option<u64>,
    pub reasoning_tokens: Option<u64>,
    pub usage_source: &'static str,
    pub duration_ms: u64,
    pub ttfb_ms: Option<u64>,
    pub upstream_request_id: Option<Text>,
}

/// The audit record of a finished request, from its outcome and the usage charged.
///
/// It takes what it logs out of `o` (the request's outcome is spent by then): the outcome is
/// not copied whole (~600 bytes) for a record of its fields. The record is made in its box
/// (the one the writer thread receives), not on the stack and copied there.
pub fn record_of(
    o: &mut Outcome,
    usage: Option<Usage>,
    source: UsageSource,
    elapsed: std::time::Duration,
    ended: std::time::SystemTime,
) -> Box<AuditRecord> {
    let status = o.status();
    let (backend, region) = match o.tried.take() {
        Some(t) => (Some(t.backend), t.region),
        None => (None, None),
    };
    Box::write(
        Box::new_uninit(),
        AuditRecord {
            ts: String::new(),
            ended: Some(ended),
            request_id: o.request_id,
            client: o.caller.client.clone(),
            auth: o.caller.auth.as_str(),
            key_id: o.caller.key_id.take(),
            user: o.caller.user.take(),
            provider: o.caller.provider.take(),
            client_ip: o.client_ip,
            method: std::mem::take(&mut o.method),
            path: std::mem::take(&mut o.path),
            operation: o.operation.map(|op| op.as_str()),
            deployment: o.deployment.take(),
            backend,
            region,
            attempts: o.attempts,
            status,
            error_code: o.error.as_ref().map(|e| e.code.as_str()),
            stream: o.stream,
            prompt_tokens: usage.map(|u| u.prompt),
            completion_tokens: usage.map(|u| u.completion),
            total_tokens: usage.map(|u| u.total),
            cached_tokens: usage.and_then(|u| u.details.cached_prompt),
            reasoning_tokens: usage.and_then(|u| u.details.reasoning),
            usage_source: source.as_str(),
            duration_ms: elapsed.as_millis() as u64,
            ttfb_ms: o.ttfb.map(|t| t.as_millis() as u64),
            upstream_request_id: o.upstream_request_id.take(),
        },
    )
}

enum Msg {
    Line(Box<AuditRecord>),
    Reopen,
    /// Answered once everything before it is written and flushed.
    Sync(SyncSender<()>),
}

/// Sends records to the writer thread.
#[derive(Clone)]
pub struct AuditLog {
    tx: SyncSender<Msg>,
    writer: Arc<Writer>,
}

/// The writer thread, started by the first message rather than with the file: `run --daemon`
/// forks after the configuration is read, and a thread started before the fork would not
/// exist in the serving process (its lines would queue unwritten, then block the sender).
struct Writer {
    /// What the thread will own; taken when it starts.
    pending: Mutex<Option<(Receiver<Msg>, Sink, String)>>,
    started: OnceLock<()>,
}

impl AuditLog {
    /// Opens `path` (`-` = stdout); its writer starts with the first line.
    pub fn start(path: &str) -> std::io::Result<AuditLog> {
        let sink = Sink::open(path)?;
        let (tx, rx) = sync_channel(65_536);
        let writer = Writer {
            pending: Mutex::new(Some((rx, sink, path.to_string()))),
            started: OnceLock::new(),
        };
        Ok(AuditLog {
            tx,
            writer: Arc::new(writer),
        })
    }

    /// Starts the writer thread unless it runs already.
    fn running(&self) {
        self.writer.started.get_or_init(|| {
            let pending = self
                .writer
                .pending
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .take();
            if let Some((rx, sink, path)) = pending {
                if let Err(e) = std::thread::Builder::new()
                    .name("audit-log".into())
                    .spawn(move || writer(rx, sink, path))
                {
                    log::error!("cannot start the audit log writer: {e}");
                }
            }
        });
    }

    pub fn log(&self, rec: Box<AuditRecord>) {
        self.running();
        match self.tx.try_send(Msg::Line(rec)) {
            Ok(()) => {}
            Err(TrySendError::Full(m)) => {
                // The writer is behind: wait rather than lose an audit line.
                let _ = self.tx.send(m);
            }
            Err(TrySendError::Disconnected(_)) => log::error!("audit log writer has stopped"),
        }
    }

    /// Reopens the file (after logrotate moved it).
    pub fn reopen(&self) {
        self.running();
        let _ = self.tx.send(Msg::Reopen);
    }

    /// Waits until every line logged so far is written (before the process exits).
    pub fn sync(&self, timeout: std::time::Duration) {
        self.running();
        let (tx, rx) = sync_channel(1);
        if self.tx.send(Msg::Sync(tx)).is_ok() {
            let _ = rx.recv_timeout(timeout);
        }
    }
}

/// Where the lines go. The writer collects them in a batch of its own and writes each batch
/// with one call: no second buffer, one `write` per batch.
enum Sink {
    Stdout(std::io::Stdout),
    File(std::fs::File),
}

impl Sink {
    fn open(path: &str) -> std::io::Result<Sink> {
        if path == "-" {
            return Ok(Sink::Stdout(std::io::stdout()));
        }
        let f = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Sink::File(f))
    }

    /// Writes the batch and empties it.
    fn write(&mut self, batch: &mut Vec<u8>) {
        if batch.is_empty() {
            return;
        }
        let written = match self {
            Sink::Stdout(w) => {
                let mut w = w.lock();
                w.write_all(batch).and_then(|()| w.flush())
            }
            Sink::File(f) => f.write_all(batch),
        };
        if let Err(e) = written {
            log::error!("audit log write failed: {e}");
        }
        batch.clear();
    }
}

/// Drains the queue every few milliseconds instead of blocking on it: a parked receiver
/// would cost every request a futex wake-up; this way requests only enqueue.
fn writer(rx: Receiver<Msg>, mut sink: Sink, path: String) {
    const PERIOD: std::time::Duration = std::time::Duration::from_millis(10);
    /// A batch is written when it reaches this size, and at the end of every drain.
    const BATCH: usize = 256 * 1024;
    let mut batch = Vec::with_capacity(BATCH + 4096);
    let mut clock = SecondCache::default();
    // The timestamp's text, reused from record to record.
    let mut ts = String::new();
    loop {
        std::thread::sleep(PERIOD);
        let mut acks = Vec::new();
        let closed = loop {
            match rx.try_recv() {
                Ok(Msg::Line(mut rec)) => {
                    if let Some(t) = rec.ended {
                        clock.write_system(t, &mut ts);
                        std::mem::swap(&mut rec.ts, &mut ts);
                    }
                    write_json(&rec, &mut batch);
                    batch.push(b'\n');
                    if rec.ended.is_some() {
                        std::mem::swap(&mut rec.ts, &mut ts);
                    }
                    if batch.len() >= BATCH {
                        sink.write(&mut batch);
                    }
                }
                Ok(Msg::Reopen) => {
                    sink.write(&mut batch);
                    match Sink::open(&path) {
                        Ok(s) => sink = s,
                        Err(e) => log::error!("audit log reopen of {path} failed: {e}"),
                    }
                }
                Ok(Msg::Sync(ack)) => acks.push(ack),
                Err(std::sync::mpsc::TryRecvError::Empty) => break false,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => break true,
            }
        };
        sink.write(&mut batch);
        for ack in acks {
            let _ = ack.send(());
        }
        if closed {
            return;
        }
    }
}

/// Appends `rec` as one JSON object, byte for byte what `serde_json::to_writer(out, rec)`
/// writes (fields in declaration order, `None` as `null`, serde_json's escaping).
///
/// Hand-written because it runs once per request and serde_json's generic `serialize_str`
/// (byte-by-byte escaping) and `serialize_entry` dominated the profile. The fields are
/// listed once: the record is destructured exhaustively from that list, so a new field fails
/// to compile until it is added here (in the same position as in the struct; the tests
/// compare against serde_json). Each key is written with its punctuation as one constant
/// (`{"ts":`, `,"request_id":`).
fn write_json(rec: &AuditRecord, out: &mut Vec<u8>) {
    macro_rules! object {
        ($first:ident, $($field:ident),* $(,)?) => {
            let AuditRecord { ended: _, $first, $($field),* } = rec;
            // A usual line is 500-700 bytes: one reservation.
            out.reserve(1024);
            out.extend_from_slice(concat!("{\"", stringify!($first), "\":").as_bytes());
            $first.encode(out);
            $(
                out.extend_from_slice(concat!(",\"", stringify!($field), "\":").as_bytes());
                $field.encode(out);
            )*
            out.push(b'}');
        };
    }
    object!(
        ts,
        request_id,
        client,
        auth,
        key_id,
        user,
        provider,
        client_ip,
        method,
        path,
        operation,
        deployment,
        backend,
        region,
        attempts,
        status,
        error_code,
        stream,
        prompt_tokens,
        completion_tokens,
        total_tokens,
        cached_tokens,
        reasoning_tokens,
        usage_source,
        duration_ms,
        ttfb_ms,
        upstream_request_id,
    );
}

/// A value written the way serde_json serializes it.
trait Json {
    fn encode(&self, out: &mut Vec<u8>);
}

impl Json for str {
    fn encode(&self, out: &mut Vec<u8>) {
        write_str(self, out);
    }
}

impl Json for String {
    fn encode(&self, out: &mut Vec<u8>) {
        write_str(self, out);
    }
}

impl Json for Text {
    fn encode(&self, out: &mut Vec<u8>) {
        write_str(self.as_str(), out);
    }
}

impl Json for RequestId {
    fn encode(&self, out: &mut Vec<u8>) {
        // Hex digits and dashes: nothing to escape.
        out.push(b'"');
        out.extend_from_slice(&self.text());
        out.push(b'"');
    }
}

impl<T: Json + ?Sized> Json for &T {
    fn encode(&self, out: &mut Vec<u8>) {
        (**self).encode(out);
    }
}

impl<T: Json + ?Sized> Json for Arc<T> {
    fn encode(&self, out: &mut Vec<u8>) {
        (**self).encode(out);
    }
}

impl<T: Json> Json for Option<T> {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Some(v) => v.encode(out),
            None => out.extend_from_slice(b"null"),
        }
    }
}

impl Json for bool {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(if *self { b"true" } else { b"false" });
    }
}

macro_rules! json_integer {
    ($($t:ty),*) => {$(
        impl Json for $t {
            fn encode(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(itoa::Buffer::new().format(*self).as_bytes());
            }
        }
    )*};
}

json_integer!(u16, u32, u64);

/// serde writes an address as a string of its `Display` form (which needs no escaping).
impl Json for std::net::IpAddr {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            // The usual case, without the formatting machinery.
            std::net::IpAddr::V4(v4) => {
                out.push(b'"');
                for (i, octet) in v4.octets().iter().enumerate() {
                    if i > 0 {
                        out.push(b'.');
                    }
                    out.extend_from_slice(itoa::Buffer::new().format(*octet).as_bytes());
                }
                out.push(b'"');
            }
            // Writing to a `Vec` cannot fail.
            v6 => {
                let _ = write!(out, "\"{v6}\"");
            }
        }
    }
}

/// Writes `s` as a JSON string with serde_json's escaping: `"`, `\` and control characters
/// below 0x20 are escaped (`\b \t \n \f \r` by name, the rest as `\u00xx`); everything else,
/// including `/`, DEL and non-ASCII UTF-8, is copied as is, a clean run at a time.
fn write_str(s: &str, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    if !needs_escape(bytes) {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if !matches!(b, b'"' | b'\\' | 0x00..=0x1f) {
            continue;
        }
        out.extend_from_slice(&bytes[start..i]);
        start = i + 1;
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            _ => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]),
        }
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// [`rfc3339`] with the part up to the second formatted once per second.
#[derive(Default)]
struct SecondCache {
    second: i64,
    prefix: String,
}

impl SecondCache {
    #[cfg(test)]
    fn rfc3339(&mut self, t: time::OffsetDateTime) -> String {
        let mut out = String::new();
        self.write_rfc3339(t, &mut out);
        out
    }

    /// Replaces `out` with `t`'s text.
    fn write_rfc3339(&mut self, t: time::OffsetDateTime, out: &mut String) {
        let t = t.to_offset(time::UtcOffset::UTC);
        self.write(t.unix_timestamp(), t.millisecond(), || t, out);
    }

    /// Replaces `out` with `t`'s text; a date is made only when the second changes.
    fn write_system(&mut self, t: std::time::SystemTime, out: &mut String) {
        match t.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => self.write(
                d.as_secs() as i64,
                d.subsec_millis() as u16,
                || time::OffsetDateTime::from(t),
                out,
            ),
            Err(_) => self.write_rfc3339(time::OffsetDateTime::from(t), out),
        }
    }

    fn write(
        &mut self,
        second: i64,
        ms: u16,
        date: impl FnOnce() -> time::OffsetDateTime,
        out: &mut String,
    ) {
        if second != self.second || self.prefix.is_empty() {
            let full = rfc3339(date());
            // "YYYY-MM-DDTHH:MM:SS" + ".mmmZ"
            self.prefix = full[..full.len() - 5].to_string();
            self.second = second;
        }
        out.clear();
        out.push_str(&self.prefix);
        out.push('.');
        out.push(char::from(b'0' + (ms / 100) as u8));
        out.push(char::from(b'0' + (ms / 10 % 10) as u8));
        out.push(char::from(b'0' + (ms % 10) as u8));
        out.push('Z');
    }
}

/// RFC 3339 UTC with milliseconds.
pub fn rfc3339(t: time::OffsetDateTime) -> String {
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.to_offset(time::UtcOffset::UTC)
        .format(&fmt)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_values_are_null_and_lines_are_json() {
        let dir = std::env::temp_dir().join(format!("agw-audit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.log");
        let log = AuditLog::start(path.to_str().unwrap()).unwrap();
        log.log(Box::new(AuditRecord {
            client: Arc::from("anonymous"),
            auth: "none",
            usage_source: "none",
            ..Default::default()
        }));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let text = loop {
            let t = std::fs::read_to_string(&path).unwrap_or_default();
            if t.ends_with('\n') || std::time::Instant::now() > deadline {
                break t;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let v: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(v["client"], "anonymous");
        assert!(v["user"].is_null());
        assert!(v["backend"].is_null());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn cached_timestamps_equal_formatted_ones() {
        let mut c = SecondCache::default();
        let base = time::OffsetDateTime::from_unix_timestamp(1_790_000_000).unwrap();
        for ms in [0i64, 7, 99, 123, 999, 1000, 1001, 61_042, 86_400_005] {
            let t = base + time::Duration::milliseconds(ms);
            assert_eq!(c.rfc3339(t), rfc3339(t), "{ms}");
        }
    }

    #[test]
    fn timestamps_of_the_wall_clock_equal_formatted_ones() {
        let mut c = SecondCache::default();
        let mut out = String::new();
        let base = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_790_000_000);
        for ms in [0u64, 7, 99, 123, 999, 1000, 1001, 61_042, 86_400_005] {
            for extra_ns in [0u64, 1, 999_999] {
                let d = std::time::Duration::from_millis(ms)
                    + std::time::Duration::from_nanos(extra_ns);
                let t = base + d;
                c.write_system(t, &mut out);
                assert_eq!(
                    out,
                    rfc3339(time::OffsetDateTime::from(t)),
                    "{ms} ms {extra_ns} ns"
                );
            }
        }
        // Before the epoch: the date's own arithmetic.
        let t = std::time::UNIX_EPOCH - std::time::Duration::from_millis(1_500);
        c.write_system(t, &mut out);
        assert_eq!(out, rfc3339(time::OffsetDateTime::from(t)));
    }

    #[test]
    fn timestamp_is_rfc3339_utc() {
        let ts = rfc3339(time::OffsetDateTime::now_utc());
        assert!(ts.ends_with('Z'));
        assert!(
            time::OffsetDateTime::parse(&ts, &time::format_description::well_known::Rfc3339)
                .is_ok()
        );
    }

    /// Quotes, backslashes, every control character, DEL, `/` and multi-byte UTF-8.
    fn nasty() -> String {
        let mut s: String = (0u8..0x20).map(char::from).collect();
        s.push_str("plain \"quoted\" back\\slash \\\\ \\\" \u{7f} a/b </script> é 日本 😀 end");
        s
    }

    fn leak(s: String) -> &'static str {
        Box::leak(s.into_boxed_str())
    }

    fn full() -> AuditRecord {
        AuditRecord {
            ts: "2026-09-22T10:00:00.123Z".into(),
            ended: Some(std::time::UNIX_EPOCH),
            request_id: RequestId::default(),
            client: Arc::from("team-a"),
            auth: "api_key",
            key_id: Some(Arc::from("k1")),
            user: Some("alice@example.com".into()),
            provider: Some(Arc::from("azure")),
            client_ip: Some("203.0.113.7".parse().unwrap()),
            method: Text::from("POST".to_string()),
            path: Text::from(
                "/openai/deployments/gpt-4o/chat/completions?api-version=1".to_string(),
            ),
            operation: Some("chat.completions"),
            deployment: Some(Arc::from("gpt-4o")),
            backend: Some(Arc::from("eastus-1")),
            region: Some(Arc::from("eastus")),
            attempts: 2,
            status: 200,
            error_code: Some("upstream_timeout"),
            stream: true,
            prompt_tokens: Some(12),
            completion_tokens: Some(34),
            total_tokens: Some(46),
            cached_tokens: Some(8),
            reasoning_tokens: Some(16),
            usage_source: "response",
            duration_ms: 1234,
            ttfb_ms: Some(56),
            upstream_request_id: Some(Text::from("abc-123".to_string())),
        }
    }

    fn all_nasty() -> AuditRecord {
        let n = nasty();
        let st = leak(n.clone());
        AuditRecord {
            ts: n.clone(),
            request_id: RequestId::default(),
            client: Arc::from(n.as_str()),
            auth: st,
            key_id: Some(Arc::from(n.as_str())),
            user: Some(n.clone()),
            provider: Some(Arc::from(n.as_str())),
            method: Text::from(n.clone()),
            path: Text::from(n.clone()),
            operation: Some(st),
            deployment: Some(Arc::from(n.as_str())),
            backend: Some(Arc::from(n.as_str())),
            region: Some(Arc::from(n.as_str())),
            error_code: Some(st),
            usage_source: st,
            upstream_request_id: Some(Text::from(n)),
            ..full()
        }
    }

    fn max_numbers() -> AuditRecord {
        AuditRecord {
            attempts: u32::MAX,
            status: u16::MAX,
            prompt_tokens: Some(u64::MAX),
            completion_tokens: Some(u64::MAX),
            total_tokens: Some(u64::MAX),
            cached_tokens: Some(u64::MAX),
            reasoning_tokens: Some(u64::MAX),
            duration_ms: u64::MAX,
            ttfb_ms: Some(u64::MAX),
            stream: false,
            ..full()
        }
    }

    /// Each optional field set alone on a default record, and cleared alone on a full one.
    fn one_optional_each() -> Vec<AuditRecord> {
        let set: [fn(&mut AuditRecord, &AuditRecord); 17] = [
            |r, f| r.key_id = f.key_id.clone(),
            |r, f| r.user = f.user.clone(),
            |r, f| r.provider = f.provider.clone(),
            |r, f| r.client_ip = f.client_ip,
            |r, f| r.operation = f.operation,
            |r, f| r.deployment = f.deployment.clone(),
            |r, f| r.backend = f.backend.clone(),
            |r, f| r.region = f.region.clone(),
            |r, f| r.error_code = f.error_code,
            |r, f| r.prompt_tokens = f.prompt_tokens,
            |r, f| r.completion_tokens = f.completion_tokens,
            |r, f| r.total_tokens = f.total_tokens,
            |r, f| r.cached_tokens = f.cached_tokens,
            |r, f| r.reasoning_tokens = f.reasoning_tokens,
            |r, f| r.ttfb_ms = f.ttfb_ms,
            |r, f| r.upstream_request_id = f.upstream_request_id.clone(),
            |r, f| r.ended = f.ended,
        ];
        let (full, empty) = (full(), AuditRecord::default());
        let mut out = Vec::new();
        for f in set {
            let mut only = AuditRecord::default();
            f(&mut only, &full);
            out.push(only);
            let mut all_but = full.clone();
            f(&mut all_but, &empty);
            out.push(all_but);
        }
        out
    }

    fn ip(s: &str) -> AuditRecord {
        AuditRecord {
            client_ip: Some(s.parse().unwrap()),
            ..full()
        }
    }

    fn cases() -> Vec<AuditRecord> {
        let mut v = vec![
            AuditRecord::default(),
            full(),
            all_nasty(),
            max_numbers(),
            AuditRecord {
                request_id: RequestId::new(),
                ..full()
            },
            ip("0.0.0.0"),
            ip("255.255.255.255"),
            ip("::"),
            ip("::1"),
            ip("2001:db8::8a2e:370:7334"),
            ip("fe80::1:2:3:4"),
            ip("::ffff:192.0.2.128"),
            ip("2001:db8:85a3:1:2:8a2e:370:7334"),
        ];
        v.extend(one_optional_each());
        v
    }

    fn hand_written(rec: &AuditRecord) -> Vec<u8> {
        let mut out = Vec::new();
        write_json(rec, &mut out);
        out
    }

    #[test]
    fn write_json_equals_serde_json() {
        for (i, rec) in cases().iter().enumerate() {
            let ours = hand_written(rec);
            let serde = serde_json::to_vec(rec).unwrap();
            assert_eq!(
                String::from_utf8_lossy(&ours),
                String::from_utf8_lossy(&serde),
                "case {i}"
            );
            assert_eq!(ours, serde, "case {i}");
            assert!(
                !ours.contains(&b'\n'),
                "case {i}: a line must not contain a newline"
            );
        }
    }

    #[test]
    fn write_json_appends_to_what_is_in_the_buffer() {
        let mut out = b"prefix".to_vec();
        write_json(&full(), &mut out);
        let mut expected = b"prefix".to_vec();
        serde_json::to_writer(&mut expected, &full()).unwrap();
        assert_eq!(out, expected);
    }

    #[test]
    fn write_json_parses_back_to_serde_value() {
        for (i, rec) in cases().iter().enumerate() {
            let parsed: serde_json::Value = serde_json::from_slice(&hand_written(rec)).unwrap();
            assert_eq!(parsed, serde_json::to_value(rec).unwrap(), "case {i}");
        }
    }

    #[test]
    fn strings_are_escaped_like_serde_json() {
        let mut samples: Vec<String> = (0u8..=0x7f)
            .map(char::from)
            .flat_map(|c| [c.to_string(), format!("ab{c}cd"), format!("{c}{c}x{c}")])
            .collect();
        samples.extend(
            [
                "",
                "é",
                "日本",
                "😀",
                "a\u{80}\u{7ff}\u{800}\u{ffff}\u{10000}\u{10ffff}z",
            ]
            .map(String::from),
        );
        samples.push(nasty());
        // Every Unicode scalar value in one string.
        samples.push(('\0'..=char::MAX).collect());
        for s in &samples {
            let mut ours = Vec::new();
            write_str(s, &mut ours);
            assert_eq!(ours, serde_json::to_vec(s).unwrap(), "{s:?}");
        }
    }
}
