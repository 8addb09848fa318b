//! The state store (`state.store`, SPEC §14): where the gateway keeps what every gateway of a
//! fleet must agree on — limit counters ([`crate::limits::Limiter`]) and stored-object records
//! ([`crate::objects::ObjectStore`]). `memory` keeps them in this process; `redis` in one Redis
//! shared by every gateway, reached over one reconnecting connection ([`RedisConn`]) that both
//! use.
//!
//! Failure handling is the connection's: every round trip (connecting included) is bounded by
//! `command_timeout`; on any error or timeout the connection is dropped, and for
//! `retry_interval` callers skip Redis entirely (no stall behind a dead server) and fall back
//! as each user of the store decides; the next use after that opens a fresh connection
//! manager. So the store recovers by itself when Redis returns, also from failures the
//! connection manager does not reconnect on by itself (a response timeout on a half-open
//! connection).

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// Where the state lives (`state.store`, or the older `limits.store`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreKind {
    Memory,
    Redis { url: String },
}

/// Tuning of the Redis connection.
#[derive(Clone, Debug)]
pub struct ConnOptions {
    /// Longest wait for one Redis round trip (connecting included). Default 250 ms.
    pub command_timeout: Duration,
    /// After a failure, callers skip Redis for this long, then try a fresh connection.
    /// Default 1 s.
    pub retry_interval: Duration,
}

impl Default for ConnOptions {
    fn default() -> Self {
        ConnOptions {
            command_timeout: Duration::from_millis(250),
            retry_interval: Duration::from_secs(1),
        }
    }
}

/// One reconnecting Redis connection, shared by the limiter and the object records.
pub struct RedisConn {
    client: redis::Client,
    config: ConnectionManagerConfig,
    /// The current connection manager and its generation; `None` after a failure (a fresh one
    /// is made on the next use).
    conn: Mutex<Option<(u64, ConnectionManager)>>,
    generation: AtomicU64,
    timeout: Duration,
    retry_interval: Duration,
    epoch: Instant,
    /// Until when (ms since `epoch`) callers skip Redis after a failure.
    skip_until_ms: AtomicU64,
    /// Set by a failure, cleared by the next success: one warning when Redis is lost and
    /// one line when it answers again, not one per failed attempt.
    down: AtomicBool,
}

impl std::fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConn")
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl RedisConn {
    /// Does not connect: the connection is made on first use, inside the caller's runtime.
    /// Errors only on an invalid URL.
    pub fn open(url: &str, options: &ConnOptions) -> Result<Arc<RedisConn>, String> {
        let client = redis::Client::open(url).map_err(|e| format!("redis_url: {e}"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.command_timeout))
            .set_response_timeout(Some(options.command_timeout))
            // One connection attempt per manager: retries are this store's business (a fresh
            // manager after `retry_interval`), so no request waits behind a backoff loop.
            .set_number_of_retries(0);
        Ok(Arc::new(RedisConn {
            client,
            config,
            conn: Mutex::new(None),
            generation: AtomicU64::new(0),
            timeout: options.command_timeout,
            retry_interval: options.retry_interval,
            epoch: Instant::now(),
            skip_until_ms: AtomicU64::new(0),
            down: AtomicBool::new(false),
        }))
    }

    fn elapsed_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The connection to use, or `None` while callers skip Redis after a failure.
    fn connection(&self) -> Option<(u64, ConnectionManager)> {
        if self.elapsed_ms() < self.skip_until_ms.load(Ordering::Acquire) {
            return None;
        }
        let mut guard = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((generation, conn)) = guard.as_ref() {
            return Some((*generation, conn.clone()));
        }
        // Lazy: connects on the first command, inside the caller's runtime.
        match ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone()) {
            Ok(conn) => {
                let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
                *guard = Some((generation, conn.clone()));
                Some((generation, conn))
            }
            Err(e) => {
                log::warn!("state store: cannot create a Redis connection: {e}");
                None
            }
        }
    }

    /// Records a failure of the connection of `generation`: drop it (unless a newer one
    /// replaced it already) and skip Redis for `retry_interval`.
    pub(crate) fn failed(&self, generation: u64, what: &str, error: &dyn std::fmt::Display) {
        let mut guard = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if guard.as_ref().is_some_and(|(g, _)| *g == generation) {
            *guard = None;
            let until = self.elapsed_ms() + self.retry_interval.as_millis() as u64;
            self.skip_until_ms.store(until, Ordering::Release);
            if self.down.swap(true, Ordering::AcqRel) {
                log::debug!(
                    "state store: Redis {what} failed again ({error}); retrying in {:?}",
                    self.retry_interval
                );
            } else {
                log::warn!(
                    "state store: Redis {what} failed ({error}); retrying every {:?} (logged again when it answers)",
                    self.retry_interval
                );
            }
        }
    }

    /// Runs one round trip, bounded by the command timeout. `None`: Redis could not answer
    /// (skipped after a recent failure, an error, or a timeout — the connection is then
    /// dropped and Redis skipped for a while).
    pub(crate) async fn run<T, F, Fut>(&self, what: &str, f: F) -> Option<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let (generation, conn) = self.connection()?;
        match tokio::time::timeout(self.timeout, f(conn)).await {
            Ok(Ok(v)) => {
                if self.down.load(Ordering::Relaxed) && self.down.swap(false, Ordering::AcqRel) {
                    log::info!("state store: Redis answers again ({what})");
                }
                Some(v)
            }
            Ok(Err(e)) => {
                self.failed(generation, what, &e);
                None
            }
            Err(_) => {
                self.failed(generation, what, &"timed out");
                None
            }
        }
    }
}

/// The store every part of the state is made from: nothing (memory), or the Redis
/// connection they share.
#[derive(Clone, Debug)]
pub struct Store {
    pub kind: StoreKind,
    redis: Option<Arc<RedisConn>>,
}

impl Store {
    pub fn open(kind: StoreKind, options: &ConnOptions) -> Result<Store, String> {
        let redis = match &kind {
            StoreKind::Memory => None,
            StoreKind::Redis { url } => Some(RedisConn::open(url, options)?),
        };
        Ok(Store { kind, redis })
    }

    pub fn redis(&self) -> Option<&Arc<RedisConn>> {
        self.redis.as_ref()
    }
}

/// Escapes `%`, `:`, `{` and `}` in a name that goes into a Redis key, so keys stay
/// unambiguous and no name can form a hash tag.
pub(crate) fn escape_into(out: &mut String, s: &str) {
    for ch in s.chars() {
        match ch {
            '%' => out.push_str("%25"),
            ':' => out.push_str("%3A"),
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_url_is_an_error_and_memory_has_no_connection() {
        assert!(Store::open(
            StoreKind::Redis {
                url: "nonsense://x".into()
            },
            &ConnOptions::default()
        )
        .is_err());
        let m = Store::open(StoreKind::Memory, &ConnOptions::default()).unwrap();
        assert!(m.redis().is_none());
    }

    #[test]
    fn escaping() {
        let mut s = String::new();
        escape_into(&mut s, "a:b{c}%d");
        assert_eq!(s, "a%3Ab%7Bc%7D%25d");
    }
}
