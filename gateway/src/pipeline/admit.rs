//! Admission decisions made from a request's head before anything else: whether it is a
//! health probe, whether its framing and origin can be trusted, where it is routed, and who
//! the client is at the network level.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::errors::{ErrorCode, GatewayError};
use crate::pipeline::route::{classify, Route};

/// What a request is, before anyone is identified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry<'a> {
    /// `GET`/`HEAD /healthz`: answered at once, no credential, no Front Door check.
    Health,
    /// Everything else, routed (an unsupported route is refused after identity).
    Request(Route<'a>),
}

/// The first decision on every request: a health probe; else framing that cannot be trusted
/// (request-smuggling shapes, refused before anything else is looked at); else a request that
/// did not come through one of the configured Front Doors (`front_door_ids`, compared with
/// `X-Azure-FDID` ignoring case); else its route.
pub fn admit<'a>(
    method: &str,
    path: &'a str,
    framing_error: Option<&str>,
    fdid: Option<&str>,
    front_door_ids: &[String],
) -> Result<Entry<'a>, GatewayError> {
    if path == "/healthz" && (method == "GET" || method == "HEAD") {
        return Ok(Entry::Health);
    }
    if let Some(why) = framing_error {
        return Err(GatewayError::with_message(
            ErrorCode::InvalidRequestBody,
            format!("The request's framing is invalid: {why}."),
        ));
    }
    if !front_door_ids.is_empty() {
        let ok = fdid.is_some_and(|v| {
            front_door_ids
                .iter()
                .any(|id| id.eq_ignore_ascii_case(v.trim()))
        });
        if !ok {
            return Err(GatewayError::new(ErrorCode::ForbiddenOrigin));
        }
    }
    Ok(Entry::Request(classify(method, path)))
}

/// The client's address for the audit log. The peer itself unless it is a trusted proxy; then
/// `X-Azure-ClientIP` (Front Door sets it; of several field lines the last, which the nearest
/// proxy wrote), else the `X-Forwarded-For` chain — every field line joined in order — read
/// from the right: the first address that is not a trusted proxy is the client, never an
/// entry further left (which whoever sent the request could have written). An entry that is
/// not an address ends the walk at the last trusted hop.
pub fn client_ip<'a>(
    peer: IpAddr,
    trusted: &[IpNet],
    azure_client_ip: impl DoubleEndedIterator<Item = &'a str>,
    forwarded_for: impl DoubleEndedIterator<Item = &'a str>,
) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    if let Some(ip) = azure_client_ip.last().and_then(address) {
        return ip;
    }
    let mut hop = peer;
    for entry in forwarded_for.rev().flat_map(|line| line.rsplit(',')) {
        match address(entry) {
            Some(ip) if is_trusted(&ip) => hop = ip,
            Some(ip) => return ip,
            None => return hop,
        }
    }
    hop
}

/// An address as proxies write it: `192.0.2.1`, `2001:db8::1`, or with a port
/// (`192.0.2.1:4711`, `[2001:db8::1]:4711`, as Application Gateway writes them).
fn address(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim_matches([' ', '\t']);
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(r: Result<Entry<'_>, GatewayError>) -> Result<Entry<'_>, ErrorCode> {
        r.map_err(|e| e.code)
    }

    #[test]
    fn admit_table() {
        let fd = ["AFD-1".to_string()];
        let chat = "/openai/deployments/d/chat/completions";
        assert_eq!(
            code(admit("GET", "/healthz", None, None, &fd)),
            Ok(Entry::Health)
        );
        assert_eq!(
            code(admit("HEAD", "/healthz", Some("bad"), None, &fd)),
            Ok(Entry::Health)
        );
        assert!(matches!(
            code(admit("POST", "/healthz", None, Some("afd-1"), &fd)),
            Ok(Entry::Request(Route::NotSupported))
        ));
        assert_eq!(
            code(admit("POST", chat, Some("both"), Some("afd-1"), &fd)),
            Err(ErrorCode::InvalidRequestBody)
        );
        assert_eq!(
            code(admit("POST", chat, None, None, &fd)),
            Err(ErrorCode::ForbiddenOrigin)
        );
        assert_eq!(
            code(admit("POST", chat, None, Some("AFD-2"), &fd)),
            Err(ErrorCode::ForbiddenOrigin)
        );
        assert!(matches!(
            code(admit("POST", chat, None, Some(" afd-1 "), &fd)),
            Ok(Entry::Request(Route::InPath { .. }))
        ));
        assert!(matches!(
            code(admit("POST", chat, None, None, &[])),
            Ok(Entry::Request(Route::InPath { .. }))
        ));
    }

    #[test]
    fn client_ip_table() {
        let trusted: Vec<IpNet> = vec![
            "10.0.0.0/8".parse().unwrap(),
            "127.0.0.1/32".parse().unwrap(),
        ];
        let proxy: IpAddr = "10.1.2.3".parse().unwrap();
        let outsider: IpAddr = "192.0.2.50".parse().unwrap();
        let cases: &[(IpAddr, &[&str], &[&str], &str)] = &[
            // An untrusted peer: its headers are ignored.
            (outsider, &["203.0.113.7"], &["198.51.100.9"], "192.0.2.50"),
            (outsider, &[], &[], "192.0.2.50"),
            // A trusted peer without headers.
            (proxy, &[], &[], "10.1.2.3"),
            (proxy, &["203.0.113.7"], &[], "203.0.113.7"),
            // Two X-Azure-ClientIP lines: the last (the nearest proxy's).
            (proxy, &["203.0.113.7", "198.51.100.9"], &[], "198.51.100.9"),
            // Not an address: the forwarded-for chain decides.
            (proxy, &["junk"], &["198.51.100.9"], "198.51.100.9"),
            (proxy, &[], &["203.0.113.7"], "203.0.113.7"),
            // Two X-Forwarded-For lines: joined, read from the right.
            (proxy, &[], &["203.0.113.7", "198.51.100.9"], "198.51.100.9"),
            (proxy, &[], &["203.0.113.7, 198.51.100.9"], "198.51.100.9"),
            // Trusted hops on the right are skipped.
            (proxy, &[], &["203.0.113.7, 10.9.9.9"], "203.0.113.7"),
            (
                proxy,
                &[],
                &["203.0.113.7", "10.9.9.9, 127.0.0.1"],
                "203.0.113.7",
            ),
            // Only trusted hops: the left-most of them.
            (proxy, &[], &["10.9.9.9, 10.8.8.8"], "10.9.9.9"),
            // Garbage ends the walk at the last trusted hop.
            (proxy, &[], &["203.0.113.7, nonsense, 10.9.9.9"], "10.9.9.9"),
            (proxy, &[], &["nonsense"], "10.1.2.3"),
            (proxy, &[], &[""], "10.1.2.3"),
            // Ports and IPv6.
            (proxy, &[], &["203.0.113.7:4711"], "203.0.113.7"),
            (proxy, &[], &["[2001:db8::1]:4711"], "2001:db8::1"),
            (proxy, &[], &[" 2001:db8::2 "], "2001:db8::2"),
        ];
        for (peer, azure, xff, want) in cases {
            let got = client_ip(*peer, &trusted, azure.iter().copied(), xff.iter().copied());
            assert_eq!(got.to_string(), *want, "{peer} {azure:?} {xff:?}");
        }
    }
}
