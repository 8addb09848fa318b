//! Stored-object records (SPEC §11): for every object created through the gateway (a stored
//! response, …), which backend holds it, for which client-facing deployment, whose it is, and
//! until when. They live in the state store ([`crate::store`]): this process's memory, or Redis
//! (one hash per record, `agw:obj:<id>`, expiring with the record) so that every gateway
//! sharing it routes and authorizes the same ids.
//!
//! While Redis is away, records created meanwhile are kept in this process's memory and found
//! there; a lookup that Redis cannot answer and memory does not know is
//! [`StoreUnavailable`] (the caller answers 503 rather than guess).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use redis::Script;

use crate::store::{escape_into, RedisConn, Store};

/// Who owns an object: the client, and the user where the request named one (`user_claim`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub client: String,
    pub user: Option<String>,
}

/// One stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRecord {
    /// The backend (by its configured name) that holds the object.
    pub backend: String,
    /// The client-facing deployment it was created for.
    pub deployment: Option<String>,
    pub owner: Owner,
    /// Unix seconds.
    pub created: i64,
    /// Unix seconds; the record is gone after this.
    pub expires: i64,
    /// A response created with `background: true`: its reservation was charged at creation.
    pub background: bool,
    /// Tokens reserved (and charged) at creation.
    pub reserved: u64,
    /// The reported usage has replaced the reservation (once per response).
    pub settled: bool,
}

/// Whether `caller` may see the record at `now` (Unix seconds): the same client and the same
/// user (a record without a user is the client's alone: a user of that client does not see
/// it, and a record with a user is seen by no other user and not by the bare client), and
/// not expired. The answer for "someone else's" and "expired" is the same: not found.
pub fn visible(record: &ObjectRecord, caller: &Owner, now: i64) -> bool {
    record.owner == *caller && now < record.expires
}

/// Redis could not answer and this process does not know the id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreUnavailable;

/// Marks a record settled, once: 1 the first time for a record that exists, else 0.
const SETTLE_LUA: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
return redis.call('HSETNX', KEYS[1], 's', '1')
"#;

/// Sweep expired memory records every this many insertions.
const SWEEP_EVERY: u64 = 1024;

/// The records, in memory or in Redis (with memory for what Redis could not take).
pub struct ObjectStore {
    redis: Option<Arc<RedisConn>>,
    local: Mutex<HashMap<String, ObjectRecord>>,
    inserts: AtomicU64,
    prefix: String,
    settle: Script,
    on_store_error: Arc<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for ObjectStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectStore")
            .field("redis", &self.redis.is_some())
            .finish()
    }
}

impl ObjectStore {
    /// Records on `store`; `on_store_error` is called for every operation Redis could not
    /// serve (wire it to `aoai_gateway_limit_store_errors_total`).
    pub fn new(store: &Store, on_store_error: Arc<dyn Fn() + Send + Sync>) -> ObjectStore {
        ObjectStore::with_prefix(store, "agw:obj:", on_store_error)
    }

    pub fn with_prefix(
        store: &Store,
        prefix: &str,
        on_store_error: Arc<dyn Fn() + Send + Sync>,
    ) -> ObjectStore {
        ObjectStore {
            redis: store.redis().cloned(),
            local: Mutex::new(HashMap::new()),
            inserts: AtomicU64::new(0),
            prefix: prefix.to_owned(),
            settle: Script::new(SETTLE_LUA),
            on_store_error,
        }
    }

    fn key(&self, id: &str) -> String {
        let mut k = String::with_capacity(self.prefix.len() + id.len() + 4);
        k.push_str(&self.prefix);
        escape_into(&mut k, id);
        k
    }

    fn local(&self) -> std::sync::MutexGuard<'_, HashMap<String, ObjectRecord>> {
        self.local.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn put_local(&self, id: &str, record: ObjectRecord, now: i64) {
        let mut local = self.local();
        if self.inserts.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            local.retain(|_, r| r.expires > now);
        }
        local.insert(id.to_owned(), record);
    }

    /// Records `id` (`now`: Unix seconds, for sweeping).
    pub async fn put(&self, id: &str, record: ObjectRecord, now: i64) {
        let Some(redis) = &self.redis else {
            return self.put_local(id, record, now);
        };
        let key = self.key(id);
        let fields = to_fields(&record);
        let expires = record.expires;
        let done = redis
            .run("record write", |mut c| async move {
                redis::pipe()
                    .atomic()
                    .hset_multiple(&key, &fields)
                    .ignore()
                    .expire_at(&key, expires)
                    .ignore()
                    .query_async::<()>(&mut c)
                    .await
            })
            .await;
        if done.is_none() {
            (self.on_store_error)();
            self.put_local(id, record, now);
        }
    }

    /// The record of `id`, whoever owns it (the caller decides with [`visible`]).
    pub async fn get(&self, id: &str) -> Result<Option<ObjectRecord>, StoreUnavailable> {
        let Some(redis) = &self.redis else {
            return Ok(self.local().get(id).cloned());
        };
        let key = self.key(id);
        let got = redis
            .run("record lookup", |mut c| async move {
                redis::cmd("HGETALL")
                    .arg(&key)
                    .query_async::<HashMap<String, String>>(&mut c)
                    .await
            })
            .await;
        let local = self.local().get(id).cloned();
        match got {
            Some(fields) if !fields.is_empty() => Ok(from_fields(&fields)),
            Some(_) => Ok(local),
            None => {
                (self.on_store_error)();
                local.map(Some).ok_or(StoreUnavailable)
            }
        }
    }

    /// Forgets `id` (deleted through the gateway).
    pub async fn delete(&self, id: &str) {
        self.local().remove(id);
        if let Some(redis) = &self.redis {
            let key = self.key(id);
            let done = redis
                .run("record delete", |mut c| async move {
                    redis::cmd("DEL").arg(&key).query_async::<i64>(&mut c).await
                })
                .await;
            if done.is_none() {
                (self.on_store_error)();
            }
        }
    }

    /// Marks `id` settled (its reported usage replaced its reservation); `true` only for the
    /// first caller, across every gateway sharing the store. `false` also when the store
    /// cannot say (no charge rather than a second one).
    pub async fn settle(&self, id: &str) -> bool {
        {
            let mut local = self.local();
            if let Some(r) = local.get_mut(id) {
                return !std::mem::replace(&mut r.settled, true);
            }
        }
        let Some(redis) = &self.redis else {
            return false;
        };
        let key = self.key(id);
        let script = &self.settle;
        let won = redis
            .run("record settle", |mut c| async move {
                script.key(&key).invoke_async::<i64>(&mut c).await
            })
            .await;
        if won.is_none() {
            (self.on_store_error)();
        }
        won == Some(1)
    }
}

fn to_fields(r: &ObjectRecord) -> Vec<(&'static str, String)> {
    let mut f = vec![
        ("b", r.backend.clone()),
        ("c", r.owner.client.clone()),
        ("t", r.created.to_string()),
        ("x", r.expires.to_string()),
        ("r", r.reserved.to_string()),
    ];
    if let Some(d) = &r.deployment {
        f.push(("d", d.clone()));
    }
    if let Some(u) = &r.owner.user {
        f.push(("u", u.clone()));
    }
    if r.background {
        f.push(("g", "1".into()));
    }
    if r.settled {
        f.push(("s", "1".into()));
    }
    f
}

/// A record from its Redis hash; `None` for a hash that is not one (treated as unknown).
fn from_fields(f: &HashMap<String, String>) -> Option<ObjectRecord> {
    let num = |k: &str| f.get(k)?.parse::<i64>().ok();
    Some(ObjectRecord {
        backend: f.get("b")?.clone(),
        deployment: f.get("d").cloned(),
        owner: Owner {
            client: f.get("c")?.clone(),
            user: f.get("u").cloned(),
        },
        created: num("t")?,
        expires: num("x")?,
        background: f.contains_key("g"),
        reserved: f.get("r")?.parse().ok()?,
        settled: f.contains_key("s"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ConnOptions, StoreKind};

    fn owner(client: &str, user: Option<&str>) -> Owner {
        Owner {
            client: client.into(),
            user: user.map(Into::into),
        }
    }

    fn record(client: &str, user: Option<&str>) -> ObjectRecord {
        ObjectRecord {
            backend: "eastus".into(),
            deployment: Some("gpt-4o".into()),
            owner: owner(client, user),
            created: 1_000,
            // (Redis drops a key whose expiry has passed: far in the future.)
            expires: 4_000_000_000,
            background: false,
            reserved: 42,
            settled: false,
        }
    }

    #[test]
    fn visibility_table() {
        let alice = record("app", Some("alice"));
        let bare = record("app", None);
        for (rec, caller, now, want) in [
            (&alice, owner("app", Some("alice")), 1_500, true),
            (&alice, owner("app", Some("bob")), 1_500, false),
            (&alice, owner("app", None), 1_500, false),
            (&alice, owner("other", Some("alice")), 1_500, false),
            (&bare, owner("app", None), 1_500, true),
            (&bare, owner("app", Some("alice")), 1_500, false),
            (&bare, owner("other", None), 1_500, false),
            // Expired: gone, for its owner too.
            (&alice, owner("app", Some("alice")), 4_000_000_000, false),
            (&bare, owner("app", None), 4_000_000_001, false),
        ] {
            assert_eq!(visible(rec, &caller, now), want, "{rec:?} {caller:?} {now}");
        }
    }

    #[test]
    fn fields_round_trip() {
        for mut r in [record("a:b{c}", Some("u")), record("a", None)] {
            r.background = r.owner.user.is_some();
            r.settled = r.owner.user.is_some();
            r.deployment = r.owner.user.clone();
            let f: HashMap<String, String> = to_fields(&r)
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            assert_eq!(from_fields(&f), Some(r));
        }
        assert_eq!(from_fields(&HashMap::new()), None);
    }

    fn no_errors() -> Arc<dyn Fn() + Send + Sync> {
        Arc::new(|| {})
    }

    async fn scenario(store: &ObjectStore) {
        assert_eq!(store.get("resp_1").await, Ok(None));
        store
            .put("resp_1", record("app", Some("alice")), 1_000)
            .await;
        let got = store.get("resp_1").await.unwrap().unwrap();
        assert_eq!(got, record("app", Some("alice")));
        assert!(store.settle("resp_1").await, "first settle wins");
        assert!(!store.settle("resp_1").await, "once per response");
        assert!(store.get("resp_1").await.unwrap().unwrap().settled);
        assert!(!store.settle("resp_unknown").await);
        store.delete("resp_1").await;
        assert_eq!(store.get("resp_1").await, Ok(None));
        assert!(
            !store.settle("resp_1").await,
            "a deleted record is not recreated"
        );
        assert_eq!(store.get("resp_1").await, Ok(None));
    }

    #[tokio::test]
    async fn memory_store() {
        let s = Store::open(StoreKind::Memory, &ConnOptions::default()).unwrap();
        scenario(&ObjectStore::new(&s, no_errors())).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_store_is_shared_and_expires_with_the_record() {
        let server = crate::limits::tests::RedisServer::start();
        let kind = StoreKind::Redis { url: server.url() };
        let a = Store::open(kind.clone(), &ConnOptions::default()).unwrap();
        let b = Store::open(kind, &ConnOptions::default()).unwrap();
        let (a, b) = (
            ObjectStore::new(&a, no_errors()),
            ObjectStore::new(&b, no_errors()),
        );
        scenario(&a).await;
        // Two gateways on one Redis agree: written by one, seen, settled and deleted by the
        // other.
        a.put("resp_2", record("app", None), 1_000).await;
        assert_eq!(b.get("resp_2").await.unwrap(), Some(record("app", None)));
        assert!(b.settle("resp_2").await);
        assert!(!a.settle("resp_2").await);
        b.delete("resp_2").await;
        assert_eq!(a.get("resp_2").await, Ok(None));
        // Expiry is Redis' own: a record whose time has passed is gone.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let mut r = record("app", None);
        r.expires = now + 1;
        a.put("resp_3", r, now).await;
        assert!(b.get("resp_3").await.unwrap().is_some());
        tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
        assert_eq!(b.get("resp_3").await, Ok(None));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_away_keeps_new_records_locally_and_refuses_unknown_ones() {
        let errors = Arc::new(AtomicU64::new(0));
        let e = errors.clone();
        // Nothing listens on port 1.
        let s = Store::open(
            StoreKind::Redis {
                url: "redis://127.0.0.1:1/".into(),
            },
            &ConnOptions::default(),
        )
        .unwrap();
        let store = ObjectStore::new(
            &s,
            Arc::new(move || {
                e.fetch_add(1, Ordering::Relaxed);
            }),
        );
        assert_eq!(store.get("resp_x").await, Err(StoreUnavailable));
        store.put("resp_y", record("app", None), 1_000).await;
        assert_eq!(
            store.get("resp_y").await,
            Ok(Some(record("app", None))),
            "a record written while Redis is away is found locally"
        );
        assert!(errors.load(Ordering::Relaxed) >= 3);
    }
}
