//! A test PKI made with rcgen: a CA, a server certificate and client
//! certificates, as PEM files in a temporary directory. Shared by the
//! integration tests and `examples/loadgen.rs` (mutual TLS runs).

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

/// PEM files of a CA, a server certificate (SANs localhost and 127.0.0.1)
/// and client certificates (one URI SAN each), in a temporary directory.
pub struct Pki {
    pub dir: tempfile::TempDir,
    ca_issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

/// A certificate and key written as PEM files.
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Issued {
    /// A rustls client config that presents this certificate and trusts
    /// the CA file `ca`, offering h2 as a gRPC client does.
    // For the server tests and the load generator; the client tests,
    // which include this file too, go through the client crate.
    #[allow(dead_code)]
    pub fn rustls_client(&self, ca: &Path) -> rustls::ClientConfig {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
        let mut roots = rustls::RootCertStore::empty();
        for certificate in CertificateDer::pem_file_iter(ca).expect("the CA file") {
            roots
                .add(certificate.expect("a CA certificate"))
                .expect("a usable CA");
        }
        let chain = CertificateDer::pem_file_iter(&self.cert)
            .expect("the certificate file")
            .collect::<Result<Vec<_>, _>>()
            .expect("PEM certificates");
        let key = PrivateKeyDer::from_pem_file(&self.key).expect("the key file");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .expect("a usable client key");
        config.alpn_protocols = vec![b"h2".to_vec()];
        config
    }
}

impl Pki {
    pub fn new() -> Self {
        Self::with_ca(|_| {})
    }

    /// A PKI whose CA expires `after` from now (its leaves do not).
    // For the server tests; the client tests include this file too.
    #[allow(dead_code)]
    pub fn with_ca_expiring(after: std::time::Duration) -> Self {
        Self::with_ca(|params| params.not_after = time::OffsetDateTime::now_utc() + after)
    }

    /// A PKI whose CA's dates begin `after` from now, as the broker counts
    /// them (it takes a CA in five minutes early, for clock skew).
    // For the server tests, as `with_ca_expiring`.
    #[allow(dead_code)]
    pub fn with_ca_starting(after: std::time::Duration) -> Self {
        let skew = std::time::Duration::from_secs(300);
        Self::with_ca(|params| params.not_before = time::OffsetDateTime::now_utc() + skew + after)
    }

    fn with_ca(adjust: impl FnOnce(&mut rcgen::CertificateParams)) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "secrets-broker client tests CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        adjust(&mut params);
        let key = KeyPair::generate().expect("CA key");
        let ca_cert = params.self_signed(&key).expect("self-sign the CA");
        let dir = tempfile::tempdir().expect("temp dir for the PKI");
        std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).expect("write ca.pem");
        Self {
            dir,
            ca_issuer: rcgen::Issuer::new(params, key),
        }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Signs a leaf certificate made from `params` with the CA.
    pub fn issue(&self, label: &str, params: rcgen::CertificateParams) -> Issued {
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.ca_issuer)
            .expect("sign a leaf certificate");
        let issued = Issued {
            cert: self.dir.path().join(format!("{label}.pem")),
            key: self.dir.path().join(format!("{label}-key.pem")),
        };
        std::fs::write(&issued.cert, cert.pem()).expect("write a certificate");
        std::fs::write(&issued.key, key.serialize_pem()).expect("write a key");
        issued
    }

    /// The broker's certificate: SAN DNS localhost and IP 127.0.0.1.
    pub fn server(&self) -> Issued {
        use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyUsagePurpose};
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "secrets-broker test server");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        self.issue("server", params)
    }

    /// A client certificate whose only SAN is the URI `identity`.
    pub fn client(&self, label: &str, identity: &str) -> Issued {
        use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyUsagePurpose, SanType};
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
        params
            .distinguished_name
            .push(DnType::OrganizationName, "InsureCove client tests");
        params.subject_alt_names = vec![SanType::URI(identity.try_into().expect("an IA5 URI"))];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        self.issue(label, params)
    }

    /// Writes a policy file; returns its path.
    pub fn write_policy(&self, text: &str) -> PathBuf {
        let path = self.dir.path().join("policy.toml");
        std::fs::write(&path, text).expect("write policy.toml");
        path
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}
