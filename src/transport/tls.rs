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
//! - CA dates: only the bundle's CAs within their dates are trusted
//!   (`client_cas`), and the config is reloaded when that set changes (a
//!   CA expires, or one not yet valid starts): the connections of clients
//!   it signed are then closed as after any reload.
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
    pki_types::{
        CertificateDer, PrivateKeyDer, UnixTime,
        pem::{self, PemObject},
    },
    server::{WebPkiClientVerifier, danger::ClientCertVerifier},
    sign::CertifiedKey,
};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_util::sync::CancellationToken;
use x509_parser::prelude::FromDer;

use super::client_cas::{ClientCas, ClientCheck};
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
    /// When the last client CA it trusts expires (`None`: it trusts none).
    trusted_until: Option<i64>,
    /// Cancelled when a reload replaces this state.
    replaced: CancellationToken,
    /// What it was built from: a reload that finds the same changes
    /// nothing (a SIGHUP, a file written again as it was).
    built_from: BuiltFrom,
}

/// What a TLS config was built from: the certificates, and the client CA
/// bundle's CAs left out and when that changes (a CA added ahead of its
/// dates changes no root, but must be taken in when they begin). The key
/// is not among them: a key that changed without its certificate would
/// not match it, and is refused.
#[derive(PartialEq)]
struct BuiltFrom {
    chain: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
    trust_none: bool,
    left_out: Vec<(String, bool)>,
    /// When the client CAs within their dates change, Unix seconds: the
    /// config is reloaded then.
    changes_at: Option<i64>,
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

    fn load(&self, previous: Option<&TlsState>) -> Result<TlsState, TlsError> {
        let now = unix_now();
        let path = &self.files.client_ca;
        let cas = ClientCas::read(path, now)?;
        // Said when it changes, not at every SIGHUP.
        let trust_as_before = previous.is_some_and(|p| {
            p.built_from.left_out == cas.left_out && p.built_from.changes_at == cas.changes_at
        });
        if !trust_as_before {
            cas.log_left_out(path);
        }
        let trusting = !cas.in_date.is_empty();
        // No CA in its dates: a broken file at the start, or while the
        // config in force still trusts one (an edit put an expired bundle
        // in place). When the last CA in force expires, though, a config
        // that trusts no client takes over: the old one would go on
        // letting that CA's clients in.
        if !trusting && previous.is_none_or(|p| p.trusted_until.is_some_and(|until| until >= now)) {
            return Err(cas.none_in_date(path));
        }
        if !trusting && !trust_as_before {
            tracing::error!(file = %path.display(), "no CA of the client CA bundle is within its dates: every client certificate is refused until it holds one");
        }
        let roots = if trusting { &cas.in_date } else { &cas.all };
        let chain = read_certificates("server certificate", &self.files.cert)?;
        let (config, clients) = build(&self.files, chain.clone(), roots.clone(), !trusting)?;
        // A certificate outside its dates fails every handshake: at a
        // reload it is a broken file (the one in use stays), at start a
        // clear error rather than a broker no client can reach.
        let report = report(&self.files, &chain, &cas, now)?;
        Ok(TlsState {
            config,
            clients,
            expiry: report.expires_at,
            trusted_until: cas.trusted_until,
            replaced: CancellationToken::new(),
            built_from: BuiltFrom {
                chain,
                roots: roots.clone(),
                trust_none: !trusting,
                left_out: cas.left_out.clone(),
                changes_at: cas.changes_at,
            },
        })
    }

    fn same(&self, old: &TlsState, new: &TlsState) -> bool {
        old.built_from == new.built_from
    }

    fn reload_due(&self, value: &TlsState) -> Option<SystemTime> {
        let at = u64::try_from(value.built_from.changes_at?).unwrap_or(0);
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

    /// Says at start what `check` fails on: a server certificate within
    /// `EXPIRY_WARNING` of its end (the broker still starts: it serves
    /// until then, and a renewal is taken in without a restart).
    pub fn warn_if_expiring_soon(&self) {
        let left = self.certificate_expiry() - unix_now();
        if left < EXPIRY_WARNING.as_secs() as i64 {
            tracing::warn!(
                days = left / 86_400,
                "the server certificate expires within {} days: renew it",
                EXPIRY_WARNING.as_secs() / 86_400
            );
        }
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
/// with it, its check of client certificates, which trusts `client_cas`,
/// or no client at all when `trust_none`.
fn build(
    files: &TlsFiles,
    chain: Vec<CertificateDer<'static>>,
    client_cas: Vec<CertificateDer<'static>>,
    trust_none: bool,
) -> Result<(Arc<ServerConfig>, Arc<dyn ClientCertVerifier>), TlsError> {
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError::Read {
        what: "server key",
        path: files.key.clone(),
        detail: pem_problem(&e),
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
    let verifier: Arc<dyn ClientCertVerifier> = Arc::new(ClientCheck {
        inner: verifier,
        trust_none,
    });
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

/// A server certificate closer than this to its end is a problem: `check`
/// fails on it, and the start warns.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(7 * 24 * 3600);

/// A renewed certificate stamped "valid from now" can be a little ahead of
/// this machine's clock: that is not a broken file.
pub(super) const CLOCK_SKEW: i64 = 300;

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64
}

pub(super) fn read_certificates(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read_error = |detail: String| TlsError::Read {
        what,
        path: path.to_owned(),
        detail,
    };
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|e| read_error(pem_problem(&e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read_error(pem_problem(&e)))?;
    if certificates.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_owned(),
            kind: "certificate",
        });
    }
    Ok(certificates)
}

/// What is wrong with a PEM file, in words: the PEM reader's own text
/// shows the END marker it missed as a list of byte values, and would
/// quote a BEGIN line it could not read.
fn pem_problem(error: &pem::Error) -> String {
    match error {
        pem::Error::MissingSectionEnd { end_marker } => format!(
            "a PEM block has no -----END {}----- line: the file is cut short, or still being \
             written",
            String::from_utf8_lossy(end_marker)
        ),
        pem::Error::IllegalSectionStart { .. } => {
            "a -----BEGIN ...----- line cannot be read".to_owned()
        }
        pem::Error::Base64Decode(_) => "a PEM block's base64 text is damaged".to_owned(),
        other => other.to_string(),
    }
}

/// Checks the server certificate's dates (for `check`), after
/// `TlsTerminator::load` has checked the rest.
pub fn certificate_report(files: &TlsFiles) -> Result<CertificateReport, TlsError> {
    let now = unix_now();
    let chain = read_certificates("server certificate", &files.cert)?;
    report(files, &chain, &ClientCas::read(&files.client_ca, now)?, now)
}

/// `certificate_report`, with the server's `chain` and the client CA
/// bundle as read at `now`.
fn report(
    files: &TlsFiles,
    chain: &[CertificateDer<'static>],
    cas: &ClientCas,
    now: i64,
) -> Result<CertificateReport, TlsError> {
    let (_, leaf) = x509_parser::certificate::X509Certificate::from_der(&chain[0])
        .map_err(|e| TlsError::Config(format!("the server certificate does not parse: {e}")))?;
    let validity = leaf.validity();
    let not_after = validity.not_after.to_string();
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
    // Only a certificate that says it is no CA counts against the file: a
    // trust anchor without BasicConstraints still works.
    let not_a_ca = |der: &CertificateDer<'_>| {
        x509_parser::certificate::X509Certificate::from_der(der).is_ok_and(|(_, cert)| {
            matches!(cert.basic_constraints(), Ok(Some(constraints)) if !constraints.value.ca)
        })
    };
    if cas.all.iter().all(not_a_ca) {
        problems.push(format!(
            "the client CA file {} holds no CA (its certificates say CA:FALSE): no client \
             certificate can chain to it",
            files.client_ca.display()
        ));
    }
    for (ca, expired) in &cas.left_out {
        let file = files.client_ca.display();
        problems.push(if *expired {
            format!(
                "the client CA {ca} in {file} has expired: it is left out, and the \
                 certificates it signed are refused"
            )
        } else {
            format!("the client CA {ca} in {file} is not valid yet: it is left out until it is")
        });
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
