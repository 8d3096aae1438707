//! What identifies a cache entry, owned (in the map) or borrowed (a
//! request's lookup).
//!
//! A hit must not allocate, so a request looks its entry up with a
//! `KeyRef` borrowed from its own fields. `DashMap` finds an entry by any
//! `Q` the key `Borrow`s; a key with two parts cannot lend out a single
//! reference to a borrowed pair, so both forms are seen through the
//! `Keyed` trait object, which hashes and compares their `KeyRef` view.
//! `CacheKey`'s own `Hash` and `Eq` go through the same view, which keeps
//! the two consistent.

use std::{
    borrow::Borrow,
    hash::{Hash, Hasher},
};

use crate::backend::{SelectorRef, VersionSelector};

/// What identifies a cache entry.
#[derive(Debug, Clone)]
pub struct CacheKey {
    /// Full secret name (or ARN).
    pub name: String,
    /// Which version of it.
    pub selector: VersionSelector,
}

impl CacheKey {
    /// The key of `name` at `selector`.
    pub fn new(name: String, selector: VersionSelector) -> Self {
        Self { name, selector }
    }

    /// The key of a read of `name` by version id alone (tests read so).
    #[cfg(test)]
    pub fn by_version_id(name: &str, id: &str) -> Self {
        Self::new(
            name.to_owned(),
            VersionSelector::Id {
                id: id.to_owned(),
                stage: None,
            },
        )
    }

    /// The key as borrowed parts.
    pub fn as_ref(&self) -> KeyRef<'_> {
        KeyRef {
            name: &self.name,
            selector: self.selector.as_ref(),
        }
    }
}

/// A cache key borrowed from elsewhere (a request): finds an entry without
/// allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyRef<'a> {
    /// Full secret name (or ARN).
    pub name: &'a str,
    /// Which version of it.
    pub selector: SelectorRef<'a>,
}

impl KeyRef<'_> {
    /// The owned key, for the entries a miss makes.
    pub fn to_owned(self) -> CacheKey {
        CacheKey::new(self.name.to_owned(), self.selector.to_owned())
    }
}

/// Either form of a key, as the map compares them.
pub(super) trait Keyed {
    fn key(&self) -> KeyRef<'_>;
}

impl Keyed for CacheKey {
    fn key(&self) -> KeyRef<'_> {
        self.as_ref()
    }
}

impl Keyed for KeyRef<'_> {
    fn key(&self) -> KeyRef<'_> {
        *self
    }
}

impl Hash for dyn Keyed + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.key().hash(state);
    }
}

impl PartialEq for dyn Keyed + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for dyn Keyed + '_ {}

impl<'a> Borrow<dyn Keyed + 'a> for CacheKey {
    fn borrow(&self) -> &(dyn Keyed + 'a) {
        self
    }
}

impl Hash for CacheKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_ref().hash(state);
    }
}

impl PartialEq for CacheKey {
    fn eq(&self, other: &Self) -> bool {
        self.as_ref() == other.as_ref()
    }
}

impl Eq for CacheKey {}

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher;

    use super::*;

    #[test]
    fn both_forms_hash_and_compare_alike() {
        let hasher = std::collections::hash_map::RandomState::new();
        let owned = CacheKey::new("insurecove/db".into(), VersionSelector::current());
        let borrowed = KeyRef {
            name: "insurecove/db",
            selector: SelectorRef::Stage("AWSCURRENT"),
        };
        let as_keyed = |k: &dyn Keyed| hasher.hash_one(k);
        assert_eq!(as_keyed(&owned), as_keyed(&borrowed));
        assert_eq!(hasher.hash_one(&owned), as_keyed(&borrowed));
        assert!(&owned as &dyn Keyed == &borrowed as &dyn Keyed);

        let map = dashmap::DashMap::new();
        map.insert(owned.clone(), 1);
        assert_eq!(map.get(&borrowed as &dyn Keyed).map(|v| *v), Some(1));
        let other = KeyRef {
            selector: SelectorRef::Stage("AWSPREVIOUS"),
            ..borrowed
        };
        assert!(map.get(&other as &dyn Keyed).is_none());
        assert_eq!(borrowed.to_owned(), owned);
    }
}
