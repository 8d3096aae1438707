//! `secrets-broker check`: validates the configuration and the backend
//! before a deploy, and says plainly what is wrong.

use crate::{
    app::{AppError, Security, open_store},
    config::Settings,
    transport::{
        descriptors,
        tls::{self, EXPIRY_WARNING, TlsError},
    },
};

/// Why a check failed.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // each variant's #[error] message is its documentation
pub enum CheckError {
    #[error(transparent)]
    Start(#[from] AppError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("the server certificate expires in {days} days ({not_after}); renew it")]
    ExpiresSoon { days: u64, not_after: String },
    #[error("upstream: {}", without_retry_note(.0))]
    Upstream(crate::backend::StoreError),
    #[error("events: {0}")]
    Events(String),
    #[error("--listen unix:{}: {problem}", .socket.display())]
    SocketPath {
        socket: std::path::PathBuf,
        problem: String,
    },
}

/// A store error's message for `check`, which exits rather than retries:
/// without the "it is retried" the broker's own messages end with.
fn without_retry_note(error: &crate::backend::StoreError) -> String {
    let message = error.to_string();
    match message.strip_suffix("; it is retried") {
        Some(shorter) => shorter.to_owned(),
        None => message,
    }
}

/// Runs every check; on success, the lines to print.
pub async fn run(settings: &Settings) -> Result<Vec<String>, CheckError> {
    socket_folder_exists(settings)?;
    let security = Security::load(settings)?;
    let mut certificate_problems = Vec::new();
    let transport = match &settings.tls {
        Some(files) => {
            let certificate = tls::certificate_report(files)?;
            if certificate.expires_in < EXPIRY_WARNING {
                return Err(CheckError::ExpiresSoon {
                    days: certificate.expires_in.as_secs() / 86_400,
                    not_after: certificate.not_after,
                });
            }
            certificate_problems = certificate.problems;
            format!(
                "mutual TLS, server certificate {} valid until {}, key matches, client CA parses",
                certificate.subject, certificate.not_after
            )
        }
        None => "plaintext, local only".to_owned(),
    };
    let store = open_store(settings)?;
    let upstream = store.store.check().await.map_err(CheckError::Upstream)?;
    let prefix = crate::app::name_resolver(settings);
    let (reads, reads_warning) = reads_answer(&store, prefix.prefix())
        .await
        .map_err(CheckError::Upstream)?;
    let mut report = vec![
        format!("listen: {} ({transport})", settings.listen),
        format!("authorization: {}", security.authorizer.summary()),
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
        format!("upstream: {reads}"),
    ];
    if let (Some(source), Some(region)) = (&settings.events, settings.backend.region()) {
        let events = crate::events::check_source(source, region)
            .await
            .map_err(CheckError::Events)?;
        report.push(format!("events: {events}"));
    }
    report.extend(reads_warning);
    if let Some(warning) = none_under_the_prefix(&store, settings, prefix.prefix()).await {
        report.push(warning);
    }
    for warning in security.authorizer.warnings(prefix.prefix()) {
        report.push(format!("warning: policy {warning}"));
    }
    for problem in certificate_problems {
        report.push(format!("warning: {problem}"));
    }
    if settings.tls.is_some() && settings.policy.is_none() {
        report.push(
            "warning: mutual TLS without --policy refuses every call: give it a policy file"
                .to_owned(),
        );
    }
    let descriptors = descriptors::fit_connections(&settings.limits);
    let wanted = settings.limits.max_connections;
    if let Some(warning) = descriptors.and_then(|fit| fit.shortfall(wanted)) {
        report.push(format!("warning: {warning}"));
    }
    if let Some(file) = &settings.config_file {
        report.insert(0, format!("config file: {}", file.display()));
    }
    report.push("configuration ok".to_owned());
    Ok(report)
}

/// A unix socket is made in a folder that must be there (serve cannot
/// make it). Nothing is bound: a broker may be serving at the address.
fn socket_folder_exists(settings: &Settings) -> Result<(), CheckError> {
    let crate::config::ListenAddr::Unix(socket) = &settings.listen else {
        return Ok(());
    };
    let folder = match socket.parent() {
        Some(folder) if !folder.as_os_str().is_empty() => folder,
        _ => std::path::Path::new("."),
    };
    let problem = if !folder.exists() {
        format!("the folder {} does not exist", folder.display())
    } else if !folder.is_dir() {
        format!("{} is not a folder", folder.display())
    } else if socket.is_dir() {
        "it names a folder, not a socket file".to_owned()
    } else {
        return Ok(());
    };
    Err(CheckError::SocketPath {
        socket: socket.clone(),
        problem,
    })
}

/// The name `reads_answer` reads: under the prefix (where the broker's
/// grants are), and saying what it is to whoever finds it in CloudTrail.
const READ_PROBE: &str = "secrets-broker-check-of-reads-not-a-secret";

/// Reads a secret that does not exist: NOT_FOUND proves reads are allowed
/// and answered. Listing alone passes when only reads are denied, or when
/// something in between answers every call with an empty 200 (that
/// fails). A role allowed only some secrets under the prefix is refused
/// this name and works: then up to `LISTED_TRIED` secrets the listing
/// names are read too, and only if each is refused does the check fail
/// (none listed: a warning).
async fn reads_answer(
    store: &crate::app::Store,
    prefix: &str,
) -> Result<(String, Option<String>), crate::backend::StoreError> {
    use crate::backend::StoreError;
    let name = format!("{prefix}{READ_PROBE}");
    let selector = crate::backend::VersionSelector::current();
    match store.store.get_secret_value(&name, &selector).await {
        Err(StoreError::NotFound { .. } | StoreError::Deleted { .. }) => Ok((
            format!("reads answered (a read of {name:?}, which does not exist: not found)"),
            None,
        )),
        Ok(_) => Ok((format!("reads answered (a read of {name:?})"), None)),
        Err(refused @ StoreError::AccessDenied { .. }) => {
            let listed = listed_secrets(store, prefix).await;
            let mut last_refusal = None;
            for secret in &listed {
                match store.store.get_secret_value(secret, &selector).await {
                    Err(error @ StoreError::AccessDenied { .. }) => last_refusal = Some(error),
                    _ => return Ok((format!("reads answered (a read of {secret:?})"), None)),
                }
            }
            if let Some(error) = last_refusal {
                return Err(error);
            }
            Ok((
                format!("reads refused for {name:?}"),
                Some(format!(
                    "warning: {refused}. If the broker's role is allowed only some secrets \
                     under {prefix:?} this is expected; otherwise grant \
                     secretsmanager:GetSecretValue on them (deploy/iam-policy.json)"
                )),
            ))
        }
        Err(error) => Err(error),
    }
}

/// How many listed secrets `reads_answer` tries when the probe is refused.
const LISTED_TRIED: usize = 10;

/// Up to `LISTED_TRIED` secrets the listing names under `prefix`.
async fn listed_secrets(store: &crate::app::Store, prefix: &str) -> Vec<String> {
    let Ok(page) = store.store.list_secrets(prefix, None).await else {
        return Vec::new();
    };
    page.secrets
        .into_iter()
        .filter(|secret| !secret.deleted)
        .map(|secret| secret.name)
        .take(LISTED_TRIED)
        .collect()
}

/// A warning when AWS holds no secret under the prefix in this Region:
/// every read would answer NOT_FOUND, and the likeliest cause (a Region
/// left at its default, or another than the secrets') says nothing of
/// itself. A listing that fails says nothing either: the upstream check
/// above already passed.
async fn none_under_the_prefix(
    store: &crate::app::Store,
    settings: &Settings,
    prefix: &str,
) -> Option<String> {
    let region = settings.backend.region()?;
    if prefix.is_empty() {
        return None;
    }
    let page = store.store.list_secrets(prefix, None).await.ok()?;
    (page.secrets.is_empty() && page.next.is_none()).then(|| {
        format!(
            "warning: AWS Secrets Manager in {region} holds no secret named {prefix}*: every read \
             by name will answer NOT_FOUND. If the secrets are in another Region, set AWS_REGION \
             (AWS_DEFAULT_REGION wins when both are set); else check SECRET_PREFIX"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_messages_do_not_promise_a_retry() {
        let error = CheckError::Upstream(crate::backend::StoreError::Unavailable {
            detail: "AWS answered HTTP 502 with no AWS error code; it is retried".into(),
        });
        let message = error.to_string();
        assert!(
            message.starts_with("upstream: ") && message.ends_with("no AWS error code"),
            "{message}"
        );
    }
}
