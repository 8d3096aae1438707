//! The client CA bundle as the trust store takes it: only the CAs within
//! their dates.
//!
//! webpki checks the dates of a client's certificate and of its
//! intermediates, never those of the trust anchor, so an expired CA left in
//! the bundle would go on admitting what it signed. The TLS config says
//! when the set in date changes next (`changes_at`), and is reloaded then
//! (`tls::TlsSource::reload_due`). When the last CA in date expires, no
//! client is trusted (`ClientCheck`) until the bundle holds one again.
//!
//! `ClientCheck` also refuses, at the handshake, a chain larger than
//! `MAX_CLIENT_CHAIN`: rustls keeps a client's whole chain for as long as
//! its connection lasts, and so does the connection's `PeerTrust`, so a
//! holder of any certificate the CA signed could otherwise make each
//! connection cost a hundred times what a workload's certificate does.

use std::{path::Path, sync::Arc};

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    pki_types::{CertificateDer, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use x509_parser::prelude::FromDer;

use super::tls::{CLOCK_SKEW, TlsError, read_certificates};

/// See the module doc.
pub(super) struct ClientCas {
    /// The CAs within their dates now.
    pub(super) in_date: Vec<CertificateDer<'static>>,
    /// Every CA of the bundle (a config needs roots even when it trusts
    /// none of them).
    pub(super) all: Vec<CertificateDer<'static>>,
    /// The others, as the log names them, and whether each has expired
    /// (else it is not valid yet).
    pub(super) left_out: Vec<(String, bool)>,
    /// When the CAs in date change next, Unix seconds: the first of them
    /// to expire, or the first of the others to start.
    pub(super) changes_at: Option<i64>,
    /// When the last CA in date expires (`i64::MAX` for one x509-parser
    /// cannot read, which webpki judges); `None` when none is in date.
    pub(super) trusted_until: Option<i64>,
}

impl ClientCas {
    /// Reads the bundle at `path` as it stands at `now` (Unix seconds).
    pub(super) fn read(path: &Path, now: i64) -> Result<Self, TlsError> {
        let mut cas = Self {
            in_date: Vec::new(),
            all: Vec::new(),
            left_out: Vec::new(),
            changes_at: None,
            trusted_until: None,
        };
        for der in read_certificates("client CA bundle", path)? {
            cas.all.push(der.clone());
            let Ok((_, ca)) = x509_parser::certificate::X509Certificate::from_der(&der) else {
                cas.in_date.push(der);
                cas.trusted_until = Some(i64::MAX);
                continue;
            };
            let validity = ca.validity();
            let (from, until) = (
                validity.not_before.timestamp(),
                validity.not_after.timestamp(),
            );
            let shown = |dates: String| format!("{} ({dates})", ca.subject());
            // A CA issued just now may be a little ahead of this clock.
            let change = if now + CLOCK_SKEW < from {
                let dates = format!("valid from {}", validity.not_before);
                cas.left_out.push((shown(dates), false));
                from - CLOCK_SKEW
            } else if now > until {
                let dates = format!("expired {}", validity.not_after);
                cas.left_out.push((shown(dates), true));
                continue;
            } else {
                cas.in_date.push(der);
                cas.trusted_until = cas.trusted_until.max(Some(until));
                until.saturating_add(1)
            };
            cas.changes_at = Some(cas.changes_at.map_or(change, |at| at.min(change)));
        }
        Ok(cas)
    }

    /// What is wrong with a bundle that holds no CA in its dates.
    pub(super) fn none_in_date(&self, path: &Path) -> TlsError {
        let left_out: Vec<&str> = self.left_out.iter().map(|(ca, _)| ca.as_str()).collect();
        TlsError::NoCaInDate {
            path: path.to_owned(),
            left_out: left_out.join("; "),
        }
    }

    /// Says, once a load, which CAs are left out, and why.
    pub(super) fn log_left_out(&self, path: &Path) {
        for (ca, expired) in &self.left_out {
            let file = path.display();
            if *expired {
                tracing::warn!(%ca, %file, "a client CA that has expired is left out of the trust store: the certificates it signed are refused");
            } else {
                tracing::info!(%ca, %file, "a client CA not valid yet is left out of the trust store until it is");
            }
        }
    }
}

/// The most bytes of certificates a client may present (its certificate
/// and intermediates, DER): a workload's chain takes a few KiB.
pub(super) const MAX_CLIENT_CHAIN: usize = 16 * 1024;

/// The check of client certificates the TLS config uses: `inner` (webpki
/// over the CAs in date) for chains within `MAX_CLIENT_CHAIN`; no client at
/// all when `trust_none` (the bundle's last CA in date has expired: `inner`
/// is then a check over the expired CAs, kept because rustls wants roots,
/// and used for everything but the verdict).
#[derive(Debug)]
pub(super) struct ClientCheck {
    pub(super) inner: Arc<dyn ClientCertVerifier>,
    pub(super) trust_none: bool,
}

impl ClientCertVerifier for ClientCheck {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let refuse = |why: Refused| {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(why)),
            )))
        };
        if self.trust_none {
            return refuse(Refused::CasExpired);
        }
        let size = end_entity.len() + intermediates.iter().map(|der| der.len()).sum::<usize>();
        if size > MAX_CLIENT_CHAIN {
            return refuse(Refused::ChainTooLarge { size });
        }
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Why `ClientCheck` refuses a client before webpki sees it.
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("every CA of the client CA bundle has expired")]
    CasExpired,
    #[error(
        "the client's certificate chain takes {size} bytes; the broker takes at most \
         {MAX_CLIENT_CHAIN}"
    )]
    ChainTooLarge { size: usize },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed CA valid from `from` to `until` (Unix seconds).
    fn ca(name: &str, from: i64, until: i64) -> String {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.not_before = time::OffsetDateTime::from_unix_timestamp(from).unwrap();
        params.not_after = time::OffsetDateTime::from_unix_timestamp(until).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().pem()
    }

    fn bundle(cas: &[String]) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), cas.join("\n")).unwrap();
        file
    }

    const NOW: i64 = 1_800_000_000;
    const DAY: i64 = 86_400;

    #[test]
    fn a_bundle_cut_short_says_so_in_words() {
        let whole = ca("CA", NOW - DAY, NOW + DAY);
        let cut = &whole[..whole.len() / 2];
        let file = bundle(&[cut.to_owned()]);
        let error = ClientCas::read(file.path(), NOW).err().unwrap().to_string();
        assert!(
            error.contains("a PEM block has no -----END CERTIFICATE----- line"),
            "{error}"
        );
        assert!(!error.contains("[67"), "{error}");
    }

    #[test]
    fn only_the_client_cas_within_their_dates_are_trusted() {
        let file = bundle(&[
            ca("expired", NOW - 10 * DAY, NOW - DAY),
            ca("current", NOW - DAY, NOW + 30 * DAY),
            ca("next", NOW + 7 * DAY, NOW + 400 * DAY),
            ca("soon over", NOW - DAY, NOW + 2 * DAY),
        ]);
        let cas = ClientCas::read(file.path(), NOW).unwrap();
        assert_eq!((cas.in_date.len(), cas.all.len()), (2, 4));
        let left_out: Vec<(&str, bool)> = cas
            .left_out
            .iter()
            .map(|(ca, expired)| (ca.as_str(), *expired))
            .collect();
        assert!(
            left_out[0].0.contains("CN=expired") && left_out[0].1,
            "{left_out:?}"
        );
        assert!(
            left_out[1].0.contains("CN=next")
                && left_out[1].0.contains("valid from")
                && !left_out[1].1,
            "{left_out:?}"
        );
        // The first change: "soon over" ends (before "next" starts).
        assert_eq!(cas.changes_at, Some(NOW + 2 * DAY + 1));
        assert_eq!(cas.trusted_until, Some(NOW + 30 * DAY));
        // Then "next" starts (a little early: clocks differ).
        let later = ClientCas::read(file.path(), NOW + 3 * DAY).unwrap();
        assert_eq!(later.changes_at, Some(NOW + 7 * DAY - CLOCK_SKEW));
    }

    #[test]
    fn a_bundle_with_no_client_ca_within_its_dates_says_which_it_left_out() {
        let file = bundle(&[ca("expired", NOW - 10 * DAY, NOW - DAY)]);
        let cas = ClientCas::read(file.path(), NOW).unwrap();
        assert!(cas.in_date.is_empty() && cas.trusted_until.is_none());
        let error = cas.none_in_date(file.path());
        assert!(error.to_string().contains("CN=expired"), "{error}");
    }
}
