//! Mutual TLS identities and the policy: what each caller may read, that
//! the shared cache never answers past the policy, that an edited policy
//! takes effect (and ends revoked watches) without a restart, that a broken
//! one keeps the rules in force, and that a certificate naming nobody is
//! unauthenticated.
//!
//! The handshake itself against other TLS stacks, SIGHUP and the audit
//! lines of the binary are tested from Python (tests/integration).

use std::time::Duration;

use secrets_broker_client::proto::{
    BatchGetSecretsRequest, GetDatabaseConfigRequest, GetJwtConfigRequest, WatchEventType,
    WatchSecretRequest, batch_get_secrets_result, secrets_service_client::SecretsServiceClient,
};
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::harness::{
    Issued, Pki, Running, Secrets, assert_no_dev_value, eventually, get, process_log, reason,
    replace_file, serving, stats, unnamed, value,
};

const AUTH: &str = "spiffe://insurecove/auth-service";
const BILLING: &str = "spiffe://insurecove/billing";
const OPS: &str = "spiffe://insurecove/ops";
const MISTRAL: &str = "insurecove/mistral-api-key";
const JWT: &str = "insurecove/production/jwt";
const DATABASE: &str = "insurecove/production/database";
const MISTRAL_VALUE: &str = "dev-mistral-key-NOT-A-REAL-KEY-0000";
const RELOAD_BOUND: Duration = Duration::from_secs(2);

/// `[[grant]]` tables: (identity, secret patterns, admin).
fn policy(grants: &[(&str, &[&str], bool)]) -> String {
    grants
        .iter()
        .map(|(identity, secrets, admin)| {
            let secrets: Vec<String> = secrets.iter().map(|s| format!("{s:?}")).collect();
            format!(
                "[[grant]]\nidentity = {identity:?}\nsecrets = [{}]\nadmin = {admin}\n\n",
                secrets.join(", ")
            )
        })
        .collect()
}

/// auth-service reads the JWT and the Mistral key; billing the database;
/// ops is admin and reads nothing.
fn base_policy() -> String {
    policy(&[
        (AUTH, &[JWT, MISTRAL], false),
        (BILLING, &[DATABASE], false),
        (OPS, &[], true),
    ])
}

/// A refusal by the policy: PERMISSION_DENIED, POLICY_DENIED, no value.
fn assert_denied(answer: Result<impl std::fmt::Debug, Status>) {
    let status = answer.expect_err("refused");
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (Code::PermissionDenied, "POLICY_DENIED"),
        "{status:?}"
    );
    assert_no_dev_value(&status);
}

/// The PKI, its three callers, and a TLS broker under `policy_text` (no
/// policy at all when `None`).
struct Callers {
    pki: Pki,
    auth: Issued,
    billing: Issued,
    ops: Issued,
}

impl Callers {
    fn new() -> Self {
        let pki = Pki::new();
        Self {
            auth: pki.client("auth", AUTH),
            billing: pki.client("billing", BILLING),
            ops: pki.client("ops", OPS),
            pki,
        }
    }

    async fn broker(&self, policy_text: Option<&str>) -> Running {
        let path = policy_text.map(|text| self.pki.write_policy(text));
        Running::start_tls(&self.pki, path).await
    }

    fn policy_path(&self) -> std::path::PathBuf {
        self.pki.dir.path().join("policy.toml")
    }
}

/// A watch's first event, within a bound.
async fn first_event(
    stream: &mut tonic::Streaming<secrets_broker_client::proto::WatchSecretResponse>,
) -> secrets_broker_client::proto::WatchSecretResponse {
    tokio::time::timeout(RELOAD_BOUND, stream.message())
        .await
        .expect("the first event in time")
        .expect("an open stream")
        .expect("an event")
}

async fn secrets(broker: &Running, caller: &Issued) -> Secrets {
    SecretsServiceClient::new(broker.mtls(caller).await)
}

#[tokio::test]
async fn without_a_policy_mutual_tls_allows_nothing() {
    let callers = Callers::new();
    let broker = callers.broker(None).await;
    for caller in [&callers.auth, &callers.ops] {
        assert_denied(get(&mut secrets(&broker, caller).await, "mistral-api-key").await);
    }
    assert_denied(stats(broker.mtls(&callers.ops).await).await);
    assert!(serving(broker.mtls(&callers.auth).await).await);
    broker.stop().await;
}

#[tokio::test]
async fn plaintext_callers_are_anonymous_under_a_policy() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("anonymous.toml");
    std::fs::write(&path, policy(&[("anonymous", &[MISTRAL], false)])).unwrap();
    let file = path.to_string_lossy().into_owned();
    let broker = Running::start(move |args| args.policy = Some(file)).await;
    let mut raw = broker.raw().await;
    assert_eq!(
        value(&get(&mut raw, "mistral-api-key").await.unwrap()),
        MISTRAL_VALUE
    );
    let refused = get(&mut raw, "production/jwt").await;
    // The refusal names the secret, as every error names what it is about.
    let info = refused
        .as_ref()
        .err()
        .and_then(|s| s.get_details_error_info());
    assert_eq!(
        info.map(|info| info.metadata["secret_name"].clone()),
        Some(JWT.to_owned()),
        "{refused:?}"
    );
    assert_denied(refused);
    assert_denied(stats(broker.channel().await).await);
    drop(raw);
    broker.stop().await;
}

#[tokio::test]
async fn the_shared_cache_does_not_answer_past_the_policy() {
    let callers = Callers::new();
    let broker = callers.broker(Some(&base_policy())).await;
    let mut auth = secrets(&broker, &callers.auth).await;
    let mut billing = secrets(&broker, &callers.billing).await;
    let ops = broker.mtls(&callers.ops).await;

    assert!(
        !get(&mut auth, "mistral-api-key")
            .await
            .unwrap()
            .cache
            .unwrap()
            .hit
    );
    let cached = get(&mut auth, "mistral-api-key").await.unwrap();
    assert_eq!(
        (value(&cached), cached.cache.unwrap().hit),
        (MISTRAL_VALUE, true)
    );
    let before = stats(ops.clone()).await.unwrap();
    assert_eq!(
        (
            before.total_entries,
            before.valid_entries,
            before.hits,
            before.misses
        ),
        (1, 1, 1, 1)
    );

    // Billing may not read it, cached or not, bypass or not, nor in a batch.
    assert_denied(get(&mut billing, "mistral-api-key").await);
    let mut bypass = crate::harness::read("mistral-api-key");
    bypass.bypass_cache = true;
    assert_denied(billing.get_secret(bypass).await);
    let batch = billing
        .batch_get_secrets(BatchGetSecretsRequest {
            names: vec!["mistral-api-key".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    match &batch.results[0].result {
        Some(batch_get_secrets_result::Result::Error(error)) => {
            assert_eq!((error.code, error.reason.as_str()), (7, "POLICY_DENIED"));
        }
        other => panic!("billing read the key in a batch: {}", other.is_some()),
    }
    // Admin does not mean reader.
    assert_denied(get(&mut secrets(&broker, &callers.ops).await, "mistral-api-key").await);

    let after = stats(ops).await.unwrap();
    assert_eq!(
        (
            after.total_entries,
            after.valid_entries,
            after.hits,
            after.misses,
            after.upstream_calls
        ),
        (1, 1, before.hits, before.misses, before.upstream_calls),
        "refused calls touched the cache"
    );
    drop((auth, billing));
    broker.stop().await;
}

#[tokio::test]
async fn a_policy_edit_grants_then_revokes_and_ends_the_revoked_watch() {
    let callers = Callers::new();
    let broker = callers.broker(Some(&base_policy())).await;
    let path = callers.policy_path();
    let billing = secrets(&broker, &callers.billing).await;
    let reads = |stub: &Secrets| {
        let mut stub = stub.clone();
        async move {
            match get(&mut stub, "mistral-api-key").await {
                Ok(secret) => value(&secret) == MISTRAL_VALUE,
                Err(status) if status.code() == Code::PermissionDenied => false,
                Err(status) => panic!("{status:?}"),
            }
        }
    };
    assert!(!reads(&billing).await);

    // Granted by an edit in place.
    std::fs::write(
        &path,
        policy(&[
            (AUTH, &[JWT, MISTRAL], false),
            (BILLING, &[DATABASE, MISTRAL], false),
        ]),
    )
    .unwrap();
    eventually(RELOAD_BOUND, "billing's grant", || reads(&billing)).await;
    let watch = || WatchSecretRequest {
        name: "mistral-api-key".into(),
        ..Default::default()
    };
    let mut billing_watch = billing
        .clone()
        .watch_secret(watch())
        .await
        .unwrap()
        .into_inner();
    let first = first_event(&mut billing_watch).await;
    assert_eq!(first.r#type(), WatchEventType::Current);
    assert_eq!(value(first.secret.as_ref().unwrap()), MISTRAL_VALUE);
    let mut auth = secrets(&broker, &callers.auth).await;
    let mut auth_watch = auth.watch_secret(watch()).await.unwrap().into_inner();
    assert_eq!(
        first_event(&mut auth_watch).await.r#type(),
        WatchEventType::Current
    );

    // Revoked by replacing the file: billing's stream ends PERMISSION_DENIED.
    replace_file(&path, &base_policy());
    eventually(RELOAD_BOUND, "billing's refusal", || async {
        !reads(&billing).await
    })
    .await;
    let ended = tokio::time::timeout(RELOAD_BOUND, async {
        loop {
            match billing_watch.message().await {
                Ok(Some(event)) => assert_ne!(
                    event.r#type(),
                    WatchEventType::Rotated,
                    "a value after the revoke"
                ),
                Ok(None) => panic!("the stream ended without a status"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("billing's watch ends after the revoke");
    assert_eq!(
        (ended.code(), reason(&ended).as_str()),
        (Code::PermissionDenied, "POLICY_DENIED")
    );

    // auth-service kept its grant: its stream stays open.
    let quiet = tokio::time::timeout(Duration::from_millis(500), auth_watch.message()).await;
    assert!(
        quiet.is_err(),
        "auth-service's watch was disturbed: {quiet:?}"
    );
    assert_eq!(
        value(&get(&mut auth, "mistral-api-key").await.unwrap()),
        MISTRAL_VALUE
    );
    drop((auth_watch, billing_watch, auth, billing));
    broker.stop().await;
}

#[tokio::test]
async fn a_broken_policy_keeps_the_rules_in_force() {
    let log = process_log();
    let callers = Callers::new();
    let broker = callers.broker(Some(&base_policy())).await;
    let path = callers.policy_path();
    let file_name = path.to_string_lossy().into_owned();
    let mut auth = secrets(&broker, &callers.auth).await;
    let mut billing = secrets(&broker, &callers.billing).await;
    // Each case's own warning: the file's path and the reason it gives.
    let warnings = |reason: &str| {
        log.text()
            .lines()
            .filter(|line| {
                line.contains("WARN") && line.contains(&file_name) && line.contains(reason)
            })
            .count()
    };

    let broken = [
        ("unclosed array table", "[[grant]\nidentity = ".to_owned()),
        (
            "unknown field `superuser`",
            format!(
                "[[grant]]\nidentity = {BILLING:?}\nsecrets = [{MISTRAL:?}]\nsuperuser = true\n"
            ),
        ),
        (
            "is not a valid glob",
            format!("[[grant]]\nidentity = {BILLING:?}\nsecrets = [\"insurecove/[unclosed\"]\n"),
        ),
    ];
    for (case, text) in broken {
        let before = warnings(case);
        replace_file(&path, &text);
        eventually(RELOAD_BOUND, case, || async { warnings(case) > before }).await;
        assert_eq!(
            value(&get(&mut auth, "mistral-api-key").await.unwrap()),
            MISTRAL_VALUE
        );
        let database = get(&mut billing, "production/database").await.unwrap();
        assert!(
            value(&database).contains("dev-db-password-NOT-REAL"),
            "{case}"
        );
        assert_denied(get(&mut billing, "mistral-api-key").await);
    }

    // A good file again takes effect.
    replace_file(&path, &policy(&[(BILLING, &[MISTRAL], false)]));
    eventually(RELOAD_BOUND, "the repaired policy", || {
        let mut billing = billing.clone();
        async move { get(&mut billing, "mistral-api-key").await.is_ok() }
    })
    .await;
    drop((auth, billing));
    broker.stop().await;
}

#[tokio::test]
async fn a_certificate_that_names_nobody_is_unauthenticated() {
    let callers = Callers::new();
    // Even a grant for every identity does not let an unnamed caller in.
    let broker = callers
        .broker(Some(&policy(&[("spiffe://**", &["**"], true)])))
        .await;
    let unnamed = unnamed(&callers.pki);
    let channel = broker.mtls(&unnamed).await;
    assert!(
        serving(channel.clone()).await,
        "health answers a verified peer"
    );
    let mut stub = SecretsServiceClient::new(channel.clone());
    let refusals = [
        get(&mut stub, "mistral-api-key").await.map(drop),
        stub.get_jwt_config(GetJwtConfigRequest::default())
            .await
            .map(drop),
        stub.get_database_config(GetDatabaseConfigRequest::default())
            .await
            .map(drop),
        // Refused as a whole, not name by name; before its names are read.
        stub.batch_get_secrets(BatchGetSecretsRequest {
            names: vec!["mistral-api-key".into()],
            ..Default::default()
        })
        .await
        .map(drop),
        stub.batch_get_secrets(BatchGetSecretsRequest::default())
            .await
            .map(drop),
        get(&mut stub, "not a name!").await.map(drop),
        stub.watch_secret(WatchSecretRequest {
            name: "not a name!".into(),
            ..Default::default()
        })
        .await
        .map(drop),
        stats(channel).await.map(drop),
    ];
    for refusal in refusals {
        let status = refusal.unwrap_err();
        assert_eq!(
            (status.code(), reason(&status).as_str()),
            (Code::Unauthenticated, "NO_CLIENT_IDENTITY"),
            "{status:?}"
        );
        assert_no_dev_value(&status);
    }
    // The glob grant works for a named caller.
    let mut billing = secrets(&broker, &callers.billing).await;
    assert_eq!(
        value(&get(&mut billing, "mistral-api-key").await.unwrap()),
        MISTRAL_VALUE
    );
    drop((stub, billing));
    broker.stop().await;
}
