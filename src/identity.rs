//! Who is calling: the identity taken from a verified client certificate,
//! or `anonymous` on plaintext (loopback / unix socket only).
//!
//! The identity is worked out once per connection, at the TLS handshake,
//! and travels to every call of that connection in the request's
//! extensions (tonic copies a connection's `ConnectInfo` there), so no call
//! parses a certificate.

use std::{fmt, sync::Arc};

use x509_parser::{extensions::GeneralName, prelude::FromDer};

/// The identity of plaintext callers, as the policy names it.
pub const ANONYMOUS: &str = "anonymous";

/// A caller's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// Plaintext connection: no certificate.
    Anonymous,
    /// From the client certificate: URI SAN (e.g. a SPIFFE id), else DNS
    /// SAN, else subject CN.
    Certificate(Arc<str>),
    /// A verified certificate that names nobody (no SAN, no CN).
    Unnamed,
}

impl Identity {
    /// The name the policy and the audit log use; `None` when unnamed.
    pub fn name(&self) -> Option<&str> {
        match self {
            Self::Anonymous => Some(ANONYMOUS),
            Self::Certificate(name) => Some(name),
            Self::Unnamed => None,
        }
    }

    /// Reads the identity of a DER certificate.
    pub fn from_certificate(der: &[u8]) -> Self {
        let Ok((_, cert)) = x509_parser::certificate::X509Certificate::from_der(der) else {
            return Self::Unnamed;
        };
        let sans: Vec<&GeneralName> = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|ext| ext.value.general_names.iter().collect())
            .unwrap_or_default();
        let uri = sans.iter().find_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        });
        let dns = sans.iter().find_map(|name| match name {
            GeneralName::DNSName(dns) => Some(*dns),
            _ => None,
        });
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok());
        match uri.or(dns).or(common_name) {
            Some(name) if !name.is_empty() => Self::Certificate(name.into()),
            _ => Self::Unnamed,
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name().unwrap_or("(unnamed certificate)"))
    }
}

/// What a connection tells each of its calls.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub identity: Identity,
    /// The connection's call slots: a call (a stream, for as long as it is
    /// open) holds one; none left means RESOURCE_EXHAUSTED.
    pub call_slots: Arc<tokio::sync::Semaphore>,
}

/// The identity of a request: from its connection, or anonymous when the
/// connection is plaintext.
pub fn of_request<T>(request: &tonic::Request<T>) -> Identity {
    connection_of(request).map_or(Identity::Anonymous, |info| info.identity.clone())
}

/// What the request's connection told it (absent on unix sockets).
pub fn connection_of<T>(request: &tonic::Request<T>) -> Option<&ConnectionInfo> {
    request.extensions().get::<ConnectionInfo>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(build: impl FnOnce(&mut rcgen::CertificateParams)) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        build(&mut params);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn uri_san_first_then_dns_then_cn() {
        let all = cert(|p| {
            p.subject_alt_names = vec![
                rcgen::SanType::DnsName("svc.internal".try_into().unwrap()),
                rcgen::SanType::URI("spiffe://insurecove/auth-service".try_into().unwrap()),
            ];
            p.distinguished_name
                .push(rcgen::DnType::CommonName, "cn-name");
        });
        assert_eq!(
            Identity::from_certificate(&all),
            Identity::Certificate("spiffe://insurecove/auth-service".into())
        );
        let dns = cert(|p| {
            p.subject_alt_names = vec![rcgen::SanType::DnsName("svc.internal".try_into().unwrap())];
            p.distinguished_name
                .push(rcgen::DnType::CommonName, "cn-name");
        });
        assert_eq!(
            Identity::from_certificate(&dns),
            Identity::Certificate("svc.internal".into())
        );
        let cn = cert(|p| {
            p.distinguished_name
                .push(rcgen::DnType::CommonName, "cn-name")
        });
        assert_eq!(
            Identity::from_certificate(&cn),
            Identity::Certificate("cn-name".into())
        );
        assert_eq!(Identity::from_certificate(&cert(|_| {})), Identity::Unnamed);
        assert_eq!(
            Identity::from_certificate(b"not a certificate"),
            Identity::Unnamed
        );
    }
}
