//! `backends`: names (unique; the index map resolves deployment members), base URLs,
//! credentials and CA files.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::file::{BackendFile, CredentialKind};
use crate::config::load::Errors;
use crate::config::runtime::{Backend, Credential};

/// The backends in file order, and each name's index (the last one for a duplicated name).
pub(super) fn backends(
    file: &[BackendFile],
    errs: &mut Errors,
) -> (Vec<Backend>, HashMap<String, usize>) {
    let mut backends = Vec::new();
    let mut index = HashMap::new();
    for (i, b) in file.iter().enumerate() {
        let path = format!("backends[{i}]");
        if index.insert(b.name.clone(), i).is_some() {
            errs.at(
                format!("{path}.name"),
                format!("duplicate backend name `{}`", b.name),
            );
        }
        backends.push(backend(b, &path, errs));
    }
    (backends, index)
}

fn backend(b: &BackendFile, path: &str, errs: &mut Errors) -> Backend {
    let (tls, host, port) = match parse_backend_url(&b.url) {
        Ok(v) => v,
        Err(e) => {
            errs.at(format!("{path}.url"), format!("`{}` {e}", b.url));
            (true, String::new(), 443)
        }
    };
    let credential = credential(b, path, errs);
    if let Some(ca) = &b.ca_file {
        if std::fs::metadata(ca).is_err() {
            errs.at(format!("{path}.ca_file"), format!("cannot read {ca}"));
        }
    }
    let window = b
        .capacity_window_seconds
        .unwrap_or(DEFAULT_CAPACITY_WINDOW_SECONDS);
    if window > MAX_CAPACITY_WINDOW_SECONDS {
        errs.at(
            format!("{path}.capacity_window_seconds"),
            format!("must be at most {MAX_CAPACITY_WINDOW_SECONDS} (0 turns the check off)"),
        );
    }
    let default_port = if tls { 443 } else { 80 };
    // An IPv6 literal goes in brackets in `Host` (RFC 9110 §7.2, RFC 3986 §3.2.2).
    let name = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.clone()
    };
    let host_header = if port == default_port {
        name
    } else {
        format!("{name}:{port}")
    };
    Backend {
        name: Arc::from(b.name.as_str()),
        tls,
        host,
        port,
        host_header,
        region: Arc::from(b.region.as_deref().unwrap_or("")),
        credential,
        ca_file: b.ca_file.clone(),
        capacity_window_ms: window.min(MAX_CAPACITY_WINDOW_SECONDS) * 1000,
    }
}

/// Azure's token quota is per minute: a report says nothing after a minute.
const DEFAULT_CAPACITY_WINDOW_SECONDS: u64 = 60;
const MAX_CAPACITY_WINDOW_SECONDS: u64 = 600;

/// `api_key` is required with `credential: api_key` and refused with the others.
fn credential(b: &BackendFile, path: &str, errs: &mut Errors) -> Credential {
    let credential = match b.credential {
        CredentialKind::ManagedIdentity => Credential::ManagedIdentity,
        CredentialKind::Forward => Credential::Forward,
        CredentialKind::ApiKey => match &b.api_key {
            Some(k) if !k.is_empty() => Credential::ApiKey(k.clone()),
            _ => {
                errs.at(
                    format!("{path}.api_key"),
                    "credential: api_key needs api_key",
                );
                Credential::ApiKey(String::new())
            }
        },
    };
    if b.api_key.is_some() && b.credential != CredentialKind::ApiKey {
        errs.at(
            format!("{path}.api_key"),
            "api_key is only used with credential: api_key",
        );
    }
    credential
}

/// Splits `https://host[:port][/]` into (tls, host, port).
pub fn parse_backend_url(url: &str) -> Result<(bool, String, u16), String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err("must start with https:// (or http:// for a local test backend)".into());
    };
    let hostport = rest.trim_end_matches('/');
    if hostport.contains('/') || hostport.contains('?') || hostport.contains('@') {
        return Err("must be the resource's base URL, without a path".into());
    }
    // An IPv6 literal only in brackets (RFC 3986 §3.2.2): `http://::1` would read as host
    // `:` and port 1.
    let (host, port) = if let Some(after) = hostport.strip_prefix('[') {
        let Some((ip, tail)) = after.split_once(']') else {
            return Err("has an unclosed `[`".into());
        };
        if ip.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("`[{ip}]` is not an IPv6 address"));
        }
        match tail {
            "" => (ip, None),
            _ => match tail.strip_prefix(':') {
                Some(p) => (ip, Some(p)),
                None => return Err(format!("has `{tail}` after `[{ip}]`")),
            },
        }
    } else {
        match hostport.split_once(':') {
            Some((_, p)) if p.contains(':') => {
                return Err("writes an IPv6 address without brackets (http://[::1]:8080)".into())
            }
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    let port = match port {
        Some(p) => p.parse::<u16>().map_err(|_| format!("bad port `{p}`"))?,
        None => {
            if tls {
                443
            } else {
                80
            }
        }
    };
    let host = host.to_string();
    if host.is_empty() {
        return Err("has no host".into());
    }
    Ok((tls, host, port))
}

#[cfg(test)]
mod tests {
    use super::super::table::{assert_cases, run, READABLE};
    use super::*;

    #[test]
    fn backend_urls() {
        assert_eq!(
            parse_backend_url("https://x.openai.azure.com").unwrap(),
            (true, "x.openai.azure.com".to_string(), 443)
        );
        assert_eq!(
            parse_backend_url("http://127.0.0.1:9000/").unwrap(),
            (false, "127.0.0.1".to_string(), 9000)
        );
        assert!(parse_backend_url("ftp://x").is_err());
        assert_eq!(
            parse_backend_url("http://[::1]:9000/").unwrap(),
            (false, "::1".to_string(), 9000)
        );
        assert_eq!(
            parse_backend_url("https://[fd00::5]").unwrap(),
            (true, "fd00::5".to_string(), 443)
        );
        for (url, why) in [
            (
                "http://::1",
                "writes an IPv6 address without brackets (http://[::1]:8080)",
            ),
            (
                "http://::1:9000",
                "writes an IPv6 address without brackets (http://[::1]:8080)",
            ),
            ("http://[::1", "has an unclosed `[`"),
            ("http://[x]:1", "`[x]` is not an IPv6 address"),
            ("http://[::1]9000", "has `9000` after `[::1]`"),
            ("http://[::1]:", "bad port ``"),
            ("http://h:99999", "bad port `99999`"),
            ("http://:80", "has no host"),
        ] {
            assert_eq!(parse_backend_url(url).unwrap_err(), why, "{url}");
        }
        assert!(parse_backend_url("https://x/openai").is_err());
        assert!(parse_backend_url("https://x:notaport").is_err());
    }

    #[test]
    fn errors_have_their_paths() {
        let cases: &[(&str, &[(&str, &str)])] = &[
            (
                "[{name: a, url: 'https://a', credential: forward}, {name: a, url: 'https://b', credential: forward}]",
                &[("backends[1].name", "duplicate backend name `a`")],
            ),
            (
                "[{name: a, url: 'ftp://a', credential: forward}]",
                &[(
                    "backends[0].url",
                    "`ftp://a` must start with https:// (or http:// for a local test backend)",
                )],
            ),
            (
                "[{name: a, url: 'https://a/openai?x=1', credential: forward}]",
                &[(
                    "backends[0].url",
                    "`https://a/openai?x=1` must be the resource's base URL, without a path",
                )],
            ),
            (
                "[{name: a, url: 'https://a:99999', credential: forward}, {name: b, url: 'http://:80', credential: forward}]",
                &[
                    ("backends[0].url", "`https://a:99999` bad port `99999`"),
                    ("backends[1].url", "`http://:80` has no host"),
                ],
            ),
            (
                "[{name: a, url: 'https://a', credential: api_key}, {name: b, url: 'https://b', credential: api_key, api_key: ''}]",
                &[
                    ("backends[0].api_key", "credential: api_key needs api_key"),
                    ("backends[1].api_key", "credential: api_key needs api_key"),
                ],
            ),
            (
                "[{name: a, url: 'https://a', credential: managed_identity, api_key: k}]",
                &[("backends[0].api_key", "api_key is only used with credential: api_key")],
            ),
            (
                "[{name: a, url: 'x', credential: forward, api_key: k, ca_file: /nonexistent/ca}]",
                &[
                    (
                        "backends[0].url",
                        "`x` must start with https:// (or http:// for a local test backend)",
                    ),
                    ("backends[0].api_key", "api_key is only used with credential: api_key"),
                    ("backends[0].ca_file", "cannot read /nonexistent/ca"),
                ],
            ),
            (
                "[{name: a, url: 'https://a', credential: forward, capacity_window_seconds: 0}, {name: b, url: 'https://b', credential: forward, capacity_window_seconds: 601}]",
                &[(
                    "backends[1].capacity_window_seconds",
                    "must be at most 600 (0 turns the check off)",
                )],
            ),
        ];
        assert_cases(cases, |b: &Vec<BackendFile>, errs: &mut Errors| {
            backends(b, errs).0
        });
    }

    #[test]
    fn values_are_carried_over() {
        let yaml = format!(
            "- {{name: a, url: 'https://a.example', credential: managed_identity, region: r}}
- {{name: b, url: 'http://127.0.0.1:9000/', credential: api_key, api_key: k, ca_file: {READABLE}}}
- {{name: c, url: 'https://c:443', credential: forward}}
- {{name: c, url: 'https://c:80', credential: forward}}
- {{name: v6, url: 'http://[::1]:9000', credential: forward}}
- {{name: v6d, url: 'https://[::1]', credential: forward}}
"
        );
        let ((bs, index), errs) = run(&yaml, |b: &Vec<BackendFile>, errs: &mut Errors| {
            backends(b, errs)
        });
        assert_eq!(
            errs,
            [(
                "backends[3].name".to_string(),
                "duplicate backend name `c`".to_string()
            )]
        );
        assert_eq!(
            bs.iter()
                .map(|b| b.host_header.as_str())
                .collect::<Vec<_>>(),
            [
                "a.example",
                "127.0.0.1:9000",
                "c",
                "c:80",
                "[::1]:9000",
                "[::1]"
            ]
        );
        assert_eq!(&*bs[0].region, "r");
        assert_eq!(
            bs[0].capacity_window_ms, 60_000,
            "Azure's minute by default"
        );
        assert_eq!(bs[1].credential, Credential::ApiKey("k".into()));
        assert!(!bs[1].tls);
        assert_eq!(index["c"], 3, "the last of a duplicated name");
    }
}
