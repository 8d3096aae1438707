//! Mutual TLS: the server's certificate, client certificates required and
//! verified against a CA bundle, TLS 1.2 and 1.3, ALPN h2.
//!
//! The broker terminates TLS itself (rustls through tokio-rustls) rather
//! than through tonic's `tls_config`, for two reasons:
//! - reload: the rustls config is a `Reloadable`, swapped whole when the
//!   certificate, key or CA files change (or on SIGHUP); each new handshake
//!   takes the config current at that moment. A broken new file keeps the
//!   old config. An open connection's client is checked again against the
//!   new config (a CA taken out of the bundle), and its connection closed
//!   when it fails, or when its certificate expires (`peer_trust`).
//! - CA dates: webpki checks the dates of a client's certificate and of its
//!   intermediates, not those of the trust anchor, so an expired CA left in
//!   the bundle would go on admitting what it signed. Only the bundle's CAs
//!   within their dates are trusted, and the config is reloaded when that
//!   set changes (a CA expires, or one not yet valid starts): the
//!   connections of clients it signed are then closed as after any reload.
//! - identity: the caller's identity is read from its certificate once, at
//!   the handshake (see `listener`), and attached to the connection, so
//!   calls never parse certificates.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::{
    RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject},
    server::{WebPkiClientVerifier, danger::ClientCertVerifier},
    sign::CertifiedKey,
};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_util::sync::CancellationToken;
use x509_parser::prelude::FromDer;

use crate::{
    config::TlsFiles,
    identity::Identity,
    reload::{Loader, Reload, Reloadable},
};

/// Why the TLS files cannot be used. Never includes key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {detail}")]
    Read {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("{what} {path} holds no PEM {kind}")]
    Empty {
        what: &'static str,
        path: PathBuf,
        kind: &'static str,
    },
    #[error("the private key {key} does not belong to the certificate {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("the certificate {path} is not valid now (valid {not_before} to {not_after})")]
    NotValidNow {
        path: PathBuf,
        not_before: String,
        not_after: String,
    },
    #[error(
        "no CA of the client CA bundle {path} is within its dates ({left_out}): no client \
         certificate could be verified"
    )]
    NoCaInDate { path: PathBuf, left_out: String },
    #[error("cannot build the TLS configuration: {0}")]
    Config(String),
}

/// What `check` reports of the server certificate.
#[derive(Debug, Clone)]
pub struct CertificateReport {
    pub subject: String,
    pub not_after: String,
    /// `not_after`, in Unix seconds.
    pub expires_at: i64,
    pub expires_in: Duration,
    /// What would make every client's handshake fail although the files
    /// load: a server certificate for client authentication only, a client
    /// CA file with no CA in it.
    pub problems: Vec<String>,
}

/// The TLS side of the listener; holds the current rustls config.
pub struct TlsTerminator {
    state: Arc<Reloadable<TlsSource>>,
}

/// The files a TLS config is read from.
struct TlsSource {
    files: TlsFiles,
}

/// A TLS config and when its certificate expires.
struct TlsState {
    config: Arc<ServerConfig>,
    /// The config's check of client certificates, kept to check again the
    /// clients of open connections when a reload replaces it.
    clients: Arc<dyn ClientCertVerifier>,
    /// When the server certificate expires, Unix seconds.
    expiry: i64,
    /// When the client CAs within their dates change, Unix seconds: the
    /// config is reloaded then.
    trust_changes_at: Option<i64>,
    /// Cancelled when a reload replaces this state.
    replaced: CancellationToken,
}

impl Loader for TlsSource {
    type Value = TlsState;
    type Error = TlsError;

    fn what(&self) -> &'static str {
        "TLS certificates"
    }

    fn files(&self) -> Vec<PathBuf> {
        vec![
            self.files.cert.clone(),
            self.files.key.clone(),
            self.files.client_ca.clone(),
        ]
    }

    fn load(&self, _previous: Option<&TlsState>) -> Result<TlsState, TlsError> {
        let cas = ClientCas::read(&self.files.client_ca, unix_now())?;
        for left_out in &cas.left_out {
            tracing::warn!(
                ca = %left_out,
                file = %self.files.client_ca.display(),
                "a client CA outside its dates is left out of the trust store: the certificates it signed are refused"
            );
        }
        let trust_changes_at = cas.changes_at;
        let (config, clients) = build(&self.files, cas.in_date)?;
        // A certificate outside its dates fails every handshake: at a
        // reload it is a broken file (the one in use stays), at start a
        // clear error rather than a broker no client can reach.
        let report = certificate_report(&self.files)?;
        Ok(TlsState {
            config,
            clients,
            expiry: report.expires_at,
            trust_changes_at,
            replaced: CancellationToken::new(),
        })
    }

    fn reload_due(&self, value: &TlsState) -> Option<SystemTime> {
        let at = u64::try_from(value.trust_changes_at?).unwrap_or(0);
        Some(SystemTime::UNIX_EPOCH + Duration::from_secs(at))
    }

    fn replaced(&self, replaced: &TlsState) {
        replaced.replaced.cancel();
    }
}

impl TlsTerminator {
    pub fn load(files: &TlsFiles) -> Result<Arc<Self>, TlsError> {
        let source = TlsSource {
            files: files.clone(),
        };
        Ok(Arc::new(Self {
            state: Reloadable::new(source)?,
        }))
    }

    /// The config, as a value that follows its files.
    pub fn reloadable(&self) -> Arc<dyn Reload> {
        Arc::clone(&self.state) as Arc<dyn Reload>
    }

    /// When the certificate in use expires, in Unix seconds.
    pub fn certificate_expiry(&self) -> i64 {
        self.state.current().expiry
    }

    /// The acceptor for a new connection: the config current right now,
    /// and the token a reload of that config cancels.
    pub(crate) fn acceptor(&self) -> (TlsAcceptor, CancellationToken) {
        let state = self.state.current();
        (
            TlsAcceptor::from(Arc::clone(&state.config)),
            state.replaced.clone(),
        )
    }

    /// Checks `chain` (a client's, leaf first) against the config in
    /// force; `Ok` holds the token a reload of that config cancels.
    pub(crate) fn verify_client(
        &self,
        chain: &[CertificateDer<'static>],
    ) -> Result<CancellationToken, rustls::Error> {
        let state = self.state.current();
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or(rustls::Error::NoCertificatesPresented)?;
        state
            .clients
            .verify_client_cert(leaf, intermediates, UnixTime::now())?;
        Ok(state.replaced.clone())
    }
}

/// The identity a TLS connection's verified client certificate names.
pub(crate) fn peer_identity(stream: &TlsStream<TcpStream>) -> Identity {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map_or(Identity::Unnamed, |leaf| Identity::from_certificate(leaf))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Builds the rustls config from the files, checking what can be checked;
/// with it, its check of client certificates, which trusts `client_cas`.
fn build(
    files: &TlsFiles,
    client_cas: Vec<CertificateDer<'static>>,
) -> Result<(Arc<ServerConfig>, Arc<dyn ClientCertVerifier>), TlsError> {
    let chain = read_certificates("server certificate", &files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError::Read {
        what: "server key",
        path: files.key.clone(),
        detail: e.to_string(),
    })?;
    let provider = provider();
    let signing_key = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| TlsError::Config(format!("the server key cannot be used: {e}")))?;
    CertifiedKey::new(chain.clone(), signing_key)
        .keys_match()
        .map_err(|_| TlsError::KeyMismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
        })?;

    let mut roots = RootCertStore::empty();
    for ca in client_cas {
        roots.add(ca).map_err(|e| {
            TlsError::Config(format!("client CA {}: {e}", files.client_ca.display()))
        })?;
    }
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(Arc::clone(&verifier))
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    // No session resumption: a resumed session skips the client
    // certificate's check, so a client whose certificate has expired (or
    // whose CA a reload has not yet dropped) would be let back in on
    // every reconnect. A full handshake per connection is the price; a
    // connection lives long.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok((Arc::new(config), verifier))
}

/// The client CA bundle as the trust store takes it: the CAs within their
/// dates (see the module doc).
struct ClientCas {
    in_date: Vec<CertificateDer<'static>>,
    /// The others, as the log names them.
    left_out: Vec<String>,
    /// When the CAs in date change next, Unix seconds: the first of them
    /// to expire, or the first of the others to start.
    changes_at: Option<i64>,
}

impl ClientCas {
    fn read(path: &Path, now: i64) -> Result<Self, TlsError> {
        let mut cas = Self {
            in_date: Vec::new(),
            left_out: Vec::new(),
            changes_at: None,
        };
        for der in read_certificates("client CA bundle", path)? {
            // One x509-parser cannot read is left to webpki to judge.
            let Ok((_, ca)) = x509_parser::certificate::X509Certificate::from_der(&der) else {
                cas.in_date.push(der);
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
                cas.left_out
                    .push(shown(format!("valid from {}", validity.not_before)));
                from - CLOCK_SKEW
            } else if now > until {
                cas.left_out
                    .push(shown(format!("expired {}", validity.not_after)));
                continue;
            } else {
                cas.in_date.push(der);
                until.saturating_add(1)
            };
            cas.changes_at = Some(cas.changes_at.map_or(change, |at| at.min(change)));
        }
        if cas.in_date.is_empty() {
            return Err(TlsError::NoCaInDate {
                path: path.to_owned(),
                left_out: cas.left_out.join("; "),
            });
        }
        Ok(cas)
    }
}

/// A renewed certificate stamped "valid from now" can be a little ahead of
/// this machine's clock: that is not a broken file.
const CLOCK_SKEW: i64 = 300;

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64
}

fn read_certificates(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read_error = |detail: String| TlsError::Read {
        what,
        path: path.to_owned(),
        detail,
    };
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|e| read_error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read_error(e.to_string()))?;
    if certificates.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_owned(),
            kind: "certificate",
        });
    }
    Ok(certificates)
}

/// Checks the server certificate's dates (for `check`), after
/// `server_config` has checked the rest.
pub fn certificate_report(files: &TlsFiles) -> Result<CertificateReport, TlsError> {
    let chain = read_certificates("server certificate", &files.cert)?;
    let (_, leaf) = x509_parser::certificate::X509Certificate::from_der(&chain[0])
        .map_err(|e| TlsError::Config(format!("the server certificate does not parse: {e}")))?;
    let validity = leaf.validity();
    let not_after = validity.not_after.to_string();
    let now = unix_now();
    if now + CLOCK_SKEW < validity.not_before.timestamp() || now > validity.not_after.timestamp() {
        return Err(TlsError::NotValidNow {
            path: files.cert.clone(),
            not_before: validity.not_before.to_string(),
            not_after,
        });
    }
    let expires_in =
        Duration::from_secs(validity.not_after.timestamp().saturating_sub(now).max(0) as u64);
    let mut problems = Vec::new();
    if let Ok(Some(usage)) = leaf.extended_key_usage()
        && !usage.value.server_auth
        && !usage.value.any
    {
        problems.push(format!(
            "the server certificate {} is not for server authentication (its extended key \
             usage lacks serverAuth): clients will refuse it",
            files.cert.display()
        ));
    }
    let client_cas = read_certificates("client CA", &files.client_ca)?;
    // Only a certificate that says it is no CA counts against the file: a
    // trust anchor without BasicConstraints still works.
    let not_a_ca = |der: &CertificateDer<'_>| {
        x509_parser::certificate::X509Certificate::from_der(der).is_ok_and(|(_, cert)| {
            matches!(cert.basic_constraints(), Ok(Some(constraints)) if !constraints.value.ca)
        })
    };
    if client_cas.iter().all(not_a_ca) {
        problems.push(format!(
            "the client CA file {} holds no CA (its certificates say CA:FALSE): no client \
             certificate can chain to it",
            files.client_ca.display()
        ));
    }
    for left_out in ClientCas::read(&files.client_ca, now)?.left_out {
        problems.push(format!(
            "the client CA {left_out} in {} is outside its dates: it is left out, and the \
             certificates it signed are refused",
            files.client_ca.display()
        ));
    }
    Ok(CertificateReport {
        subject: leaf.subject().to_string(),
        not_after,
        expires_at: validity.not_after.timestamp(),
        expires_in,
        problems,
    })
}

impl TlsTerminator {
    /// Registers the certificate's expiry as a metric.
    pub fn register_metrics(self: &Arc<Self>, metrics: &crate::metrics::Metrics) {
        use crate::metrics::gauge;
        let tls = Arc::downgrade(self);
        metrics.register_state(move |e| {
            if let Some(expiry) = tls.upgrade().map(|tls| tls.certificate_expiry()) {
                gauge(
                    e,
                    "tls_certificate_expiry_timestamp_seconds",
                    "When the server certificate in use expires (Unix time)",
                    expiry,
                )?;
            }
            Ok(())
        });
    }
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
    fn only_the_client_cas_within_their_dates_are_trusted() {
        let file = bundle(&[
            ca("expired", NOW - 10 * DAY, NOW - DAY),
            ca("current", NOW - DAY, NOW + 30 * DAY),
            ca("next", NOW + 7 * DAY, NOW + 400 * DAY),
            ca("soon over", NOW - DAY, NOW + 2 * DAY),
        ]);
        let cas = ClientCas::read(file.path(), NOW).unwrap();
        assert_eq!(cas.in_date.len(), 2);
        assert_eq!(cas.left_out.len(), 2, "{:?}", cas.left_out);
        assert!(
            cas.left_out[0].contains("CN=expired") && cas.left_out[0].contains("expired "),
            "{:?}",
            cas.left_out
        );
        assert!(
            cas.left_out[1].contains("CN=next") && cas.left_out[1].contains("valid from"),
            "{:?}",
            cas.left_out
        );
        // The first change: "soon over" ends (before "next" starts).
        assert_eq!(cas.changes_at, Some(NOW + 2 * DAY + 1));
        // Then "next" starts (a little early: clocks differ).
        let later = ClientCas::read(file.path(), NOW + 3 * DAY).unwrap();
        assert_eq!(later.changes_at, Some(NOW + 7 * DAY - CLOCK_SKEW));
    }

    #[test]
    fn a_bundle_with_no_client_ca_within_its_dates_is_refused() {
        let file = bundle(&[ca("expired", NOW - 10 * DAY, NOW - DAY)]);
        let error = ClientCas::read(file.path(), NOW).err().unwrap();
        assert!(matches!(error, TlsError::NoCaInDate { .. }), "{error}");
        assert!(error.to_string().contains("CN=expired"), "{error}");
    }
}
