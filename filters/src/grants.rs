//! Claims that grant (`identity.oidc[].grants`, an extension of SPEC §5): a provider's
//! grants narrow what a token of that provider may do to the client's `allow` intersected
//! with the union of the grants its claims match. A token matching none is refused (403
//! `Forbidden`); a provider without `grants` leaves `allow` as it is.
//!
//! A grant matches when the token's `claim` holds `value`: an array claim (Entra's `roles`,
//! `groups`) contains it as a string; a string claim (Entra's `scp`, space-separated
//! delegated scopes) has it as one of its space-separated words.

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::authz::AllowSet;
use crate::{FilterError, Operation};

/// At most this many grants per provider (a token's matches are a 64-bit set).
pub const MAX_GRANTS: usize = 64;

/// A deployment pattern of a grant: `*`, a name, or a prefix ending in `*` (`gpt-4o*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    All,
    Exact(String),
    Prefix(String),
}

impl Pattern {
    /// Reads a pattern; `*` is allowed alone or at the end only.
    pub fn parse(s: &str) -> Result<Pattern, String> {
        if s == "*" {
            return Ok(Pattern::All);
        }
        match s.find('*') {
            None if s.is_empty() => Err("must not be empty".into()),
            None => Ok(Pattern::Exact(s.to_string())),
            Some(i) if i == s.len() - 1 => Ok(Pattern::Prefix(s[..i].to_string())),
            Some(_) => Err(format!(
                "`{s}`: `*` may only stand alone or end a name (`gpt-4o*`)"
            )),
        }
    }

    pub fn matches(&self, deployment: &str) -> bool {
        match self {
            Pattern::All => true,
            Pattern::Exact(n) => n == deployment,
            Pattern::Prefix(p) => deployment.starts_with(p.as_str()),
        }
    }
}

/// One grant: a claim value and what it permits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub claim: String,
    pub value: String,
    pub operations: AllowSet<Operation>,
    pub deployments: Vec<Pattern>,
}

impl Grant {
    fn permits(&self, operation: Operation, deployment: Option<&str>) -> bool {
        self.operations.contains(&operation)
            && deployment.is_none_or(|d| self.deployments.iter().any(|p| p.matches(d)))
    }
}

/// A provider's grants (at most [`MAX_GRANTS`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Grants {
    pub list: Vec<Grant>,
}

/// Whether a claim value holds `wanted`: an array with it as one of its strings, or a string
/// with it as one of its space-separated words.
fn holds(claim: &Value, wanted: &str) -> bool {
    match claim {
        Value::Array(items) => items.iter().any(|v| v.as_str() == Some(wanted)),
        Value::String(s) => s.split_ascii_whitespace().any(|w| w == wanted),
        _ => false,
    }
}

impl Grants {
    /// The grants a token's claims match, as a set of indexes.
    pub fn matching(&self, claims: &Map<String, Value>) -> u64 {
        let mut set = 0u64;
        for (i, g) in self.list.iter().enumerate().take(MAX_GRANTS) {
            if claims.get(&g.claim).is_some_and(|c| holds(c, &g.value)) {
                set |= 1 << i;
            }
        }
        set
    }
}

/// What a token's claims were granted: the matched grants of its provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Granted {
    grants: Arc<Grants>,
    matched: u64,
}

impl Granted {
    /// `None` when the claims match no grant (the token is refused).
    pub fn new(grants: Arc<Grants>, claims: &Map<String, Value>) -> Option<Granted> {
        let matched = grants.matching(claims);
        (matched != 0).then_some(Granted { grants, matched })
    }

    fn each(&self) -> impl Iterator<Item = &Grant> {
        self.grants
            .list
            .iter()
            .enumerate()
            .filter(|(i, _)| *i < MAX_GRANTS && self.matched & (1 << i) != 0)
            .map(|(_, g)| g)
    }

    /// The pure decision, on top of the client's `allow`: some matched grant must permit the
    /// operation on the deployment. Refused as `OperationNotAllowed` when no matched grant
    /// has the operation, else `DeploymentNotAllowed`.
    pub fn check(&self, operation: Operation, deployment: Option<&str>) -> Result<(), FilterError> {
        if self.each().any(|g| g.permits(operation, deployment)) {
            return Ok(());
        }
        if self.each().any(|g| g.operations.contains(&operation)) {
            Err(FilterError::DeploymentNotAllowed)
        } else {
            Err(FilterError::OperationNotAllowed)
        }
    }

    /// Whether some matched grant names this deployment (for `models.read` lists).
    pub fn shows(&self, deployment: &str) -> bool {
        self.each()
            .any(|g| g.deployments.iter().any(|p| p.matches(deployment)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn grant(claim: &str, value: &str, ops: &[Operation], deps: &[&str]) -> Grant {
        Grant {
            claim: claim.into(),
            value: value.into(),
            operations: if ops.is_empty() {
                AllowSet::All
            } else {
                AllowSet::Only(ops.iter().copied().collect::<HashSet<_>>())
            },
            deployments: deps.iter().map(|d| Pattern::parse(d).unwrap()).collect(),
        }
    }

    fn entra() -> Arc<Grants> {
        use Operation::*;
        Arc::new(Grants {
            list: vec![
                // App roles (client-credentials tokens): `roles` is an array.
                grant(
                    "roles",
                    "AOAI.Chat",
                    &[ChatCompletions, Responses],
                    &["gpt-4o*"],
                ),
                grant(
                    "roles",
                    "AOAI.Embed",
                    &[Embeddings],
                    &["text-embedding-3-large"],
                ),
                // Delegated scopes (user tokens): `scp` is one space-separated string.
                grant(
                    "scp",
                    "Chat.Read",
                    &[ChatCompletions, ModelsRead],
                    &["gpt-4o-mini"],
                ),
                grant("roles", "AOAI.Admin", &[], &["*"]),
            ],
        })
    }

    fn claims(json: &str) -> Map<String, Value> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn matching_claims() {
        let g = entra();
        for (json, want) in [
            (r#"{"roles": ["AOAI.Chat"]}"#, 0b0001),
            (r#"{"roles": ["x", "AOAI.Embed", "AOAI.Chat"]}"#, 0b0011),
            (r#"{"scp": "User.Read Chat.Read"}"#, 0b0100),
            (r#"{"scp": "Chat.ReadWrite"}"#, 0),
            // A string claim is split into words; an array is not.
            (r#"{"roles": "AOAI.Admin"}"#, 0b1000),
            (r#"{"roles": ["AOAI.Admin AOAI.Chat"]}"#, 0),
            // Case matters; other JSON types hold nothing.
            (r#"{"roles": ["aoai.chat"]}"#, 0),
            (r#"{"roles": [true], "scp": 5}"#, 0),
            (r#"{}"#, 0),
        ] {
            assert_eq!(g.matching(&claims(json)), want, "{json}");
        }
        assert_eq!(Granted::new(g.clone(), &claims("{}")), None);
    }

    #[test]
    fn decisions() {
        use Operation::*;
        let g = entra();
        let t = |json: &str| Granted::new(g.clone(), &claims(json)).unwrap();
        let chat = t(r#"{"roles": ["AOAI.Chat"]}"#);
        let both = t(r#"{"roles": ["AOAI.Chat", "AOAI.Embed"]}"#);
        let scp = t(r#"{"scp": "openid Chat.Read"}"#);
        let admin = t(r#"{"roles": ["AOAI.Admin"]}"#);
        let not_dep = Err(FilterError::DeploymentNotAllowed);
        let not_op = Err(FilterError::OperationNotAllowed);
        for (who, op, dep, want) in [
            (&chat, ChatCompletions, Some("gpt-4o"), Ok(())),
            (&chat, Responses, Some("gpt-4o-mini"), Ok(())),
            (&chat, ChatCompletions, Some("gpt-35"), not_dep.clone()),
            (
                &chat,
                Embeddings,
                Some("text-embedding-3-large"),
                not_op.clone(),
            ),
            (&chat, ModelsRead, None, not_op.clone()),
            // The union of what the matched grants permit, pair by pair.
            (&both, Embeddings, Some("text-embedding-3-large"), Ok(())),
            (&both, Embeddings, Some("gpt-4o"), not_dep.clone()),
            (
                &both,
                ChatCompletions,
                Some("text-embedding-3-large"),
                not_dep.clone(),
            ),
            (&scp, ChatCompletions, Some("gpt-4o-mini"), Ok(())),
            (&scp, ChatCompletions, Some("gpt-4o"), not_dep.clone()),
            (&scp, ModelsRead, None, Ok(())),
            (&admin, Files, Some("anything"), Ok(())),
        ] {
            assert_eq!(who.check(op, dep), want, "{op:?} {dep:?}");
        }
        assert!(chat.shows("gpt-4o-mini") && !chat.shows("text-embedding-3-large"));
        assert!(scp.shows("gpt-4o-mini") && !scp.shows("gpt-4o"));
    }

    #[test]
    fn patterns() {
        assert_eq!(Pattern::parse("*"), Ok(Pattern::All));
        assert_eq!(
            Pattern::parse("gpt-4o*"),
            Ok(Pattern::Prefix("gpt-4o".into()))
        );
        assert_eq!(
            Pattern::parse("gpt-4o"),
            Ok(Pattern::Exact("gpt-4o".into()))
        );
        assert!(Pattern::parse("gpt-*-mini").is_err());
        assert!(Pattern::parse("**").is_err());
        assert!(Pattern::parse("").is_err());
        let p = Pattern::parse("gpt-4o*").unwrap();
        assert!(p.matches("gpt-4o") && p.matches("gpt-4o-mini") && !p.matches("gpt-4"));
    }
}
