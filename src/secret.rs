//! The broker's in-memory form of a secret version.
//!
//! Values live in zeroizing buffers, so the memory is wiped when the last
//! copy (the cache entry, an in-flight answer) is dropped, and `Debug` never
//! prints them: a stray `{:?}` in a log line or a panic message shows
//! `<redacted N bytes>` instead.

use std::{
    fmt,
    sync::{Arc, OnceLock},
    time::SystemTime,
};

use secrets_broker_contract::encoded::EncodedSecret;
use zeroize::Zeroizing;

/// A secret's value: text (SecretString upstream) or bytes (SecretBinary).
#[derive(Clone, PartialEq, Eq)]
pub enum SecretValue {
    /// A SecretString.
    Text(Zeroizing<String>),
    /// A SecretBinary.
    Binary(Zeroizing<Vec<u8>>),
}

impl SecretValue {
    /// A text value.
    pub fn text(value: impl Into<String>) -> Self {
        Self::Text(Zeroizing::new(value.into()))
    }

    /// A binary value.
    pub fn binary(value: impl Into<Vec<u8>>) -> Self {
        Self::Binary(Zeroizing::new(value.into()))
    }

    /// The value as text, when it is text.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Self::Text(text) => Some(text),
            Self::Binary(_) => None,
        }
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Self::Text(text) => text.len(),
            Self::Binary(bytes) => bytes.len(),
        }
    }

    /// Whether it holds no byte.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self {
            Self::Text(_) => "Text",
            Self::Binary(_) => "Binary",
        };
        write!(f, "{kind}(<redacted {} bytes>)", self.len())
    }
}

/// One version of one secret: its metadata and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretVersion {
    /// The full name (with prefix).
    pub name: String,
    /// The ARN upstream; empty where the backend has none.
    pub arn: String,
    /// The version id.
    pub version_id: String,
    /// The staging labels this version carries.
    pub version_stages: Vec<String>,
    /// When the version was created, when known.
    pub created_date: Option<SystemTime>,
    /// The value (zeroized when dropped).
    pub value: SecretValue,
    /// Its `Secret` message, encoded on its first answer.
    pub encoded: EncodedOnce,
}

/// Whether the ARNs `a` and `b` may name one secret: equal, or one of them
/// missing (a backend without ARNs, an answer that left it out), which
/// says nothing.
pub fn may_be_one_secret(a: &str, b: &str) -> bool {
    a == b || a.is_empty() || b.is_empty()
}

impl SecretVersion {
    /// Whether this is the version `version_id` of the secret at `arn`. A
    /// version id alone does not say it: a secret deleted and created again
    /// under its name may be given its old version ids (a caller's
    /// ClientRequestToken), with other values, under a new ARN. An ARN
    /// missing on either side (a backend without ARNs, an answer that left
    /// it out) leaves the version id to say it.
    pub fn is(&self, arn: &str, version_id: &str) -> bool {
        self.version_id == version_id && may_be_one_secret(&self.arn, arn)
    }

    /// Whether `other` is the same version of the same secret (see `is`).
    pub fn same_version(&self, other: &SecretVersion) -> bool {
        self.is(&other.arn, &other.version_id)
    }
}

/// A version's `Secret` message (value included), encoded once on its first
/// answer and kept with it: a version never changes, so every later answer
/// copies these bytes instead of encoding again. The buffer is wiped when
/// dropped. It is not part of the version's identity: equality ignores it
/// and a clone starts without it (a clone may be changed).
#[derive(Default)]
pub struct EncodedOnce(OnceLock<Arc<EncodedSecret>>);

impl EncodedOnce {
    /// The encoded message, made by `encode` the first time.
    pub fn get_or_encode(&self, encode: impl FnOnce() -> EncodedSecret) -> &Arc<EncodedSecret> {
        self.0.get_or_init(|| Arc::new(encode()))
    }
}

impl Clone for EncodedOnce {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl PartialEq for EncodedOnce {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for EncodedOnce {}

impl fmt::Debug for EncodedOnce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "encoded"
        } else {
            "not encoded"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let version = SecretVersion {
            name: "insurecove/x".into(),
            arn: String::new(),
            version_id: "v1".into(),
            version_stages: vec!["AWSCURRENT".into()],
            created_date: None,
            value: SecretValue::text("hunter2-very-secret"),
            encoded: Default::default(),
        };
        let shown = format!("{version:?} {:?}", SecretValue::binary(vec![1, 2, 3]));
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("Text(<redacted 19 bytes>)"), "{shown}");
        assert!(shown.contains("Binary(<redacted 3 bytes>)"), "{shown}");
        assert!(shown.contains("insurecove/x"), "{shown}");
    }
}
