//! `ClientConfig`: where the broker is and how to reach it.
//!
//! The endpoint is parsed once, here, as the broker enforces its side:
//! plaintext only to loopback or a unix socket, mutual TLS with all three
//! files otherwise, and no form (`http://` with TLS files, a `user@` part)
//! that would quietly talk to another host or in plaintext.

use std::{path::PathBuf, time::Duration};

use crate::Error;

/// How to reach the broker. Plaintext is allowed to a loopback address
/// only; anything else needs mutual TLS (a CA, a certificate and its key).
///
/// ```
/// use secrets_broker_client::ClientConfig;
/// let local = ClientConfig::new("127.0.0.1:50051");
/// let remote = ClientConfig::new("broker.internal:50051")
///     .with_tls("ca.pem", "client.pem", "client-key.pem")
///     .with_tls_domain("broker.internal");
/// # let _ = (local, remote);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// `host:port`, a URL (`http://` or `https://`), or a unix socket
    /// (`unix:/run/secrets-broker.sock`, plaintext).
    pub endpoint: String,
    /// The CA that signed the broker's certificate (PEM).
    pub ca_file: Option<PathBuf>,
    /// This client's certificate (PEM).
    pub cert_file: Option<PathBuf>,
    /// This client's private key (PEM).
    pub key_file: Option<PathBuf>,
    /// The name to expect in the broker's certificate, when it differs from
    /// the endpoint's host.
    pub tls_domain: Option<String>,
    /// How long to wait for a connection.
    pub connect_timeout: Duration,
    /// How long one call may take, its retries and the wait for a
    /// connection included (watch streams excepted).
    pub request_timeout: Duration,
    /// Extra attempts of an idempotent read after UNAVAILABLE, within
    /// `request_timeout`.
    pub max_retries: u32,
}

impl ClientConfig {
    /// A plaintext config for `endpoint`, with default timeouts (5 s to
    /// connect, 10 s a call) and 3 retries.
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            tls_domain: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            max_retries: 3,
        }
    }

    /// From the environment: `BROKER_ENDPOINT` (default
    /// `127.0.0.1:50051`), `BROKER_CA_FILE`, `BROKER_CERT_FILE`,
    /// `BROKER_KEY_FILE`, `BROKER_TLS_DOMAIN`.
    pub fn from_env() -> Result<Self, Error> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let mut config =
            Self::new(var("BROKER_ENDPOINT").unwrap_or_else(|| "127.0.0.1:50051".into()));
        config.ca_file = var("BROKER_CA_FILE").map(PathBuf::from);
        config.cert_file = var("BROKER_CERT_FILE").map(PathBuf::from);
        config.key_file = var("BROKER_KEY_FILE").map(PathBuf::from);
        config.tls_domain = var("BROKER_TLS_DOMAIN");
        config.tls_files()?;
        Ok(config)
    }

    /// Mutual TLS with these PEM files.
    pub fn with_tls(
        mut self,
        ca_file: impl Into<PathBuf>,
        cert_file: impl Into<PathBuf>,
        key_file: impl Into<PathBuf>,
    ) -> Self {
        self.ca_file = Some(ca_file.into());
        self.cert_file = Some(cert_file.into());
        self.key_file = Some(key_file.into());
        self
    }

    /// The name the broker's certificate must carry.
    pub fn with_tls_domain(mut self, domain: impl Into<String>) -> Self {
        self.tls_domain = Some(domain.into());
        self
    }

    /// The three TLS files, when TLS is configured; an error when only some
    /// of them are.
    pub(crate) fn tls_files(&self) -> Result<Option<(&PathBuf, &PathBuf, &PathBuf)>, Error> {
        match (&self.ca_file, &self.cert_file, &self.key_file) {
            (None, None, None) => Ok(None),
            (Some(ca), Some(cert), Some(key)) => Ok(Some((ca, cert, key))),
            _ => Err(Error::Config(
                "mutual TLS needs BROKER_CA_FILE, BROKER_CERT_FILE and BROKER_KEY_FILE together"
                    .into(),
            )),
        }
    }

    /// The socket path of a `unix:` endpoint.
    pub(crate) fn unix_path(&self) -> Option<&str> {
        self.endpoint.strip_prefix("unix:")
    }

    /// The endpoint as a URL with the scheme TLS implies.
    pub(crate) fn url(&self) -> Result<String, Error> {
        let tls = self.tls_files()?.is_some();
        if let Some(path) = self.unix_path() {
            if path.is_empty() {
                return Err(Error::Config(
                    "a unix socket endpoint needs a path, e.g. unix:/run/secrets-broker.sock"
                        .into(),
                ));
            }
            if tls {
                return Err(Error::Config(format!(
                    "{}: a unix socket is plaintext (only local processes reach it); \
                     leave out the TLS files",
                    self.endpoint
                )));
            }
            // The connector ignores it; h2 refuses a path as :authority.
            return Ok("http://localhost".to_owned());
        }
        let url = match self.endpoint.split_once("://") {
            Some(_) => self.endpoint.clone(),
            None => format!("{}://{}", if tls { "https" } else { "http" }, self.endpoint),
        };
        let refused = |why: &str| Err(Error::Config(format!("{}: {why}", self.endpoint)));
        let Ok(uri) = url.parse::<tonic::transport::Uri>() else {
            return refused("not host:port, nor an http:// or https:// URL");
        };
        // `user@host` would connect to `host`, whatever a check of the
        // text before it said.
        let (Some(host), Some(authority)) = (uri.host(), uri.authority()) else {
            return refused("names no host");
        };
        if authority.as_str().contains('@')
            || !matches!(uri.path(), "" | "/")
            || uri.query().is_some()
        {
            return refused("only host:port is taken (no user, path or query)");
        }
        match (uri.scheme_str(), tls) {
            (Some("https"), true) => {}
            (Some("http"), false) if is_loopback(host) => {}
            (Some("http"), false) => {
                return refused(
                    "not a loopback address: plaintext is only allowed to loopback; configure \
                     mutual TLS",
                );
            }
            (Some("http"), true) => {
                return refused(
                    "http:// is plaintext, but mutual TLS is configured (BROKER_CA_FILE, \
                     BROKER_CERT_FILE, BROKER_KEY_FILE): use https:// or host:port",
                );
            }
            (Some("https"), false) => {
                return refused(
                    "https:// needs mutual TLS: set BROKER_CA_FILE, BROKER_CERT_FILE and \
                     BROKER_KEY_FILE",
                );
            }
            _ => return refused("the scheme must be http:// or https://"),
        }
        Ok(url)
    }
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_only_to_loopback() {
        assert_eq!(
            ClientConfig::new("127.0.0.1:50051").url().unwrap(),
            "http://127.0.0.1:50051"
        );
        assert_eq!(
            ClientConfig::new("localhost:1").url().unwrap(),
            "http://localhost:1"
        );
        assert_eq!(
            ClientConfig::new("[::1]:1").url().unwrap(),
            "http://[::1]:1"
        );
        assert!(ClientConfig::new("10.0.0.1:50051").url().is_err());
        let tls = ClientConfig::new("broker:50051").with_tls("a", "b", "c");
        assert_eq!(tls.url().unwrap(), "https://broker:50051");
    }

    #[test]
    fn an_endpoint_cannot_talk_plaintext_past_the_tls_files_or_the_loopback_check() {
        // The TLS files say mutual TLS: http:// must not undo that.
        let tls = ClientConfig::new("http://192.0.2.2:50051").with_tls("a", "b", "c");
        let refused = tls.url().unwrap_err().to_string();
        assert!(refused.contains("mutual TLS is configured"), "{refused}");
        // user@host connects to host: the check must look at host.
        for endpoint in [
            "127.0.0.1:50051@192.0.2.2",
            "http://127.0.0.1:1@192.0.2.2:50051",
            "http://127.0.0.1:1/x",
            "ftp://127.0.0.1:1",
            "https://127.0.0.1:50051",
        ] {
            assert!(
                matches!(ClientConfig::new(endpoint).url(), Err(Error::Config(_))),
                "{endpoint}"
            );
        }
        assert_eq!(
            ClientConfig::new("http://LOCALHOST:1").url().unwrap(),
            "http://LOCALHOST:1"
        );
    }

    #[test]
    fn partial_tls_is_refused() {
        let mut config = ClientConfig::new("127.0.0.1:1");
        config.ca_file = Some("ca.pem".into());
        assert!(matches!(config.url(), Err(Error::Config(_))));
    }
}
