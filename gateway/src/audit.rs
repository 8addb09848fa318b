//! The audit log (SPEC §8): one JSON object per line per request, written after it ends by
//! a dedicated thread (the request path only sends a record over a channel). A file is
//! appended to and reopened on SIGHUP (logrotate); `-` is stdout.

use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

use serde::Serialize;

/// One request, as logged. `None` is written as `null`.
#[derive(Debug, Serialize, Default, Clone)]
pub struct AuditRecord {
    /// Written by the writer thread from `ended` (formatting stays off the request path).
    pub ts: String,
    #[serde(skip)]
    pub ended: Option<time::OffsetDateTime>,
    pub request_id: String,
    pub client: Arc<str>,
    pub auth: &'static str,
    pub key_id: Option<String>,
    pub user: Option<String>,
    pub provider: Option<Arc<str>>,
    /// Formatted by the writer thread.
    pub client_ip: Option<std::net::IpAddr>,
    pub method: String,
    pub path: String,
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
    pub usage_source: &'static str,
    pub duration_ms: u64,
    pub ttfb_ms: Option<u64>,
    pub upstream_request_id: Option<String>,
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
}

impl AuditLog {
    /// Starts the writer for `path` (`-` = stdout).
    pub fn start(path: &str) -> std::io::Result<AuditLog> {
        let sink = Sink::open(path)?;
        let (tx, rx) = sync_channel(65_536);
        let path = path.to_string();
        std::thread::Builder::new()
            .name("audit-log".into())
            .spawn(move || writer(rx, sink, path))?;
        Ok(AuditLog { tx })
    }

    pub fn log(&self, rec: AuditRecord) {
        match self.tx.try_send(Msg::Line(Box::new(rec))) {
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
        let _ = self.tx.send(Msg::Reopen);
    }

    /// Waits until every line logged so far is written (before the process exits).
    pub fn sync(&self, timeout: std::time::Duration) {
        let (tx, rx) = sync_channel(1);
        if self.tx.send(Msg::Sync(tx)).is_ok() {
            let _ = rx.recv_timeout(timeout);
        }
    }
}

enum Sink {
    Stdout(BufWriter<std::io::Stdout>),
    File(BufWriter<std::fs::File>),
}

impl Sink {
    fn open(path: &str) -> std::io::Result<Sink> {
        if path == "-" {
            return Ok(Sink::Stdout(BufWriter::new(std::io::stdout())));
        }
        let f = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Sink::File(BufWriter::new(f)))
    }

    fn out(&mut self) -> &mut dyn Write {
        match self {
            Sink::Stdout(w) => w,
            Sink::File(w) => w,
        }
    }
}

/// Drains the queue every few milliseconds instead of blocking on it: a parked receiver
/// would cost every request a futex wake-up; this way requests only enqueue.
fn writer(rx: Receiver<Msg>, mut sink: Sink, path: String) {
    const PERIOD: std::time::Duration = std::time::Duration::from_millis(10);
    let mut line = Vec::with_capacity(1024);
    let mut clock = SecondCache::default();
    loop {
        std::thread::sleep(PERIOD);
        let mut acks = Vec::new();
        let mut wrote = false;
        let closed = loop {
            match rx.try_recv() {
                Ok(Msg::Line(mut rec)) => {
                    if let Some(t) = rec.ended {
                        rec.ts = clock.rfc3339(t);
                    }
                    line.clear();
                    if serde_json::to_writer(&mut line, &rec).is_ok() {
                        line.push(b'\n');
                        if let Err(e) = sink.out().write_all(&line) {
                            log::error!("audit log write failed: {e}");
                        }
                        wrote = true;
                    }
                }
                Ok(Msg::Reopen) => {
                    let _ = sink.out().flush();
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
        if wrote || !acks.is_empty() {
            let _ = sink.out().flush();
        }
        for ack in acks {
            let _ = ack.send(());
        }
        if closed {
            return;
        }
    }
}

/// [`rfc3339`] with the part up to the second formatted once per second.
#[derive(Default)]
struct SecondCache {
    second: i64,
    prefix: String,
}

impl SecondCache {
    fn rfc3339(&mut self, t: time::OffsetDateTime) -> String {
        let t = t.to_offset(time::UtcOffset::UTC);
        let second = t.unix_timestamp();
        if second != self.second || self.prefix.is_empty() {
            let full = rfc3339(t);
            // "YYYY-MM-DDTHH:MM:SS" + ".mmmZ"
            self.prefix = full[..full.len() - 5].to_string();
            self.second = second;
        }
        let mut out = String::with_capacity(self.prefix.len() + 5);
        out.push_str(&self.prefix);
        out.push('.');
        let ms = t.millisecond();
        out.push(char::from(b'0' + (ms / 100) as u8));
        out.push(char::from(b'0' + (ms / 10 % 10) as u8));
        out.push(char::from(b'0' + (ms % 10) as u8));
        out.push('Z');
        out
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
        log.log(AuditRecord {
            client: Arc::from("anonymous"),
            auth: "none",
            usage_source: "none",
            ..Default::default()
        });
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
    fn timestamp_is_rfc3339_utc() {
        let ts = rfc3339(time::OffsetDateTime::now_utc());
        assert!(ts.ends_with('Z'));
        assert!(
            time::OffsetDateTime::parse(&ts, &time::format_description::well_known::Rfc3339)
                .is_ok()
        );
    }
}
