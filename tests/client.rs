//! The client crate against the real broker binary on moto_server.
//!
//! Every call below goes through `secrets_broker_client` only (moto is
//! seeded and rotated with the AWS SDK, as an operator would). Each test
//! starts its own moto_server (`MOTO_SERVER`, required) and broker on free
//! loopback ports; both are killed when the test ends, pass or fail.

mod support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use secrets_broker_client::{
    ClientConfig, Error, SecretValue, SecretsClient, WatchEvent, WatchEventKind,
};
use support::{Broker, BrokerSpec, Moto, Pki, plaintext_client, within};

const MISTRAL: &str = "insurecove/mistral-api-key";
const JWT: &str = "insurecove/production/jwt";
const DATABASE: &str = "insurecove/production/database";
const AWS_SERVICES: &str = "insurecove/production/aws-services";
const SECURITY: &str = "insurecove/production/security";

const JWT_SIGNING_KEY: &str = "client-test-jwt-signing-key-0001";
const JWT_VALUE: &str = r#"{"jwt_secret_key":"client-test-jwt-signing-key-0001","jwt_algorithm":"HS256","jwt_issuer":"insurecove-client-tests","jwt_audience":"insurecove-clients","jwt_access_token_expire_minutes":45}"#;
const DATABASE_VALUE: &str = r#"{"supabase_url":"https://client-tests.supabase.invalid","supabase_anon_key":"client-test-anon-key","supabase_service_key":"client-test-service-key","database_password":"client-test-db-password"}"#;
const AWS_SERVICES_VALUE: &str = r#"{"aws_ses_region":"ap-east-1","aws_end_user_messaging_region":"ap-southeast-1","s3_bucket_name":"insurecove-client-tests","max_file_size_mb":25}"#;
const SECURITY_VALUE: &str = r#"{"encryption_key":"client-test-encryption-key","encryption_salt":"client-test-encryption-salt","allowed_hosts":"localhost, 127.0.0.1","cors_origins":["http://localhost:3000"]}"#;
/// The JWT config without `jwt_issuer`.
const JWT_WITHOUT_ISSUER: &str = r#"{"jwt_secret_key":"client-test-jwt-signing-key-0001","jwt_algorithm":"HS256","jwt_audience":"insurecove-clients","jwt_access_token_expire_minutes":45}"#;

/// How long a rotation may take to reach a watcher (watch interval 1 s).
const ROTATION_BOUND: Duration = Duration::from_secs(15);

fn text(secret: &SecretValue) -> &str {
    secret
        .as_str()
        .unwrap_or_else(|| panic!("{secret:?} is not text"))
}

/// `value` must appear nowhere in the error's text or debug form.
fn assert_no_value(error: &Error, values: &[&str]) {
    let shown = format!("{error} {error:?}");
    for value in values {
        assert!(
            !shown.contains(value),
            "the error shows a secret value: {shown}"
        );
    }
}

async fn next_event(events: &mut secrets_broker_client::WatchStream, what: &str) -> WatchEvent {
    within(ROTATION_BOUND, what, events.next())
        .await
        .unwrap_or_else(|| panic!("{what}: the watch stream ended"))
        .unwrap_or_else(|e| panic!("{what}: the watch stream failed: {e}"))
}

// --------------------------------------------------------------------------
// 1. every RPC and the error variants, plaintext broker on moto

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_and_error_variant_through_the_crate() {
    let test = "every_rpc_and_error_variant";
    let moto = Moto::start(test);
    let v1 = moto.create_secret(MISTRAL, "client-test-mistral-v1").await;
    let v2 = moto
        .put_secret_value(MISTRAL, "client-test-mistral-v2")
        .await;
    moto.create_secret(JWT, JWT_VALUE).await;
    moto.create_secret(DATABASE, DATABASE_VALUE).await;
    moto.create_secret(AWS_SERVICES, AWS_SERVICES_VALUE).await;
    moto.create_secret(SECURITY, SECURITY_VALUE).await;

    let mut broker = Broker::spawn(BrokerSpec::aws(test, &moto).args(["--watch-interval", "1"]));
    let client = plaintext_client(&broker).await;
    broker.wait_ready(|| client.check_upstream()).await;

    // check_upstream (AdminService.CheckUpstream): moto is reachable; and
    // test_connection (the health status, any caller) says so too.
    assert!(
        client.check_upstream().await.expect("check_upstream"),
        "check_upstream says moto is unreachable"
    );
    assert!(client.test_connection().await, "test_connection");

    current_then_cached(&client, &v2).await;
    by_version_and_stage(&client, &v1).await;
    bypass_sees_a_new_version(&moto, &client, &v2).await;
    batch_answers_each_name(&client).await;
    typed_configs(&client).await;
    cache_stats(&client).await;
    let v4 = refresh_reads_metadata(&moto, &client).await;
    clear_cache_one_then_all(&client).await;
    errors_name_their_reason(&moto, &client).await;
    watch_current_then_rotated(&moto, &client, &v4).await;
}

/// get_secret by short name: the current version, then from the cache.
async fn current_then_cached(client: &SecretsClient, v2: &str) {
    let current = client
        .get_secret("mistral-api-key")
        .await
        .expect("get_secret");
    assert_eq!(text(&current), "client-test-mistral-v2");
    assert_eq!(current.name(), MISTRAL);
    assert_eq!(current.version_id(), v2);
    assert!(
        current.version_stages().iter().any(|s| s == "AWSCURRENT"),
        "{current:?}"
    );
    assert!(current.arn().starts_with("arn:"), "arn {:?}", current.arn());
    assert!(
        !current.cache().hit,
        "first read was a cache hit: {current:?}"
    );
    let cached = client
        .get_secret("mistral-api-key")
        .await
        .expect("get_secret again");
    assert!(
        cached.cache().hit,
        "second read missed the cache: {cached:?}"
    );
    assert_eq!(cached.version_id(), v2);
}

/// get_secret by version id and by stage; get_mistral_api_key.
async fn by_version_and_stage(client: &SecretsClient, v1: &str) {
    let by_id = client
        .get_secret("mistral-api-key")
        .version_id(v1)
        .await
        .expect("get_secret version_id");
    assert_eq!(text(&by_id), "client-test-mistral-v1");
    assert_eq!(by_id.version_id(), v1);
    let previous = client
        .get_secret("mistral-api-key")
        .version_stage("AWSPREVIOUS")
        .await
        .expect("get_secret AWSPREVIOUS");
    assert_eq!(text(&previous), "client-test-mistral-v1");
    assert_eq!(previous.version_id(), v1);
    assert!(
        previous.version_stages().iter().any(|s| s == "AWSPREVIOUS"),
        "{previous:?}"
    );

    // get_mistral_api_key
    let key = client
        .get_mistral_api_key()
        .await
        .expect("get_mistral_api_key");
    assert_eq!(key.as_str(), "client-test-mistral-v2");
}

/// bypass_cache sees a new version at once and refreshes the cache.
async fn bypass_sees_a_new_version(moto: &Moto, client: &SecretsClient, v2: &str) {
    let v3 = moto
        .put_secret_value(MISTRAL, "client-test-mistral-v3")
        .await;
    let still = client
        .get_secret("mistral-api-key")
        .await
        .expect("cached read");
    assert_eq!(still.version_id(), v2, "the cache should still hold v2");
    let fresh = client
        .get_secret("mistral-api-key")
        .bypass_cache()
        .await
        .expect("get_secret bypass_cache");
    assert_eq!(text(&fresh), "client-test-mistral-v3");
    assert_eq!(fresh.version_id(), v3);
    assert!(
        !fresh.cache().hit,
        "bypass_cache answered from the cache: {fresh:?}"
    );
    let after = client
        .get_secret("mistral-api-key")
        .await
        .expect("read after bypass");
    assert_eq!(
        after.version_id(),
        v3,
        "bypass_cache did not refresh the cache"
    );
}

/// batch_get_secrets: one found, one NotFound, in order.
async fn batch_answers_each_name(client: &SecretsClient) {
    let batch = client
        .batch_get_secrets(&["mistral-api-key", "no-such-secret"])
        .await
        .expect("batch_get_secrets");
    assert_eq!(batch.len(), 2, "{batch:?}");
    assert!(batch[0].0.ends_with("mistral-api-key"), "{:?}", batch[0].0);
    let found = batch[0].1.as_ref().expect("batch: mistral-api-key");
    assert_eq!(text(found), "client-test-mistral-v3");
    assert!(batch[1].0.ends_with("no-such-secret"), "{:?}", batch[1].0);
    match &batch[1].1 {
        Err(Error::NotFound { reason, .. }) => assert_eq!(reason, "SECRET_NOT_FOUND"),
        other => panic!("batch: no-such-secret gave {other:?}, not NotFound"),
    }
}

/// The four typed configs, field by field.
async fn typed_configs(client: &SecretsClient) {
    let jwt = client.get_jwt_config().await.expect("get_jwt_config");
    assert_eq!(jwt.jwt_issuer, "insurecove-client-tests");
    assert_eq!(jwt.jwt_secret_key, JWT_SIGNING_KEY);
    assert_eq!(jwt.jwt_algorithm, "HS256");
    assert_eq!(jwt.jwt_audience, "insurecove-clients");
    assert_eq!(jwt.jwt_access_token_expire_minutes, 45);
    let db = client
        .get_database_config()
        .await
        .expect("get_database_config");
    assert_eq!(db.supabase_url, "https://client-tests.supabase.invalid");
    assert_eq!(db.supabase_anon_key, "client-test-anon-key");
    assert_eq!(db.supabase_service_key, "client-test-service-key");
    assert_eq!(db.database_password, "client-test-db-password");
    let aws = client
        .get_aws_services_config()
        .await
        .expect("get_aws_services_config");
    assert_eq!(aws.aws_ses_region, "ap-east-1");
    assert_eq!(aws.aws_end_user_messaging_region, "ap-southeast-1");
    assert_eq!(aws.s3_bucket_name, "insurecove-client-tests");
    assert_eq!(aws.max_file_size_mb, 25);
    let security = client
        .get_security_config()
        .await
        .expect("get_security_config");
    assert_eq!(security.encryption_key, "client-test-encryption-key");
    assert_eq!(security.encryption_salt, "client-test-encryption-salt");
    assert_eq!(security.allowed_hosts, ["localhost", "127.0.0.1"]);
    assert_eq!(security.cors_origins, ["http://localhost:3000"]);
    // From a named secret rather than the default: by full name the same
    // JWT config; the JWT's secret read as a database config is refused
    // for its fields, which the default name would not have been.
    let named = client
        .get_config_from::<secrets_broker_client::JwtConfig>(JWT)
        .await
        .expect("get_config_from by full name");
    assert_eq!(named.jwt_issuer, "insurecove-client-tests");
    match client
        .get_config_from::<secrets_broker_client::DatabaseConfig>("production/jwt")
        .await
    {
        Err(Error::MalformedSecret { .. }) => {}
        other => panic!("a JWT secret read as a database config gave {other:?}"),
    }
}

/// get_cache_stats after the reads above.
async fn cache_stats(client: &SecretsClient) {
    let stats = client.get_cache_stats().await.expect("get_cache_stats");
    assert!(stats.hits >= 2, "hits {stats:?}");
    assert!(stats.misses >= 1, "misses {stats:?}");
    assert!(stats.upstream_calls >= 1, "upstream_calls {stats:?}");
    assert!(stats.total_entries >= 5, "total_entries {stats:?}");
    assert!(
        stats.hit_ratio > 0.0 && stats.hit_ratio < 1.0,
        "hit_ratio {stats:?}"
    );
}

/// refresh_secret picks up a new version, metadata only; returns it.
async fn refresh_reads_metadata(moto: &Moto, client: &SecretsClient) -> String {
    let v4 = moto
        .put_secret_value(MISTRAL, "client-test-mistral-v4")
        .await;
    let (meta, changed) = client
        .refresh_secret("mistral-api-key")
        .await
        .expect("refresh_secret");
    assert!(
        changed,
        "refresh_secret saw no change after a new version: {meta:?}"
    );
    assert_eq!(meta.version_id(), v4);
    assert_eq!(meta.name(), MISTRAL);
    assert!(
        meta.as_bytes().is_empty(),
        "refresh_secret returned a value"
    );
    let (_, changed_again) = client
        .refresh_secret("mistral-api-key")
        .await
        .expect("refresh_secret again");
    assert!(!changed_again, "a second refresh_secret reported a change");
    let refreshed = client
        .get_secret("mistral-api-key")
        .await
        .expect("read after refresh");
    assert_eq!(refreshed.version_id(), v4);
    assert!(
        refreshed.cache().hit,
        "refresh_secret did not fill the cache"
    );
    v4
}

/// clear_cache of one name, then of everything.
async fn clear_cache_one_then_all(client: &SecretsClient) {
    let cleared = client
        .clear_cache(&["mistral-api-key"])
        .await
        .expect("clear_cache one");
    assert!(
        cleared >= 1,
        "clear_cache(mistral-api-key) cleared {cleared}"
    );
    let miss = client
        .get_secret("mistral-api-key")
        .await
        .expect("read after clear");
    assert!(!miss.cache().hit, "read after clear_cache was a hit");
    let cleared_all = client.clear_cache(&[]).await.expect("clear_cache all");
    assert!(cleared_all >= 5, "clear_cache(all) cleared {cleared_all}");
    let empty = client.get_cache_stats().await.expect("stats after clear");
    assert_eq!(
        empty.total_entries, 0,
        "entries left after clear_cache(all): {empty:?}"
    );
}

/// NotFound, InvalidArgument (field name), MalformedSecret (field jwt_issuer).
async fn errors_name_their_reason(moto: &Moto, client: &SecretsClient) {
    match client.get_secret("no-such-secret").await {
        Err(error @ Error::NotFound { .. }) => {
            assert_eq!(error.reason(), Some("SECRET_NOT_FOUND"), "{error:?}")
        }
        other => panic!("get_secret(no-such-secret) gave {other:?}, not NotFound"),
    }
    match client.get_secret("bad name!").await {
        Err(Error::InvalidArgument { reason, field, .. }) => {
            assert_eq!(reason, "INVALID_SECRET_NAME");
            assert_eq!(field.as_deref(), Some("name"));
        }
        other => panic!("get_secret(\"bad name!\") gave {other:?}, not InvalidArgument"),
    }
    moto.put_secret_value(JWT, JWT_WITHOUT_ISSUER).await;
    client
        .clear_cache(&["production/jwt"])
        .await
        .expect("clear_cache jwt");
    match client.get_jwt_config().await {
        Err(error @ Error::MalformedSecret { .. }) => {
            let Error::MalformedSecret { field, .. } = &error else {
                unreachable!()
            };
            assert_eq!(field.as_deref(), Some("jwt_issuer"), "{error:?}");
            assert_eq!(error.reason(), Some("MALFORMED_SECRET"));
            assert_no_value(&error, &[JWT_SIGNING_KEY]);
        }
        other => panic!("get_jwt_config on a jwt without jwt_issuer gave {other:?}"),
    }
}

/// watch_secret: CURRENT at once, ROTATED on a new version; a missing secret ends with NotFound.
async fn watch_current_then_rotated(moto: &Moto, client: &SecretsClient, v4: &str) {
    let mut events = client.watch_secret("mistral-api-key");
    let first = next_event(&mut events, "first watch event").await;
    assert_eq!(first.kind, WatchEventKind::Current, "{first:?}");
    assert_eq!(first.secret.version_id(), v4);
    assert_eq!(text(&first.secret), "client-test-mistral-v4");
    let watching = client
        .get_cache_stats()
        .await
        .expect("stats while watching");
    assert_eq!(watching.watchers, 1, "{watching:?}");
    let v5 = moto
        .put_secret_value(MISTRAL, "client-test-mistral-v5")
        .await;
    let rotated = next_event(&mut events, "ROTATED after put-secret-value").await;
    assert_eq!(rotated.kind, WatchEventKind::Rotated, "{rotated:?}");
    assert_eq!(rotated.secret.version_id(), v5);
    assert_eq!(text(&rotated.secret), "client-test-mistral-v5");
    assert!(rotated.observed_at.is_some(), "{rotated:?}");
    drop(events);

    // a watch of a missing secret ends with NotFound
    let mut missing = client.watch_secret("no-such-secret");
    match within(ROTATION_BOUND, "watch of a missing secret", missing.next()).await {
        Some(Err(Error::NotFound { reason, .. })) => assert_eq!(reason, "SECRET_NOT_FOUND"),
        other => panic!("watch_secret(no-such-secret) gave {other:?}"),
    }
}

// --------------------------------------------------------------------------
// 2. mutual TLS and the policy: allowed, and PermissionDenied (POLICY_DENIED)

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_policy_allows_and_denies_through_the_crate() {
    let test = "mutual_tls_policy";
    let moto = Moto::start(test);
    moto.create_secret(MISTRAL, "client-test-mtls-mistral")
        .await;
    moto.create_secret(JWT, JWT_VALUE).await;
    moto.create_secret(DATABASE, DATABASE_VALUE).await;

    let pki = Pki::new();
    let server = pki.server();
    let client_a = pki.client("client-a", "spiffe://insurecove/a");
    let policy = pki.write_policy(
        "[[grant]]\nidentity = \"spiffe://insurecove/a\"\nsecrets = [\"insurecove/mistral-api-key\"]\n",
    );
    let spec = BrokerSpec::aws(test, &moto).args([
        "--tls-cert".to_owned(),
        server.cert.display().to_string(),
        "--tls-key".to_owned(),
        server.key.display().to_string(),
        "--tls-client-ca".to_owned(),
        pki.ca().display().to_string(),
        "--policy".to_owned(),
        policy.display().to_string(),
    ]);
    let mut broker = Broker::spawn(spec);
    let config = ClientConfig::new(broker.addr())
        .with_tls(pki.ca(), &client_a.cert, &client_a.key)
        .with_tls_domain("localhost");
    let client = SecretsClient::connect(config)
        .await
        .expect("mTLS client config");
    broker
        .wait_ready(|| client.get_secret("mistral-api-key").send())
        .await;

    // allowed
    let secret = client
        .get_secret("mistral-api-key")
        .await
        .unwrap_or_else(|e| {
            panic!(
                "allowed read refused: {e}; broker log:\n{}",
                broker.log_tail()
            )
        });
    assert_eq!(text(&secret), "client-test-mtls-mistral");
    assert_eq!(
        client
            .get_mistral_api_key()
            .await
            .expect("get_mistral_api_key")
            .as_str(),
        "client-test-mtls-mistral"
    );

    // denied: another secret, a typed config, the admin service, a watch
    let denied = |what: &str, result: Result<String, Error>| match result {
        Err(error @ Error::AccessDenied { .. }) => {
            assert_eq!(error.reason(), Some("POLICY_DENIED"), "{what}: {error:?}");
            assert_no_value(&error, &[JWT_SIGNING_KEY, "client-test-db-password"]);
        }
        other => panic!("{what}: expected AccessDenied/POLICY_DENIED, got {other:?}"),
    };
    denied(
        "get_secret(production/database)",
        client
            .get_secret("production/database")
            .await
            .map(|s| s.version_id().to_owned()),
    );
    denied(
        "get_jwt_config",
        client.get_jwt_config().await.map(|c| c.jwt_issuer),
    );
    denied(
        "check_upstream (admin)",
        client.check_upstream().await.map(|b| b.to_string()),
    );
    // Not an admin service: any caller learns whether the broker serves.
    assert!(client.test_connection().await, "test_connection under mTLS");
    let mut events = client.watch_secret("production/jwt");
    denied(
        "watch_secret(production/jwt)",
        within(ROTATION_BOUND, "denied watch", events.next())
            .await
            .expect("the denied watch ended without an error")
            .map(|e| e.secret.version_id().to_owned()),
    );
    let batch = client
        .batch_get_secrets(&["mistral-api-key", "production/jwt"])
        .await
        .expect("batch_get_secrets");
    assert!(batch[0].1.is_ok(), "batch: allowed item {:?}", batch[0].1);
    denied(
        "batch_get_secrets item production/jwt",
        batch[1].1.clone().map(|s| s.version_id().to_owned()),
    );
}

// --------------------------------------------------------------------------
// 3. a watch keeps its stream across a broker restart

#[derive(Clone, Copy, Debug)]
enum Stop {
    Kill,
    Terminate,
}

async fn watch_survives_restart(test: &str, stop: Stop) {
    const NAME: &str = "insurecove/rotating/api-token";
    let moto = Moto::start(test);
    let v1 = moto.create_secret(NAME, "client-test-rotating-v1").await;
    let mut broker = Broker::spawn(BrokerSpec::aws(test, &moto).args(["--watch-interval", "1"]));
    let client = plaintext_client(&broker).await;
    broker.wait_ready(|| client.check_upstream()).await;

    let mut events = client.watch_secret("rotating/api-token");
    let first = next_event(&mut events, "first watch event").await;
    assert_eq!(first.kind, WatchEventKind::Current, "{first:?}");
    assert_eq!(first.secret.version_id(), v1);

    match stop {
        Stop::Kill => broker.kill(),
        Stop::Terminate => {
            let status = broker.terminate();
            eprintln!("{test}: broker stopped by SIGTERM: {status:?}");
        }
    }
    let v2 = moto.put_secret_value(NAME, "client-test-rotating-v2").await;

    // While the broker is down the stream neither ends nor reports an error.
    if let Ok(item) = tokio::time::timeout(Duration::from_secs(2), events.next()).await {
        panic!("{test}: while the broker was down the watch stream gave {item:?}");
    }
    assert!(
        !client.test_connection().await,
        "{test}: test_connection while the broker is down"
    );

    broker.restart();
    let restarted = Instant::now();
    let event = match tokio::time::timeout(ROTATION_BOUND, events.next()).await {
        Ok(Some(Ok(event))) => event,
        Ok(other) => panic!(
            "{test}: after the restart the watch stream gave {other:?}; broker log:\n{}",
            broker.log_tail()
        ),
        Err(_) => panic!(
            "{test}: no event within {ROTATION_BOUND:?} of the broker's restart on {}; broker log:\n{}",
            broker.addr(),
            broker.log_tail()
        ),
    };
    eprintln!(
        "{test}: {:?} {} {:.1} s after the restart",
        event.kind,
        event.secret.version_id(),
        restarted.elapsed().as_secs_f64()
    );
    assert_eq!(event.kind, WatchEventKind::Rotated, "{event:?}");
    assert_eq!(event.secret.version_id(), v2);
    assert_eq!(text(&event.secret), "client-test-rotating-v2");

    // And it keeps following: the next rotation comes through too.
    let v3 = moto.put_secret_value(NAME, "client-test-rotating-v3").await;
    let next = next_event(&mut events, "ROTATED after the restart").await;
    assert_eq!(next.kind, WatchEventKind::Rotated, "{next:?}");
    assert_eq!(next.secret.version_id(), v3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_survives_broker_sigkill_and_restart() {
    watch_survives_restart("watch_restart_sigkill", Stop::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_survives_broker_sigterm_and_restart() {
    watch_survives_restart("watch_restart_sigterm", Stop::Terminate).await;
}

// --------------------------------------------------------------------------
// 4. the cached client: reads from memory, fresh by push

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_reads_follow_rotations_and_survive_a_restart() {
    const TEST: &str = "cached_client";
    const NAME: &str = "insurecove/cached/api-token";
    let moto = Moto::start(TEST);
    let v1 = moto.create_secret(NAME, "client-test-cached-v1").await;
    let mut broker = Broker::spawn(BrokerSpec::aws(TEST, &moto).args(["--watch-interval", "1"]));
    let client = plaintext_client(&broker).await;
    broker.wait_ready(|| client.check_upstream()).await;
    let max_stale = Duration::from_secs(4);
    let cached = client.cached(secrets_broker_client::CacheLimits {
        max_entries: 4,
        max_stale,
    });
    let mut changes = cached.changes();
    assert_eq!(
        cached.get("cached/api-token").await.unwrap().version_id(),
        v1
    );
    // Its stream is open once the first read has returned; let it connect.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A rotation reaches reads within the interval + 1 s; reads never fail.
    let v2 = moto.put_secret_value(NAME, "client-test-cached-v2").await;
    let rotated = Instant::now();
    loop {
        let secret = cached
            .get("cached/api-token")
            .await
            .expect("reads never fail");
        if secret.version_id() == v2 {
            assert_eq!(text(&secret), "client-test-cached-v2");
            break;
        }
        assert!(
            rotated.elapsed() < Duration::from_secs(2),
            "the rotation did not reach reads within 2 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "{TEST}: rotation read after {:.2} s",
        rotated.elapsed().as_secs_f64()
    );
    let change = within(Duration::from_secs(5), "a change event", changes.recv())
        .await
        .unwrap();
    assert_eq!(
        (change.kind, change.version_id.as_str()),
        (WatchEventKind::Rotated, v2.as_str())
    );

    // No read for longer than max_stale while the stream is connected: the
    // value stays vouched for, and max_stale counts from the break only.
    tokio::time::sleep(max_stale + Duration::from_secs(1)).await;

    // The broker goes away: values are served from memory within max_stale.
    broker.kill();
    let down = Instant::now();
    // The client sees its connection close.
    tokio::time::sleep(Duration::from_millis(300)).await;
    while down.elapsed() < max_stale - Duration::from_secs(1) {
        let secret = cached
            .get("cached/api-token")
            .await
            .expect("served from memory");
        assert_eq!(secret.version_id(), v2);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Past max_stale without a stream, a read goes to the broker (down).
    tokio::time::sleep(max_stale).await;
    let unverified = cached.get("cached/api-token").await;
    assert!(
        unverified.is_err(),
        "an unverified value was served: {unverified:?}"
    );

    // A rotation while down arrives once the stream reconnects.
    let v3 = moto.put_secret_value(NAME, "client-test-cached-v3").await;
    broker.restart();
    let restarted = Instant::now();
    loop {
        if let Ok(secret) = cached.get("cached/api-token").await
            && secret.version_id() == v3
        {
            break;
        }
        assert!(
            restarted.elapsed() < ROTATION_BOUND,
            "no fresh value after the restart; broker log:\n{}",
            broker.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(cached.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_typed_configs_are_read_again_after_a_rotation() {
    const TEST: &str = "cached_typed";
    let moto = Moto::start(TEST);
    moto.create_secret(JWT, JWT_VALUE).await;
    let mut broker = Broker::spawn(BrokerSpec::aws(TEST, &moto).args(["--watch-interval", "1"]));
    let client = plaintext_client(&broker).await;
    broker.wait_ready(|| client.check_upstream()).await;
    let cached = client.cached(secrets_broker_client::CacheLimits::default());
    let reads = |stats: &secrets_broker_client::CacheStats| stats.hits + stats.misses;
    let first: secrets_broker_client::JwtConfig = cached.get_config().await.unwrap();
    assert_eq!(first.jwt_issuer, "insurecove-client-tests");
    // Its secret's stream opens (the broker reads it once for that).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = reads(&client.get_cache_stats().await.unwrap());
    let again: secrets_broker_client::JwtConfig = cached.get_config().await.unwrap();
    assert_eq!(again.jwt_issuer, first.jwt_issuer);
    let after = reads(&client.get_cache_stats().await.unwrap());
    assert_eq!(after, before, "the second config came from memory");
    assert!(
        !format!("{again:?}").contains(JWT_SIGNING_KEY),
        "Debug is redacted"
    );

    let rotated = JWT_VALUE.replace("insurecove-client-tests", "insurecove-rotated-issuer");
    moto.put_secret_value(JWT, &rotated).await;
    issuer_becomes(&cached, "insurecove-rotated-issuer", Duration::from_secs(5)).await;

    // Deleted for good and created again with the version id it had (a
    // ClientRequestToken): another secret, whose config is read again.
    let held = cached.get("production/jwt").await.unwrap();
    let recreated = JWT_VALUE.replace("insurecove-client-tests", "insurecove-recreated-issuer");
    moto.create_again(JWT, &recreated, held.version_id()).await;
    issuer_becomes(&cached, "insurecove-recreated-issuer", ROTATION_BOUND).await;
}

/// Reads the cached JWT config until its issuer is `issuer`, for at most
/// `bound`.
async fn issuer_becomes(
    cached: &secrets_broker_client::CachedSecrets,
    issuer: &str,
    bound: Duration,
) {
    let started = Instant::now();
    loop {
        let config: secrets_broker_client::JwtConfig = cached.get_config().await.unwrap();
        if config.jwt_issuer == issuer {
            return;
        }
        assert!(
            started.elapsed() < bound,
            "{issuer} never reached the config"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A secret deleted for good and created again with its old version id (a
/// caller's ClientRequestToken) is another secret: its value reaches the
/// cached reads, and `changes()` tells it.
#[tokio::test]
async fn a_secret_created_again_with_its_old_version_id_reaches_the_cached_reads() {
    const TEST: &str = "created_again";
    const NAME: &str = "insurecove/created-again";
    let moto = Moto::start(TEST);
    let v1 = moto.create_secret(NAME, "created-again-old-7d1e").await;
    let mut broker = Broker::spawn(BrokerSpec::aws(TEST, &moto).args(["--watch-interval", "1"]));
    let client = plaintext_client(&broker).await;
    broker.wait_ready(|| client.check_upstream()).await;
    let cached = client.cached(secrets_broker_client::CacheLimits::default());
    let old = cached.get("created-again").await.unwrap();
    assert_eq!(text(&old), "created-again-old-7d1e");
    let mut changes = cached.changes();
    // Its stream opens.
    tokio::time::sleep(Duration::from_millis(500)).await;

    moto.create_again(NAME, "created-again-new-7d1e", &v1).await;
    // A sweep between the two steps may see it gone first (DELETED).
    let told = within(Duration::from_secs(10), "the new secret told", async {
        loop {
            let change = changes.recv().await.unwrap();
            if change.kind != WatchEventKind::Deleted {
                return change;
            }
        }
    })
    .await;
    assert_eq!(told.version_id, v1, "{told:?}");
    let new = cached.get("created-again").await.unwrap();
    assert_eq!(text(&new), "created-again-new-7d1e");
    assert_ne!(new.arn(), old.arn());
}

// --------------------------------------------------------------------------
// 5. what the crate gives back: the broker's streams, the caller's time

/// Waits (up to 5 s) until `read` says `expected`, then checks it still
/// does a second later.
async fn settles_at<F, Fut>(read: F, expected: u64, what: &str)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = u64>,
{
    let started = Instant::now();
    loop {
        let now = read().await;
        if now == expected {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{what}: {now}, not {expected}, after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(read().await, expected, "{what}: did not stay at {expected}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_watches_and_evicted_names_end_their_streams_on_the_broker() {
    const TEST: &str = "client_streams_end";
    let moto = Moto::start(TEST);
    moto.create_secret("insurecove/streams/a", "client-test-streams-a")
        .await;
    moto.create_secret("insurecove/streams/b", "client-test-streams-b")
        .await;
    let mut broker = Broker::spawn(BrokerSpec::aws(TEST, &moto));
    let client = plaintext_client(&broker).await;
    broker.wait_ready(|| client.check_upstream()).await;
    let watchers = || async { client.get_cache_stats().await.unwrap().watchers };

    // A quiet secret's watch, dropped after its first event: nothing more
    // would come on it to notice that nobody listens.
    let mut events = client.watch_secret("streams/a");
    next_event(&mut events, "the watch's first event").await;
    assert_eq!(watchers().await, 1);
    drop(events);
    settles_at(watchers, 0, "open streams after the watch was dropped").await;

    // One name held at most: reading b drops a, and a's stream with it.
    let cached = client.cached(secrets_broker_client::CacheLimits {
        max_entries: 1,
        max_stale: Duration::from_secs(30),
    });
    cached.get("streams/a").await.unwrap();
    settles_at(watchers, 1, "open streams with a held").await;
    cached.get("streams/b").await.unwrap();
    assert_eq!(cached.len(), 1);
    settles_at(watchers, 1, "open streams once b took a's place").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_takes_at_most_its_timeout_retries_included() {
    const TEST: &str = "client_call_timeout";
    const NAME: &str = "insurecove/timeout/api-token";
    let moto = Moto::start(TEST);
    moto.create_secret(NAME, "client-test-timeout").await;
    let mut broker = Broker::spawn(BrokerSpec::aws(TEST, &moto));
    let timeout = Duration::from_millis(1500);
    let mut config = ClientConfig::new(broker.addr());
    config.request_timeout = timeout;
    config.max_retries = 3;
    let client = SecretsClient::connect(config).await.unwrap();
    broker.wait_ready(|| client.check_upstream()).await;
    client.get_secret(NAME).await.expect("a first read");

    // A broker that hangs: each attempt would wait out the whole timeout.
    broker.pause(true);
    let started = Instant::now();
    let result = client.get_secret(NAME).bypass_cache().await;
    let took = started.elapsed();
    broker.pause(false);
    let error = result.expect_err("a hung broker gave an answer");
    assert!(error.is_retryable(), "{error}");
    assert!(
        took < timeout + Duration::from_millis(500),
        "the call took {took:?} with a timeout of {timeout:?}: {error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_waiting_for_its_connection_takes_at_most_its_timeout() {
    // A listener that never accepts, its queue full: a connection attempt
    // hangs, as towards an address whose packets are dropped.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let connect = || {
        tokio::time::timeout(
            Duration::from_millis(300),
            tokio::net::TcpStream::connect(addr),
        )
    };
    let mut queued = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(stream)) = connect().await {
            queued.push(stream);
        }
    }
    assert!(connect().await.is_err(), "the listener's queue is not full");

    let timeout = Duration::from_millis(1500);
    let mut config = ClientConfig::new(addr.to_string());
    config.request_timeout = timeout;
    config.connect_timeout = Duration::from_secs(5);
    let client = SecretsClient::connect(config).await.unwrap();
    let started = Instant::now();
    let read = client.get_secret(MISTRAL).await;
    let read_took = started.elapsed();
    let started = Instant::now();
    let cleared = client.clear_cache(&[]).await;
    let clear_took = started.elapsed();
    for (call, result, took) in [
        ("GetSecret", read.map(|_| ()), read_took),
        ("ClearCache", cleared.map(|_| ()), clear_took),
    ] {
        let error = result.expect_err("nothing answered, yet a call succeeded");
        assert!(
            took < timeout + Duration::from_millis(500),
            "{call} took {took:?} with a timeout of {timeout:?}: {error}"
        );
        assert!(error.is_retryable(), "{call}: {error}");
        assert!(
            error.to_string().contains("timed out"),
            "{call}: the error does not say it timed out: {error}"
        );
    }
    drop(queued);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_stops_answering_is_noticed_well_within_max_stale() {
    const TEST: &str = "client_frozen_broker";
    const NAME: &str = "insurecove/frozen/api-token";
    let moto = Moto::start(TEST);
    moto.create_secret(NAME, "client-test-frozen").await;
    let mut broker = Broker::spawn(BrokerSpec::aws(TEST, &moto));
    let client = plaintext_client(&broker).await;
    broker.wait_ready(|| client.check_upstream()).await;
    let events = client.watch_secret(NAME);
    let mut connected = events.connected();
    within(
        Duration::from_secs(10),
        "the stream connects",
        connected.wait_for(|up| *up),
    )
    .await
    .expect("the watch goes on");

    // Frozen, the broker keeps its connections open but says nothing:
    // only the keep-alive can tell (a cached value is vouched for by its
    // stream, and served for max_stale, 30 s by default, after a break).
    broker.pause(true);
    let started = Instant::now();
    let noticed = tokio::time::timeout(Duration::from_secs(25), connected.wait_for(|up| !*up))
        .await
        .map(|seen| seen.is_ok());
    let took = started.elapsed();
    broker.pause(false);
    assert_eq!(noticed, Ok(true), "not noticed within {took:?}");
    assert!(took < Duration::from_secs(12), "noticed after {took:?}");
    // Why, in words that do not send the reader to TLS settings.
    let failure = events
        .last_failure()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        failure.contains("broke during the call") && !failure.contains("TLS"),
        "{failure}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_that_cannot_connect_says_why() {
    let port = support::free_port();
    let endpoint = format!("127.0.0.1:{port}");
    let client = SecretsClient::connect(ClientConfig::new(endpoint.clone()))
        .await
        .unwrap();
    let events = client.watch_secret("mistral-api-key");
    assert!(events.last_failure().is_none());
    let mut connected = events.connected();
    within(
        Duration::from_secs(10),
        "a failed attempt",
        connected.changed(),
    )
    .await
    .expect("the watch goes on");
    assert!(!*connected.borrow());
    let failure = events.last_failure().expect("the failure is kept");
    let shown = failure.to_string();
    assert!(
        matches!(failure, Error::Unreachable { .. }) && shown.contains(&endpoint),
        "{shown}"
    );
    assert!(shown.to_lowercase().contains("refused"), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bypass_read_aws_cannot_answer_is_an_error_not_the_older_value() {
    const TEST: &str = "client_bypass_down";
    const NAME: &str = "insurecove/bypass/api-token";
    let mut moto = Moto::start(TEST);
    moto.create_secret(NAME, "client-test-bypass-v1").await;
    let mut broker = Broker::spawn(BrokerSpec::aws(TEST, &moto));
    let client = plaintext_client(&broker).await;
    broker.wait_ready(|| client.check_upstream()).await;
    client.get_secret(NAME).await.expect("a first read");

    moto.stop();
    let error = client
        .get_secret(NAME)
        .bypass_cache()
        .await
        .expect_err("AWS is down: a bypass read has no answer");
    assert!(matches!(error, Error::Unavailable { .. }), "{error:?}");
    assert_eq!(error.reason(), Some("UPSTREAM_UNAVAILABLE"), "{error}");
    assert_no_value(&error, &["client-test-bypass-v1"]);
    // A read without bypass still gets the value the broker holds.
    let held = client.get_secret(NAME).await.expect("the cached value");
    assert_eq!(text(&held), "client-test-bypass-v1");
}

#[tokio::test]
async fn tls_files_that_cannot_work_are_named_when_the_client_is_made() {
    let pki = Pki::new();
    let mine = pki.client("tls-files", "spiffe://insurecove/tls-files");
    let other = pki.client("tls-other", "spiffe://insurecove/tls-other");
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let made = |ca: &std::path::Path, cert: &std::path::Path, key: &std::path::Path| {
        let config = ClientConfig::new("127.0.0.1:1").with_tls(ca, cert, key);
        async move {
            SecretsClient::connect(config)
                .await
                .err()
                .map(|e| e.to_string())
        }
    };

    assert_eq!(made(&pki.ca(), &mine.cert, &mine.key).await, None);
    for (ca, cert, key, expected) in [
        (&pki.ca(), &mine.cert, &other.key, "BROKER_KEY_FILE"),
        (&garbage, &mine.cert, &mine.key, "BROKER_CA_FILE"),
        (&pki.ca(), &garbage, &mine.key, "BROKER_CERT_FILE"),
        (&pki.ca(), &mine.cert, &mine.cert, "BROKER_KEY_FILE"),
    ] {
        let refused = made(ca, cert, key)
            .await
            .unwrap_or_else(|| panic!("{expected}: the client was made"));
        assert!(refused.contains(expected), "{refused}");
        assert!(!refused.contains("transport error"), "{refused}");
    }
    let mismatch = made(&pki.ca(), &mine.cert, &other.key).await.unwrap();
    assert!(
        mismatch.contains("is not the key of the certificate"),
        "{mismatch}"
    );
    let empty_ca = made(&garbage, &mine.cert, &mine.key).await.unwrap();
    assert!(empty_ca.contains("holds no PEM certificate"), "{empty_ca}");
}
