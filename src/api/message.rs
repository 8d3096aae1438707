//! Building the contract's messages from the cache's answers.
//!
//! One place, so that GetSecret, BatchGetSecrets, the typed configs and the
//! watch events describe a version the same way. GetSecret's answer is the
//! exception that makes the hot path cheap: the version's `Secret` is
//! encoded once, into zeroizing memory, and only the call's cache facts are
//! encoded per call.

use std::sync::Arc;

use prost::{
    Message,
    encoding::{self, WireType},
};
use secrets_broker_contract::encoded::{EncodedGetSecretResponse, EncodedSecret};

use crate::{
    cache::Lookup,
    proto,
    secret::{SecretValue, SecretVersion},
    watch::{WatchEvent, WatchState},
};

/// `Secret`'s value fields: `string_value` and `binary_value`.
const STRING_VALUE: u32 = 6;
const BINARY_VALUE: u32 = 7;

/// GetSecret's answer: the version's `Secret` as encoded once (on its
/// first answer), and this call's cache facts, the only part encoded per
/// call.
pub fn get_secret_response(lookup: &Lookup) -> EncodedGetSecretResponse {
    let encoded = lookup
        .version
        .encoded
        .get_or_encode(|| encode_secret(&lookup.version));
    EncodedGetSecretResponse::new(Arc::clone(encoded), cache_info(lookup))
}

/// A version's `Secret` message with its value, without `cache`: the
/// metadata through the generated message, the value written straight from
/// its zeroizing buffer into the exactly sized (and wiped) output, so that
/// no other copy of it is made.
fn encode_secret(version: &SecretVersion) -> EncodedSecret {
    let metadata = metadata(version);
    let (field, value): (u32, &[u8]) = match &version.value {
        SecretValue::Text(text) => (STRING_VALUE, text.as_bytes()),
        SecretValue::Binary(bytes) => (BINARY_VALUE, bytes),
    };
    let value_len =
        encoding::key_len(field) + encoding::encoded_len_varint(value.len() as u64) + value.len();
    EncodedSecret::with_len(metadata.encoded_len() + value_len, |buf| {
        metadata.encode_raw(buf);
        encoding::encode_key(field, WireType::LengthDelimited, buf);
        encoding::encode_varint(value.len() as u64, buf);
        buf.extend_from_slice(value);
    })
}

pub fn cache_info(lookup: &Lookup) -> proto::CacheInfo {
    proto::CacheInfo {
        hit: lookup.hit,
        age: prost_types::Duration::try_from(lookup.age).ok(),
        stale: lookup.stale,
    }
}

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
        value,
        cache: Some(cache_info(lookup)),
        ..metadata(version)
    }
}

/// A version's `Secret` message without value and cache facts.
fn metadata(version: &SecretVersion) -> proto::Secret {
    proto::Secret {
        name: version.name.clone(),
        arn: version.arn.clone(),
        version_id: version.version_id.clone(),
        version_stages: version.version_stages.clone(),
        created_date: version.created_date.map(prost_types::Timestamp::from),
        value: None,
        cache: None,
    }
}

/// The first message of a WatchSecret stream: the state now, as CURRENT,
/// or ROTATED when the caller says it holds another version (it missed a
/// rotation while away: another version id, or the same one of another
/// secret of the name, when it says the ARN), or DELETED. Such a state is
/// one AWS answered (`WatchHub::confirm_first`), never a cached one that
/// may be older than the caller's.
pub fn first_watch_event(
    state: &WatchState,
    since_version_id: &str,
    since_arn: &str,
) -> proto::WatchSecretResponse {
    let event = if state.event == WatchEvent::Deleted {
        proto::WatchEventType::Deleted
    } else if tells_a_change(state, (since_version_id, since_arn)) {
        proto::WatchEventType::Rotated
    } else {
        proto::WatchEventType::Current
    };
    watch_message(state, event)
}

/// Whether a watcher that holds `(version id, ARN)` (an empty id: none)
/// would be told something by `state` as its first message: DELETED, or
/// another version than its own.
pub fn tells_a_change(state: &WatchState, (version_id, arn): (&str, &str)) -> bool {
    state.event == WatchEvent::Deleted
        || (!version_id.is_empty() && !state.version.is(arn, version_id))
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::secret::SecretVersion;

    fn lookup(value: SecretValue) -> Lookup {
        Lookup {
            version: Arc::new(SecretVersion {
                name: "insurecove/db".into(),
                arn: String::new(),
                version_id: "v1".into(),
                version_stages: vec!["AWSCURRENT".into(), "BLUE".into()],
                created_date: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
                value,
                encoded: Default::default(),
            }),
            hit: true,
            age: Duration::from_millis(1500),
            stale: false,
        }
    }

    #[test]
    fn the_encoded_answer_is_the_message_encoded_per_call() {
        for value in [
            SecretValue::text("{\"password\":\"hunter2\"}"),
            SecretValue::binary(vec![0u8, 1, 2, 255]),
            SecretValue::text(""),
        ] {
            let lookup = lookup(value);
            let encoded = get_secret_response(&lookup).encode_to_vec();
            let decoded = proto::GetSecretResponse::decode(encoded.as_slice()).unwrap();
            let expected = proto::GetSecretResponse {
                secret: Some(secret(&lookup, Contents::WithValue)),
            };
            assert_eq!(decoded, expected);
        }
    }

    #[test]
    fn a_resuming_watcher_is_told_of_another_version_or_another_secret_of_the_name() {
        let mut version = (*lookup(SecretValue::text("v")).version).clone();
        version.arn = "arn:aws:secretsmanager:us-east-1:1:secret:insurecove/db-AAAAAA".into();
        let state = WatchState::new_for_tests(WatchEvent::Current, Arc::new(version));
        let other_arn = "arn:aws:secretsmanager:us-east-1:1:secret:insurecove/db-BBBBBB";
        let first = |since_version_id, since_arn| {
            first_watch_event(&state, since_version_id, since_arn).r#type()
        };
        use proto::WatchEventType::{Current, Rotated};
        assert_eq!(first("", ""), Current, "a new watcher");
        assert_eq!(first("v1", ""), Current, "the version held, no ARN said");
        assert_eq!(first("v1", &state.version.arn), Current);
        assert_eq!(first("v0", ""), Rotated, "a rotation missed");
        assert_eq!(
            first("v1", other_arn),
            Rotated,
            "the secret created again under the name, with its old version id"
        );
        // A store without ARNs: the version id alone says it.
        let mut no_arn = (*state.version).clone();
        no_arn.arn.clear();
        let state = WatchState::new_for_tests(WatchEvent::Current, Arc::new(no_arn));
        assert_eq!(first_watch_event(&state, "v1", other_arn).r#type(), Current);
    }

    #[test]
    fn a_version_is_encoded_once() {
        let first = lookup(SecretValue::text("v"));
        let again = Lookup {
            hit: false,
            ..first.clone()
        };
        let a = Arc::clone(get_secret_response(&first).secret().unwrap());
        let b = Arc::clone(get_secret_response(&again).secret().unwrap());
        assert!(Arc::ptr_eq(&a, &b), "the second answer reuses the bytes");
        assert_eq!(
            Arc::strong_count(&a),
            3,
            "the version holds one, each answer one"
        );
    }
}
