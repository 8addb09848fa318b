//! `clients`: ids, the credentials that identify each (API key hashes, provider tokens,
//! certificates) with their lookup tables, allow lists and limits; then one client template
//! per provider that accepts unlisted applications (`identity.oidc[i].unlisted_clients`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use filters::apikey::{parse_hash, KeyRecord, KeyStore};
use filters::cert::{normalize_fingerprint, CertMap};
use filters::identity::TokenMap;

use super::allow::policy;
use super::limits::client_limits;
use crate::config::file::{ClientFile, MemberFile, OidcFile};
use crate::config::load::Errors;
use crate::config::runtime::{Client, Listener};

/// The clients and the tables that map a credential to a client index.
pub(super) struct Clients {
    /// Configured clients first, then the unlisted-clients templates.
    pub clients: Vec<Client>,
    pub keys: KeyStore,
    pub certs: CertMap,
    pub tokens: TokenMap,
}

/// `oidc` are the file's providers (token references and unlisted templates); `deployments`
/// the file's, for the references of allow lists and limits.
pub(super) fn clients(
    file: &[ClientFile],
    oidc: &[OidcFile],
    deployments: &BTreeMap<String, Vec<MemberFile>>,
    errs: &mut Errors,
) -> Clients {
    let providers: HashSet<&str> = oidc.iter().map(|p| p.name.as_str()).collect();
    let mut out = Clients {
        clients: Vec::new(),
        keys: KeyStore::default(),
        certs: CertMap::default(),
        tokens: TokenMap::default(),
    };
    let mut ids = HashSet::new();
    let mut key_ids = HashMap::new();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    for (ci, c) in file.iter().enumerate() {
        let path = format!("clients[{ci}]");
        check_id(c, &path, &mut ids, errs);
        let key_expiries = api_keys(c, ci, &path, now, &mut out.keys, &mut key_ids, errs);
        tokens(c, ci, &path, &providers, &mut out.tokens, errs);
        certificates(c, ci, &path, &mut out.certs, errs);
        out.clients.push(Client {
            id: Arc::from(c.id.as_str()),
            policy: policy(&c.allow, &format!("{path}.allow"), deployments, errs),
            limits: client_limits(&c.limits, &format!("{path}.limits"), deployments, errs),
            key_expiries,
        });
    }
    unlisted(oidc, deployments, &mut out, errs);
    out
}

fn check_id(c: &ClientFile, path: &str, ids: &mut HashSet<String>, errs: &mut Errors) {
    if c.id.is_empty() || c.id.starts_with("unlisted:") || c.id == "anonymous" {
        errs.at(
            format!("{path}.id"),
            "must be a name (not empty, `anonymous` or `unlisted:…`)",
        );
    }
    if !ids.insert(c.id.clone()) {
        errs.at(
            format!("{path}.id"),
            format!("duplicate client id `{}`", c.id),
        );
    }
    if c.api_keys.is_empty() && c.tokens.is_empty() && c.certificates.is_empty() {
        errs.at(path, "a client needs api_keys, tokens or certificates");
    }
}

/// Adds client `ci`'s key hashes to `keys`; returns (key id, expiry) of those that expire.
fn api_keys(
    c: &ClientFile,
    ci: usize,
    path: &str,
    now: i64,
    keys: &mut KeyStore,
    key_ids: &mut HashMap<String, String>,
    errs: &mut Errors,
) -> Vec<(String, i64)> {
    let mut key_expiries = Vec::new();
    for (ki, k) in c.api_keys.iter().enumerate() {
        let kp = format!("{path}.api_keys[{ki}]");
        let Some(hash) = parse_hash(&k.sha256) else {
            errs.at(
                format!("{kp}.sha256"),
                "must be 64 hex characters (the SHA-256 of the key; see `aoai-gateway keys hash`)",
            );
            continue;
        };
        let expires_at = match &k.expires {
            None => None,
            Some(s) => match unix_of(s) {
                Ok(t) => Some(t),
                Err(e) => {
                    errs.at(format!("{kp}.expires"), e);
                    None
                }
            },
        };
        let key_id = k.sha256.trim().to_ascii_lowercase()[..8].to_string();
        if let Some(t) = expires_at {
            key_expiries.push((key_id.clone(), t));
            if t <= now {
                log::warn!("{kp}: key {key_id} of client {} has expired", c.id);
            }
        }
        let record = KeyRecord {
            client: ci,
            expires_at,
            key_id: key_id.as_str().into(),
        };
        if !keys.insert(hash, record) {
            errs.at(format!("{kp}.sha256"), "this key hash is listed twice");
        } else if let Some(first) = key_ids.get(&key_id) {
            // The key id names a key in the audit log, the expiry metric and `keys revoke`:
            // two keys under one id could not be told apart, nor revoked one at a time.
            errs.at(
                format!("{kp}.sha256"),
                format!("shares its key id `{key_id}` (the hash's first 8 hex digits) with {first}: issue another key"),
            );
        } else {
            key_ids.insert(key_id, kp.clone());
        }
    }
    key_expiries
}

fn unix_of(rfc3339: &str) -> Result<i64, String> {
    time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|e| format!("not an RFC 3339 time ({e}), e.g. 2027-06-30T00:00:00Z"))
}

fn tokens(
    c: &ClientFile,
    ci: usize,
    path: &str,
    providers: &HashSet<&str>,
    tokens: &mut TokenMap,
    errs: &mut Errors,
) {
    for (ti, t) in c.tokens.iter().enumerate() {
        if !providers.contains(t.provider.as_str()) {
            errs.at(
                format!("{path}.tokens[{ti}].provider"),
                format!("unknown provider `{}`", t.provider),
            );
        }
        if !tokens.add_listed(&t.provider, &t.client, ci) {
            errs.at(
                format!("{path}.tokens[{ti}]"),
                "this application is listed twice",
            );
        }
    }
}

fn certificates(c: &ClientFile, ci: usize, path: &str, certs: &mut CertMap, errs: &mut Errors) {
    for (xi, x) in c.certificates.iter().enumerate() {
        let xp = format!("{path}.certificates[{xi}]");
        match (&x.sha256, &x.subject) {
            (Some(fp), None) => {
                if normalize_fingerprint(fp).is_none() {
                    errs.at(
                        format!("{xp}.sha256"),
                        "must be a SHA-256 fingerprint (64 hex digits, colons allowed)",
                    );
                } else if !certs.add_fingerprint(fp, ci) {
                    errs.at(format!("{xp}.sha256"), "this fingerprint is listed twice");
                }
            }
            (None, Some(s)) => {
                if !certs.add_subject(s, ci) {
                    errs.at(format!("{xp}.subject"), "this subject is listed twice");
                }
            }
            _ => errs.at(&xp, "give exactly one of sha256 or subject"),
        }
    }
}

/// One `unlisted:<provider>` client per provider with `unlisted_clients`, after the listed.
fn unlisted(
    oidc: &[OidcFile],
    deployments: &BTreeMap<String, Vec<MemberFile>>,
    out: &mut Clients,
    errs: &mut Errors,
) {
    for (i, p) in oidc.iter().enumerate() {
        if let Some(u) = &p.unlisted_clients {
            let path = format!("identity.oidc[{i}].unlisted_clients");
            out.tokens
                .unlisted
                .insert(Arc::from(p.name.as_str()), out.clients.len());
            out.clients.push(Client {
                id: Arc::from(format!("unlisted:{}", p.name).as_str()),
                policy: policy(&u.allow, &format!("{path}.allow"), deployments, errs),
                limits: client_limits(&u.limits, &format!("{path}.limits"), deployments, errs),
                key_expiries: Vec::new(),
            });
        }
    }
}

/// Certificates identify no one unless some listener asks for them: say so (not an error).
pub(super) fn warn_if_certificates_unused(clients: &[ClientFile], listeners: &[Listener]) {
    let mtls = listeners.iter().any(|l| {
        l.tls
            .as_ref()
            .is_some_and(|t| t.client_certificates.is_some())
    });
    if !mtls && clients.iter().any(|c| !c.certificates.is_empty()) {
        log::warn!("clients list certificates but no listener asks for client certificates");
    }
}

#[cfg(test)]
mod tests {
    use super::super::table::{assert_cases, run};
    use super::*;
    use filters::apikey::hash_key;

    const PROVIDERS: &str = "
- {name: entra, issuer: 'https://e', audiences: [x]}
- name: partner
  issuer: 'https://p'
  audiences: [x]
  unlisted_clients:
    allow: {deployments: [d, nope], operations: [embeddings, bogus]}
    limits: {tokens_per_day: 0, deployments: {e: {}}}
";

    fn check(file: &[ClientFile], errs: &mut Errors) -> Clients {
        let oidc: Vec<OidcFile> = serde_norway::from_str(PROVIDERS).unwrap();
        let deployments = BTreeMap::from([("d".to_string(), Vec::new())]);
        clients(file, &oidc, &deployments, errs)
    }

    /// The errors of the unlisted-clients template in [`PROVIDERS`], always last.
    const UNLISTED: &[(&str, &str)] = &[
        (
            "identity.oidc[1].unlisted_clients.allow.deployments[1]",
            "unknown deployment `nope`",
        ),
        (
            "identity.oidc[1].unlisted_clients.allow.operations[1]",
            "unknown operation `bogus` (one of: chat.completions, completions, embeddings, responses, images, audio, models.read, realtime, files, batches, or \"*\")",
        ),
        (
            "identity.oidc[1].unlisted_clients.limits.tokens_per_day",
            "must be at least 1 (omit it for no limit)",
        ),
        (
            "identity.oidc[1].unlisted_clients.limits.deployments.e",
            "unknown deployment `e`",
        ),
    ];

    fn with_unlisted(errors: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
        errors.iter().chain(UNLISTED).copied().collect()
    }

    #[test]
    fn errors_have_their_paths() {
        const ALLOW: &str = "allow: {deployments: [d], operations: ['*']}";
        let h1 = "a".repeat(64);
        let h2 = "B".repeat(64);
        let colons = ["AA"; 32].join(":");
        let inputs = [
            format!("- {{id: '', tokens: [{{provider: entra, client: c}}], {ALLOW}}}"),
            format!("- {{id: anonymous, api_keys: [{{sha256: {h1}}}], {ALLOW}}}\n- {{id: 'unlisted:entra', api_keys: [{{sha256: {h2}}}], {ALLOW}}}"),
            format!("- {{id: a, api_keys: [{{sha256: {h1}}}], {ALLOW}}}\n- {{id: a, {ALLOW}}}"),
            format!("- {{id: a, api_keys: [{{sha256: 'abc'}}, {{sha256: {h1}, expires: 'next week'}}, {{sha256: ' {} '}}], {ALLOW}}}", h1.to_uppercase()),
            format!("- {{id: a, tokens: [{{provider: entra, client: c}}, {{provider: okta, client: c}}, {{provider: entra, client: c}}], {ALLOW}}}"),
            format!("- {{id: a, certificates: [{{sha256: '{colons}'}}, {{sha256: {}}}, {{sha256: 'AA:BB'}}], {ALLOW}}}", "aa".repeat(32)),
            format!("- {{id: a, certificates: [{{subject: CN=x}}, {{subject: CN=x}}, {{}}, {{sha256: {h1}, subject: CN=y}}], {ALLOW}}}"),
            "- {id: a, tokens: [{provider: entra, client: c}], allow: {deployments: [e], operations: [fine_tuning]}, limits: {requests_per_minute: 0}}".to_string(),
        ];
        let expected: [&[(&str, &str)]; 8] = [
            &[("clients[0].id", "must be a name (not empty, `anonymous` or `unlisted:…`)")],
            &[
                ("clients[0].id", "must be a name (not empty, `anonymous` or `unlisted:…`)"),
                ("clients[1].id", "must be a name (not empty, `anonymous` or `unlisted:…`)"),
            ],
            &[
                ("clients[1].id", "duplicate client id `a`"),
                ("clients[1]", "a client needs api_keys, tokens or certificates"),
            ],
            &[
                ("clients[0].api_keys[0].sha256", "must be 64 hex characters (the SHA-256 of the key; see `aoai-gateway keys hash`)"),
                ("clients[0].api_keys[1].expires", "not an RFC 3339 time (the 'year' component could not be parsed), e.g. 2027-06-30T00:00:00Z"),
                ("clients[0].api_keys[2].sha256", "this key hash is listed twice"),
            ],
            &[
                ("clients[0].tokens[1].provider", "unknown provider `okta`"),
                ("clients[0].tokens[2]", "this application is listed twice"),
            ],
            &[
                ("clients[0].certificates[1].sha256", "this fingerprint is listed twice"),
                ("clients[0].certificates[2].sha256", "must be a SHA-256 fingerprint (64 hex digits, colons allowed)"),
            ],
            &[
                ("clients[0].certificates[1].subject", "this subject is listed twice"),
                ("clients[0].certificates[2]", "give exactly one of sha256 or subject"),
                ("clients[0].certificates[3]", "give exactly one of sha256 or subject"),
            ],
            &[
                ("clients[0].allow.deployments[0]", "unknown deployment `e`"),
                ("clients[0].allow.operations[0]", "unknown operation `fine_tuning` (one of: chat.completions, completions, embeddings, responses, images, audio, models.read, realtime, files, batches, or \"*\")"),
                ("clients[0].limits.requests_per_minute", "must be at least 1 (omit it for no limit)"),
            ],
        ];
        for (input, want) in inputs.iter().zip(expected) {
            let want = with_unlisted(want);
            assert_cases(
                &[(input.as_str(), want.as_slice())],
                |f: &Vec<_>, e: &mut _| check(f, e),
            );
        }
    }

    #[test]
    fn two_keys_under_one_key_id_are_refused_across_clients() {
        let first = "a".repeat(64);
        let same_id = format!("{}{}", "A".repeat(8), "b".repeat(56));
        let other_id = format!("{}{}", "a".repeat(7), "c".repeat(57));
        let yaml = format!(
            "
- {{id: a, api_keys: [{{sha256: {first}}}, {{sha256: {other_id}}}], allow: {{deployments: ['*'], operations: ['*']}}}}
- {{id: b, api_keys: [{{sha256: {same_id}}}], allow: {{deployments: ['*'], operations: ['*']}}}}
"
        );
        let want: &[(&str, &str)] = &[(
            "clients[1].api_keys[0].sha256",
            "shares its key id `aaaaaaaa` (the hash's first 8 hex digits) with clients[0].api_keys[0]: issue another key",
        )];
        let deployments = BTreeMap::from([("d".to_string(), Vec::new())]);
        assert_cases(&[(yaml.as_str(), want)], |f: &Vec<_>, e: &mut _| {
            clients(f, &[], &deployments, e)
        });
    }

    #[test]
    fn tables_point_at_client_indexes() {
        let yaml = format!(
            "
- id: a
  api_keys: [{{sha256: {}}}, {{sha256: {}, expires: 2001-01-01T00:00:00Z}}]
  allow: {{deployments: ['*'], operations: ['*']}}
- id: b
  tokens: [{{provider: entra, client: app}}]
  allow: {{deployments: ['*'], operations: ['*']}}
",
            hash_key("key-a"),
            hash_key("key-b"),
        );
        let (c, _) = run(&yaml, |f: &Vec<_>, e: &mut _| check(f, e));
        let ids: Vec<&str> = c.clients.iter().map(|c| &*c.id).collect();
        assert_eq!(ids, ["a", "b", "unlisted:partner"]);
        assert_eq!(c.tokens.unlisted[&Arc::from("partner")], 2);
        assert_eq!(c.keys.len(), 2);
        assert_eq!(c.keys.lookup("key-a", 0).unwrap().client, 0);
        let b = &c.clients[0].key_expiries;
        assert_eq!(b, &[(hash_key("key-b")[..8].to_string(), 978307200)]);
        assert!(c.clients[1].key_expiries.is_empty());
    }

    #[test]
    fn unix_times() {
        assert_eq!(unix_of("1970-01-01T00:01:00Z"), Ok(60));
        assert_eq!(unix_of("2027-06-30T02:00:00+02:00"), Ok(1_814_313_600));
        assert!(unix_of("2027-06-30").is_err());
    }
}
