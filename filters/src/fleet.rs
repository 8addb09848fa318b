//! One fleet (SPEC §14): what every gateway sharing a Redis learns from the others —
//! cooldowns of (backend, deployment) members and revoked API keys — and the revoked set the
//! identity check reads locally.
//!
//! Redis layout (all keys under `agw:fleet:`):
//! - `agw:fleet:revoked`: a hash `key_id -> unix seconds of the revocation`; persistent.
//! - `agw:fleet:cool:<backend>:<deployment>:<upstream>`: `until` (unix ms), expiring when the
//!   cooldown ends. A member is named by its backend, the client-facing deployment and the
//!   deployment's name on the backend (the same configuration on every gateway).
//! - `agw:fleet:epoch`: a random id written when a gateway first finds Redis without one:
//!   a gateway that sees it change knows Redis lost its data (a restart without persistence)
//!   and writes back the revocations it knew.
//! - channel `agw:fleet`: one JSON [`Message`] per change, so that the others apply it at once.
//!
//! The pure parts (message encoding, key ids, set differences) are here with their tests; the
//! gateway's background task (`gateway/src/fleet.rs`) does the I/O of a running gateway, the
//! `keys revoke|unrevoke|revoked` commands the blocking I/O of [`cli`].

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The pub/sub channel of the fleet.
pub const CHANNEL: &str = "agw:fleet";
/// The hash of revoked key ids.
pub const REVOKED_KEY: &str = "agw:fleet:revoked";
/// The store's epoch (see the module documentation).
pub const EPOCH_KEY: &str = "agw:fleet:epoch";

/// The Redis key of a member's shared cooldown.
pub fn cooldown_key(backend: &str, deployment: &str, upstream: &str) -> String {
    let mut k = String::from("agw:fleet:cool:");
    crate::store::escape_into(&mut k, backend);
    k.push(':');
    crate::store::escape_into(&mut k, deployment);
    k.push(':');
    crate::store::escape_into(&mut k, upstream);
    k
}

/// One notification on [`CHANNEL`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case", deny_unknown_fields)]
pub enum Message {
    /// A gateway started a cooldown of the member `backend` (serving it as `upstream`) of
    /// the client-facing `deployment`, until `until_ms` (unix ms).
    Cooldown {
        from: String,
        backend: String,
        deployment: String,
        upstream: String,
        until_ms: u64,
    },
    /// The revoked set changed: read it again.
    Revocations { from: String },
}

impl Message {
    pub fn encode(&self) -> String {
        // A plain enum of strings and integers always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Strict: anything but one of the messages above is an error (logged and ignored by
    /// the receiver).
    pub fn decode(payload: &[u8]) -> Result<Message, String> {
        serde_json::from_slice(payload).map_err(|e| e.to_string())
    }

    /// The gateway that sent it.
    pub fn from(&self) -> &str {
        match self {
            Message::Cooldown { from, .. } | Message::Revocations { from } => from,
        }
    }
}

/// A key id as the audit log shows it: the first 8 hex characters of the key's SHA-256,
/// lower case. Anything else is refused (no guessing at prefixes or whole hashes).
pub fn parse_key_id(s: &str) -> Result<String, String> {
    if s.len() == 8 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(format!(
            "key id {s:?}: expected the 8 hex characters the audit log shows as key_id"
        ))
    }
}

/// What a gateway makes of the store's epoch when it reads the revoked set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Epoch {
    /// It had read none yet: it adopts this one, and has nothing of its own to write back.
    First,
    /// The same store as before: the revoked hash is the truth.
    Same,
    /// Redis lost its data since the last read (restarted without persistence): the
    /// revocations this gateway knew are written back before the hash is read.
    Changed,
}

pub fn check_epoch(known: Option<&str>, current: &str) -> Epoch {
    match known {
        None => Epoch::First,
        Some(k) if k == current => Epoch::Same,
        Some(_) => Epoch::Changed,
    }
}

/// What changed between two revoked sets.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Diff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

/// The difference from `old` to `new`, each side sorted.
pub fn diff(old: &HashSet<String>, new: &HashSet<String>) -> Diff {
    let mut added: Vec<String> = new.difference(old).cloned().collect();
    let mut removed: Vec<String> = old.difference(new).cloned().collect();
    added.sort();
    removed.sort();
    Diff { added, removed }
}

/// The revoked key ids this process knows, read on the request path without any I/O.
#[derive(Debug, Default)]
pub struct RevokedKeys {
    set: arc_swap::ArcSwap<HashSet<String>>,
    /// False while the set is empty: the usual request does one relaxed load.
    any: AtomicBool,
}

impl RevokedKeys {
    pub fn is_revoked(&self, key_id: &str) -> bool {
        self.any.load(Ordering::Relaxed) && self.set.load().contains(key_id)
    }

    /// The current set.
    pub fn snapshot(&self) -> Arc<HashSet<String>> {
        self.set.load_full()
    }

    pub fn len(&self) -> usize {
        self.set.load().len()
    }

    pub fn is_empty(&self) -> bool {
        !self.any.load(Ordering::Relaxed)
    }

    /// Replaces the set; returns what changed.
    pub fn replace(&self, new: HashSet<String>) -> Diff {
        let d = diff(&self.set.load(), &new);
        if !d.is_empty() {
            let any = !new.is_empty();
            self.set.store(Arc::new(new));
            self.any.store(any, Ordering::Relaxed);
        }
        d
    }
}

/// The blocking Redis calls of `aoai-gateway keys revoke|unrevoke|revoked`.
pub mod cli {
    use super::*;
    use std::time::Duration;

    const TIMEOUT: Duration = Duration::from_secs(5);

    fn connect(url: &str, timeout: Duration) -> Result<redis::Connection, String> {
        let client = redis::Client::open(url).map_err(|e| format!("state.redis_url: {e}"))?;
        let con = client
            .get_connection_with_timeout(timeout)
            .map_err(|e| format!("cannot reach Redis: {e}"))?;
        let t = Some(timeout);
        con.set_read_timeout(t).map_err(|e| e.to_string())?;
        con.set_write_timeout(t).map_err(|e| e.to_string())?;
        Ok(con)
    }

    fn notify(con: &mut redis::Connection) -> Result<(), String> {
        let msg = Message::Revocations { from: "cli".into() }.encode();
        redis::cmd("PUBLISH")
            .arg(CHANNEL)
            .arg(msg)
            .query::<i64>(con)
            .map(|_| ())
            .map_err(|e| format!("Redis PUBLISH: {e}"))
    }

    /// Records the revocation (kept: a hash field, no expiry) and tells every gateway.
    /// `Ok(false)`: it was revoked already (the first time is kept).
    pub fn revoke(url: &str, key_id: &str, now_unix: i64) -> Result<bool, String> {
        let mut con = connect(url, TIMEOUT)?;
        let added: i64 = redis::cmd("HSETNX")
            .arg(REVOKED_KEY)
            .arg(key_id)
            .arg(now_unix)
            .query(&mut con)
            .map_err(|e| format!("Redis HSETNX: {e}"))?;
        notify(&mut con)?;
        Ok(added == 1)
    }

    /// `Ok(false)`: it was not revoked.
    pub fn unrevoke(url: &str, key_id: &str) -> Result<bool, String> {
        let mut con = connect(url, TIMEOUT)?;
        let removed: i64 = redis::cmd("HDEL")
            .arg(REVOKED_KEY)
            .arg(key_id)
            .query(&mut con)
            .map_err(|e| format!("Redis HDEL: {e}"))?;
        notify(&mut con)?;
        Ok(removed == 1)
    }

    /// Every revoked key id with the unix seconds of its revocation (`None` if unreadable).
    pub fn list(url: &str) -> Result<BTreeMap<String, Option<i64>>, String> {
        let mut con = connect(url, TIMEOUT)?;
        let all: BTreeMap<String, String> = redis::cmd("HGETALL")
            .arg(REVOKED_KEY)
            .query(&mut con)
            .map_err(|e| format!("Redis HGETALL: {e}"))?;
        Ok(all
            .into_iter()
            .map(|(k, v)| (k, v.parse::<i64>().ok()))
            .collect())
    }

    /// The store's epoch and the revoked key ids, each round trip bounded by `timeout`: what
    /// a gateway reads before it serves.
    pub fn read_state(
        url: &str,
        timeout: Duration,
    ) -> Result<(Option<String>, HashSet<String>), String> {
        let mut con = connect(url, timeout)?;
        let epoch: Option<String> = redis::cmd("GET")
            .arg(EPOCH_KEY)
            .query(&mut con)
            .map_err(|e| format!("Redis GET: {e}"))?;
        let ids: HashSet<String> = redis::cmd("HKEYS")
            .arg(REVOKED_KEY)
            .query(&mut con)
            .map_err(|e| format!("Redis HKEYS: {e}"))?;
        Ok((epoch, ids))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[&str]) -> HashSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn messages_round_trip_and_are_strict() {
        let cases = [
            Message::Cooldown {
                from: "a1".into(),
                backend: "east:1".into(),
                deployment: "gpt-4o".into(),
                upstream: "gpt-4o-ptu".into(),
                until_ms: 1_700_000_000_123,
            },
            Message::Revocations { from: "cli".into() },
        ];
        for m in cases {
            assert_eq!(Message::decode(m.encode().as_bytes()), Ok(m.clone()));
        }
        assert_eq!(
            Message::Revocations { from: "x".into() }.encode(),
            r#"{"t":"revocations","from":"x"}"#
        );
        for bad in [
            &b""[..],
            b"{}",
            b"not json",
            br#"{"t":"cooldown","from":"a","backend":"b","deployment":"d","upstream":"u"}"#,
            br#"{"t":"cooldown","from":"a","backend":"b","deployment":"d","until_ms":1}"#,
            br#"{"t":"cooldown","from":"a","backend":"b","deployment":"d","upstream":"u","until_ms":-1}"#,
            br#"{"t":"cooldown","from":"a","backend":"b","deployment":"d","upstream":"u","until_ms":1,"x":1}"#,
            br#"{"t":"other","from":"a"}"#,
        ] {
            assert!(Message::decode(bad).is_err(), "{:?}", std::str::from_utf8(bad));
        }
    }

    #[test]
    fn key_ids_are_8_hex() {
        assert_eq!(parse_key_id("ABCDEF01").unwrap(), "abcdef01");
        assert_eq!(parse_key_id("0123abcd").unwrap(), "0123abcd");
        for bad in ["", "abc", "0123abcd0", "0123abcg", " 0123abc", "agw_0123"] {
            assert!(parse_key_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn epochs() {
        assert_eq!(check_epoch(None, "e1"), Epoch::First);
        assert_eq!(check_epoch(Some("e1"), "e1"), Epoch::Same);
        assert_eq!(check_epoch(Some("e1"), "e2"), Epoch::Changed);
    }

    #[test]
    fn diffs() {
        type Ids<'a> = &'a [&'a str];
        let table: [(Ids, Ids, Ids, Ids); 4] = [
            (&[], &[], &[], &[]),
            (&[], &["b", "a"], &["a", "b"], &[]),
            (&["a", "b"], &["b", "c"], &["c"], &["a"]),
            (&["a"], &[], &[], &["a"]),
        ];
        for (old, new, added, removed) in table {
            let d = diff(&set(old), &set(new));
            assert_eq!(d.added, added.to_vec(), "{old:?} -> {new:?}");
            assert_eq!(d.removed, removed.to_vec(), "{old:?} -> {new:?}");
        }
    }

    #[test]
    fn revoked_set_replaces_and_reports() {
        let r = RevokedKeys::default();
        assert!(!r.is_revoked("aaaaaaaa") && r.is_empty());
        let d = r.replace(set(&["aaaaaaaa", "bbbbbbbb"]));
        assert_eq!(d.added.len(), 2);
        assert!(r.is_revoked("aaaaaaaa") && !r.is_revoked("cccccccc"));
        assert!(r.replace(set(&["aaaaaaaa", "bbbbbbbb"])).is_empty());
        let d = r.replace(set(&["bbbbbbbb"]));
        assert_eq!(d.removed, ["aaaaaaaa"]);
        assert!(!r.is_revoked("aaaaaaaa") && r.is_revoked("bbbbbbbb"));
        r.replace(HashSet::new());
        assert!(r.is_empty() && !r.is_revoked("bbbbbbbb"));
    }

    #[test]
    fn cooldown_keys_escape_names() {
        assert_eq!(
            cooldown_key("east", "gpt-4o", "gpt-4o-ptu"),
            "agw:fleet:cool:east:gpt-4o:gpt-4o-ptu"
        );
        assert_eq!(
            cooldown_key("a:b", "c}", "d"),
            "agw:fleet:cool:a%3Ab:c%7D:d"
        );
    }
}
