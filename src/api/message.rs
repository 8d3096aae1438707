//! Building the contract's messages from the cache's answers.

use std::sync::Arc;

use crate::{
    cache::Lookup,
    proto,
    secret::SecretValue,
    watch::{WatchEvent, WatchState},
};

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

/// The first message of a WatchSecret stream: the state now, as CURRENT,
/// or ROTATED when the caller says it holds another version (it missed a
/// rotation while away), or DELETED.
pub fn first_watch_event(state: &WatchState, since_version_id: &str) -> proto::WatchSecretResponse {
    let event = if state.event == WatchEvent::Deleted {
        proto::WatchEventType::Deleted
    } else if !since_version_id.is_empty() && since_version_id != state.version.version_id {
        proto::WatchEventType::Rotated
    } else {
        proto::WatchEventType::Current
    };
    watch_message(state, event)
}

/// A later message: what happened.
pub fn watch_event(state: &WatchState) -> proto::WatchSecretResponse {
    let event = match state.event {
        WatchEvent::Current => proto::WatchEventType::Current,
        WatchEvent::Rotated => proto::WatchEventType::Rotated,
        WatchEvent::Deleted => proto::WatchEventType::Deleted,
        WatchEvent::Restored => proto::WatchEventType::Restored,
    };
    watch_message(state, event)
}

fn watch_message(state: &WatchState, event: proto::WatchEventType) -> proto::WatchSecretResponse {
    // A deleted secret's message carries its last metadata, not its value.
    let contents = if state.event == WatchEvent::Deleted {
        Contents::MetadataOnly
    } else {
        Contents::WithValue
    };
    let lookup = Lookup::fresh(Arc::clone(&state.version));
    proto::WatchSecretResponse {
        r#type: event as i32,
        secret: Some(secret(&lookup, contents)),
        observed_at: Some(prost_types::Timestamp::from(state.observed_at)),
    }
}
