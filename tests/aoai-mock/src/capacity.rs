//! The capacity a resource announces (`x-ratelimit-remaining-tokens` /
//! `x-ratelimit-remaining-requests`) per deployment: the command line's defaults, replaced
//! at run time by `PUT /_mock/capacity` (per deployment, or `"*"` for every deployment).

use std::collections::HashMap;
use std::sync::RwLock;

use serde::Deserialize;

/// What one deployment announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Announce {
    pub remaining_tokens: u64,
    pub remaining_requests: u64,
}

/// The body of `PUT /_mock/capacity`: deployment (or `"*"`) → announce; `null` removes it.
pub type Patch = HashMap<String, Option<Announce>>;

pub struct Capacity {
    default: Announce,
    set: RwLock<HashMap<String, Announce>>,
}

impl Capacity {
    pub fn new(default: Announce) -> Capacity {
        Capacity {
            default,
            set: RwLock::new(HashMap::new()),
        }
    }

    /// What `deployment` announces: its own setting, else `"*"`'s, else the default.
    pub fn announce(&self, deployment: Option<&str>) -> Announce {
        let set = self.set.read().unwrap_or_else(|e| e.into_inner());
        if set.is_empty() {
            return self.default;
        }
        deployment
            .and_then(|d| set.get(d))
            .or_else(|| set.get("*"))
            .copied()
            .unwrap_or(self.default)
    }

    pub fn apply(&self, patch: Patch) {
        let mut set = self.set.write().unwrap_or_else(|e| e.into_inner());
        for (d, a) in patch {
            match a {
                Some(a) => set.insert(d, a),
                None => set.remove(&d),
            };
        }
    }

    pub fn clear(&self) {
        self.set.write().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// The settings as JSON (`{"*": …, "gpt-4o": …}`, plus `"default"`).
    pub fn to_json(&self) -> serde_json::Value {
        let set = self.set.read().unwrap_or_else(|e| e.into_inner());
        let one = |a: &Announce| serde_json::json!({"remaining_tokens": a.remaining_tokens, "remaining_requests": a.remaining_requests});
        let mut m = serde_json::Map::new();
        m.insert("default".into(), one(&self.default));
        for (d, a) in set.iter() {
            m.insert(d.clone(), one(a));
        }
        serde_json::Value::Object(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_deployment_then_star_then_default() {
        let a = |t, r| Announce {
            remaining_tokens: t,
            remaining_requests: r,
        };
        let c = Capacity::new(a(999_000, 9_999));
        assert_eq!(c.announce(Some("ptu")), a(999_000, 9_999));
        c.apply(Patch::from([("ptu".to_string(), Some(a(10, 5)))]));
        assert_eq!(c.announce(Some("ptu")), a(10, 5));
        assert_eq!(c.announce(Some("other")), a(999_000, 9_999));
        c.apply(Patch::from([("*".to_string(), Some(a(1, 1)))]));
        assert_eq!(c.announce(Some("other")), a(1, 1));
        assert_eq!(c.announce(None), a(1, 1));
        c.apply(Patch::from([("ptu".to_string(), None)]));
        assert_eq!(c.announce(Some("ptu")), a(1, 1));
        c.clear();
        assert_eq!(c.announce(Some("ptu")), a(999_000, 9_999));
    }
}
