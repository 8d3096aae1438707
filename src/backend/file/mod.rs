//! The embedded file backend: secrets from a JSON or TOML file, for
//! development and tests without an AWS account.
//!
//! The file lists secrets, each with one or more versions:
//!
//! ```json
//! { "secrets": [ { "name": "production/jwt",
//!                  "versions": [ { "value": "{...}" },
//!                                { "value": "{...}", "stages": ["AWSCURRENT"] } ] } ] }
//! ```
//!
//! Names are resolved like request names (relative to the prefix). A version
//! holds `value` (text) or `binary_base64`; `version_id` defaults to a fresh
//! UUID, kept across reloads while the value is unchanged but not across
//! restarts (set it for ids that last; deriving one from the value would
//! publish a hash of it); without explicit `stages` anywhere in a secret,
//! its last version is
//! AWSCURRENT and the one before AWSPREVIOUS, as AWS does after a rotation.
//! `"deleted": true` marks a secret for deletion. `serve --dev` uses five
//! typical secrets (Mistral key, database, JWT, AWS services, security)
//! with fake values and fixed version ids, built into the binary: a
//! restart is not a rotation to the clients that follow them.
//!
//! A store opened from a file follows it (a `Reloadable`, followed by the
//! app): it reloads when the file changes on disk (a version whose value did
//! not change keeps its id), and raises the change signal so that watchers
//! hear of rotations at once. A file that no longer parses is refused, and
//! the previous content stays; so is a value changed under an explicit
//! `version_id`, since every cache holds a version's value as final.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use async_trait::async_trait;
use base64::Engine;
use serde::Deserialize;

use super::{SecretDescription, SecretPage, SecretStore, StoreError, VersionSelector};
use crate::{
    names::{InvalidName, NameResolver},
    reload::{Loader, Reload, Reloadable},
    secret::{SecretValue, SecretVersion},
};

/// The dev seed: five typical secrets with obviously fake values. Its
/// typed configs are named under the default environment (`SEED_ENVIRONMENT`).
const DEV_SEED: &str = include_str!("../dev_secrets.json");
/// How the seed's typed configs' names start: `"name": "production/jwt"`.
const SEED_ENVIRONMENT: &str = "\"name\": \"production/";

/// The largest value Secrets Manager stores (SecretString or SecretBinary).
const MAX_VALUE_BYTES: usize = 65_536;

/// Why a secrets file could not be used. Never quotes the file's content:
/// a parse error there could be in the middle of a secret value.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // each variant's #[error] message is its documentation
pub enum FileStoreError {
    #[error("cannot read secrets file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("secrets file {origin} is not valid {format} at line {line}, column {column} ({what})")]
    Parse {
        origin: String,
        format: &'static str,
        line: usize,
        column: usize,
        what: &'static str,
    },
    #[error("secrets file {origin}: secret #{index}: {source}")]
    BadName {
        origin: String,
        index: usize,
        source: InvalidName,
    },
    #[error("secrets file {origin}: secret {name}: {problem}")]
    BadSecret {
        origin: String,
        name: String,
        problem: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    secrets: Vec<DocumentSecret>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DocumentSecret {
    name: String,
    #[serde(default)]
    deleted: bool,
    versions: Vec<DocumentVersion>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DocumentVersion {
    version_id: Option<String>,
    stages: Option<Vec<String>>,
    value: Option<String>,
    binary_base64: Option<String>,
}

#[derive(Debug, PartialEq, Eq)]
struct StoredSecret {
    deleted: bool,
    versions: Vec<StoredVersion>,
}

#[derive(Debug, PartialEq, Eq)]
struct StoredVersion {
    id: String,
    stages: Vec<String>,
    created: SystemTime,
    value: SecretValue,
}

/// The secrets of one file, by full name.
type Secrets = HashMap<String, StoredSecret>;

/// A `SecretStore` over a file's content, held in memory.
pub struct FileStore {
    secrets: Arc<Reloadable<SecretsSource>>,
}

/// Where a store's secrets are read from.
struct SecretsSource {
    origin: String,
    content: Content,
    resolver: NameResolver,
}

enum Content {
    /// Text that never changes (the built-in dev secrets).
    Fixed(String, Format),
    /// A file, read again when it changes.
    File(PathBuf, Format),
}

impl Loader for SecretsSource {
    type Value = Secrets;
    type Error = FileStoreError;

    fn what(&self) -> &'static str {
        "secrets file"
    }

    fn files(&self) -> Vec<PathBuf> {
        match &self.content {
            Content::File(path, _) => vec![path.clone()],
            Content::Fixed(..) => Vec::new(),
        }
    }

    fn load(&self, previous: Option<&Secrets>) -> Result<Secrets, FileStoreError> {
        let (text, format) = match &self.content {
            Content::File(path, format) => (read(path)?, *format),
            Content::Fixed(text, format) => (text.clone(), *format),
        };
        let document = format.parse(&self.origin, &text)?;
        let none = Secrets::new();
        build_secrets(
            &self.origin,
            document,
            &self.resolver,
            previous.unwrap_or(&none),
        )
    }

    fn same(&self, old: &Secrets, new: &Secrets) -> bool {
        old == new
    }
}

impl FileStore {
    /// The dev backend: the dev seed's five secrets, fake values. The typed
    /// configs are named under the resolver's environment (`staging/jwt`
    /// under `--environment staging`), where the typed calls' default names
    /// look for them.
    pub fn dev(resolver: &NameResolver) -> Result<Self, FileStoreError> {
        // The environment is letters, digits and `/_+=.@-`: nothing to
        // escape in JSON.
        let named = format!("\"name\": \"{}/", resolver.environment());
        let seed = DEV_SEED.replace(SEED_ENVIRONMENT, &named);
        Self::from_text("(built-in dev secrets)", &seed, Format::Json, resolver)
    }

    /// Reads a `.json` or `.toml` (by extension) secrets file.
    pub fn open(path: &Path, resolver: &NameResolver) -> Result<Self, FileStoreError> {
        let format = match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => Format::Toml,
            _ => Format::Json,
        };
        Self::over(SecretsSource {
            origin: path.display().to_string(),
            content: Content::File(path.to_owned(), format),
            resolver: resolver.clone(),
        })
    }

    fn from_text(
        origin: &str,
        text: &str,
        format: Format,
        resolver: &NameResolver,
    ) -> Result<Self, FileStoreError> {
        Self::over(SecretsSource {
            origin: origin.to_owned(),
            content: Content::Fixed(text.to_owned(), format),
            resolver: resolver.clone(),
        })
    }

    fn over(source: SecretsSource) -> Result<Self, FileStoreError> {
        Ok(Self {
            secrets: Reloadable::new(source)?,
        })
    }

    /// Reads the file again. Returns whether anything changed; on error the
    /// previous content stays. (The app reloads through `reloadable`.)
    #[cfg(test)]
    fn reload(&self) -> Result<bool, FileStoreError> {
        self.secrets.reload()
    }

    /// The content, as a value that follows its file (see `reload`).
    pub fn reloadable(&self) -> Arc<dyn Reload> {
        Arc::clone(&self.secrets) as Arc<dyn Reload>
    }

    /// How many secrets the store holds.
    pub fn secret_count(&self) -> usize {
        self.snapshot().len()
    }

    fn snapshot(&self) -> Arc<Secrets> {
        self.secrets.snapshot()
    }
}

fn read(path: &Path) -> Result<String, FileStoreError> {
    std::fs::read_to_string(path).map_err(|source| FileStoreError::Read {
        path: path.to_owned(),
        source,
    })
}

#[derive(Clone, Copy)]
enum Format {
    Json,
    Toml,
}

impl Format {
    fn parse(self, origin: &str, text: &str) -> Result<Document, FileStoreError> {
        let parse_error = |format, (line, column), what| FileStoreError::Parse {
            origin: origin.to_owned(),
            format,
            line,
            column,
            what,
        };
        match self {
            Format::Json => serde_json::from_str(text).map_err(|e| {
                let what = match e.classify() {
                    serde_json::error::Category::Data => {
                        "a field is missing, unknown or of the wrong type"
                    }
                    _ => "syntax error",
                };
                parse_error("JSON", (e.line(), e.column()), what)
            }),
            Format::Toml => toml::from_str(text).map_err(|e| {
                let at = e
                    .span()
                    .map_or((0, 0), |span| line_and_column(text, span.start));
                parse_error(
                    "TOML",
                    at,
                    "syntax error, or a field missing, unknown or mistyped",
                )
            }),
        }
    }
}

fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

/// `previous` is the content before a reload: a version whose value is
/// unchanged keeps its id and creation date there.
fn build_secrets(
    origin: &str,
    document: Document,
    resolver: &NameResolver,
    previous: &Secrets,
) -> Result<Secrets, FileStoreError> {
    let loaded_at = SystemTime::now();
    let mut secrets = Secrets::new();
    for (index, secret) in document.secrets.into_iter().enumerate() {
        let name = resolver
            .resolve(&secret.name)
            .map_err(|source| FileStoreError::BadName {
                origin: origin.to_owned(),
                index,
                source,
            })?;
        let bad = |problem: &str| FileStoreError::BadSecret {
            origin: origin.to_owned(),
            name: name.clone(),
            problem: problem.to_owned(),
        };
        let before = previous.get(&name).map_or(&[][..], |s| &s.versions[..]);
        let versions =
            build_versions(secret.versions, loaded_at, before).map_err(|problem| bad(&problem))?;
        if secrets.contains_key(&name) {
            return Err(bad("listed twice"));
        }
        let stored = StoredSecret {
            deleted: secret.deleted,
            versions,
        };
        secrets.insert(name, stored);
    }
    Ok(secrets)
}

fn build_versions(
    versions: Vec<DocumentVersion>,
    loaded_at: SystemTime,
    before: &[StoredVersion],
) -> Result<Vec<StoredVersion>, String> {
    if versions.is_empty() {
        return Err("has no versions".into());
    }
    let explicit_stages = versions.iter().any(|v| v.stages.is_some());
    let explicit_ids: Vec<String> = versions
        .iter()
        .filter_map(|v| v.version_id.clone())
        .collect();
    let count = versions.len();
    let mut built = Vec::with_capacity(count);
    for (index, version) in versions.into_iter().enumerate() {
        let value = match (version.value, version.binary_base64) {
            (Some(text), None) => SecretValue::text(text),
            (None, Some(encoded)) => SecretValue::binary(
                base64::engine::general_purpose::STANDARD
                    .decode(encoded.trim())
                    .map_err(|_| "a version's binary_base64 is not valid base64")?,
            ),
            _ => return Err("each version needs exactly one of value and binary_base64".into()),
        };
        if value.len() > MAX_VALUE_BYTES {
            return Err(format!(
                "a version's value is {} bytes, over Secrets Manager's limit of \
                 {MAX_VALUE_BYTES}, which AWS would refuse",
                value.len()
            ));
        }
        let stages = match version.stages {
            Some(stages) => stages,
            None if explicit_stages => Vec::new(),
            None => default_stages(index, count),
        };
        // A version without an id keeps the id of an unchanged one, once:
        // a value rolled back to as a new version is a version of its own.
        let same_before = before.iter().find(|old| match &version.version_id {
            Some(id) => old.id == *id,
            None => {
                old.value == value
                    && !explicit_ids.contains(&old.id)
                    && !built.iter().any(|taken: &StoredVersion| taken.id == old.id)
            }
        });
        if let (Some(id), Some(old)) = (&version.version_id, same_before)
            && old.value != value
        {
            // Clients and caches hold a version's value as final: a new
            // value under the same id would never reach them.
            return Err(format!(
                "the value of version {id:?} changed; a version never changes (as in AWS): \
                 give the new value a new version_id, or none"
            ));
        }
        let id = match (version.version_id, same_before) {
            (Some(id), _) => id,
            (None, Some(old)) => old.id.clone(),
            (None, None) => uuid::Uuid::new_v4().to_string(),
        };
        built.push(StoredVersion {
            id,
            stages,
            created: same_before.map_or(loaded_at, |old| old.created),
            value,
        });
    }
    check_unique(&built)?;
    Ok(built)
}

/// Without explicit stages, a secret looks as AWS leaves it after rotations.
fn default_stages(index: usize, count: usize) -> Vec<String> {
    let stage = match count - index {
        1 => "AWSCURRENT",
        2 => "AWSPREVIOUS",
        _ => return Vec::new(),
    };
    vec![stage.to_owned()]
}

/// AWS's invariants: version ids are unique, and a stage is on one version.
fn check_unique(versions: &[StoredVersion]) -> Result<(), String> {
    for (i, version) in versions.iter().enumerate() {
        let later = &versions[i + 1..];
        if later.iter().any(|other| other.id == version.id) {
            return Err("two versions have the same version_id".into());
        }
        if later
            .iter()
            .any(|other| other.stages.iter().any(|s| version.stages.contains(s)))
        {
            return Err("a stage is on more than one version".into());
        }
    }
    Ok(())
}

#[async_trait]
impl SecretStore for FileStore {
    async fn get_secret_value(
        &self,
        name: &str,
        selector: &VersionSelector,
    ) -> Result<SecretVersion, StoreError> {
        let secrets = self.snapshot();
        let secret = live_secret(&secrets, name)?;
        let version = secret
            .versions
            .iter()
            .find(|v| selector.matches(&v.id, &v.stages))
            .ok_or_else(|| StoreError::NotFound {
                name: name.to_owned(),
            })?;
        Ok(SecretVersion {
            name: name.to_owned(),
            arn: String::new(),
            version_id: version.id.clone(),
            version_stages: version.stages.clone(),
            created_date: Some(version.created),
            value: version.value.clone(),
            encoded: Default::default(),
        })
    }

    async fn describe_secret(&self, name: &str) -> Result<SecretDescription, StoreError> {
        let secrets = self.snapshot();
        let secret = secrets.get(name).ok_or_else(|| StoreError::NotFound {
            name: name.to_owned(),
        })?;
        Ok(describe(name, secret))
    }

    /// The whole file is one page: listing it costs no upstream call.
    async fn list_secrets(
        &self,
        prefix: &str,
        _page: Option<String>,
    ) -> Result<SecretPage, StoreError> {
        let secrets = self.snapshot();
        Ok(SecretPage {
            secrets: secrets
                .iter()
                .filter(|(name, _)| name.starts_with(prefix))
                .map(|(name, secret)| describe(name, secret))
                .collect(),
            next: None,
        })
    }

    async fn check(&self) -> Result<String, StoreError> {
        Ok(format!(
            "file backend {} holds {} secrets",
            self.secrets.loader().origin,
            self.secret_count()
        ))
    }

    fn change_signal(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        let has_file = matches!(self.secrets.loader().content, Content::File(..));
        has_file.then(|| self.secrets.changes())
    }
}

fn describe(name: &str, secret: &StoredSecret) -> SecretDescription {
    SecretDescription {
        name: name.to_owned(),
        arn: String::new(),
        versions: secret
            .versions
            .iter()
            .filter(|v| !v.stages.is_empty())
            .map(|v| (v.id.clone(), v.stages.clone()))
            .collect(),
        deleted: secret.deleted,
    }
}

fn live_secret<'a>(secrets: &'a Secrets, name: &str) -> Result<&'a StoredSecret, StoreError> {
    match secrets.get(name) {
        None => Err(StoreError::NotFound {
            name: name.to_owned(),
        }),
        Some(secret) if secret.deleted => Err(StoreError::Deleted {
            name: name.to_owned(),
        }),
        Some(secret) => Ok(secret),
    }
}

#[cfg(test)]
mod tests;
