//! The one place where the broker's errors become gRPC statuses.
//!
//! Every error a caller can see is a status code plus a `google.rpc.ErrorInfo`
//! detail (domain `secretsbroker`) whose reason a program in any language can
//! branch on, and whose metadata names what was wrong (`field`,
//! `secret_name`). Messages are written from names and rules only; no secret
//! value can reach them because none of the error types below holds one.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use super::typed::Malformed;
use crate::{
    backend::{InvalidVersion, StoreError},
    names::InvalidName,
    policy::Denied,
    proto::SecretError,
};

/// The `ErrorInfo.domain` of every error the broker returns.
pub const ERROR_DOMAIN: &str = "secretsbroker";

/// Everything a SecretsService or AdminService call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid secret name: {0}")]
    InvalidName(#[from] InvalidName),
    /// A name of a request's `names` list (ClearCache).
    #[error("invalid secret name at names[{index}]: {source}")]
    InvalidNameInList { index: usize, source: InvalidName },
    #[error("invalid version selector: {0}")]
    InvalidVersion(#[from] InvalidVersion),
    /// WatchSecret's `since_arn`: not a secret's ARN.
    #[error("since_arn must be empty or the secret's ARN as a Secret message gives it: {problem}")]
    InvalidSinceArn { problem: &'static str },
    #[error(transparent)]
    Store(#[from] StoreError),
    /// NOT_FOUND for a read of a version id or a stage: which one.
    #[error("secret {name} has no version with {field} {value} (or does not exist)")]
    VersionNotFound {
        name: String,
        field: &'static str,
        value: String,
    },
    #[error("{refusal}: {0}", refusal = .0.refusal())]
    Denied(#[from] Denied),
    #[error("names holds {count} names; at most {limit} are allowed per call")]
    TooManyNames { count: usize, limit: usize },
    /// An item of a BatchGetSecrets answer that would have made it too
    /// large for a gRPC client's default receive limit.
    #[error(
        "the names and secrets before this one fill the batch's answer ({limit} bytes of the \
         4 MiB a gRPC client receives by default); read this one in another call"
    )]
    BatchAnswerFull { limit: usize },
    #[error("too many calls in flight on this connection; open another connection or wait")]
    TooManyCalls,
    #[error("the broker has as many calls in flight as it allows ({limit}); retry shortly")]
    BrokerFull { limit: usize },
    #[error(
        "the broker reached its limit of calls in flight while this call's request had not \
         arrived; send the request with the call, or retry"
    )]
    Displaced,
    #[error("a connection may hold at most {limit} health watch streams")]
    TooManyHealthWatches { limit: usize },
    #[error(
        "the broker has as many {what} open as it allows ({limit}, {share} of its call slots); \
         reads are still served: retry later, or raise --max-concurrent-calls"
    )]
    TooManyStreams {
        what: &'static str,
        share: &'static str,
        limit: usize,
    },
    #[error(
        "the broker is shutting down and this call's request had not arrived; retry on another"
    )]
    ShuttingDown,
    #[error("the broker is shutting down; open the stream again, on another replica")]
    StreamShutDown,
    #[error("the broker is shutting down; reconnect with since_version_id")]
    WatchShutDown,
    #[error("the call took longer than the broker's call timeout of {0:?}")]
    CallTimeout(std::time::Duration),
    #[error(
        "the broker holds as many unfinished requests as its request memory allows; \
         send each request whole, or retry"
    )]
    RequestMemory,
    #[error("the request is larger than the broker's limit of {limit} bytes (--max-message-size)")]
    MessageTooLarge { limit: usize },
    #[error("secret {name} cannot be read as {kind}: {source}")]
    Malformed {
        name: String,
        kind: &'static str,
        source: Malformed,
    },
    /// A path no service of the broker's answers; `None` when it is not
    /// kept (under `/grpc.`, health's and reflection's own).
    #[error(
        "no method {} on this broker; it serves secretsbroker.v1.SecretsService, \
         secretsbroker.v1.AdminService, grpc.health.v1.Health and server reflection",
        path.as_deref().unwrap_or("of that name")
    )]
    UnknownMethod { path: Option<String> },
    #[error(
        "the request is compressed with {encoding}, which the broker does not accept; \
         send it uncompressed (grpc-encoding identity)"
    )]
    UnsupportedEncoding { encoding: String },
    /// tonic could not read the request message (its words in `detail`):
    /// not a message of the method's type, or a compressed-flag without
    /// an encoding.
    #[error("the request message cannot be read: {detail}")]
    MalformedRequest { detail: String },
}

impl ApiError {
    /// The status code and the ErrorInfo reason.
    fn code_and_reason(&self) -> (Code, &'static str) {
        match self {
            Self::InvalidName(_) | Self::InvalidNameInList { .. } => {
                (Code::InvalidArgument, "INVALID_SECRET_NAME")
            }
            Self::Denied(Denied::NoIdentity | Denied::BadIdentity(_)) => {
                (Code::Unauthenticated, "NO_CLIENT_IDENTITY")
            }
            Self::Denied(_) => (Code::PermissionDenied, "POLICY_DENIED"),
            Self::InvalidVersion(_) | Self::InvalidSinceArn { .. } => {
                (Code::InvalidArgument, "INVALID_VERSION")
            }
            Self::TooManyNames { .. } => (Code::InvalidArgument, "TOO_MANY_NAMES"),
            Self::BatchAnswerFull { .. } => (Code::ResourceExhausted, "ANSWER_TOO_LARGE"),
            Self::TooManyCalls
            | Self::BrokerFull { .. }
            | Self::Displaced
            | Self::TooManyHealthWatches { .. }
            | Self::TooManyStreams { .. } => (Code::ResourceExhausted, "TOO_MANY_CALLS"),
            Self::ShuttingDown | Self::StreamShutDown | Self::WatchShutDown => {
                (Code::Unavailable, "SHUTTING_DOWN")
            }
            Self::CallTimeout(_) => (Code::DeadlineExceeded, "CALL_TIMEOUT"),
            Self::RequestMemory => (Code::ResourceExhausted, "REQUEST_MEMORY"),
            Self::MessageTooLarge { .. } => (Code::ResourceExhausted, "MESSAGE_TOO_LARGE"),
            Self::Malformed { .. } => (Code::FailedPrecondition, "MALFORMED_SECRET"),
            Self::UnknownMethod { .. } => (Code::Unimplemented, "UNKNOWN_METHOD"),
            Self::UnsupportedEncoding { .. } => (Code::Unimplemented, "UNSUPPORTED_ENCODING"),
            // gRPC's code for a request that does not parse.
            Self::MalformedRequest { .. } => (Code::Internal, "MALFORMED_REQUEST"),
            Self::VersionNotFound { .. } => (Code::NotFound, "SECRET_NOT_FOUND"),
            Self::Store(store) => match store {
                StoreError::NotFound { .. } => (Code::NotFound, "SECRET_NOT_FOUND"),
                StoreError::Deleted { .. } => (Code::NotFound, "SECRET_DELETED"),
                StoreError::AccessDenied { .. } => (Code::PermissionDenied, "ACCESS_DENIED"),
                StoreError::Throttled => (Code::ResourceExhausted, "UPSTREAM_THROTTLED"),
                StoreError::Unavailable { .. } => (Code::Unavailable, "UPSTREAM_UNAVAILABLE"),
                // E.g. DecryptionFailure: the broker's (or AWS's) fault, not
                // the caller's.
                StoreError::Rejected { .. } => (Code::Internal, "UPSTREAM_REJECTED"),
                StoreError::Mismatch { .. } => (Code::Internal, "UPSTREAM_MISMATCH"),
                StoreError::QueueFull => (Code::ResourceExhausted, "UPSTREAM_QUEUE_FULL"),
            },
        }
    }

    /// ErrorInfo metadata: what was wrong, by name.
    fn metadata(&self) -> HashMap<String, String> {
        let mut metadata = HashMap::new();
        let mut put = |key: &str, value: &str| metadata.insert(key.to_owned(), value.to_owned());
        match self {
            Self::InvalidName(_) => {
                put("field", "name");
            }
            Self::InvalidNameInList { index, .. } => {
                put("field", "names");
                put("index", &index.to_string());
            }
            Self::InvalidVersion(invalid) => {
                put("field", invalid.field);
            }
            Self::InvalidSinceArn { .. } => {
                put("field", "since_arn");
            }
            Self::Malformed { name, source, .. } => {
                put("secret_name", name);
                if let Some(field) = source.field {
                    put("field", field);
                }
            }
            Self::Store(
                StoreError::NotFound { name }
                | StoreError::Deleted { name }
                | StoreError::AccessDenied { name, .. },
            ) => {
                put("secret_name", name);
            }
            Self::TooManyNames { .. } => {
                put("field", "names");
            }
            Self::VersionNotFound { name, field, .. } => {
                put("secret_name", name);
                put("field", field);
            }
            Self::Store(StoreError::Mismatch { asked, .. }) => {
                put("secret_name", asked);
            }
            Self::Denied(Denied::Secret { secret, .. }) => {
                put("secret_name", secret);
            }
            Self::UnknownMethod { path } => {
                if let Some(path) = path {
                    put("method", path);
                }
            }
            Self::UnsupportedEncoding { .. } => {
                put("header", "grpc-encoding");
            }
            Self::Store(_)
            | Self::Denied(_)
            | Self::MalformedRequest { .. }
            | Self::TooManyCalls
            | Self::BrokerFull { .. }
            | Self::Displaced
            | Self::TooManyHealthWatches { .. }
            | Self::TooManyStreams { .. }
            | Self::ShuttingDown
            | Self::StreamShutDown
            | Self::WatchShutDown
            | Self::CallTimeout(_)
            | Self::RequestMemory
            | Self::BatchAnswerFull { .. }
            | Self::MessageTooLarge { .. } => {}
        }
        metadata
    }

    /// A NOT_FOUND of a read that asked for a version id or a stage says
    /// which, and in which field.
    pub fn naming_the_version(self, version_id: &str, version_stage: &str) -> Self {
        let (field, value) = match (version_id, version_stage) {
            ("", "") => return self,
            ("", stage) => ("version_stage", stage),
            (id, _) => ("version_id", id),
        };
        match self {
            Self::Store(StoreError::NotFound { name }) => Self::VersionNotFound {
                name,
                field,
                value: value.to_owned(),
            },
            other => other,
        }
    }

    pub fn code(&self) -> Code {
        self.code_and_reason().0
    }

    /// The `ErrorInfo` reason.
    pub fn reason(&self) -> &'static str {
        self.code_and_reason().1
    }

    /// `reason` as the broker's own word, when an error of this reason is
    /// given before any handler runs (by the transport, not a handler), so
    /// that no `Audit` saw its call.
    pub fn given_before_the_handler(reason: &str) -> Option<&'static str> {
        [
            Self::RequestMemory,
            Self::MessageTooLarge { limit: 0 },
            Self::Displaced,
            Self::ShuttingDown,
        ]
        .iter()
        .map(Self::reason)
        .find(|given| *given == reason)
    }

    /// The per-item form used by BatchGetSecrets.
    pub fn to_secret_error(&self) -> SecretError {
        let (code, reason) = self.code_and_reason();
        SecretError {
            code: code as u32,
            reason: reason.to_owned(),
            message: self.to_string(),
        }
    }
}

impl From<crate::transport::call_slots::ShareFull> for ApiError {
    fn from(full: crate::transport::call_slots::ShareFull) -> Self {
        Self::TooManyStreams {
            what: full.share.streams(),
            share: full.share.part_in_words(),
            limit: full.limit,
        }
    }
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Self {
        let (code, reason) = error.code_and_reason();
        let metadata = error
            .metadata()
            .into_iter()
            .map(|(key, value)| (key, fitted(value, MAX_METADATA_VALUE)))
            .collect::<HashMap<_, _>>();
        let details = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata);
        Status::with_error_details(code, fitted(error.to_string(), MAX_MESSAGE), details)
    }
}

/// The most bytes of a status message. The message travels twice in the
/// answer's headers (`grpc-message`, and in `grpc-status-details-bin`
/// with the metadata, base64): grpc-core clients refuse headers past 8 KiB
/// (at random between that and 16 KiB), so an error echoing a 2,048-
/// character ARN or version selector would reach a Python caller as
/// RESOURCE_EXHAUSTED instead of NOT_FOUND. A real secret's name or ARN
/// (at most 512 and about 620 characters) always fits whole.
const MAX_MESSAGE: usize = 1024;

/// The most bytes of an `ErrorInfo` metadata value (a `secret_name`).
const MAX_METADATA_VALUE: usize = 640;

/// `text`, or, past `max` bytes, its start and end around a mark that says
/// how much was cut: the end of a message says what to do.
fn fitted(text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    const KEPT_END: usize = 160;
    let end = text.ceil_char_boundary(text.len() - KEPT_END);
    // Room for the mark, whose number has at most 5 digits here.
    let start = text.floor_char_boundary(max - KEPT_END - 24);
    format!(
        "{}…({} bytes cut)…{}",
        &text[..start],
        end - start,
        &text[end..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every pair of a code and a reason this file maps errors to, read from
    /// its own source: a reason added later is covered without editing the
    /// test that uses them.
    fn mapped_reasons() -> Vec<(Code, String)> {
        // Whitespace as one space: a pair rustfmt breaks over two lines is
        // still one pair.
        let source = include_str!("status.rs")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        let pairs: Vec<_> = source
            .split("(Code::")
            .skip(1)
            .filter_map(|rest| {
                let (code, rest) = rest.split_once(", \"")?;
                let (reason, _) = rest.split_once("\")")?;
                Some((code, reason))
            })
            .filter(|(code, reason)| {
                code.chars().all(char::is_alphanumeric)
                    && reason.chars().all(|c| c.is_ascii_uppercase() || c == '_')
            })
            .map(|(code, reason)| (code_named(code), reason.to_owned()))
            .collect();
        pairs
    }

    fn code_named(name: &str) -> Code {
        match name {
            "InvalidArgument" => Code::InvalidArgument,
            "Unauthenticated" => Code::Unauthenticated,
            "PermissionDenied" => Code::PermissionDenied,
            "NotFound" => Code::NotFound,
            "ResourceExhausted" => Code::ResourceExhausted,
            "Unavailable" => Code::Unavailable,
            "DeadlineExceeded" => Code::DeadlineExceeded,
            "FailedPrecondition" => Code::FailedPrecondition,
            "Unimplemented" => Code::Unimplemented,
            "Internal" => Code::Internal,
            other => panic!("a code this test does not know yet: Code::{other}"),
        }
    }

    #[test]
    fn the_client_crate_can_branch_on_every_reason_the_broker_gives() {
        let reasons = mapped_reasons();
        // The reader above still finds the mapping (a reformat could hide it).
        for expected in ["NO_CLIENT_IDENTITY", "SHUTTING_DOWN", "UPSTREAM_QUEUE_FULL"] {
            assert!(
                reasons.iter().any(|(_, reason)| reason == expected),
                "{expected} not read from status.rs: {reasons:?}"
            );
        }
        assert!(reasons.len() >= 20, "{reasons:?}");
        for (code, reason) in reasons {
            let details = ErrorDetails::with_error_info(&reason, ERROR_DOMAIN, []);
            let status = Status::with_error_details(code, "refused", details);
            let error = secrets_broker_client::Error::from(status);
            assert_eq!(
                error.reason(),
                Some(reason.as_str()),
                "{code:?} {reason}: {error:?}"
            );
        }
    }

    #[test]
    fn statuses_carry_code_reason_and_field() {
        let error = ApiError::Malformed {
            name: "insurecove/production/jwt".into(),
            kind: "a JWT config",
            source: Malformed {
                field: Some("jwt_issuer"),
                rule: "is missing".into(),
            },
        };
        let status = Status::from(error);
        assert_eq!(status.code(), Code::FailedPrecondition);
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.reason, "MALFORMED_SECRET");
        assert_eq!(info.domain, ERROR_DOMAIN);
        assert_eq!(info.metadata["field"], "jwt_issuer");
        assert_eq!(info.metadata["secret_name"], "insurecove/production/jwt");
        assert_eq!(
            status.message(),
            "secret insurecove/production/jwt cannot be read as a JWT config: field jwt_issuer is missing"
        );
    }

    #[test]
    fn store_errors_map_as_designed() {
        let name = || "insurecove/x".to_owned();
        let cases = [
            (
                StoreError::NotFound { name: name() },
                Code::NotFound,
                "SECRET_NOT_FOUND",
            ),
            (
                StoreError::Deleted { name: name() },
                Code::NotFound,
                "SECRET_DELETED",
            ),
            (
                StoreError::AccessDenied {
                    name: name(),
                    detail: "IAM".into(),
                },
                Code::PermissionDenied,
                "ACCESS_DENIED",
            ),
            (
                StoreError::Throttled,
                Code::ResourceExhausted,
                "UPSTREAM_THROTTLED",
            ),
            (
                StoreError::Unavailable {
                    detail: "timeout".into(),
                },
                Code::Unavailable,
                "UPSTREAM_UNAVAILABLE",
            ),
        ];
        for (store, code, reason) in cases {
            let item = ApiError::from(store.clone()).to_secret_error();
            assert_eq!((item.code, item.reason.as_str()), (code as u32, reason));
            let status = Status::from(ApiError::from(store));
            assert_eq!(status.code(), code);
            assert_eq!(status.get_details_error_info().unwrap().reason, reason);
        }
    }

    #[test]
    fn invalid_names_name_the_field() {
        let status = Status::from(ApiError::from(InvalidName::Empty));
        assert_eq!(status.code(), Code::InvalidArgument);
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.reason, "INVALID_SECRET_NAME");
        assert_eq!(info.metadata["field"], "name");
    }

    /// A NOT_FOUND for the longest name a caller may send (a 2,048-
    /// character ARN) must fit a grpc-core client's 8 KiB of headers; a
    /// real secret's ARN is shown whole.
    #[test]
    fn a_status_for_a_very_long_name_stays_small_and_keeps_its_ends() {
        let long = format!(
            "arn:aws:secretsmanager:us-east-1:123456789012:secret:insurecove/{}",
            "x".repeat(1980)
        );
        let status = Status::from(ApiError::from(StoreError::NotFound { name: long.clone() }));
        let message = status.message();
        assert!(message.len() <= MAX_MESSAGE, "{} bytes", message.len());
        assert!(
            message.starts_with(
                "secret arn:aws:secretsmanager:us-east-1:123456789012:secret:insurecove/xxx"
            ),
            "{message}"
        );
        assert!(
            message.ends_with("was not found (or has no such version)"),
            "{message}"
        );
        assert!(message.contains(" bytes cut)…"), "{message}");
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.reason, "SECRET_NOT_FOUND");
        assert!(info.metadata["secret_name"].len() <= MAX_METADATA_VALUE);
        // What travels in headers: the message, and the details in base64.
        let headers = message.len() + status.details().len() * 4 / 3;
        assert!(headers < 4096, "{headers} bytes of headers");

        let real = "arn:aws:secretsmanager:us-east-1:123456789012:secret:insurecove/".to_owned()
            + &"n".repeat(512)
            + "-AbCdEf";
        let status = Status::from(ApiError::from(StoreError::NotFound { name: real.clone() }));
        assert_eq!(
            status.message(),
            format!("secret {real} was not found (or has no such version)")
        );
        assert_eq!(
            status.get_details_error_info().unwrap().metadata["secret_name"],
            real
        );
    }
}
