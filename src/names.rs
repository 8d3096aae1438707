//! Secret names: how a caller's name becomes the full name asked upstream.
//!
//! Callers use short names relative to a prefix (`mistral-api-key` means
//! `insurecove/mistral-api-key`), as the Python class this broker replaces
//! did. A name that already carries the prefix, or an ARN, is taken as is.
//! The full name is then checked against AWS's own rule (1–512 characters of
//! `A-Za-z0-9/_+=.@-`) so that a bad name is refused here, with a clear
//! reason, instead of costing an upstream call.

use std::fmt;

/// AWS's longest secret name (and, in practice, ARN) in characters.
pub const MAX_NAME_LEN: usize = 512;

const ARN_PREFIX: &str = "arn:";

/// Why a name was refused. Carries no part of the name itself beyond what
/// the caller sent, and never a secret value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidName {
    #[error("the secret name is empty")]
    Empty,
    #[error(
        "the secret name is {len} characters long once prefixed; at most {MAX_NAME_LEN} are allowed"
    )]
    TooLong { len: usize },
    #[error(
        "the secret name contains {found:?}; only letters, digits and the characters /_+=.@- are allowed"
    )]
    BadCharacter { found: char },
}

/// Turns callers' names into full secret names. Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameResolver {
    /// The prefix with its trailing slash, e.g. `insurecove/`.
    prefix_with_slash: String,
    environment: String,
}

impl NameResolver {
    /// `prefix` is `SECRET_PREFIX` (e.g. `insurecove`); `environment` is
    /// `SECRET_ENVIRONMENT` (e.g. `production`), used by the typed configs'
    /// default names.
    pub fn new(prefix: &str, environment: &str) -> Self {
        let prefix = prefix.trim_end_matches('/');
        Self {
            prefix_with_slash: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
            environment: environment.to_owned(),
        }
    }

    /// The full name for `name`, validated.
    pub fn resolve(&self, name: &str) -> Result<String, InvalidName> {
        if name.is_empty() {
            return Err(InvalidName::Empty);
        }
        let full = if name.starts_with(ARN_PREFIX) || name.starts_with(&self.prefix_with_slash) {
            name.to_owned()
        } else {
            // Every call resolves a name: one exact allocation, no formatter.
            let mut full = String::with_capacity(self.prefix_with_slash.len() + name.len());
            full.push_str(&self.prefix_with_slash);
            full.push_str(name);
            full
        };
        validate_full_name(&full)?;
        Ok(full)
    }

    /// The full name of a typed config: the caller's name when given, else
    /// `<environment>/<kind>` (e.g. `production/jwt`).
    pub fn resolve_or_default(&self, name: &str, kind: &str) -> Result<String, InvalidName> {
        if name.is_empty() {
            self.resolve(&format!("{}/{kind}", self.environment))
        } else {
            self.resolve(name)
        }
    }
}

fn validate_full_name(full: &str) -> Result<(), InvalidName> {
    let len = full.chars().count();
    if len > MAX_NAME_LEN {
        return Err(InvalidName::TooLong { len });
    }
    let is_arn = full.starts_with(ARN_PREFIX);
    match full.chars().find(|&c| !is_allowed(c, is_arn)) {
        Some(found) => Err(InvalidName::BadCharacter { found }),
        None => Ok(()),
    }
}

/// AWS's character set for names; ARNs also use `:` as a separator.
fn is_allowed(c: char, is_arn: bool) -> bool {
    c.is_ascii_alphanumeric() || "/_+=.@-".contains(c) || (is_arn && c == ':')
}

/// A name shown in logs and errors: full names are not secret, but a caller
/// could paste anything into a name field, so overlong input is cut.
pub struct ShownName<'a>(pub &'a str);

impl fmt::Display for ShownName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 80;
        match self.0.char_indices().nth(SHOWN) {
            Some((cut, _)) => write!(f, "{}…", &self.0[..cut]),
            None => f.write_str(self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolver() -> NameResolver {
        NameResolver::new("insurecove", "production")
    }

    #[test]
    fn short_names_get_the_prefix() {
        assert_eq!(
            resolver().resolve("mistral-api-key").unwrap(),
            "insurecove/mistral-api-key"
        );
    }

    #[test]
    fn prefixed_names_and_arns_are_kept() {
        let r = resolver();
        assert_eq!(
            r.resolve("insurecove/production/jwt").unwrap(),
            "insurecove/production/jwt"
        );
        let arn = "arn:aws:secretsmanager:ap-east-1:123456789012:secret:insurecove/jwt-AbCdEf";
        assert_eq!(r.resolve(arn).unwrap(), arn);
    }

    #[test]
    fn a_name_that_only_looks_like_the_prefix_is_prefixed() {
        assert_eq!(
            resolver().resolve("insurecove-other").unwrap(),
            "insurecove/insurecove-other"
        );
    }

    #[test]
    fn typed_defaults_use_the_environment() {
        let r = NameResolver::new("acme/", "staging");
        assert_eq!(r.resolve_or_default("", "jwt").unwrap(), "acme/staging/jwt");
        assert_eq!(r.resolve_or_default("x", "jwt").unwrap(), "acme/x");
    }

    #[test]
    fn bad_names_are_refused_with_a_reason() {
        let r = resolver();
        assert_eq!(r.resolve(""), Err(InvalidName::Empty));
        assert_eq!(
            r.resolve("has space"),
            Err(InvalidName::BadCharacter { found: ' ' })
        );
        assert_eq!(
            r.resolve("glob*"),
            Err(InvalidName::BadCharacter { found: '*' })
        );
        assert_eq!(
            r.resolve("a:b"),
            Err(InvalidName::BadCharacter { found: ':' })
        );
    }

    #[test]
    fn length_counts_the_prefix() {
        let r = resolver();
        let fits = "a".repeat(MAX_NAME_LEN - "insurecove/".len());
        assert!(r.resolve(&fits).is_ok());
        let over = format!("{fits}a");
        assert_eq!(
            r.resolve(&over),
            Err(InvalidName::TooLong {
                len: MAX_NAME_LEN + 1
            })
        );
    }

    #[test]
    fn shown_names_are_cut() {
        let long = "x".repeat(200);
        let shown = ShownName(&long).to_string();
        assert_eq!(shown.chars().count(), 81);
        assert_eq!(ShownName("short").to_string(), "short");
    }
}
