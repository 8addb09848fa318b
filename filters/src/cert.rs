//! Client certificates: mapping a certificate that the TLS layer already verified (chain,
//! validity, CRLs) to a configured client by leaf fingerprint or subject.

use std::collections::HashMap;

/// What the TLS handshake tells about the verified client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    /// SHA-256 of the leaf DER, lower-case hex without separators.
    pub fingerprint: String,
    /// Subject as an RFC 4514 string, e.g. `CN=plant-7-edge,O=Contoso`.
    pub subject: String,
    /// notAfter, Unix seconds.
    pub not_after: i64,
}

/// Normalises a configured fingerprint: colons and case are ignored.
pub fn normalize_fingerprint(s: &str) -> Option<String> {
    let hex: String = s
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    (hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit())).then_some(hex)
}

/// Normalises an RFC 4514 subject for comparison: no spaces around separators, attribute
/// types upper-case.
pub fn normalize_subject(s: &str) -> String {
    s.split(',')
        .map(|rdn| match rdn.split_once('=') {
            Some((k, v)) => format!("{}={}", k.trim().to_ascii_uppercase(), v.trim()),
            None => rdn.trim().to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Fingerprints and subjects of the configured clients.
#[derive(Debug, Default, Clone)]
pub struct CertMap {
    by_fingerprint: HashMap<String, usize>,
    by_subject: HashMap<String, usize>,
}

impl CertMap {
    pub fn add_fingerprint(&mut self, fingerprint: &str, client: usize) -> bool {
        match normalize_fingerprint(fingerprint) {
            Some(fp) => self.by_fingerprint.insert(fp, client).is_none(),
            None => false,
        }
    }

    pub fn add_subject(&mut self, subject: &str, client: usize) -> bool {
        self.by_subject
            .insert(normalize_subject(subject), client)
            .is_none()
    }

    /// The client of a verified certificate: fingerprint first, then subject.
    pub fn client_of(&self, cert: &PeerCert) -> Option<usize> {
        self.by_fingerprint
            .get(&cert.fingerprint)
            .or_else(|| self.by_subject.get(&normalize_subject(&cert.subject)))
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_ignores_colons_and_case() {
        let fp = "3A:1F".repeat(16);
        let n = normalize_fingerprint(&fp).unwrap();
        assert_eq!(n, "3a1f".repeat(16));
        assert!(normalize_fingerprint("3A:1F").is_none());
    }

    #[test]
    fn maps_by_fingerprint_then_subject() {
        let mut m = CertMap::default();
        m.add_fingerprint(&"AB".repeat(32), 1);
        m.add_subject("CN=plant-7-edge, O=Contoso", 2);
        let by_fp = PeerCert {
            fingerprint: "ab".repeat(32),
            subject: "CN=x".into(),
            not_after: 0,
        };
        assert_eq!(m.client_of(&by_fp), Some(1));
        let by_subject = PeerCert {
            fingerprint: "cd".repeat(32),
            subject: "CN=plant-7-edge,O=Contoso".into(),
            not_after: 0,
        };
        assert_eq!(m.client_of(&by_subject), Some(2));
        let none = PeerCert {
            fingerprint: "cd".repeat(32),
            subject: "CN=other".into(),
            not_after: 0,
        };
        assert_eq!(m.client_of(&none), None);
    }
}
