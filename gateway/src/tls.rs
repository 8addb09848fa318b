//! TLS listeners: the server certificate chain, TLS 1.2+, h2 and http/1.1 by ALPN, and — where
//! `client_certificates` is configured — client certificates (mTLS).
//!
//! A client certificate must chain to `trust_bundle` (roots, and intermediates that help build
//! the chain; the client may also send its intermediates), be within its validity dates, and
//! not be revoked by any configured CRL (`CRL_CHECK | CRL_CHECK_ALL`: every CA of the chain,
//! the root included, needs a current CRL). A certificate that fails is refused at the
//! handshake in both modes; `required` also refuses a handshake without a certificate. A
//! verified certificate reaches the request path as a [`filters::cert::PeerCert`] in the TLS
//! digest's extension (see [`peer_certificate`]); the identity filter maps it to a client.
//!
//! Refused handshakes have no HTTP answer: they are counted in
//! `aoai_gateway_tls_handshake_failures_total{reason}` (`no_certificate`, `unknown_ca`,
//! `expired`, `revoked`, `other`) and logged with the reason and the subject and SHA-256
//! fingerprint of the certificate that failed. Every verified certificate sets
//! `aoai_gateway_client_certificate_expiry_timestamp_seconds{client,fingerprint}`.
//!
//! # When trust bundle and CRL changes take effect
//!
//! **On `SIGHUP`**, without dropping any connection. Each handshake installs the current
//! verification store on its own connection (in the certificate callback, before the client's
//! certificate is read). After a successful configuration reload (a new snapshot), the first
//! handshake re-reads the listener's `trust_bundle` and `crls` (the paths of the reloaded
//! file, for the same listener address) and later handshakes use the new store. Established
//! connections keep the verification they had; there is no session resumption on mTLS
//! listeners (no tickets, no session cache), so every new connection is verified against the
//! current files. If the new files cannot be read or parsed, the previous store stays in force
//! and the error is logged. A reload that fails (invalid configuration) re-reads nothing.
//! The graceful upgrade (`aoai-gateway run -c FILE --upgrade`, then `SIGQUIT` to the old
//! process) also re-reads everything and is needed to change the server certificate, the
//! listener addresses or to add or remove `client_certificates` on a listener; the `mode`
//! (`required`/`optional`) follows a reload.

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use openssl::asn1::{Asn1Time, Asn1TimeRef};
use openssl::ex_data::Index;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::ssl::{
    select_next_proto, AlpnError, Ssl, SslAcceptor, SslAcceptorBuilder, SslFiletype, SslMethod,
    SslOptions, SslSessionCacheMode, SslVerifyMode, SslVersion,
};
use openssl::stack::Stack;
use openssl::x509::store::{X509Lookup, X509Store, X509StoreBuilder};
use openssl::x509::verify::X509VerifyFlags;
use openssl::x509::{X509Name, X509NameRef, X509Ref, X509StoreContextRef, X509};
use pingora::listeners::TlsAccept;
use pingora::protocols::tls::TlsRef;
use pingora::tls::ssl_sys;

use crate::config::runtime::{ClientCertSettings, ListenerTls};
use crate::front::handshake::TlsListener;
use crate::observe::metrics::Metrics;
use crate::state::Snapshot;

/// The TLS side of a listener: Mozilla's intermediate settings (TLS 1.2 and later), ALPN
/// `h2` preferred over `http/1.1`, and with `client_certificates` the mTLS callbacks. The
/// handshake itself is run by the front ([`crate::front::handshake`]), which counts it.
pub fn tls_listener(
    address: &str,
    tls: &ListenerTls,
    metrics: &Arc<Metrics>,
    state: &Arc<ArcSwap<Snapshot>>,
) -> Result<TlsListener, String> {
    let err = |e: &dyn std::fmt::Display| format!("listener {address}: {e}");
    let (mut builder, callbacks) = match &tls.client_certificates {
        None => {
            let mut s = intermediate(address)?;
            s.set_private_key_file(&tls.private_key, SslFiletype::PEM)
                .map_err(|e| err(&format!("private key {}: {e}", tls.private_key)))?;
            s.set_certificate_chain_file(&tls.certificate)
                .map_err(|e| err(&format!("certificate {}: {e}", tls.certificate)))?;
            (s, None)
        }
        Some(cc) => {
            let (s, cb) = mtls_settings(address, tls, cc, metrics, state)?;
            (s, Some(cb))
        }
    };
    builder.set_alpn_select_callback(|_, offered| {
        select_next_proto(b"\x02h2\x08http/1.1", offered).ok_or(AlpnError::NOACK)
    });
    Ok(TlsListener {
        acceptor: builder.build(),
        callbacks,
    })
}

fn intermediate(address: &str) -> Result<SslAcceptorBuilder, String> {
    let err = |e: &dyn std::fmt::Display| format!("listener {address}: {e}");
    let mut s = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).map_err(|e| err(&e))?;
    s.set_min_proto_version(Some(SslVersion::TLS1_2))
        .map_err(|e| err(&e))?;
    Ok(s)
}

type Callbacks = Box<dyn TlsAccept + Send + Sync>;

fn mtls_settings(
    address: &str,
    tls: &ListenerTls,
    cc: &ClientCertSettings,
    metrics: &Arc<Metrics>,
    state: &Arc<ArcSwap<Snapshot>>,
) -> Result<(SslAcceptorBuilder, Callbacks), String> {
    let err = |e: &dyn std::fmt::Display| format!("listener {address}: {e}");
    let snap = state.load_full();
    let trust = TrustMaterial::load(cc).map_err(|e| err(&e))?;
    // The context-wide store: used should the per-connection one not be installed.
    let ctx_store = TrustMaterial::load(cc).map_err(|e| err(&e))?;
    let shared = Arc::new(Shared {
        address: address.to_string(),
        metrics: metrics.clone(),
        state: state.clone(),
        trust: ArcSwap::from_pointee(Generation {
            snapshot: Arc::downgrade(&snap),
            material: Arc::new(trust),
        }),
        rebuild: tokio::sync::Mutex::new(()),
        expiry_labels: Mutex::new(HashMap::new()),
    });
    conn_index().map_err(|e| err(&e))?;

    let mut s = intermediate(address)?;
    s.set_private_key_file(&tls.private_key, SslFiletype::PEM)
        .map_err(|e| err(&format!("private key {}: {e}", tls.private_key)))?;
    s.set_certificate_chain_file(&tls.certificate)
        .map_err(|e| err(&format!("certificate {}: {e}", tls.certificate)))?;
    s.check_private_key().map_err(|e| {
        err(&format!(
            "the private key does not match the certificate: {e}"
        ))
    })?;
    s.set_client_ca_list(ctx_store.ca_list().map_err(|e| err(&e))?);
    s.set_verify_cert_store(ctx_store.store)
        .map_err(|e| err(&e))?;
    let fallback = shared.clone();
    s.set_verify_callback(verify_mode(cc.required), move |ok, ctx| {
        fallback.on_verify(ok, ctx, None)
    });
    // Every connection is verified in full against the current trust bundle and CRLs: no
    // session resumption (TLS 1.2 tickets or cache, TLS 1.3 tickets).
    s.set_session_id_context(b"aoai-gateway-mtls")
        .map_err(|e| err(&e))?;
    s.set_session_cache_mode(SslSessionCacheMode::OFF);
    s.set_options(SslOptions::NO_TICKET);
    s.set_num_tickets(0).map_err(|e| err(&e))?;
    log::info!(
        "listener {address}: client certificates {} (trust bundle {}, {} CRL file(s))",
        if cc.required { "required" } else { "optional" },
        cc.trust_bundle,
        cc.crls.len()
    );
    Ok((s, Box::new(MtlsCallbacks(shared))))
}

fn verify_mode(required: bool) -> SslVerifyMode {
    if required {
        SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT
    } else {
        SslVerifyMode::PEER
    }
}

/// A trust bundle and its CRLs, read from files.
struct TrustMaterial {
    store: X509Store,
    ca_names: Vec<X509Name>,
    required: bool,
    settings: ClientCertSettings,
}

impl TrustMaterial {
    fn load(cc: &ClientCertSettings) -> Result<TrustMaterial, String> {
        let pem = std::fs::read(&cc.trust_bundle)
            .map_err(|e| format!("trust bundle {}: {e}", cc.trust_bundle))?;
        let certs = X509::stack_from_pem(&pem)
            .map_err(|e| format!("trust bundle {}: {e}", cc.trust_bundle))?;
        if certs.is_empty() {
            return Err(format!(
                "trust bundle {}: no PEM certificate in it",
                cc.trust_bundle
            ));
        }
        let mut b = X509StoreBuilder::new().map_err(|e| e.to_string())?;
        let mut ca_names = Vec::new();
        for c in &certs {
            ca_names.push(c.subject_name().to_owned().map_err(|e| e.to_string())?);
            b.add_cert(c.clone())
                .map_err(|e| format!("trust bundle {}: {e}", cc.trust_bundle))?;
        }
        {
            let lookup = b
                .add_lookup(X509Lookup::file())
                .map_err(|e| e.to_string())?;
            for crl in &cc.crls {
                // PEM (one or more CRLs), else DER.
                let n = lookup
                    .load_crl_file(crl, SslFiletype::PEM)
                    .or_else(|_| lookup.load_crl_file(crl, SslFiletype::ASN1))
                    .map_err(|e| format!("CRL {crl}: {e}"))?;
                if n < 1 {
                    return Err(format!("CRL {crl}: no CRL in it"));
                }
            }
        }
        if !cc.crls.is_empty() {
            b.set_flags(X509VerifyFlags::CRL_CHECK | X509VerifyFlags::CRL_CHECK_ALL)
                .map_err(|e| e.to_string())?;
        }
        Ok(TrustMaterial {
            store: b.build(),
            ca_names,
            required: cc.required,
            settings: cc.clone(),
        })
    }

    fn ca_list(&self) -> Result<Stack<X509Name>, String> {
        let mut list = Stack::new().map_err(|e| e.to_string())?;
        for n in &self.ca_names {
            list.push(X509NameRef::to_owned(n).map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        }
        Ok(list)
    }
}

/// The trust material in force, and the configuration snapshot it was read for.
struct Generation {
    snapshot: Weak<Snapshot>,
    material: Arc<TrustMaterial>,
}

/// What every connection of one mTLS listener shares.
struct Shared {
    address: String,
    metrics: Arc<Metrics>,
    state: Arc<ArcSwap<Snapshot>>,
    trust: ArcSwap<Generation>,
    rebuild: tokio::sync::Mutex<()>,
    /// fingerprint -> client label of its expiry gauge series (to drop a stale series when a
    /// reload maps the certificate to another client).
    expiry_labels: Mutex<HashMap<String, Arc<str>>>,
}

impl Shared {
    /// The trust material for a new handshake: re-read from the files once after each
    /// configuration reload.
    async fn current(&self) -> Arc<TrustMaterial> {
        let snap = self.state.load_full();
        let gen = self.trust.load_full();
        if Weak::as_ptr(&gen.snapshot) == Arc::as_ptr(&snap) {
            return gen.material.clone();
        }
        let _one_at_a_time = self.rebuild.lock().await;
        let gen = self.trust.load_full();
        if Weak::as_ptr(&gen.snapshot) == Arc::as_ptr(&snap) {
            return gen.material.clone();
        }
        // The same listener in the reloaded file, if it still asks for client certificates.
        let settings = snap
            .cfg
            .server
            .listeners
            .iter()
            .find(|l| l.address == self.address)
            .and_then(|l| l.tls.as_ref())
            .and_then(|t| t.client_certificates.clone())
            .unwrap_or_else(|| gen.material.settings.clone());
        let loaded = tokio::task::spawn_blocking(move || TrustMaterial::load(&settings)).await;
        let material = match loaded {
            Ok(Ok(m)) => {
                log::info!(
                    "listener {}: re-read trust bundle {} and {} CRL file(s) after the reload \
                     (client certificates {})",
                    self.address,
                    m.settings.trust_bundle,
                    m.settings.crls.len(),
                    if m.required { "required" } else { "optional" },
                );
                Arc::new(m)
            }
            Ok(Err(e)) => {
                log::error!(
                    "listener {}: {e}; the previous trust bundle and CRLs stay in force",
                    self.address
                );
                gen.material.clone()
            }
            Err(e) => {
                log::error!(
                    "listener {}: reading the trust bundle and CRLs failed: {e}; the previous \
                     ones stay in force",
                    self.address
                );
                gen.material.clone()
            }
        };
        self.trust.store(Arc::new(Generation {
            snapshot: Arc::downgrade(&snap),
            material: material.clone(),
        }));
        material
    }

    /// The verify callback: records and logs a refusal, never changes OpenSSL's verdict.
    fn on_verify(&self, ok: bool, ctx: &mut X509StoreContextRef, conn: Option<&ConnState>) -> bool {
        if let Some(c) = conn {
            c.verify_seen.store(true, Ordering::Relaxed);
            if ok && ctx.error_depth() == 0 {
                if let Some(leaf) = ctx.current_cert() {
                    let _ = c.leaf.set(describe_short(leaf));
                }
            }
        }
        if ok {
            return true;
        }
        let err = ctx.error();
        let reason = reason_of(err.as_raw());
        if let Some(c) = conn {
            c.refused.store(true, Ordering::Relaxed);
        }
        let (subject, fingerprint) = ctx
            .current_cert()
            .map(describe_short)
            .unwrap_or_else(|| ("-".into(), "-".into()));
        let depth = ctx.error_depth();
        let leaf = if depth > 0 {
            ctx.chain()
                .and_then(|c| c.iter().next())
                .map(|l| {
                    let (s, f) = describe_short(l);
                    format!(" (leaf subject \"{s}\", sha256 {f})")
                })
                .unwrap_or_default()
        } else {
            String::new()
        };
        log::warn!(
            "listener {}: client certificate refused at the TLS handshake: {reason} ({}); \
             certificate at depth {depth}: subject \"{subject}\", sha256 {fingerprint}{leaf}",
            self.address,
            err.error_string(),
        );
        self.metrics
            .tls_handshake_failures
            .with_label_values(&[reason])
            .inc();
        false
    }

    /// Sets the expiry gauge of a verified certificate under the client it maps to now.
    fn record_expiry(&self, cert: &filters::cert::PeerCert) {
        let snap = self.state.load();
        let client: Arc<str> = match snap.cfg.certs.client_of(cert) {
            Some(i) => snap
                .cfg
                .clients
                .get(i)
                .map(|c| c.id.clone())
                .unwrap_or_else(|| Arc::from("unmapped")),
            None => Arc::from("unmapped"),
        };
        let gauge = &self.metrics.cert_expiry;
        {
            let mut labels = self.expiry_labels.lock().expect("not poisoned");
            match labels.get(&cert.fingerprint) {
                Some(prev) if *prev == client => {}
                Some(prev) => {
                    let _ = gauge.remove_label_values(&[prev.as_ref(), cert.fingerprint.as_str()]);
                    labels.insert(cert.fingerprint.clone(), client.clone());
                }
                None => {
                    labels.insert(cert.fingerprint.clone(), client.clone());
                }
            }
        }
        gauge
            .with_label_values(&[client.as_ref(), cert.fingerprint.as_str()])
            .set(cert.not_after);
    }
}

/// What one handshake learns, to count a refusal that no verify callback sees.
struct ConnState {
    shared: Arc<Shared>,
    required: bool,
    /// The verify callback ran: the client presented a certificate.
    verify_seen: AtomicBool,
    /// The verify callback refused (and counted) it.
    refused: AtomicBool,
    /// The handshake completed.
    complete: AtomicBool,
    /// (subject, fingerprint) of the verified leaf.
    leaf: OnceLock<(String, String)>,
}

/// Lives in the connection's `SSL` (ex data) and is dropped with it: a handshake that did not
/// complete is counted here unless the verify callback already counted it.
struct ConnGuard(Arc<ConnState>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let c = &self.0;
        if c.complete.load(Ordering::Relaxed) || c.refused.load(Ordering::Relaxed) {
            return;
        }
        let reason = if c.verify_seen.load(Ordering::Relaxed) {
            // The chain verified but the handshake still failed: typically a client that
            // holds someone else's certificate without its private key (bad CertificateVerify).
            let (s, f) = c
                .leaf
                .get()
                .cloned()
                .unwrap_or_else(|| ("-".into(), "-".into()));
            log::warn!(
                "listener {}: TLS handshake failed after the client certificate verified \
                 (no proof of its private key?): subject \"{s}\", sha256 {f}",
                c.shared.address
            );
            "other"
        } else if c.required {
            log::warn!(
                "listener {}: TLS handshake refused: the client presented no certificate \
                 (or ended the handshake before presenting one)",
                c.shared.address
            );
            "no_certificate"
        } else {
            // Optional mode, no certificate: a handshake the client abandoned, not a refusal.
            return;
        };
        c.shared
            .metrics
            .tls_handshake_failures
            .with_label_values(&[reason])
            .inc();
    }
}

fn conn_index() -> Result<Index<Ssl, ConnGuard>, String> {
    static INDEX: OnceLock<Index<Ssl, ConnGuard>> = OnceLock::new();
    if let Some(i) = INDEX.get() {
        return Ok(*i);
    }
    let i = Ssl::new_ex_index::<ConnGuard>().map_err(|e| e.to_string())?;
    Ok(*INDEX.get_or_init(|| i))
}

struct MtlsCallbacks(Arc<Shared>);

#[async_trait]
impl TlsAccept for MtlsCallbacks {
    /// Runs after the ClientHello, before the client's certificate is requested: installs the
    /// current trust material and this connection's verify callback.
    async fn certificate_callback(&self, ssl: &mut TlsRef) {
        let material = self.0.current().await;
        if let Err(e) = pingora::tls::ext::ssl_set_verify_cert_store(ssl, &material.store) {
            log::error!(
                "listener {}: cannot install the client certificate store on a connection \
                 ({e}); the store read at start-up applies",
                self.0.address
            );
        }
        match material.ca_list() {
            Ok(list) => ssl.set_client_ca_list(list),
            Err(e) => log::warn!("listener {}: client CA list: {e}", self.0.address),
        }
        let conn = Arc::new(ConnState {
            shared: self.0.clone(),
            required: material.required,
            verify_seen: AtomicBool::new(false),
            refused: AtomicBool::new(false),
            complete: AtomicBool::new(false),
            leaf: OnceLock::new(),
        });
        let (shared, c) = (self.0.clone(), conn.clone());
        ssl.set_verify_callback(verify_mode(material.required), move |ok, ctx| {
            shared.on_verify(ok, ctx, Some(c.as_ref()))
        });
        if let Ok(idx) = conn_index() {
            ssl.set_ex_data(idx, ConnGuard(conn));
        }
    }

    /// Hands the verified client certificate to the request path and sets its expiry gauge.
    async fn handshake_complete_callback(
        &self,
        ssl: &TlsRef,
    ) -> Option<Arc<dyn Any + Send + Sync>> {
        if let Some(g) = conn_index().ok().and_then(|i| ssl.ex_data(i)) {
            g.0.complete.store(true, Ordering::Relaxed);
        }
        let cert = ssl.peer_certificate()?;
        let peer = peer_cert_of(&cert);
        self.0.record_expiry(&peer);
        Some(Arc::new(peer))
    }
}

/// Fingerprint (lower-case hex SHA-256 of the DER), RFC 4514 subject and notAfter of a
/// certificate.
pub fn peer_cert_of(cert: &X509Ref) -> filters::cert::PeerCert {
    let (subject, fingerprint) = describe_short(cert);
    filters::cert::PeerCert {
        fingerprint,
        subject,
        not_after: unix_seconds(cert.not_after()).unwrap_or(0),
    }
}

fn describe_short(cert: &X509Ref) -> (String, String) {
    let fingerprint = cert
        .digest(MessageDigest::sha256())
        .map(|d| hex::encode(&*d))
        .unwrap_or_else(|_| "-".into());
    (rfc4514(cert.subject_name()), fingerprint)
}

fn unix_seconds(t: &Asn1TimeRef) -> Option<i64> {
    let epoch = Asn1Time::from_unix(0).ok()?;
    let d = epoch.diff(t).ok()?;
    Some(i64::from(d.days) * 86_400 + i64::from(d.secs))
}

/// The RFC 4514 string of a name, most specific attribute first (as `openssl x509 -noout
/// -subject -nameopt RFC2253` prints it, except that non-ASCII UTF-8 is kept as is), e.g.
/// `CN=plant-7-edge,O=Contoso`. Attributes of a multi-valued RDN are separated by `,` too.
pub fn rfc4514(name: &X509NameRef) -> String {
    let mut parts: Vec<String> = name
        .entries()
        .map(|e| {
            let obj = e.object();
            let nid = obj.nid();
            let key = match nid.short_name() {
                Ok(s) if nid != Nid::UNDEF => s.to_string(),
                _ => obj.to_string(),
            };
            let value = match e.data().to_string() {
                Ok(s) => s,
                Err(_) => String::from_utf8_lossy(e.data().as_slice()).into_owned(),
            };
            format!("{key}={}", escape_rfc4514(&value))
        })
        .collect();
    parts.reverse();
    parts.join(",")
}

fn escape_rfc4514(v: &str) -> String {
    let n = v.chars().count();
    let mut out = String::with_capacity(v.len());
    for (i, ch) in v.chars().enumerate() {
        match ch {
            ',' | '+' | '"' | '\\' | '<' | '>' | ';' => {
                out.push('\\');
                out.push(ch);
            }
            '#' if i == 0 => out.push_str("\\#"),
            ' ' if i == 0 || i + 1 == n => out.push_str("\\ "),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\{:02X}", c as u32));
            }
            c => out.push(c),
        }
    }
    out
}

/// The `reason` label of a certificate verification error.
fn reason_of(code: i32) -> &'static str {
    match code {
        ssl_sys::X509_V_ERR_CERT_HAS_EXPIRED => "expired",
        ssl_sys::X509_V_ERR_CERT_REVOKED => "revoked",
        ssl_sys::X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT
        | ssl_sys::X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
        | ssl_sys::X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE
        | ssl_sys::X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT
        | ssl_sys::X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN
        | ssl_sys::X509_V_ERR_CERT_UNTRUSTED => "unknown_ca",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openssl::x509::X509NameBuilder;

    #[test]
    fn subject_is_most_specific_first_and_escaped() {
        let mut b = X509NameBuilder::new().unwrap();
        b.append_entry_by_text("C", "DE").unwrap();
        b.append_entry_by_text("O", "Contoso, Ltd").unwrap();
        b.append_entry_by_text("CN", "plant-7-edge").unwrap();
        let name = b.build();
        assert_eq!(rfc4514(&name), "CN=plant-7-edge,O=Contoso\\, Ltd,C=DE");
    }

    #[test]
    fn escapes_leading_and_trailing() {
        assert_eq!(escape_rfc4514("#a b "), "\\#a b\\ ");
        assert_eq!(escape_rfc4514(" x"), "\\ x");
        assert_eq!(escape_rfc4514("a;b+c"), "a\\;b\\+c");
    }

    #[test]
    fn reasons() {
        assert_eq!(reason_of(10), "expired");
        assert_eq!(reason_of(23), "revoked");
        assert_eq!(reason_of(20), "unknown_ca");
        assert_eq!(reason_of(3), "other");
    }
}
