//! Authorization: which identity may read which secret, and who is admin.
//!
//! The policy is a TOML file of grants; default deny; every grant whose
//! `identity` matches the caller applies:
//!
//! ```toml
//! [[grant]]
//! identity = "spiffe://insurecove/auth-service"   # exact, or a glob
//! secrets  = ["insurecove/production/jwt", "insurecove/shared/*"]
//! admin    = false                                 # AdminService allowed?
//! ```
//!
//! Globs match whole names segment by segment: `*` stays within one
//! `/`-separated segment, `**` crosses them. Secret patterns match full
//! names (prefix included); a secret asked by ARN is matched as the ARN.
//!
//! Without a policy file, plaintext (loopback only) allows everything and
//! mTLS allows nothing: a broker reachable from the network never hands out
//! secrets by default. The policy reloads when its file changes (and on
//! SIGHUP); a broken new file keeps the old rules. Each reload bumps a
//! counter that open WatchSecret streams follow, so a revoked caller's
//! stream ends.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

use arc_swap::ArcSwap;

use globset::{GlobBuilder, GlobMatcher, GlobSet, GlobSetBuilder};
use serde::Deserialize;
use tokio::sync::watch;

use crate::{
    file_watch::{self, FileWatch},
    identity::Identity,
};

/// Why a policy file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("policy {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("policy {path}: grant #{grant}: pattern {pattern:?} is not a valid glob: {message}")]
    Pattern {
        path: PathBuf,
        grant: usize,
        pattern: String,
        message: String,
    },
}

/// Why a call is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("the client certificate names no identity (no SAN, no CN)")]
    NoIdentity,
    #[error("{identity} may not read {secret}")]
    Secret { identity: String, secret: String },
    #[error("{identity} may not call AdminService")]
    Admin { identity: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    grant: Vec<GrantEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantEntry {
    identity: String,
    #[serde(default)]
    secrets: Vec<String>,
    #[serde(default)]
    admin: bool,
}

struct Grant {
    identity: GlobMatcher,
    secrets: GlobSet,
    admin: bool,
}

/// A parsed policy file.
pub struct Policy {
    grants: Vec<Grant>,
}

impl Policy {
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    fn parse(path: &Path, text: &str) -> Result<Self, PolicyError> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| PolicyError::Parse {
            path: path.to_owned(),
            message: e.message().to_owned(),
        })?;
        let grants = file
            .grant
            .into_iter()
            .enumerate()
            .map(|(index, entry)| {
                let glob = |pattern: &str| {
                    GlobBuilder::new(pattern)
                        .literal_separator(true)
                        .build()
                        .map_err(|e| PolicyError::Pattern {
                            path: path.to_owned(),
                            grant: index + 1,
                            pattern: pattern.to_owned(),
                            message: e.kind().to_string(),
                        })
                };
                let mut secrets = GlobSetBuilder::new();
                for pattern in &entry.secrets {
                    secrets.add(glob(pattern)?);
                }
                Ok(Grant {
                    identity: glob(&entry.identity)?.compile_matcher(),
                    secrets: secrets.build().map_err(|e| PolicyError::Parse {
                        path: path.to_owned(),
                        message: e.to_string(),
                    })?,
                    admin: entry.admin,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { grants })
    }

    fn grants_for<'a>(&'a self, identity: &'a str) -> impl Iterator<Item = &'a Grant> {
        self.grants
            .iter()
            .filter(move |grant| grant.identity.is_match(identity))
    }

    pub fn may_read(&self, identity: &str, secret: &str) -> bool {
        self.grants_for(identity)
            .any(|grant| grant.secrets.is_match(secret))
    }

    pub fn is_admin(&self, identity: &str) -> bool {
        self.grants_for(identity).any(|grant| grant.admin)
    }

    pub fn grant_count(&self) -> usize {
        self.grants.len()
    }
}

/// The rules in force.
enum Rules {
    /// No policy, plaintext on loopback: everything is allowed.
    AllowAll,
    /// No policy, mTLS: nothing is allowed.
    DenyAll,
    Policy(Policy),
}

/// Decides every call; cheap to share.
pub struct Authorizer {
    path: Option<PathBuf>,
    /// Read on every call, replaced on reload: lock-free reads.
    rules: ArcSwap<Rules>,
    reloads: watch::Sender<u64>,
    watch: Mutex<Option<FileWatch>>,
    denials: AtomicU64,
}

impl Authorizer {
    /// `policy`: the file, if any; `mutual_tls`: whether callers are
    /// authenticated (decides the rules without a file).
    pub fn new(policy: Option<&Path>, mutual_tls: bool) -> Result<Arc<Self>, PolicyError> {
        let rules = match policy {
            Some(path) => Rules::Policy(Policy::load(path)?),
            None if mutual_tls => Rules::DenyAll,
            None => Rules::AllowAll,
        };
        Ok(Arc::new(Self {
            path: policy.map(Path::to_owned),
            rules: ArcSwap::from_pointee(rules),
            reloads: watch::Sender::new(0),
            watch: Mutex::new(None),
            denials: AtomicU64::new(0),
        }))
    }

    fn rules(&self) -> arc_swap::Guard<Arc<Rules>> {
        self.rules.load()
    }

    /// May `identity` read the secret with this full name?
    pub fn check_read(&self, identity: &Identity, secret: &str) -> Result<(), Denied> {
        let name = identity.name().ok_or(Denied::NoIdentity)?;
        let allowed = match &**self.rules() {
            Rules::AllowAll => true,
            Rules::DenyAll => false,
            Rules::Policy(policy) => policy.may_read(name, secret),
        };
        if allowed {
            Ok(())
        } else {
            self.denials.fetch_add(1, Relaxed);
            Err(Denied::Secret {
                identity: name.to_owned(),
                secret: secret.to_owned(),
            })
        }
    }

    /// May `identity` call AdminService?
    pub fn check_admin(&self, identity: &Identity) -> Result<(), Denied> {
        let name = identity.name().ok_or(Denied::NoIdentity)?;
        let allowed = match &**self.rules() {
            Rules::AllowAll => true,
            Rules::DenyAll => false,
            Rules::Policy(policy) => policy.is_admin(name),
        };
        if allowed {
            Ok(())
        } else {
            self.denials.fetch_add(1, Relaxed);
            Err(Denied::Admin {
                identity: name.to_owned(),
            })
        }
    }

    /// Reads the policy file again; on error the current rules stay.
    pub fn reload(&self) -> Result<(), PolicyError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let policy = Policy::load(path)?;
        self.rules.store(Arc::new(Rules::Policy(policy)));
        self.reloads.send_modify(|count| *count += 1);
        Ok(())
    }

    pub fn reload_and_log(&self) {
        match self.reload() {
            Ok(()) if self.path.is_some() => tracing::info!("policy reloaded"),
            Ok(()) => {}
            Err(error) => tracing::warn!(%error, "policy not reloaded; keeping the previous rules"),
        }
    }

    /// Reloads when the file changes, until dropped with `self`.
    pub fn follow_file(self: &Arc<Self>) -> notify::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let weak = Arc::downgrade(self);
        let watch = file_watch::on_change(&[path], move || {
            if let Some(authorizer) = weak.upgrade() {
                authorizer.reload_and_log();
            }
        })?;
        *self.watch.lock().unwrap_or_else(|e| e.into_inner()) = Some(watch);
        Ok(())
    }

    /// Calls refused so far.
    pub fn denials(&self) -> u64 {
        self.denials.load(Relaxed)
    }

    /// One line on the rules in force, for `check`.
    pub fn summary(&self) -> String {
        match (&**self.rules(), &self.path) {
            (Rules::AllowAll, _) => {
                "no policy: every caller may read every secret (plaintext, local only)".into()
            }
            (Rules::DenyAll, _) => {
                "no policy: with mutual TLS, nobody may read anything; give --policy".into()
            }
            (Rules::Policy(policy), path) => format!(
                "policy {}: {} grants",
                path.as_deref()
                    .map_or_else(String::new, |p| p.display().to_string()),
                policy.grant_count()
            ),
        }
    }

    /// Changes each time the rules are replaced.
    pub fn reloads(&self) -> watch::Receiver<u64> {
        self.reloads.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
        [[grant]]
        identity = "spiffe://insurecove/auth-service"
        secrets = ["insurecove/production/jwt", "insurecove/shared/*"]

        [[grant]]
        identity = "spiffe://insurecove/*"
        secrets = ["insurecove/common/**"]

        [[grant]]
        identity = "spiffe://insurecove/ops"
        admin = true
    "#;

    fn policy() -> Policy {
        Policy::parse(Path::new("policy.toml"), POLICY).unwrap()
    }

    #[test]
    fn grants_match_exact_names_and_globs_by_segment() {
        let p = policy();
        let auth = "spiffe://insurecove/auth-service";
        assert!(p.may_read(auth, "insurecove/production/jwt"));
        assert!(p.may_read(auth, "insurecove/shared/smtp"));
        assert!(
            !p.may_read(auth, "insurecove/shared/deep/smtp"),
            "* stays in its segment"
        );
        assert!(
            p.may_read(auth, "insurecove/common/a/b/c"),
            "** crosses segments"
        );
        assert!(!p.may_read(auth, "insurecove/production/database"));
        assert!(!p.may_read("spiffe://insurecove/team/x", "insurecove/common/a"));
        assert!(!p.may_read("spiffe://other/auth-service", "insurecove/production/jwt"));
    }

    #[test]
    fn admin_needs_a_grant_that_says_so() {
        let p = policy();
        assert!(p.is_admin("spiffe://insurecove/ops"));
        assert!(!p.is_admin("spiffe://insurecove/auth-service"));
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let unknown = Policy::parse(
            Path::new("p.toml"),
            "[[grant]]\nidentity = \"a\"\nsecret = []\n",
        );
        assert!(unknown.err().unwrap().to_string().contains("unknown field"));
        let glob = Policy::parse(Path::new("p.toml"), "[[grant]]\nidentity = \"a[\"\n");
        let message = glob.err().unwrap().to_string();
        assert!(
            message.contains("grant #1") && message.contains("a["),
            "{message}"
        );
    }

    #[test]
    fn without_a_file_plaintext_allows_and_mtls_denies() {
        let anonymous = Identity::Anonymous;
        let open = Authorizer::new(None, false).unwrap();
        assert_eq!(open.check_read(&anonymous, "insurecove/x"), Ok(()));
        assert_eq!(open.check_admin(&anonymous), Ok(()));
        let closed = Authorizer::new(None, true).unwrap();
        let someone = Identity::Certificate("spiffe://insurecove/a".into());
        assert!(closed.check_read(&someone, "insurecove/x").is_err());
        assert!(closed.check_admin(&someone).is_err());
        assert_eq!(
            open.check_read(&Identity::Unnamed, "insurecove/x"),
            Err(Denied::NoIdentity)
        );
    }

    #[test]
    fn reload_swaps_rules_and_keeps_them_when_broken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        std::fs::write(&path, POLICY).unwrap();
        let authorizer = Authorizer::new(Some(&path), true).unwrap();
        let reloads = authorizer.reloads();
        let ops = Identity::Certificate("spiffe://insurecove/ops".into());
        assert!(authorizer.check_admin(&ops).is_ok());

        std::fs::write(&path, "[[grant]]\nidentity = \"spiffe://insurecove/ops\"\n").unwrap();
        authorizer.reload().unwrap();
        assert!(authorizer.check_admin(&ops).is_err());
        assert!(reloads.has_changed().unwrap());

        std::fs::write(&path, "[[grant]\n").unwrap();
        assert!(authorizer.reload().is_err());
        assert!(authorizer.check_admin(&ops).is_err(), "old rules kept");
    }
}
