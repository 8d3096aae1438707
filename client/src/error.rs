//! The one error type of the client, built from the broker's status code
//! and its `google.rpc.ErrorInfo` reason.

use tonic::{Code, Status};
use tonic_types::StatusExt;

/// Everything a call to the broker can fail with.
///
/// It mirrors the Python client's hierarchy (`SecretNotFoundError`,
/// `SecretAccessDeniedError`, `AWSSecretsManagerError`) with the finer
/// distinctions the broker makes. Messages never contain a secret value.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No such secret or version (`SECRET_NOT_FOUND`), or it is marked for
    /// deletion (`SECRET_DELETED`).
    #[error("not found ({reason}): {message}")]
    NotFound {
        /// `SECRET_NOT_FOUND` or `SECRET_DELETED`.
        reason: String,
        /// The broker's message.
        message: String,
    },
    /// Refused: by the broker's policy (`POLICY_DENIED`) or by AWS IAM
    /// (`ACCESS_DENIED`).
    #[error("access denied ({reason}): {message}")]
    AccessDenied {
        /// `POLICY_DENIED` or `ACCESS_DENIED`.
        reason: String,
        /// The broker's message.
        message: String,
    },
    /// The request was not valid, e.g. a secret name outside AWS's rules.
    #[error("invalid argument ({reason}): {message}")]
    InvalidArgument {
        /// E.g. `INVALID_SECRET_NAME`.
        reason: String,
        /// The request field at fault, when the broker names one.
        field: Option<String>,
        /// The broker's message.
        message: String,
    },
    /// A typed config could not be decoded: not JSON, or a field missing,
    /// mistyped or out of range.
    #[error("malformed secret: {message}")]
    MalformedSecret {
        /// The field at fault, when there is one.
        field: Option<String>,
        /// The broker's message (never the value).
        message: String,
    },
    /// The broker, or AWS behind it with nothing cached, is unavailable.
    /// Reads are retried before this is returned.
    #[error("unavailable: {message}")]
    Unavailable {
        /// The broker's `ErrorInfo` reason (`UPSTREAM_UNAVAILABLE`,
        /// `SHUTTING_DOWN`...); empty when the broker sent none.
        reason: String,
        /// What failed.
        message: String,
    },
    /// RESOURCE_EXHAUSTED: AWS throttled the broker and nothing was cached,
    /// or this connection has too many calls in flight (`TOO_MANY_CALLS`).
    #[error("throttled: {message}")]
    Throttled {
        /// The broker's `ErrorInfo` reason (`UPSTREAM_THROTTLED`,
        /// `TOO_MANY_CALLS`, `MESSAGE_TOO_LARGE`, and in a batch's result
        /// `ANSWER_TOO_LARGE`...); empty when none.
        reason: String,
        /// What failed.
        message: String,
    },
    /// The client certificate is missing or names no identity.
    #[error("unauthenticated: {message}")]
    Unauthenticated {
        /// The broker's `ErrorInfo` reason (`NO_CLIENT_IDENTITY`); empty when
        /// the status carried none.
        reason: String,
        /// What failed.
        message: String,
    },
    /// The connection to the broker failed (TLS, DNS, refused...).
    #[error("transport: {0}")]
    Transport(String),
    /// The broker could not be reached: which endpoint, and why (refused,
    /// timed out, a TLS failure and which one), with the variables to check.
    #[error("cannot reach the broker at {endpoint}: {reason}")]
    Unreachable {
        /// The endpoint the client was configured with.
        endpoint: String,
        /// Why, and what to check.
        reason: String,
    },
    /// The client's own configuration is unusable.
    #[error("client configuration: {0}")]
    Config(String),
    /// A secret's value is not of the asked form (`as_json`, `as_map`).
    #[error("cannot decode the secret: {0}")]
    Decode(String),
    /// Any other status.
    #[error("{code:?}: {message}")]
    Other {
        /// The gRPC status code.
        code: Code,
        /// The broker's `ErrorInfo` reason (`CALL_TIMEOUT`,
        /// `UPSTREAM_MISMATCH`...); empty when the broker sent none.
        reason: String,
        /// The broker's message.
        message: String,
    },
}

impl Error {
    /// The broker's `ErrorInfo` reason, when the error came from it.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Self::NotFound { reason, .. }
            | Self::AccessDenied { reason, .. }
            | Self::InvalidArgument { reason, .. } => Some(reason),
            Self::Unavailable { reason, .. }
            | Self::Throttled { reason, .. }
            | Self::Unauthenticated { reason, .. }
            | Self::Other { reason, .. } => (!reason.is_empty()).then_some(reason.as_str()),
            Self::MalformedSecret { .. } => Some("MALFORMED_SECRET"),
            _ => None,
        }
    }

    /// Worth another try: the broker or the network may be back soon.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Unavailable { .. } | Self::Transport(_) | Self::Unreachable { .. }
        )
    }

    /// The error of a failed call to `endpoint` (over mutual TLS when
    /// `tls`): a status the broker sent (it carries an `ErrorInfo`), or the
    /// connection's own failure, told as `Unreachable`.
    pub(crate) fn from_call(status: Status, endpoint: &str, tls: bool) -> Self {
        let from_broker = status.get_details_error_info().is_some();
        // tonic reports an HTTP/2 protocol failure (e.g. a plaintext client
        // talking to a TLS broker) as INTERNAL, carrying the h2 error.
        // A connection the broker closed mid-call (a TLS broker hanging up
        // on a plaintext client) can come back as CANCELLED, with a source
        // or without: the broker itself never answers CANCELLED.
        let connection_failed = status.code() == Code::Cancelled
            || (matches!(
                status.code(),
                Code::Unavailable | Code::Unknown | Code::Internal
            ) && std::error::Error::source(&status).is_some());
        if from_broker || !connection_failed {
            return Self::from(status);
        }
        // The connector's own error (a TLS file unusable when the
        // connection was made: renewed mid-write, removed) says what to
        // fix; as a connection's failure it is retried (a renewal writes
        // the certificate and the key one after the other).
        if let Some(own) = own_error(&status) {
            return Self::Unreachable {
                endpoint: endpoint.to_owned(),
                reason: own.to_string(),
            };
        }
        Self::Unreachable {
            endpoint: endpoint.to_owned(),
            reason: connection_reason(&status, tls),
        }
    }
}

/// An `Error` of this crate in `status`'s sources.
fn own_error(status: &Status) -> Option<Error> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(status);
    while let Some(error) = current {
        if let Some(own) = error.downcast_ref::<Error>() {
            return Some(own.clone());
        }
        // An `io::Error` made from another skips it in `source()`.
        let wrapped = error
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            .and_then(|inner| inner.downcast_ref::<Error>());
        if let Some(own) = wrapped {
            return Some(own.clone());
        }
        current = error.source();
    }
    None
}

/// Why a connection failed, in words a person can act on.
fn connection_reason(status: &Status, tls: bool) -> String {
    let mut chain = String::new();
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(status);
    while let Some(error) = current {
        chain.push_str(&format!("{error:?} {error} ").to_ascii_lowercase());
        current = error.source();
    }
    // A CA of the same name but another key fails the signature check
    // rather than the issuer look-up: the same mistake for the person.
    let untrusted = [
        "unknownissuer",
        "unknown issuer",
        "badsignature",
        "bad signature",
    ];
    // Under TLS 1.3 the client's side of the handshake is done before the
    // broker checks the client's certificate: a refusal arrives as an alert
    // on the first read, or as the connection closing.
    let refused_us = [
        "unknownca",
        "decrypterror",
        "badcertificate",
        "certificateunknown",
    ];
    let alert = chain.contains("received fatal alert");
    let reason = if alert && chain.contains("certificateexpired") {
        "TLS: the broker refused this client's certificate: it has expired (BROKER_CERT_FILE)"
    } else if alert && refused_us.iter().any(|word| chain.contains(word)) {
        "TLS: the broker refused this client's certificate: not from a CA the broker trusts \
         (its --tls-client-ca), or not a client certificate (BROKER_CERT_FILE, BROKER_KEY_FILE)"
    } else if untrusted.iter().any(|word| chain.contains(word)) {
        "TLS: the broker's certificate is not signed by the CA of BROKER_CA_FILE (unknown CA)"
    } else if chain.contains("notvalidforname") || chain.contains("not valid for name") {
        "TLS: the broker's certificate does not name this host (name mismatch); set BROKER_TLS_DOMAIN to a name it carries"
    } else if chain.contains("certificaterequired") || chain.contains("certificate required") {
        "TLS: the broker requires a client certificate (BROKER_CERT_FILE, BROKER_KEY_FILE)"
    } else if [
        "certificateexpired",
        "certificate expired",
        "certexpired",
        "expired certificate",
    ]
    .iter()
    .any(|word| chain.contains(word))
    {
        // Not just "expired": a deadline "expires" too.
        "TLS: a certificate has expired"
    } else if chain.contains("refused") {
        "connection refused (is the broker running there? BROKER_ENDPOINT)"
    } else if tls && chain.contains("invalidcontenttype") {
        // The first bytes back were not a TLS record: a plaintext HTTP/2
        // server's SETTINGS frame.
        "the broker did not answer in TLS: a plaintext broker? (then unset BROKER_CA_FILE, \
         BROKER_CERT_FILE and BROKER_KEY_FILE)"
    } else if chain.contains("kind: notfound") || chain.contains("no such file") {
        "nothing listens at this path: no such socket (is the broker running, listening on \
         unix:PATH? BROKER_ENDPOINT)"
    } else if chain.contains("timed out") || chain.contains("elapsed") || chain.contains("timeout")
    {
        "timed out (BROKER_ENDPOINT, the network, a firewall)"
    } else if chain.contains("dns") || chain.contains("lookup") {
        "the host name does not resolve (BROKER_ENDPOINT)"
    } else if chain.contains("tls") || chain.contains("handshake") || chain.contains("certificate")
    {
        "TLS handshake failed (BROKER_CA_FILE, BROKER_CERT_FILE, BROKER_KEY_FILE)"
    } else if chain.contains("error reading a body") {
        // The answer had begun: the connection worked, then broke.
        "the connection broke during the call: the broker stopped answering (HTTP/2 pings \
         unanswered), restarted, or the network dropped it (BROKER_ENDPOINT)"
    } else if chain.contains("protocol error") || chain.contains("http2 error") {
        "the broker did not answer in plaintext HTTP/2 (a TLS broker? set BROKER_CA_FILE, BROKER_CERT_FILE, BROKER_KEY_FILE)"
    } else if tls
        && ["broken pipe", "reset", "cancel", "closed"]
            .iter()
            .any(|word| chain.contains(word))
    {
        "the broker closed the connection after the TLS handshake: did it refuse this client's \
         certificate? (BROKER_CERT_FILE, BROKER_KEY_FILE; the broker's --tls-client-ca)"
    } else if chain.contains("broken pipe") || chain.contains("reset") || chain.contains("cancel") {
        "the connection was closed (a plaintext client to a TLS broker? BROKER_CA_FILE)"
    } else {
        "the connection failed (BROKER_ENDPOINT)"
    };
    reason.to_owned()
}

impl Error {
    /// Builds the error from a status code, an `ErrorInfo` reason, the
    /// field it names, and a message (BatchGetSecrets' per-item errors
    /// carry these without a status).
    pub fn from_parts(code: Code, reason: String, field: Option<String>, message: String) -> Self {
        match code {
            Code::NotFound => Self::NotFound { reason, message },
            Code::PermissionDenied => Self::AccessDenied { reason, message },
            Code::InvalidArgument => Self::InvalidArgument {
                reason,
                field,
                message,
            },
            Code::FailedPrecondition if reason == "MALFORMED_SECRET" => {
                Self::MalformedSecret { field, message }
            }
            Code::Unavailable => Self::Unavailable { reason, message },
            Code::ResourceExhausted => Self::Throttled { reason, message },
            Code::Unauthenticated => Self::Unauthenticated { reason, message },
            code => Self::Other {
                code,
                reason,
                message,
            },
        }
    }
}

impl From<Status> for Error {
    fn from(status: Status) -> Self {
        let info = status.get_details_error_info();
        let reason = info.as_ref().map(|i| i.reason.clone()).unwrap_or_default();
        let field = info.as_ref().and_then(|i| i.metadata.get("field").cloned());
        Self::from_parts(status.code(), reason, field, status.message().to_owned())
    }
}

impl From<tonic::transport::Error> for Error {
    fn from(error: tonic::transport::Error) -> Self {
        Self::Transport(error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use tonic_types::ErrorDetails;

    use super::*;

    fn status(code: Code, reason: &str, field: Option<&str>) -> Status {
        let metadata: HashMap<String, String> = field
            .map(|f| [("field".to_owned(), f.to_owned())].into())
            .unwrap_or_default();
        Status::with_error_details(
            code,
            "message",
            ErrorDetails::with_error_info(reason, "secretsbroker", metadata),
        )
    }

    #[test]
    fn statuses_become_variants_with_reason_and_field() {
        let err = Error::from(status(
            Code::FailedPrecondition,
            "MALFORMED_SECRET",
            Some("jwt_issuer"),
        ));
        assert!(matches!(&err, Error::MalformedSecret { field: Some(f), .. } if f == "jwt_issuer"));
        let err = Error::from(status(Code::NotFound, "SECRET_DELETED", None));
        assert_eq!(err.reason(), Some("SECRET_DELETED"));
        let err = Error::from(status(Code::PermissionDenied, "POLICY_DENIED", None));
        assert!(matches!(err, Error::AccessDenied { .. }));
        let err = Error::from(status(
            Code::InvalidArgument,
            "INVALID_SECRET_NAME",
            Some("name"),
        ));
        assert!(matches!(&err, Error::InvalidArgument { field: Some(f), .. } if f == "name"));
        assert!(Error::from(Status::unavailable("down")).is_retryable());
        assert!(!Error::from(Status::not_found("gone")).is_retryable());
    }

    #[test]
    fn a_reason_can_be_branched_on_whatever_the_code() {
        // Every reason the broker gives is checked by the broker's own
        // tests (api::status), through this crate's `Error`.
        for (code, reason) in [
            (Code::Unauthenticated, "NO_CLIENT_IDENTITY"),
            (Code::Unimplemented, "UNKNOWN_METHOD"),
            (Code::Unavailable, "UPSTREAM_UNAVAILABLE"),
            (Code::ResourceExhausted, "MESSAGE_TOO_LARGE"),
            (Code::ResourceExhausted, "TOO_MANY_CALLS"),
            (Code::DeadlineExceeded, "CALL_TIMEOUT"),
            (Code::Internal, "UPSTREAM_MISMATCH"),
        ] {
            let details = tonic_types::ErrorDetails::with_error_info(reason, "secretsbroker", []);
            let status = Status::with_error_details(code, "refused", details);
            assert_eq!(Error::from(status).reason(), Some(reason));
        }
        assert_eq!(
            Error::from(Status::unavailable("no details")).reason(),
            None
        );
    }

    #[test]
    fn a_connection_failure_names_the_endpoint_and_why() {
        let refused = std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "Connection refused (os error 111)",
        );
        let mut failed = Status::unavailable("tcp connect error");
        failed.set_source(std::sync::Arc::new(refused));
        let error = Error::from_call(failed, "127.0.0.1:1", false);
        let message = error.to_string();
        assert!(matches!(error, Error::Unreachable { .. }), "{message}");
        assert!(
            message.contains("127.0.0.1:1") && message.contains("connection refused"),
            "{message}"
        );
        assert!(error.is_retryable());
        // A status the broker sent stays the broker's.
        let from_broker = Error::from_call(
            status(Code::Unavailable, "UPSTREAM_UNAVAILABLE", None),
            "x",
            false,
        );
        assert!(matches!(from_broker, Error::Unavailable { .. }));
        // A connection closed under the call: CANCELLED, with no source.
        let closed = Error::from_call(
            Status::cancelled("operation was canceled"),
            "127.0.0.1:2",
            false,
        );
        let message = closed.to_string();
        assert!(
            message.contains("127.0.0.1:2") && message.contains("BROKER_CA_FILE"),
            "{message}"
        );
        // The same, over TLS: the broker hung up on this client's
        // certificate, not on plaintext.
        let closed = Error::from_call(Status::cancelled("operation was canceled"), "b:1", true);
        let message = closed.to_string();
        assert!(
            message.contains("refuse this client's certificate") && !message.contains("plaintext"),
            "{message}"
        );
        let alert = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "received fatal alert: UnknownCA",
        );
        let mut refused = Status::unknown("transport error");
        refused.set_source(std::sync::Arc::new(alert));
        let message = Error::from_call(refused, "b:1", true).to_string();
        assert!(
            message.contains("the broker refused this client's certificate"),
            "{message}"
        );
        // A deadline that expired is a timeout, not a certificate.
        let late = Error::from_call(Status::cancelled("Timeout expired"), "b:1", false);
        let message = late.to_string();
        assert!(
            message.contains("timed out") && !message.contains("certificate"),
            "{message}"
        );
    }
}
