//! TLS listeners (server certificate; client certificates are added by the mTLS work).

use std::sync::Arc;

use arc_swap::ArcSwap;
use pingora::listeners::tls::TlsSettings;
use pingora::proxy::HttpProxy;
use pingora::services::listening::Service;

use crate::config::runtime::ListenerTls;
use crate::metrics::Metrics;
use crate::proxy::Gateway;
use crate::state::Snapshot;

/// The verified client certificate of this request's TLS connection, if any.
pub fn peer_certificate(session: &pingora::proxy::Session) -> Option<filters::cert::PeerCert> {
    let digest = session.digest()?;
    let ssl = digest.ssl_digest.as_ref()?;
    ssl.extension.get::<filters::cert::PeerCert>().cloned()
}

pub fn add_tls_listener(
    service: &mut Service<HttpProxy<Gateway>>,
    address: &str,
    tls: &ListenerTls,
    _metrics: &Arc<Metrics>,
    _state: &Arc<ArcSwap<Snapshot>>,
) -> Result<(), String> {
    if tls.client_certificates.is_some() {
        return Err(format!(
            "listener {address}: client_certificates are not supported yet"
        ));
    }
    let mut settings = TlsSettings::intermediate(&tls.certificate, &tls.private_key)
        .map_err(|e| format!("listener {address}: {e}"))?;
    settings.enable_h2();
    service.add_tls_with_settings(address, None, settings);
    Ok(())
}
