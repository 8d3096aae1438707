//! A `GetSecretResponse` answered from bytes encoded once per secret
//! version, for the server's hot path.
//!
//! A cached version never changes, so its `Secret` message (value
//! included) is encoded once (`EncodedSecret`) and every answer copies those
//! bytes; only the per-call cache facts (`CacheInfo`: hit, age, stale) are
//! encoded per call, once, when the response is made (prost asks a message
//! its length at each level of nesting, and a generated `CacheInfo` would
//! be measured several times per call). On the wire this is exactly a
//! `GetSecretResponse`: clients decode it with the ordinary message. The server's stubs use this
//! type for GetSecret's response (the build maps it with `extern_path`).
//!
//! The encoded bytes hold a secret value: the buffer is wiped when the last
//! reference goes (`EncodedSecret`'s `Drop`), and it is sized exactly up
//! front so that no reallocation leaves an unwiped copy behind.

use std::{fmt, sync::Arc};

use prost::{
    Message,
    bytes::{Buf, BufMut},
    encoding::{self, DecodeContext, WireType},
};
use zeroize::Zeroize;

use crate::proto::{CacheInfo, Secret};

/// The field numbers of `GetSecretResponse.secret` and `Secret.cache`.
const RESPONSE_SECRET: u32 = 1;
const SECRET_CACHE: u32 = 8;

/// The encoded fields of one `Secret` message, without its `cache` field;
/// wiped on drop.
pub struct EncodedSecret {
    bytes: Vec<u8>,
}

impl EncodedSecret {
    /// Encodes with `write` into a buffer of exactly `len` bytes (`write`
    /// must write exactly that many: a bigger write would reallocate and
    /// leave an unwiped copy, and is refused with a panic in debug builds).
    pub fn with_len(len: usize, write: impl FnOnce(&mut Vec<u8>)) -> Self {
        let mut bytes = Vec::with_capacity(len);
        write(&mut bytes);
        debug_assert_eq!(bytes.len(), len, "the encoded length was mis-computed");
        debug_assert_eq!(bytes.capacity(), len, "the buffer grew: an unwiped copy");
        Self { bytes }
    }

    /// The encoded fields.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Overwrites the bytes with zeros (what `Drop` does).
    pub fn wipe(&mut self) {
        self.bytes.zeroize();
        #[cfg(test)]
        tests::WIPES.with(|wipes| wipes.set(wipes.get() + 1));
    }
}

impl Drop for EncodedSecret {
    fn drop(&mut self) {
        self.wipe();
    }
}

impl fmt::Debug for EncodedSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EncodedSecret(<{} bytes redacted>)", self.bytes.len())
    }
}

/// GetSecret's response as the server sends it: a pre-encoded `Secret`
/// and this call's cache facts. `Default` is the empty response.
#[derive(Clone, Default)]
pub struct EncodedGetSecretResponse {
    /// The version's encoded `Secret` (without `cache`).
    secret: Option<Arc<EncodedSecret>>,
    /// This call's cache facts, encoded.
    cache_field: CacheField,
}

impl EncodedGetSecretResponse {
    /// The answer of `secret` with this call's `cache` facts.
    pub fn new(secret: Arc<EncodedSecret>, cache: CacheInfo) -> Self {
        Self {
            secret: Some(secret),
            cache_field: CacheField::new(&cache),
        }
    }

    /// The version's encoded `Secret` (none in the empty response).
    pub fn secret(&self) -> Option<&Arc<EncodedSecret>> {
        self.secret.as_ref()
    }

    /// This call's cache facts, read back from their encoding (the field
    /// alone is a valid `Secret` message; the empty response has none).
    pub fn cache(&self) -> CacheInfo {
        Secret::decode(self.cache_field.as_bytes())
            .ok()
            .and_then(|secret| secret.cache)
            .unwrap_or_default()
    }

    fn secret_len(&self) -> Option<usize> {
        let secret = self.secret.as_ref()?;
        Some(secret.as_bytes().len() + self.cache_field.as_bytes().len())
    }
}

impl fmt::Debug for EncodedGetSecretResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncodedGetSecretResponse")
            .field("secret", &self.secret)
            .field("cache", &self.cache())
            .finish()
    }
}

/// The longest `Secret.cache` field: its key and length (a byte each) and
/// a `CacheInfo` of at most 28 bytes (`hit` 2, `age` at most 24 with both
/// of its varints at their longest, negative, ten bytes each; `stale` 2).
const CACHE_FIELD_MAX: usize = 30;

/// `Secret.cache` encoded: key, length and the `CacheInfo` message.
#[derive(Clone, Copy, Default)]
struct CacheField {
    bytes: [u8; CACHE_FIELD_MAX],
    len: usize,
}

impl CacheField {
    fn new(cache: &CacheInfo) -> Self {
        let mut field = Self::default();
        let mut room = &mut field.bytes[..];
        encoding::message::encode(SECRET_CACHE, cache, &mut room);
        field.len = CACHE_FIELD_MAX - room.len();
        field
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl Message for EncodedGetSecretResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        let (Some(secret), Some(len)) = (&self.secret, self.secret_len()) else {
            return;
        };
        encoding::encode_key(RESPONSE_SECRET, WireType::LengthDelimited, buf);
        encoding::encode_varint(len as u64, buf);
        buf.put_slice(secret.as_bytes());
        buf.put_slice(self.cache_field.as_bytes());
    }

    /// The server only sends this message; what it would read is skipped.
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.secret_len().map_or(0, |len| {
            encoding::key_len(RESPONSE_SECRET) + encoding::encoded_len_varint(len as u64) + len
        })
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// Wipes done on this thread.
        pub(super) static WIPES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }
    use crate::proto::{GetSecretResponse, secret::Value};

    fn encoded(secret: &Secret) -> EncodedSecret {
        EncodedSecret::with_len(secret.encoded_len(), |buf| secret.encode_raw(buf))
    }

    #[test]
    fn the_wire_form_is_a_get_secret_response() {
        let secret = Secret {
            name: "insurecove/db".into(),
            version_id: "v1".into(),
            version_stages: vec!["AWSCURRENT".into()],
            value: Some(Value::StringValue("hunter2".into())),
            ..Secret::default()
        };
        let cache = CacheInfo {
            hit: true,
            age: Some(prost_types::Duration {
                seconds: 3,
                nanos: 0,
            }),
            stale: false,
        };
        let response = EncodedGetSecretResponse::new(Arc::new(encoded(&secret)), cache);
        let bytes = response.encode_to_vec();
        assert_eq!(bytes.len(), response.encoded_len());
        let decoded = GetSecretResponse::decode(bytes.as_slice()).unwrap();
        let expected = Secret {
            cache: Some(cache),
            ..secret
        };
        assert_eq!(decoded.secret, Some(expected));
        assert!(!format!("{response:?}").contains("hunter2"));
    }

    #[test]
    fn the_longest_cache_facts_fit_and_decode() {
        let cache = CacheInfo {
            hit: true,
            age: Some(prost_types::Duration {
                seconds: i64::MIN,
                nanos: i32::MIN,
            }),
            stale: true,
        };
        let field = CacheField::new(&cache);
        assert_eq!(field.len, CACHE_FIELD_MAX, "the bound is tight");
        let response = EncodedGetSecretResponse::new(Arc::new(encoded(&Secret::default())), cache);
        let bytes = response.encode_to_vec();
        assert_eq!(bytes.len(), response.encoded_len());
        let decoded = GetSecretResponse::decode(bytes.as_slice()).unwrap();
        assert_eq!(decoded.secret.and_then(|s| s.cache), Some(cache));
        assert_eq!(response.cache(), cache);
    }

    #[test]
    fn the_buffer_is_wiped_and_drop_wipes_it() {
        let secret = Secret {
            value: Some(Value::StringValue("hunter2".into())),
            ..Secret::default()
        };
        let mut buffer = encoded(&secret);
        assert!(buffer.as_bytes().windows(7).any(|w| w == b"hunter2"));
        buffer.wipe();
        assert!(buffer.as_bytes().iter().all(|&b| b == 0));

        // Dropping wipes (recorded by `wipe`, never by reading freed
        // memory), also when the last of several references goes.
        let shared = Arc::new(encoded(&secret));
        let other = Arc::clone(&shared);
        let before = WIPES.with(std::cell::Cell::get);
        drop(shared);
        assert_eq!(WIPES.with(std::cell::Cell::get), before, "still referenced");
        drop(other);
        assert_eq!(WIPES.with(std::cell::Cell::get), before + 1);
    }
}
