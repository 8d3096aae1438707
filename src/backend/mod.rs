//! Where secrets come from: the `SecretStore` trait and its implementations.
//!
//! A store knows nothing of caching, gRPC or callers: it answers "this
//! version of this secret" and "what versions does this secret have", and
//! classifies its failures so that the cache above can tell a transient
//! outage (serve stale) from a definite answer (never hide it).

use async_trait::async_trait;

use crate::secret::SecretVersion;

pub mod aws;
pub mod aws_error;
pub mod bounded;
#[cfg(test)]
pub(crate) mod fake;
pub mod file;
pub mod metered;

pub use aws::AwsStore;
pub use file::FileStore;
pub use metered::MeteredStore;

/// The staging label of the current version.
pub const AWSCURRENT: &str = "AWSCURRENT";

/// Longest version id or staging label AWS accepts.
const MAX_VERSION_FIELD_LEN: usize = 256;

/// Which version of a secret to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionSelector {
    /// The version that carries this staging label.
    Stage(String),
    /// This exact version; when a stage is given too, the version must
    /// carry it (as AWS checks).
    Id {
        /// The version id.
        id: String,
        /// The stage it must carry, if any.
        stage: Option<String>,
    },
}

/// A `VersionSelector` borrowed from a request: selects without
/// allocating (the cache's hit path).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SelectorRef<'a> {
    /// The version that carries this staging label.
    Stage(&'a str),
    /// This exact version, carrying `stage` when given.
    Id {
        /// The version id.
        id: &'a str,
        /// The stage it must carry, if any.
        stage: Option<&'a str>,
    },
}

impl<'a> SelectorRef<'a> {
    /// A request's `version_id` and `version_stage` (either may be empty;
    /// both empty means the current version), checked.
    pub fn from_request(
        version_id: &'a str,
        version_stage: &'a str,
    ) -> Result<Self, InvalidVersion> {
        check_version_field("version_id", version_id)?;
        check_version_field("version_stage", version_stage)?;
        let stage = (!version_stage.is_empty()).then_some(version_stage);
        Ok(if version_id.is_empty() {
            Self::Stage(stage.unwrap_or(AWSCURRENT))
        } else {
            Self::Id {
                id: version_id,
                stage,
            }
        })
    }

    /// The owned selector.
    pub fn to_owned(self) -> VersionSelector {
        match self {
            Self::Stage(stage) => VersionSelector::Stage(stage.to_owned()),
            Self::Id { id, stage } => VersionSelector::Id {
                id: id.to_owned(),
                stage: stage.map(str::to_owned),
            },
        }
    }
}

impl VersionSelector {
    /// The current version.
    pub fn current() -> Self {
        Self::Stage(AWSCURRENT.to_owned())
    }

    /// Builds a selector from a request's `version_id` and `version_stage`
    /// (either may be empty; both empty means the current version).
    pub fn from_request(version_id: &str, version_stage: &str) -> Result<Self, InvalidVersion> {
        SelectorRef::from_request(version_id, version_stage).map(SelectorRef::to_owned)
    }

    /// The selector as borrowed parts.
    pub fn as_ref(&self) -> SelectorRef<'_> {
        match self {
            Self::Stage(stage) => SelectorRef::Stage(stage),
            Self::Id { id, stage } => SelectorRef::Id {
                id,
                stage: stage.as_deref(),
            },
        }
    }

    /// Whether a version with this id and these stages is the one selected.
    pub fn matches(&self, version_id: &str, stages: &[String]) -> bool {
        let has_stage = |wanted: &str| stages.iter().any(|s| s == wanted);
        match self {
            Self::Stage(stage) => has_stage(stage),
            Self::Id { id, stage } => id == version_id && stage.as_deref().is_none_or(has_stage),
        }
    }
}

/// A `version_id` or `version_stage` that no store could accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{field} must be at most {MAX_VERSION_FIELD_LEN} characters, printable ASCII without spaces"
)]
pub struct InvalidVersion {
    /// `version_id` or `version_stage`.
    pub field: &'static str,
}

/// Checks a version id or stage (empty is fine). AWS bounds only their
/// lengths, and labels such as `release.2024-06` are in use, so any
/// printable ASCII passes; spaces and control characters do not, so that
/// neither can split or forge a log line's fields.
pub fn check_version_field(field: &'static str, value: &str) -> Result<(), InvalidVersion> {
    let valid = value.len() <= MAX_VERSION_FIELD_LEN && value.bytes().all(|b| b.is_ascii_graphic());
    if valid {
        Ok(())
    } else {
        Err(InvalidVersion { field })
    }
}

/// What a store knows of a secret without reading its value: cheap to ask,
/// and enough to tell whether a cached version is still the current one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretDescription {
    /// The secret's full name.
    pub name: String,
    /// Its ARN (empty where the backend has none).
    pub arn: String,
    /// Every version that carries at least one stage, with its stages.
    pub versions: Vec<(String, Vec<String>)>,
    /// Marked for deletion.
    pub deleted: bool,
}

impl SecretDescription {
    /// The id of the version a selector points at, if any.
    pub fn selected_version(&self, selector: &VersionSelector) -> Option<&str> {
        self.versions
            .iter()
            .find(|(id, stages)| selector.matches(id, stages))
            .map(|(id, _)| id.as_str())
    }
}

/// Why a store could not answer. Messages name secrets, never values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[allow(missing_docs)] // each variant's #[error] message is its documentation
pub enum StoreError {
    #[error("secret {name} was not found (or has no such version)")]
    NotFound { name: String },
    #[error("secret {name} is marked for deletion")]
    Deleted { name: String },
    #[error("access to secret {name} was denied: {detail}")]
    AccessDenied { name: String, detail: String },
    #[error(
        "AWS throttled the request (the account's Secrets Manager request quota); it is retried \
         with backoff, and a longer --cache-ttl makes fewer calls"
    )]
    Throttled,
    /// `detail` says what failed and what to do, in one line
    /// (`aws_error`).
    #[error("{detail}")]
    Unavailable { detail: String },
    #[error("the upstream refused the request: {detail}")]
    Rejected { detail: String },
    /// The upstream answered with another secret than the one asked (and
    /// authorized): never served, never cached.
    // `answered` is whatever the upstream (or whoever answered in its
    // place) put there: shown cut, quoted and escaped.
    #[error(
        "asked for secret {asked}, the upstream answered with secret {}; refused",
        crate::names::ShownName(.answered).quoted()
    )]
    Mismatch { asked: String, answered: String },
    /// More upstream calls are waiting than `--upstream-queue` allows.
    #[error("too many upstream calls are waiting; try again shortly")]
    QueueFull,
}

impl StoreError {
    /// A failure that says nothing about the secret itself (the upstream was
    /// down, slow or busy): the last good value may be served instead.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Throttled | Self::Unavailable { .. } | Self::QueueFull
        )
    }
}

/// A source of secrets. Implementations are shared by every caller.
#[async_trait]
pub trait SecretStore: Send + Sync + 'static {
    /// Reads one version of one secret, value included.
    async fn get_secret_value(
        &self,
        name: &str,
        selector: &VersionSelector,
    ) -> Result<SecretVersion, StoreError>;

    /// Reads a secret's versions and state, without its value.
    async fn describe_secret(&self, name: &str) -> Result<SecretDescription, StoreError>;

    /// Makes the cheapest call that proves the store answers with the
    /// broker's credentials (what `CheckUpstream` and `test_connection`
    /// report), and says what it checked.
    async fn check(&self) -> Result<String, StoreError>;

    /// One page of the secrets whose names start with `prefix` (every
    /// secret when empty), metadata only: no value crosses the wire.
    /// Secrets marked for deletion are listed too, as deleted. `page` is
    /// the previous page's `next`. The sweep uses it so that its cost grows
    /// with the number of secrets by the page (`LIST_PAGE_SIZE`), not by
    /// the secret.
    async fn list_secrets(
        &self,
        prefix: &str,
        page: Option<String>,
    ) -> Result<SecretPage, StoreError>;

    /// A signal that the store's content may have changed by itself (the
    /// file backend, when its file is edited), so the change detector can
    /// look at once instead of at its next round. `None`: poll only.
    fn change_signal(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}

/// The most secrets one ListSecrets page holds (AWS's maximum).
pub const LIST_PAGE_SIZE: usize = 100;

/// One page of `list_secrets`.
#[derive(Debug, Default)]
pub struct SecretPage {
    /// The secrets of this page, metadata only.
    pub secrets: Vec<SecretDescription>,
    /// What to pass to read the next page; `None` on the last one.
    pub next: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_request_fields_select_the_current_version() {
        assert_eq!(
            VersionSelector::from_request("", "").unwrap(),
            VersionSelector::current()
        );
        assert_eq!(
            VersionSelector::from_request("", "AWSPREVIOUS").unwrap(),
            VersionSelector::Stage("AWSPREVIOUS".into())
        );
        assert_eq!(
            VersionSelector::from_request("abc-1", "").unwrap(),
            VersionSelector::Id {
                id: "abc-1".into(),
                stage: None
            }
        );
        // AWS takes labels and tokens of any characters within its lengths.
        assert_eq!(
            VersionSelector::from_request("", "release.2024-06").unwrap(),
            VersionSelector::Stage("release.2024-06".into())
        );
        VersionSelector::from_request("v2024.06.01-0000000000000000000000", "").unwrap();
    }

    #[test]
    fn odd_version_fields_are_refused() {
        assert_eq!(
            VersionSelector::from_request("a b", ""),
            Err(InvalidVersion {
                field: "version_id"
            })
        );
        assert_eq!(
            VersionSelector::from_request("", "a\r\nb"),
            Err(InvalidVersion {
                field: "version_stage"
            })
        );
        assert_eq!(
            VersionSelector::from_request("", &"S".repeat(257)),
            Err(InvalidVersion {
                field: "version_stage"
            })
        );
    }

    #[test]
    fn id_selectors_check_the_stage_when_given() {
        let stages = vec!["AWSPREVIOUS".to_owned()];
        let by_id = |stage: Option<&str>| VersionSelector::Id {
            id: "v1".into(),
            stage: stage.map(str::to_owned),
        };
        assert!(by_id(None).matches("v1", &stages));
        assert!(by_id(Some("AWSPREVIOUS")).matches("v1", &stages));
        assert!(!by_id(Some("AWSCURRENT")).matches("v1", &stages));
        assert!(!by_id(None).matches("v2", &stages));
    }
}
