//! Building the contract's messages from the cache's answers.

use crate::{cache::Lookup, proto, secret::SecretValue};

/// Whether a `Secret` message carries the value or only metadata.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Contents {
    WithValue,
    MetadataOnly,
}

pub fn secret(lookup: &Lookup, contents: Contents) -> proto::Secret {
    let version = &lookup.version;
    let value = match (&version.value, contents) {
        (_, Contents::MetadataOnly) => None,
        (SecretValue::Text(text), Contents::WithValue) => {
            Some(proto::secret::Value::StringValue(text.as_str().to_owned()))
        }
        (SecretValue::Binary(bytes), Contents::WithValue) => Some(
            proto::secret::Value::BinaryValue(bytes::Bytes::copy_from_slice(bytes)),
        ),
    };
    proto::Secret {
        name: version.name.clone(),
        arn: version.arn.clone(),
        version_id: version.version_id.clone(),
        version_stages: version.version_stages.clone(),
        created_date: version.created_date.map(prost_types::Timestamp::from),
        value,
        cache: Some(proto::CacheInfo {
            hit: lookup.hit,
            age: prost_types::Duration::try_from(lookup.age).ok(),
            stale: lookup.stale,
        }),
    }
}
