//! Matching a name against a grant's patterns. Every call under a policy
//! runs these, and globset's `is_match` builds a candidate path and runs
//! its strategies (an Aho-Corasick search, a regex) each time, so the
//! common spellings take shortcuts that answer exactly as the glob would:
//! a pattern without glob syntax is compared as a string, and
//! `literal/**` (or `**` alone) is a prefix test. Everything else goes
//! through globset.

use globset::{Glob, GlobMatcher, GlobSet, GlobSetBuilder};

/// Characters that make a pattern a glob rather than a literal name.
const GLOB_SYNTAX: [char; 7] = ['*', '?', '[', ']', '{', '}', '\\'];

fn is_literal(text: &str) -> bool {
    !text.contains(GLOB_SYNTAX)
}

/// One identity pattern: most grants name one identity exactly.
pub(super) enum NameMatcher {
    Exact(String),
    Glob(GlobMatcher),
}

impl NameMatcher {
    pub(super) fn new(glob: Glob) -> Self {
        if is_literal(glob.glob()) {
            Self::Exact(glob.glob().to_owned())
        } else {
            Self::Glob(glob.compile_matcher())
        }
    }

    /// `glob` (built case-insensitive) for names kept in lower case (DNS
    /// names): a literal is lowered, a glob matches in any case.
    pub(super) fn any_case(glob: Glob) -> Self {
        match Self::new(glob) {
            Self::Exact(exact) => Self::Exact(exact.to_ascii_lowercase()),
            glob => glob,
        }
    }

    pub(super) fn is_match(&self, name: &str) -> bool {
        match self {
            Self::Exact(exact) => exact == name,
            Self::Glob(glob) => glob.is_match(name),
        }
    }
}

/// A grant's `secrets` patterns. The shortcuts assume the policy's glob
/// options (`literal_separator`, case-sensitive, backslash escapes), which
/// are the only ones `Policy::parse` builds with.
pub(super) struct SecretMatcher {
    /// Literal names.
    exact: Vec<String>,
    /// `literal/**` as `literal/` (with `literal_separator`, the glob
    /// matches exactly the names that start so); `**` as `""`.
    prefixes: Vec<String>,
    /// The rest, if any.
    globs: Option<GlobSet>,
}

impl SecretMatcher {
    pub(super) fn new(patterns: Vec<Glob>) -> Result<Self, globset::Error> {
        let mut matcher = Self {
            exact: Vec::new(),
            prefixes: Vec::new(),
            globs: None,
        };
        let mut globs = GlobSetBuilder::new();
        for pattern in patterns {
            let text = pattern.glob();
            if is_literal(text) {
                matcher.exact.push(text.to_owned());
            } else if let Some(prefix) = recursive_prefix(text) {
                matcher.prefixes.push(prefix.to_owned());
            } else {
                globs.add(pattern);
            }
        }
        let globs = globs.build()?;
        matcher.globs = (!globs.is_empty()).then_some(globs);
        Ok(matcher)
    }

    pub(super) fn is_match(&self, name: &str) -> bool {
        self.exact.iter().any(|exact| exact == name)
            || self
                .prefixes
                .iter()
                .any(|prefix| name.starts_with(prefix.as_str()))
            || self
                .globs
                .as_ref()
                .is_some_and(|globs| globs.is_match(name))
    }
}

/// `literal/` for `literal/**`, `""` for `**`; none for other patterns.
fn recursive_prefix(pattern: &str) -> Option<&str> {
    if pattern == "**" {
        return Some("");
    }
    let prefix = pattern.strip_suffix("**")?;
    (prefix.ends_with('/') && is_literal(prefix)).then_some(prefix)
}

#[cfg(test)]
mod tests {
    use globset::GlobBuilder;

    use super::*;

    fn glob(pattern: &str) -> Glob {
        GlobBuilder::new(pattern)
            .literal_separator(true)
            .build()
            .unwrap()
    }

    /// The shortcuts answer as globset itself does, at the edges of a
    /// prefix (the bare literal, a trailing slash, doubled slashes, a
    /// longer sibling) and for patterns that must stay globs.
    #[test]
    fn shortcuts_answer_as_the_glob_does() {
        let patterns = [
            "insurecove/db",
            "insurecove/**",
            "insurecove/shared/**",
            "**",
            "insurecove/*",
            "insurecove/*/jwt",
            "insurecove/**/jwt",
            "insurecove/db?",
            "insurecove/{a,b}/**",
            "a**",
            "insurecove**",
            "a!b",
            "a,b",
            "a]b",
            "/**",
            "insurecove/\\*",
        ];
        let names = [
            "",
            "insurecove",
            "insurecove/",
            "insurecove/db",
            "insurecove/dbx",
            "insurecove/db1",
            "insurecove/shared",
            "insurecove/shared/",
            "insurecove/shared/x",
            "insurecove/shared/x/y",
            "insurecove//",
            "insurecove//x",
            "insurecovex/db",
            "insurecove/a/jwt",
            "insurecove/a/b/jwt",
            "insurecove/b/x",
            "/insurecove/db",
            "abc",
            "a/b",
            "a!b",
            "a,b",
            "a]b",
            "/",
            "/x/y",
            "insurecove/*",
            "insurecove/a\nb",
        ];
        for pattern in patterns {
            let reference = glob(pattern).compile_matcher();
            let ours = SecretMatcher::new(vec![glob(pattern)]).unwrap();
            for name in names {
                assert_eq!(
                    ours.is_match(name),
                    reference.is_match(name),
                    "pattern {pattern:?}, name {name:?}"
                );
            }
        }
    }

    #[test]
    fn common_spellings_take_the_shortcuts() {
        let matcher = SecretMatcher::new(vec![
            glob("insurecove/db"),
            glob("insurecove/shared/**"),
            glob("**"),
            glob("insurecove/*/jwt"),
        ])
        .unwrap();
        assert_eq!(matcher.exact, ["insurecove/db"]);
        assert_eq!(matcher.prefixes, ["insurecove/shared/", ""]);
        assert!(matcher.globs.is_some(), "one pattern stays a glob");
        let literal_only = SecretMatcher::new(vec![glob("insurecove/db")]).unwrap();
        assert!(literal_only.globs.is_none());
        assert!(!literal_only.is_match("insurecove/other"));
    }

    #[test]
    fn identities_without_glob_syntax_compare_as_strings() {
        let exact = NameMatcher::new(glob("spiffe://insurecove/auth"));
        assert!(matches!(exact, NameMatcher::Exact(_)));
        assert!(exact.is_match("spiffe://insurecove/auth"));
        assert!(!exact.is_match("spiffe://insurecove/auth2"));
        let pattern = NameMatcher::new(glob("spiffe://insurecove/*"));
        assert!(matches!(pattern, NameMatcher::Glob(_)));
        assert!(pattern.is_match("spiffe://insurecove/auth"));
    }
}
