//! Admission decisions made from a request's head before anything else: who the client is at
//! the network level.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

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
