//! `SecretValue`: a secret version as the client hands it out.
//!
//! The value lives in zeroizing memory and `Debug` never shows it, so a
//! service can log the value type it got without leaking what is in it;
//! the cache facts (hit, age, stale) say how fresh it is.

use std::{
    fmt,
    time::{Duration, SystemTime},
};

use serde::de::DeserializeOwned;
use zeroize::Zeroizing;

use crate::{Error, proto};

/// One version of a secret, with its value. The value lives in zeroizing
/// memory and `Debug` never shows it.
///
/// ```
/// # fn show(secret: secrets_broker_client::SecretValue) -> Result<(), secrets_broker_client::Error> {
/// #[derive(serde::Deserialize)]
/// struct Jwt { jwt_issuer: String }
/// let jwt: Jwt = secret.as_json()?;
/// println!("{} {:?}", jwt.jwt_issuer, secret); // Debug prints <redacted>
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SecretValue {
    name: String,
    arn: String,
    version_id: String,
    version_stages: Vec<String>,
    created_date: Option<SystemTime>,
    contents: Contents,
    cache: CacheFacts,
}

#[derive(Clone)]
enum Contents {
    Text(Zeroizing<String>),
    Binary(Zeroizing<Vec<u8>>),
    /// Metadata-only answers (RefreshSecret, DELETED events).
    None,
}

/// How the broker's shared cache took part in an answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheFacts {
    /// Answered from the cache without an upstream call.
    pub hit: bool,
    /// Time since the value was read from AWS.
    pub age: Duration,
    /// Served past its TTL because AWS failed (within the broker's bound).
    pub stale: bool,
}

impl SecretValue {
    /// The full name (with prefix).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The ARN, where the broker's backend has one.
    pub fn arn(&self) -> &str {
        &self.arn
    }

    /// Whether `other` is the same version of the same secret: the same
    /// version id under the same ARN. A secret deleted and created again
    /// under its name may be given its old version ids (a caller's
    /// ClientRequestToken) with other values, under a new ARN.
    /// An ARN missing on either side leaves the version id to say it.
    pub fn is_same_version(&self, other: &SecretValue) -> bool {
        self.is_version(&other.version_id, &other.arn)
    }

    /// Whether this is the version `version_id` of the secret at `arn`,
    /// by the rule of `is_same_version`.
    pub(crate) fn is_version(&self, version_id: &str, arn: &str) -> bool {
        self.version_id == version_id && (self.arn == arn || self.arn.is_empty() || arn.is_empty())
    }

    /// The version's id.
    pub fn version_id(&self) -> &str {
        &self.version_id
    }

    /// The version's staging labels (e.g. `AWSCURRENT`).
    pub fn version_stages(&self) -> &[String] {
        &self.version_stages
    }

    /// When the version was created upstream.
    pub fn created_date(&self) -> Option<SystemTime> {
        self.created_date
    }

    /// How the cache took part.
    pub fn cache(&self) -> CacheFacts {
        self.cache
    }

    /// The value as text, when the secret is text (`SecretString`).
    pub fn as_str(&self) -> Option<&str> {
        match &self.contents {
            Contents::Text(text) => Some(text),
            _ => None,
        }
    }

    /// The value's bytes (text as UTF-8); empty for metadata-only answers.
    pub fn as_bytes(&self) -> &[u8] {
        match &self.contents {
            Contents::Text(text) => text.as_bytes(),
            Contents::Binary(bytes) => bytes,
            Contents::None => &[],
        }
    }

    /// Decodes a JSON secret into `T`. Errors name the problem, never the
    /// value.
    pub fn as_json<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(self.as_bytes()).map_err(|e| {
            Error::Decode(format!(
                "{} is not the expected JSON ({:?} at line {}, column {})",
                self.name,
                e.classify(),
                e.line(),
                e.column()
            ))
        })
    }

    /// Decodes a JSON object secret into a map (Python's `as_dict`).
    pub fn as_map(&self) -> Result<serde_json::Map<String, serde_json::Value>, Error> {
        self.as_json()
    }

    pub(crate) fn from_proto(secret: proto::Secret) -> Self {
        let contents = match secret.value {
            Some(proto::secret::Value::StringValue(text)) => Contents::Text(Zeroizing::new(text)),
            Some(proto::secret::Value::BinaryValue(bytes)) => {
                Contents::Binary(Zeroizing::new(bytes.to_vec()))
            }
            None => Contents::None,
        };
        let cache = secret
            .cache
            .map_or_else(CacheFacts::default, |c| CacheFacts {
                hit: c.hit,
                age: c
                    .age
                    .and_then(|d| Duration::try_from(d).ok())
                    .unwrap_or_default(),
                stale: c.stale,
            });
        Self {
            name: secret.name,
            arn: secret.arn,
            version_id: secret.version_id,
            version_stages: secret.version_stages,
            created_date: secret
                .created_date
                .and_then(|t| SystemTime::try_from(t).ok()),
            contents,
            cache,
        }
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretValue")
            .field("name", &self.name)
            .field("version_id", &self.version_id)
            .field("version_stages", &self.version_stages)
            .field(
                "value",
                &format_args!("<redacted {} bytes>", self.as_bytes().len()),
            )
            .field("cache", &self.cache)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(value: &str) -> SecretValue {
        SecretValue::from_proto(proto::Secret {
            name: "insurecove/x".into(),
            version_id: "v1".into(),
            value: Some(proto::secret::Value::StringValue(value.into())),
            ..Default::default()
        })
    }

    #[test]
    fn accessors_and_redacted_debug() {
        let secret = text(r#"{"k":"hunter2-SECRET"}"#);
        assert_eq!(secret.as_map().unwrap()["k"], "hunter2-SECRET");
        assert_eq!(secret.as_str(), Some(r#"{"k":"hunter2-SECRET"}"#));
        let shown = format!("{secret:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("<redacted 22 bytes>"), "{shown}");
    }

    #[test]
    fn decode_errors_never_quote_the_value() {
        let err = text("plain-SECRET-text").as_map().unwrap_err().to_string();
        assert!(!err.contains("SECRET"), "{err}");
        assert!(err.contains("insurecove/x"), "{err}");
    }
}
