//! `secrets-broker check`: validates the configuration and the backend
//! before a deploy, and says plainly what is wrong.

use crate::{
    config::Settings,
    server::{ServeError, open_store},
};

/// Why a check failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Start(#[from] ServeError),
    #[error("the upstream does not answer: {0}")]
    Upstream(crate::backend::StoreError),
}

/// Runs every check; on success, the lines to print.
pub async fn run(settings: &Settings) -> Result<Vec<String>, CheckError> {
    let store = open_store(settings)?;
    let upstream = store.check().await.map_err(CheckError::Upstream)?;
    let mut report = vec![
        format!("listen: {} (plaintext, local only)", settings.listen),
        format!(
            "names: prefix {:?}, environment {:?}",
            settings.secret_prefix, settings.environment
        ),
        format!(
            "cache: ttl {}s, at most {} entries, stale up to {}s past ttl",
            settings.cache.ttl.as_secs(),
            settings.cache.max_entries,
            settings.cache.max_stale.as_secs()
        ),
        format!("upstream: {upstream}"),
    ];
    if let Some(file) = &settings.config_file {
        report.insert(0, format!("config file: {}", file.display()));
    }
    report.push("configuration ok".to_owned());
    Ok(report)
}
