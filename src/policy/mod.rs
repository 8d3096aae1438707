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
//! names (prefix included); a secret asked by ARN is matched by the name
//! inside the ARN (see `names`), never by the ARN's text.
//!
//! Identities are typed (see `identity`): `spiffe://…` (any `scheme://…`,
//! or `uri:URI` for any URI, as the audit shows one without `://`) matches
//! a certificate's URI SAN only; `dns:NAME` its DNS SANs only, in any case
//! (DNS names are not case-sensitive); `cn:NAME` its subject CN only, when
//! it has no SAN; `anonymous` plaintext callers only. The kind prefixes are
//! read first: `cn:spiffe://x` is a CN that reads like a URI. A bare name
//! with neither a scheme nor a prefix means `dns:` (`check` warns: write it
//! out).
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
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

use globset::GlobBuilder;
use serde::Deserialize;
use tokio::sync::watch;

use self::matcher::{NameMatcher, SecretMatcher};

use crate::{
    identity::Identity,
    names,
    reload::{Loader, Reload, Reloadable},
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
    #[error("policy {path} looks empty or cut short ({reason}); the rules in force are kept")]
    Incomplete { path: PathBuf, reason: String },
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
    #[error(
        "the client certificate names no identity a policy can match: no URI or DNS SAN, and \
         no CN (a CN counts only in a certificate without a subjectAltName)"
    )]
    NoIdentity,
    #[error("{0}")]
    BadIdentity(&'static str),
    #[error("{identity} may not read {secret}")]
    Secret { identity: String, secret: String },
    #[error("{identity} may not call AdminService")]
    Admin { identity: String },
}

impl Denied {
    /// What kind of refusal it is, as its message starts: the caller is
    /// not known (UNAUTHENTICATED), or may not do it (PERMISSION_DENIED).
    pub fn refusal(&self) -> &'static str {
        match self {
            Self::NoIdentity | Self::BadIdentity(_) => "unauthenticated",
            Self::Secret { .. } | Self::Admin { .. } => "permission denied",
        }
    }
}

/// The longest identity an error shows: a certificate may carry hundreds
/// of names, and gRPC clients refuse an error message of more than a few
/// kilobytes (the audit line shows them all).
const SHOWN_IDENTITY: usize = 512;

/// `identity` as an error message shows it: cut after a name once past
/// `SHOWN_IDENTITY` bytes.
fn shown_in_an_error(identity: &Identity) -> String {
    let shown = identity.shown();
    if shown.len() <= SHOWN_IDENTITY {
        return shown.to_owned();
    }
    let cut = shown[..shown.floor_char_boundary(SHOWN_IDENTITY)]
        .rfind(", ")
        .unwrap_or(shown.floor_char_boundary(SHOWN_IDENTITY));
    format!(
        "{}, … ({} bytes of names in all)",
        &shown[..cut],
        shown.len()
    )
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
    identity: IdentityPattern,
    secrets: SecretMatcher,
    admin: bool,
}

/// A grant's `identity`, by the kind of name it matches.
enum IdentityPattern {
    /// `anonymous`: plaintext callers.
    Anonymous,
    /// `scheme://…`: a URI SAN.
    Uri(NameMatcher),
    /// `dns:…` (or a bare name): any DNS SAN.
    Dns(NameMatcher),
    /// `cn:…`: the subject CN of a certificate without SANs.
    Cn(NameMatcher),
}

/// How an identity entry was written, for the pattern and for `check`.
enum IdentitySpelling<'a> {
    Anonymous,
    Uri(&'a str),
    Dns(&'a str),
    Cn(&'a str),
    /// A bare name: read as `dns:`.
    Bare(&'a str),
}

impl<'a> IdentitySpelling<'a> {
    /// The kind prefixes first: a CN or a URI may hold `://` anywhere.
    fn of(entry: &'a str) -> Self {
        if entry == crate::identity::ANONYMOUS {
            Self::Anonymous
        } else if let Some(uri) = entry.strip_prefix("uri:") {
            Self::Uri(uri)
        } else if let Some(dns) = entry.strip_prefix("dns:") {
            Self::Dns(dns)
        } else if let Some(cn) = entry.strip_prefix("cn:") {
            Self::Cn(cn)
        } else if entry.contains("://") {
            Self::Uri(entry)
        } else {
            Self::Bare(entry)
        }
    }
}

/// A `dns:` pattern: DNS names are not case-sensitive (certificates' DNS
/// SANs are read in lower case, `identity`), so it matches in any case.
/// Matched so, not lowered: lowering its text would change what a class
/// such as `[!A-Z]` means.
fn dns_matcher<E>(
    pattern: &str,
    glob: &impl Fn(&str, bool) -> Result<globset::Glob, E>,
) -> Result<NameMatcher, E> {
    Ok(NameMatcher::any_case(glob(pattern, true)?))
}

impl IdentityPattern {
    fn matches(&self, identity: &Identity) -> bool {
        match (self, identity) {
            (Self::Anonymous, Identity::Anonymous) => true,
            (Self::Uri(glob), Identity::Certificate(names)) => {
                names.uri().is_some_and(|uri| glob.is_match(uri))
            }
            (Self::Dns(glob), Identity::Certificate(names)) => {
                names.dns().any(|dns| glob.is_match(dns))
            }
            (Self::Cn(glob), Identity::Certificate(names)) => {
                names.cn().is_some_and(|cn| glob.is_match(cn))
            }
            _ => false,
        }
    }
}

/// A parsed policy file.
pub struct Policy {
    grants: Vec<Grant>,
    /// What `check` should say about how the file is written.
    warnings: Vec<String>,
    /// Each grant's secret patterns as written, by grant number.
    patterns: Vec<(usize, String)>,
    /// Why the file looks empty or cut short, if it does: what an editor
    /// leaves for a moment while writing it.
    incomplete: Option<String>,
    /// The file's text: a reload that reads the same (a SIGHUP, a file
    /// written again as it was) changes nothing. A policy holds no secret.
    text: String,
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
            message: crate::config::toml_problem(&e, text),
        })?;
        let incomplete = if file.grant.is_empty() {
            Some("no [[grant]]: it refuses every caller".to_owned())
        } else {
            file.grant
                .iter()
                .position(|grant| grant.secrets.is_empty() && !grant.admin)
                .map(|index| {
                    format!(
                        "grant #{} grants nothing: give it secrets or admin = true \
                         (to take a caller's access away, remove its grant)",
                        index + 1
                    )
                })
        };
        let patterns = file
            .grant
            .iter()
            .enumerate()
            .flat_map(|(index, grant)| {
                grant
                    .secrets
                    .iter()
                    .map(move |pattern| (index + 1, pattern.clone()))
            })
            .collect();
        let mut warnings = Vec::new();
        let grants = file
            .grant
            .into_iter()
            .enumerate()
            .map(|(index, entry)| {
                let glob = |pattern: &str, any_case: bool| {
                    GlobBuilder::new(pattern)
                        .literal_separator(true)
                        .case_insensitive(any_case)
                        .build()
                        .map_err(|e| PolicyError::Pattern {
                            path: path.to_owned(),
                            grant: index + 1,
                            pattern: pattern.to_owned(),
                            message: e.kind().to_string(),
                        })
                };
                let secrets = entry
                    .secrets
                    .iter()
                    .map(|pattern| glob(pattern, false))
                    .collect::<Result<Vec<_>, _>>()?;
                let identity = match IdentitySpelling::of(&entry.identity) {
                    IdentitySpelling::Anonymous => IdentityPattern::Anonymous,
                    IdentitySpelling::Uri(uri) => IdentityPattern::Uri(NameMatcher::new(glob(uri, false)?)),
                    IdentitySpelling::Dns(dns) => {
                        if dns.starts_with("//") || dns.contains("://") {
                            warnings.push(format!(
                                "grant #{}: identity \"dns:{dns}\" holds '://', which no DNS name does: for a URI SAN write \"uri:dns:{dns}\"",
                                index + 1
                            ));
                        }
                        IdentityPattern::Dns(dns_matcher(dns, &glob)?)
                    }
                    IdentitySpelling::Cn(cn) => IdentityPattern::Cn(NameMatcher::new(glob(cn, false)?)),
                    IdentitySpelling::Bare(bare) => {
                        warnings.push(format!(
                            "grant #{}: identity {bare:?} has no kind; it is read as \"dns:{bare}\" (a DNS SAN): write that out",
                            index + 1
                        ));
                        IdentityPattern::Dns(dns_matcher(bare, &glob)?)
                    }
                };
                Ok(Grant {
                    identity,
                    secrets: SecretMatcher::new(secrets).map_err(|e| PolicyError::Parse {
                        path: path.to_owned(),
                        message: e.to_string(),
                    })?,
                    admin: entry.admin,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            grants,
            warnings,
            patterns,
            incomplete,
            text: text.to_owned(),
        })
    }

    /// Everything to warn about for secrets under `prefix`.
    fn all_warnings(&self, prefix: &str) -> Vec<String> {
        let mut warnings = self.warnings.clone();
        // Taken at start, but a running broker refuses such a file on
        // reload: `check` before a reload must say so.
        warnings.extend(self.incomplete.as_ref().map(|reason| {
            format!(
                "{reason}; a running broker does not reload a file like this (it reads as one \
                 cut short while being written) and keeps the rules in force"
            )
        }));
        warnings.extend(self.patterns_outside(prefix));
        warnings
    }

    /// Secret patterns that cannot match: an ARN (grants are decided on the
    /// name inside an ARN, so an ARN pattern matches nothing), or a name
    /// outside `prefix` (with its slash): patterns match full names, and a
    /// short name (`production/jwt` for `insurecove/production/jwt`)
    /// matches nothing.
    fn patterns_outside(&self, prefix: &str) -> Vec<String> {
        self.patterns
            .iter()
            .filter_map(|(grant, pattern)| {
                if pattern.starts_with("arn:") {
                    return Some(format!(
                        "grant #{grant}: secret pattern {pattern:?} is an ARN: patterns match \
                         secret names (an ARN asked for is authorized by the name inside it)"
                    ));
                }
                let starts_with_glob = pattern.starts_with(['*', '?', '[', '{']);
                if starts_with_glob && !prefix.is_empty() && !pattern.contains(['/', '{']) {
                    // `*` stays within one segment: no name under the
                    // prefix (two segments at least) is one.
                    return (!pattern.contains("**")).then(|| {
                        format!(
                            "grant #{grant}: secret pattern {pattern:?} matches names of one \
                             segment, and every name under the prefix {prefix:?} has more: it \
                             matches nothing (\"{prefix}{pattern}\" for one level, \"**\" for \
                             every secret)"
                        )
                    });
                }
                if prefix.is_empty() || pattern.starts_with(prefix) || starts_with_glob {
                    return None;
                }
                // A suggestion only where prefixing makes sense: not for a
                // pattern that already tries to cover the prefix.
                let head = pattern.split('/').next().unwrap_or_default();
                let suggestion = if head.contains(['*', '?', '[', '{']) {
                    String::new()
                } else {
                    format!(" (\"{prefix}{pattern}\"?)")
                };
                Some(format!(
                    "grant #{grant}: secret pattern {pattern:?} does not start with the prefix \
                     {prefix:?}: patterns match full names{suggestion}"
                ))
            })
            .collect()
    }

    fn grants_for<'a>(&'a self, identity: &'a Identity) -> impl Iterator<Item = &'a Grant> {
        self.grants
            .iter()
            .filter(move |grant| grant.identity.matches(identity))
    }

    /// May `identity` read the secret with this full name (not an ARN: see
    /// `Authorizer::check_read`)?
    pub fn may_read(&self, identity: &Identity, secret: &str) -> bool {
        self.grants_for(identity)
            .any(|grant| grant.secrets.is_match(secret))
    }

    pub fn is_admin(&self, identity: &Identity) -> bool {
        self.grants_for(identity).any(|grant| grant.admin)
    }

    /// How the file could be written more clearly (bare identities).
    #[cfg(test)]
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    pub fn grant_count(&self) -> usize {
        self.grants.len()
    }
}

/// Certificates that name nobody, or name themselves ambiguously, get
/// nothing, not even what a policy grants everyone.
fn usable(identity: &Identity) -> Result<(), Denied> {
    match identity {
        Identity::Unnamed => Err(Denied::NoIdentity),
        Identity::Refused(why) => Err(Denied::BadIdentity(why.why())),
        Identity::Anonymous | Identity::Certificate(_) => Ok(()),
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

/// Where the rules come from.
struct PolicySource {
    path: Option<PathBuf>,
    mutual_tls: bool,
    /// The secrets' prefix with its slash, for the warnings of a reload.
    prefix: String,
}

impl Loader for PolicySource {
    type Value = Rules;
    type Error = PolicyError;

    fn what(&self) -> &'static str {
        "policy"
    }

    fn files(&self) -> Vec<PathBuf> {
        self.path.iter().cloned().collect()
    }

    /// A file read as it was changes nothing (nor do the rules without a
    /// file): a SIGHUP then reloads nothing, and says nothing.
    fn same(&self, old: &Rules, new: &Rules) -> bool {
        match (old, new) {
            (Rules::AllowAll, Rules::AllowAll) | (Rules::DenyAll, Rules::DenyAll) => true,
            (Rules::Policy(old), Rules::Policy(new)) => old.text == new.text,
            _ => false,
        }
    }

    fn load(&self, previous: Option<&Rules>) -> Result<Rules, PolicyError> {
        Ok(match &self.path {
            Some(path) => {
                let policy = Policy::load(path)?;
                // A reload that finds the file empty or cut short (truncated
                // and not yet rewritten) keeps the rules in force, as for a
                // file that does not parse. At start it is applied as
                // written (an empty policy refuses everyone), with a warning.
                if let (Some(_), Some(reason)) = (previous, &policy.incomplete) {
                    return Err(PolicyError::Incomplete {
                        path: path.clone(),
                        reason: reason.clone(),
                    });
                }
                // A reload is how a policy changes on Kubernetes: what `check`
                // and the start would say of the new file is said here (once:
                // not again at a SIGHUP that finds the file as it was).
                let as_before =
                    matches!(previous, Some(Rules::Policy(old)) if old.text == policy.text);
                if previous.is_some() && !as_before {
                    for warning in policy.all_warnings(&self.prefix) {
                        tracing::warn!("policy {warning}");
                    }
                }
                Rules::Policy(policy)
            }
            None if self.mutual_tls => Rules::DenyAll,
            None => Rules::AllowAll,
        })
    }
}

/// Decides every call; cheap to share.
pub struct Authorizer {
    /// Read on every call, replaced on reload: lock-free reads.
    rules: Arc<Reloadable<PolicySource>>,
    denials: AtomicU64,
}

impl Authorizer {
    /// `policy`: the file, if any; `mutual_tls`: whether callers are
    /// authenticated (decides the rules without a file).
    pub fn new(policy: Option<&Path>, mutual_tls: bool) -> Result<Arc<Self>, PolicyError> {
        Self::for_prefix(policy, mutual_tls, "")
    }

    /// `new`, for secrets under `prefix` (with its slash): a reload warns of
    /// patterns outside it.
    pub fn for_prefix(
        policy: Option<&Path>,
        mutual_tls: bool,
        prefix: &str,
    ) -> Result<Arc<Self>, PolicyError> {
        let source = PolicySource {
            path: policy.map(Path::to_owned),
            mutual_tls,
            prefix: prefix.to_owned(),
        };
        Ok(Arc::new(Self {
            rules: Reloadable::new(source)?,
            denials: AtomicU64::new(0),
        }))
    }

    fn rules(&self) -> arc_swap::Guard<Arc<Rules>> {
        self.rules.current()
    }

    /// The rules, as a value that follows the policy file.
    pub fn reloadable(&self) -> Arc<dyn Reload> {
        Arc::clone(&self.rules) as Arc<dyn Reload>
    }

    /// Is `identity` one the policy can decide about at all (a certificate
    /// with a usable name, or the anonymous caller of plaintext)? Checked
    /// first, before anything the caller sent is looked at: a caller that
    /// is not authenticated hears that, whatever else is wrong.
    pub fn check_identity(&self, identity: &Identity) -> Result<(), Denied> {
        usable(identity)
    }

    /// May `identity` read the secret `id` (a full name or an ARN)? An
    /// ARN is decided by the secret name inside it.
    pub fn check_read(&self, identity: &Identity, id: &str) -> Result<(), Denied> {
        usable(identity)?;
        let secret = names::secret_name(id);
        let allowed = match &**self.rules() {
            Rules::AllowAll => true,
            Rules::DenyAll => false,
            Rules::Policy(policy) => policy.may_read(identity, secret),
        };
        if allowed {
            Ok(())
        } else {
            self.denials.fetch_add(1, Relaxed);
            Err(Denied::Secret {
                identity: shown_in_an_error(identity),
                secret: secret.to_owned(),
            })
        }
    }

    /// May `identity` call AdminService?
    pub fn check_admin(&self, identity: &Identity) -> Result<(), Denied> {
        usable(identity)?;
        let allowed = match &**self.rules() {
            Rules::AllowAll => true,
            Rules::DenyAll => false,
            Rules::Policy(policy) => policy.is_admin(identity),
        };
        if allowed {
            Ok(())
        } else {
            self.denials.fetch_add(1, Relaxed);
            Err(Denied::Admin {
                identity: shown_in_an_error(identity),
            })
        }
    }

    /// What `check` (and the start) should warn about in the policy file,
    /// for names under `prefix` (with its slash, or `""`).
    pub fn warnings(&self, prefix: &str) -> Vec<String> {
        match &**self.rules() {
            Rules::Policy(policy) => policy.all_warnings(prefix),
            _ => Vec::new(),
        }
    }

    /// Reads the policy file again; on error the current rules stay. (The
    /// app reloads through `reloadable`.)
    #[cfg(test)]
    fn reload(&self) -> Result<(), PolicyError> {
        if self.rules.loader().path.is_some() {
            self.rules.reload()?;
        }
        Ok(())
    }

    /// Calls refused so far.
    pub fn denials(&self) -> u64 {
        self.denials.load(Relaxed)
    }

    /// One line on the rules in force, for `check`.
    pub fn summary(&self) -> String {
        match (&**self.rules(), &self.rules.loader().path) {
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
        self.rules.changes()
    }
}

impl Authorizer {
    /// Registers the policy's metrics.
    pub fn register_metrics(self: &Arc<Self>, metrics: &crate::metrics::Metrics) {
        use crate::metrics::counter;
        let authorizer = Arc::clone(self);
        metrics.register_state(move |e| {
            counter(
                e,
                "policy_denials",
                "Calls refused by the policy",
                authorizer.denials(),
            )?;
            Ok(())
        });
    }
}

mod matcher;
#[cfg(test)]
mod tests;
