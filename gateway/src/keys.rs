//! `aoai-gateway keys new|hash|revoke|unrevoke|revoked`: issuing API keys, hashing them for
//! the configuration, and revoking them across the fleet (SPEC §14).

use base64::Engine;
use filters::apikey::{hash_key, KEY_PREFIX};
use rand::RngCore;

/// A new key: `agw_` + 43 base64url characters (256 random bits).
pub fn new_key() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!(
        "{KEY_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// What `keys new` prints: the key, then the YAML entry to paste under a client.
pub fn new_key_text(client: Option<&str>) -> String {
    let key = new_key();
    let hash = hash_key(&key);
    let mut out =
        format!("key: {key}\n\n# give the key to the client; put this in the configuration:\n");
    match client {
        Some(id) => out.push_str(&format!(
            "clients:\n  - id: {id}\n    api_keys:\n      - sha256: {hash}\n"
        )),
        None => out.push_str(&format!("api_keys:\n  - sha256: {hash}\n")),
    }
    out
}

/// Which revocation command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revocation {
    Revoke,
    Unrevoke,
    List,
}

/// The Redis URL revocations are kept at, or why there is none: with `state.store: memory`
/// no other process can be reached, so the commands refuse rather than record nothing.
pub fn revocation_url(cfg: &crate::config::runtime::Config) -> Result<String, String> {
    use crate::config::file::StoreKindFile;
    match (&cfg.state.store, &cfg.state.redis_url) {
        (StoreKindFile::Redis, Some(url)) => Ok(url.clone()),
        _ => Err(
            "revocations are kept in the shared state store and need `state.store: redis` \
             (every gateway of a fleet reads them there); with `state.store: memory`, remove \
             the key from the configuration and send SIGHUP instead"
                .to_string(),
        ),
    }
}

/// The clients whose configured keys have this key id.
pub fn owners(cfg: &crate::config::runtime::Config, key_id: &str) -> Vec<String> {
    let mut out: Vec<String> = cfg
        .keys
        .records()
        .filter(|r| &*r.key_id == key_id)
        .map(|r| cfg.clients[r.client].id.to_string())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Runs `keys revoke|unrevoke|revoked` against the configuration's state store; the text to
/// print, or the error.
pub fn revocation(
    cfg: &crate::config::runtime::Config,
    what: Revocation,
    key_id: Option<&str>,
) -> Result<String, String> {
    use filters::fleet::{cli, parse_key_id};
    let url = revocation_url(cfg)?;
    let id = match (what, key_id) {
        (Revocation::List, _) => String::new(),
        (_, Some(id)) => parse_key_id(id)?,
        (_, None) => return Err("--key-id is required".into()),
    };
    match what {
        Revocation::Revoke => {
            let owners = owners(cfg, &id);
            if owners.is_empty() {
                return Err(format!(
                    "no key of the configuration has key id {id}: nothing revoked (check the \
                     key_id in the audit log)"
                ));
            }
            let new = cli::revoke(&url, &id, time::OffsetDateTime::now_utc().unix_timestamp())?;
            Ok(format!(
                "{} key {id} (client {}): every gateway on this Redis refuses it within a second\n",
                if new { "revoked" } else { "already revoked:" },
                owners.join(", ")
            ))
        }
        Revocation::Unrevoke => {
            let was = cli::unrevoke(&url, &id)?;
            Ok(if was {
                format!("key {id} is no longer revoked\n")
            } else {
                format!("key {id} was not revoked\n")
            })
        }
        Revocation::List => {
            let mut out = String::new();
            for (id, at) in cli::list(&url)? {
                let at = at
                    .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
                    .and_then(|t| {
                        t.format(&time::format_description::well_known::Rfc3339)
                            .ok()
                    })
                    .unwrap_or_else(|| "-".into());
                let owners = owners(cfg, &id);
                let owners = if owners.is_empty() {
                    "-".to_string()
                } else {
                    owners.join(",")
                };
                out.push_str(&format!("{id}  {at}  {owners}\n"));
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_long_random_and_url_safe() {
        let a = new_key();
        let b = new_key();
        assert_ne!(a, b);
        assert!(a.starts_with("agw_"));
        let body = &a[4..];
        assert_eq!(body.len(), 43);
        assert!(body
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
    }

    #[test]
    fn printed_entry_has_the_hash_of_the_key() {
        let text = new_key_text(Some("bot"));
        let key = text.lines().next().unwrap().strip_prefix("key: ").unwrap();
        assert!(text.contains(&format!("sha256: {}", hash_key(key))));
        assert!(text.contains("- id: bot"));
    }

    #[test]
    fn revocations_need_redis_and_a_configured_key_id() {
        let yaml = |store: &str| {
            format!(
                "\
server:
  listeners: [{{address: 127.0.0.1:8080}}]
state: {store}
clients:
  - id: bot
    api_keys: [{{sha256: {}}}]
    allow: {{deployments: ['*'], operations: ['*']}}
deployments:
  gpt-4o: [{{backend: b}}]
backends:
  - {{name: b, url: 'http://127.0.0.1:1', credential: api_key, api_key: k}}
",
                hash_key("agw_x")
            )
        };
        let id = &hash_key("agw_x")[..8];
        let memory = crate::config::load_str(&yaml("{store: memory}")).unwrap();
        let e = revocation(&memory, Revocation::Revoke, Some(id)).unwrap_err();
        assert!(e.contains("state.store: redis"), "{e}");
        assert!(revocation(&memory, Revocation::List, None).is_err());
        // Redis on a closed port: the key id is checked before any connection is tried.
        let redis =
            crate::config::load_str(&yaml("{store: redis, redis_url: 'redis://127.0.0.1:1/0'}"))
                .unwrap();
        assert_eq!(owners(&redis, id), ["bot"]);
        let e = revocation(&redis, Revocation::Revoke, Some("0000000g")).unwrap_err();
        assert!(e.contains("8 hex"), "{e}");
        let e = revocation(&redis, Revocation::Revoke, Some("00000000")).unwrap_err();
        assert!(e.contains("no key of the configuration"), "{e}");
        let e = revocation(&redis, Revocation::Revoke, Some(id)).unwrap_err();
        assert!(e.contains("cannot reach Redis"), "{e}");
    }
}
