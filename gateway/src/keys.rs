//! `aoai-gateway keys new|hash`: issuing API keys and hashing them for the configuration.

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
}
