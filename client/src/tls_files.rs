//! The client's mutual-TLS files, read and checked when the client is
//! made: a file that holds no certificate, or a key that is not the
//! certificate's, is named with the setting that points at it. Left to
//! the handshake, each of these would fail every connection later as a
//! bare "transport error" (or, for a CA file without a certificate, as the
//! broker's certificate being "not signed by the CA").
//!
//! They are read again for each new connection (`client_config`): a
//! certificate renewed in place (cert-manager rewrites the files) is used
//! from the next connection on, without a new client. The broker closes a
//! connection when its certificate expires, so a long-lived service would
//! otherwise lose the broker for good at the first expiry.

use std::{path::Path, sync::Arc};

use rustls::{
    ClientConfig, Error as TlsError, InconsistentKeys, RootCertStore,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    sign::CertifiedKey,
};
use zeroize::Zeroizing;

use crate::Error;

/// The three files' PEM text, checked.
pub(crate) struct TlsFiles {
    pub(crate) ca: Vec<u8>,
    pub(crate) cert: Vec<u8>,
    pub(crate) key: Zeroizing<Vec<u8>>,
}

/// Reads and checks the CA, certificate and key files.
pub(crate) fn read(ca: &Path, cert: &Path, key: &Path) -> Result<TlsFiles, Error> {
    let ca_pem = read_file(ca)?;
    certificates(&ca_pem, "BROKER_CA_FILE", ca)?;
    let cert_pem = read_file(cert)?;
    let chain = certificates(&cert_pem, "BROKER_CERT_FILE", cert)?;
    let key_pem = Zeroizing::new(read_file(key)?);
    check_key(&key_pem, chain, key, cert)?;
    Ok(TlsFiles {
        ca: ca_pem,
        cert: cert_pem,
        key: key_pem,
    })
}

/// The rustls config of a connection, from the files as they are now:
/// trusts the CA file, presents the certificate and key, offers h2.
pub(crate) fn client_config(ca: &Path, cert: &Path, key: &Path) -> Result<ClientConfig, Error> {
    let files = read(ca, cert, key)?;
    let mut roots = RootCertStore::empty();
    for certificate in certificates(&files.ca, "BROKER_CA_FILE", ca)? {
        roots
            .add(certificate)
            .map_err(|e| Error::Config(format!("BROKER_CA_FILE {}: {e}", ca.display())))?;
    }
    let chain = certificates(&files.cert, "BROKER_CERT_FILE", cert)?;
    let key_der = PrivateKeyDer::from_pem_slice(&files.key).map_err(|_| {
        Error::Config(format!(
            "BROKER_KEY_FILE {} holds no PEM private key",
            key.display()
        ))
    })?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key_der)
        .map_err(|e| match e {
            TlsError::InvalidCertificate(problem) => Error::Config(format!(
                "BROKER_CERT_FILE {}: {}",
                cert.display(),
                certificate_problem(&problem)
            )),
            e => Error::Config(format!("BROKER_KEY_FILE {}: {e}", key.display())),
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Why rustls cannot present the client certificate, in words: it shows
/// the certificate parser's own errors as Rust debug text.
fn certificate_problem(problem: &rustls::CertificateError) -> String {
    let text = format!("{problem:?}");
    if text.contains("UnsupportedCertVersion") {
        // `openssl x509 -req` without an extension file makes one.
        "an X.509 v1 certificate, which TLS does not take: issue it as v3 (with openssl, \
         sign it with an extension file, e.g. one line `extendedKeyUsage=clientAuth`)"
            .to_owned()
    } else {
        format!("the certificate cannot be used ({text})")
    }
}

/// The provider the handshake uses: the process's default when one is
/// installed (tonic's rule), else ring.
fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

fn read_file(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))
}

/// The PEM certificates in `pem`; at least one.
fn certificates(
    pem: &[u8],
    setting: &str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            Error::Config(format!(
                "{setting} {}: not a readable PEM file ({e})",
                path.display()
            ))
        })?;
    if certificates.is_empty() {
        return Err(Error::Config(format!(
            "{setting} {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    Ok(certificates)
}

/// The key in `pem` must be a private key the handshake can use, and the
/// one of the certificate `chain` starts with.
fn check_key(
    pem: &[u8],
    chain: Vec<CertificateDer<'static>>,
    key_path: &Path,
    cert_path: &Path,
) -> Result<(), Error> {
    let key = PrivateKeyDer::from_pem_slice(pem).map_err(|_| {
        Error::Config(format!(
            "BROKER_KEY_FILE {} holds no PEM private key",
            key_path.display()
        ))
    })?;
    let signing = provider().key_provider.load_private_key(key).map_err(|e| {
        Error::Config(format!(
            "BROKER_KEY_FILE {}: not a usable key ({e})",
            key_path.display()
        ))
    })?;
    match CertifiedKey::new(chain, Arc::clone(&signing)).keys_match() {
        Err(TlsError::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
            Err(Error::Config(format!(
                "BROKER_KEY_FILE {} is not the key of the certificate in BROKER_CERT_FILE {}",
                key_path.display(),
                cert_path.display()
            )))
        }
        // Matching, or a key type whose public half rustls cannot tell:
        // the handshake decides.
        _ => Ok(()),
    }
}
