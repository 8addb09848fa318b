//! `server`: listeners and their TLS files, the admin address, trusted proxies, timeouts,
//! threads; front door ids and the body limit are taken as written.

use std::net::SocketAddr;
use std::time::Duration;

use crate::config::file::{
    ClientCertMode, ClientCertificatesFile, ListenerFile, ServerFile, TlsFile,
};
use crate::config::load::Errors;
use crate::config::runtime::{ClientCertSettings, Listener, ListenerTls, Realtime, Server};

pub(super) fn server(f: &ServerFile, errs: &mut Errors) -> Server {
    if f.listeners.is_empty() {
        errs.at("server.listeners", "at least one listener is needed");
    }
    let mut listeners = Vec::new();
    for (i, l) in f.listeners.iter().enumerate() {
        listeners.push(listener(l, &format!("server.listeners[{i}]"), errs));
    }
    if let Some(a) = &f.admin_address {
        if a.parse::<SocketAddr>().is_err() {
            errs.at("server.admin_address", format!("`{a}` is not an address"));
        }
    }
    let trusted_proxies = trusted_proxies(&f.trusted_proxy_cidrs, errs);
    for (key, value) in [
        ("request_timeout_seconds", f.request_timeout_seconds),
        ("header_timeout_seconds", f.header_timeout_seconds),
        ("idle_timeout_seconds", f.idle_timeout_seconds),
        ("backend_idle_seconds", f.backend_idle_seconds),
        ("shutdown_grace_seconds", f.shutdown_grace_seconds),
        ("realtime_idle_seconds", f.realtime_idle_seconds),
        (
            "realtime_max_session_seconds",
            f.realtime_max_session_seconds,
        ),
    ] {
        if value == 0 {
            errs.at(format!("server.{key}"), "must be at least 1");
        }
    }
    if f.max_upload_bytes < 65_536 {
        errs.at("server.max_upload_bytes", "must be at least 65536");
    }
    if f.tls_handshakes_per_thread == 0 {
        errs.at("server.tls_handshakes_per_thread", "must be at least 1");
    }
    if f.realtime_max_message_bytes < 1024 {
        errs.at("server.realtime_max_message_bytes", "must be at least 1024");
    }
    if f.threads == Some(0) {
        errs.at("server.threads", "must be at least 1");
    }
    Server {
        listeners,
        admin_address: f.admin_address.clone(),
        threads: f.threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }),
        max_request_body_bytes: f.max_request_body_bytes,
        max_upload_bytes: f.max_upload_bytes,
        request_timeout: Duration::from_secs(f.request_timeout_seconds),
        header_timeout: Duration::from_secs(f.header_timeout_seconds),
        idle_timeout: Duration::from_secs(f.idle_timeout_seconds),
        backend_idle: Duration::from_secs(f.backend_idle_seconds),
        tls_handshakes_per_thread: f.tls_handshakes_per_thread,
        tls_handshake_pacing: f.tls_handshake_pacing,
        shutdown_grace: Duration::from_secs(f.shutdown_grace_seconds),
        realtime: Realtime {
            idle: Duration::from_secs(f.realtime_idle_seconds),
            max_session: Duration::from_secs(f.realtime_max_session_seconds),
            max_message_bytes: f.realtime_max_message_bytes,
        },
        front_door_ids: f.front_door_ids.clone(),
        trusted_proxies,
    }
}

/// `path` is `server.listeners[i]`.
fn listener(l: &ListenerFile, path: &str, errs: &mut Errors) -> Listener {
    if l.address.parse::<SocketAddr>().is_err() {
        errs.at(
            format!("{path}.address"),
            format!("`{}` is not an address like 0.0.0.0:8443", l.address),
        );
    }
    Listener {
        address: l.address.clone(),
        tls: l
            .tls
            .as_ref()
            .map(|t| listener_tls(t, &format!("{path}.tls"), errs)),
    }
}

fn listener_tls(t: &TlsFile, path: &str, errs: &mut Errors) -> ListenerTls {
    for (k, p) in [
        ("certificate", &t.certificate),
        ("private_key", &t.private_key),
    ] {
        if std::fs::metadata(p).is_err() {
            errs.at(format!("{path}.{k}"), format!("cannot read {p}"));
        }
    }
    ListenerTls {
        certificate: t.certificate.clone(),
        private_key: t.private_key.clone(),
        client_certificates: t
            .client_certificates
            .as_ref()
            .map(|c| client_certificates(c, &format!("{path}.client_certificates"), errs)),
    }
}

fn client_certificates(
    c: &ClientCertificatesFile,
    path: &str,
    errs: &mut Errors,
) -> ClientCertSettings {
    if std::fs::metadata(&c.trust_bundle).is_err() {
        errs.at(
            format!("{path}.trust_bundle"),
            format!("cannot read {}", c.trust_bundle),
        );
    }
    for (j, crl) in c.crls.iter().enumerate() {
        if std::fs::metadata(crl).is_err() {
            errs.at(format!("{path}.crls[{j}]"), format!("cannot read {crl}"));
        }
    }
    ClientCertSettings {
        required: c.mode == ClientCertMode::Required,
        trust_bundle: c.trust_bundle.clone(),
        crls: c.crls.clone(),
    }
}

/// CIDRs, or single addresses taken as /32 or /128.
fn trusted_proxies(cidrs: &[String], errs: &mut Errors) -> Vec<ipnet::IpNet> {
    let mut nets = Vec::new();
    for (i, c) in cidrs.iter().enumerate() {
        match c
            .parse::<ipnet::IpNet>()
            .or_else(|_| c.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        {
            Ok(n) => nets.push(n),
            Err(_) => errs.at(
                format!("server.trusted_proxy_cidrs[{i}]"),
                format!("`{c}` is not a CIDR"),
            ),
        }
    }
    nets
}

#[cfg(test)]
mod tests {
    use super::super::table::{assert_cases, run, READABLE};
    use super::*;

    #[test]
    fn errors_have_their_paths() {
        let mtls = format!(
            "listeners:
  - address: 127.0.0.1:1
    tls:
      certificate: {READABLE}
      private_key: /nonexistent/key
      client_certificates: {{mode: optional, trust_bundle: /nonexistent/ca, crls: [{READABLE}, /nonexistent/crl]}}
"
        );
        let cases: &[(&str, &[(&str, &str)])] = &[
            (
                "listeners: []",
                &[("server.listeners", "at least one listener is needed")],
            ),
            (
                "listeners: [{address: 127.0.0.1:1}, {address: 'localhost:80'}]",
                &[(
                    "server.listeners[1].address",
                    "`localhost:80` is not an address like 0.0.0.0:8443",
                )],
            ),
            (
                "listeners: [{address: '[::]:1', tls: {certificate: /nonexistent/c, private_key: /nonexistent/k}}]",
                &[
                    ("server.listeners[0].tls.certificate", "cannot read /nonexistent/c"),
                    ("server.listeners[0].tls.private_key", "cannot read /nonexistent/k"),
                ],
            ),
            (
                &mtls,
                &[
                    ("server.listeners[0].tls.private_key", "cannot read /nonexistent/key"),
                    (
                        "server.listeners[0].tls.client_certificates.trust_bundle",
                        "cannot read /nonexistent/ca",
                    ),
                    (
                        "server.listeners[0].tls.client_certificates.crls[1]",
                        "cannot read /nonexistent/crl",
                    ),
                ],
            ),
            (
                "listeners: [{address: 127.0.0.1:1}]\nadmin_address: ':9'",
                &[("server.admin_address", "`:9` is not an address")],
            ),
            (
                "listeners: [{address: 127.0.0.1:1}]\ntrusted_proxy_cidrs: [10.0.0.0/8, 10.1.0.0/33, '::1', proxy]",
                &[
                    ("server.trusted_proxy_cidrs[1]", "`10.1.0.0/33` is not a CIDR"),
                    ("server.trusted_proxy_cidrs[3]", "`proxy` is not a CIDR"),
                ],
            ),
            (
                "listeners: [{address: 127.0.0.1:1}]\nthreads: 0\nidle_timeout_seconds: 0\nrequest_timeout_seconds: 0",
                &[
                    ("server.request_timeout_seconds", "must be at least 1"),
                    ("server.idle_timeout_seconds", "must be at least 1"),
                    ("server.threads", "must be at least 1"),
                ],
            ),
            (
                "listeners: [{address: 127.0.0.1:1}]\nheader_timeout_seconds: 0\nbackend_idle_seconds: 0\ntls_handshakes_per_thread: 0",
                &[
                    ("server.header_timeout_seconds", "must be at least 1"),
                    ("server.backend_idle_seconds", "must be at least 1"),
                    ("server.tls_handshakes_per_thread", "must be at least 1"),
                ],
            ),
            (
                "listeners: [{address: 127.0.0.1:1}]\nshutdown_grace_seconds: 0\nrealtime_idle_seconds: 0\nrealtime_max_session_seconds: 0\nrealtime_max_message_bytes: 1023",
                &[
                    ("server.shutdown_grace_seconds", "must be at least 1"),
                    ("server.realtime_idle_seconds", "must be at least 1"),
                    ("server.realtime_max_session_seconds", "must be at least 1"),
                    ("server.realtime_max_message_bytes", "must be at least 1024"),
                ],
            ),
        ];
        assert_cases::<ServerFile, _>(cases, server);
    }

    #[test]
    fn values_are_carried_over() {
        let yaml = format!(
            "listeners:
  - address: 127.0.0.1:1
  - address: 0.0.0.0:2
    tls: {{certificate: {READABLE}, private_key: {READABLE}, client_certificates: {{mode: required, trust_bundle: {READABLE}}}}}
threads: 3
request_timeout_seconds: 7
trusted_proxy_cidrs: [10.0.0.0/8, 192.0.2.1]
front_door_ids: [afd]
"
        );
        let (s, errs) = run::<ServerFile, _>(&yaml, server);
        assert_eq!(errs, []);
        assert_eq!(s.threads, 3);
        assert_eq!(s.request_timeout, Duration::from_secs(7));
        assert_eq!(s.header_timeout, Duration::from_secs(10));
        assert_eq!(s.shutdown_grace, Duration::from_secs(300));
        assert_eq!(
            s.realtime,
            Realtime {
                idle: Duration::from_secs(300),
                max_session: Duration::from_secs(1800),
                max_message_bytes: 16 << 20,
            }
        );
        assert!(s.listeners[0].tls.is_none());
        let mtls = s.listeners[1].tls.as_ref().unwrap();
        assert!(mtls.client_certificates.as_ref().unwrap().required);
        assert_eq!(
            s.trusted_proxies,
            [
                "10.0.0.0/8".parse().unwrap(),
                "192.0.2.1/32".parse().unwrap()
            ]
        );
        assert_eq!(s.front_door_ids, ["afd"]);
        assert_eq!(
            s.tls_handshake_pacing,
            crate::config::file::HandshakePacing::PerPass
        );
    }

    #[test]
    fn handshake_pacing_is_per_pass_or_none() {
        for (value, want) in [
            ("per_pass", crate::config::file::HandshakePacing::PerPass),
            ("none", crate::config::file::HandshakePacing::None),
        ] {
            let yaml =
                format!("listeners: [{{address: 127.0.0.1:1}}]\ntls_handshake_pacing: {value}\n");
            let (s, errs) = run::<ServerFile, _>(&yaml, server);
            assert_eq!(errs, []);
            assert_eq!(s.tls_handshake_pacing, want);
        }
        let bad = "listeners: [{address: 127.0.0.1:1}]\ntls_handshake_pacing: sometimes\n";
        let err = serde_norway::from_str::<ServerFile>(bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("tls_handshake_pacing"), "{err}");
    }
}
