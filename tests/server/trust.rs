//! An open mutual-TLS connection lasts only as long as its client's
//! certificate would pass a handshake: it is closed when the certificate
//! expires, and when a TLS reload takes its CA out of the client CA
//! bundle, watches included.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use secrets_broker_client::proto::{
    WatchEventType, WatchSecretRequest, secrets_service_client::SecretsServiceClient,
};

use crate::harness::{Issued, Pki, Running, Secrets, eventually, get, value};

const AUTH: &str = "spiffe://insurecove/auth-service";
const MISTRAL_VALUE: &str = "dev-mistral-key-NOT-A-REAL-KEY-0000";

fn policy(pki: &Pki) -> std::path::PathBuf {
    pki.write_policy(&format!(
        "[[grant]]\nidentity = \"{AUTH}\"\nsecrets = [\"insurecove/**\"]\n"
    ))
}

/// A client certificate for `AUTH` that expires `after` from now.
fn expiring(pki: &Pki, after: Duration) -> Issued {
    use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyUsagePurpose, SanType};
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![SanType::URI(AUTH.try_into().unwrap())];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_after = time::OffsetDateTime::now_utc() + after;
    pki.issue("expiring", params)
}

/// A reader on one connection: a watch open, and the stub.
async fn reading(
    broker: &Running,
    client: &Issued,
) -> (
    Secrets,
    tonic::Streaming<secrets_broker_client::proto::WatchSecretResponse>,
) {
    let mut stub = SecretsServiceClient::new(broker.mtls(client).await);
    assert_eq!(
        value(&get(&mut stub, "mistral-api-key").await.unwrap()),
        MISTRAL_VALUE
    );
    let request = WatchSecretRequest {
        name: "mistral-api-key".into(),
        ..Default::default()
    };
    let mut watch = stub.watch_secret(request).await.unwrap().into_inner();
    let first = watch.message().await.unwrap().expect("an event");
    assert_eq!(first.r#type(), WatchEventType::Current);
    (stub, watch)
}

/// Whether a new connection of `client` is served a read.
async fn served(broker: &Running, client: &Issued) -> bool {
    let Ok(channel) = broker.try_mtls(client).await else {
        return false;
    };
    get(&mut SecretsServiceClient::new(channel), "mistral-api-key")
        .await
        .is_ok()
}

/// How long until the watch ends (an error or its end), within `bound`.
async fn ends_within(
    watch: &mut tonic::Streaming<secrets_broker_client::proto::WatchSecretResponse>,
    bound: Duration,
) -> Duration {
    let started = Instant::now();
    let next = tokio::time::timeout(bound, watch.message())
        .await
        .expect("the connection was closed, and the watch with it");
    assert!(
        !matches!(next, Ok(Some(_))),
        "an event, not an end: {next:?}"
    );
    started.elapsed()
}

/// A client certificate for `AUTH` that also carries `count` DNS names.
fn with_dns_names(pki: &Pki, label: &str, count: usize) -> Issued {
    use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyUsagePurpose, SanType};
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![SanType::URI(AUTH.try_into().unwrap())];
    params.subject_alt_names.extend((0..count).map(|i| {
        SanType::DnsName(
            format!("replica-{i}.auth-service.insurecove.internal")
                .try_into()
                .unwrap(),
        )
    }));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    pki.issue(label, params)
}

/// A certificate the CA signed, far larger than a workload's (a thousand
/// DNS names, about 45 KB), is refused at the handshake: the connection
/// would keep it (twice) for its life, and every call's audit line would
/// show every name. One within the limits is served as before.
#[tokio::test]
async fn a_client_chain_past_the_size_limit_is_refused_at_the_handshake() {
    let pki = Pki::new();
    let broker = Running::start_tls(&pki, Some(policy(&pki))).await;
    let log = crate::harness::process_log();
    let start = log.position();
    let big = with_dns_names(&pki, "many-names", 1_000);
    assert!(
        !served(&broker, &big).await,
        "a 1,000-name certificate was served"
    );
    let said = log.since(start);
    assert!(
        said.contains("TLS handshake refused")
            && said.contains("bytes; the broker takes at most 16384"),
        "the refusal names the limit: {said}"
    );
    let fits = with_dns_names(&pki, "some-names", 40);
    assert!(
        served(&broker, &fits).await,
        "a 40-name certificate was refused"
    );
    broker.stop().await;
}

#[tokio::test]
async fn a_connection_ends_when_its_client_certificate_expires() {
    let pki = Pki::new();
    let broker = Running::start_tls(&pki, Some(policy(&pki))).await;
    let expires = Instant::now() + Duration::from_secs(3);
    let client = expiring(&pki, Duration::from_secs(3));
    let (_stub, mut watch) = reading(&broker, &client).await;
    ends_within(&mut watch, Duration::from_secs(10)).await;
    let ended = Instant::now();
    // Certificate times are whole seconds: its end is up to 1 s before
    // `expires`.
    assert!(
        ended + Duration::from_millis(1100) >= expires,
        "ended {:?} before the expiry",
        expires - ended
    );
    assert!(
        ended <= expires + Duration::from_secs(3),
        "ended {:?} after the expiry",
        ended - expires
    );
    // A valid certificate's connection is untouched.
    let fresh = pki.client("fresh", AUTH);
    let (mut stub, mut watch) = reading(&broker, &fresh).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), watch.message())
            .await
            .is_err()
    );
    assert_eq!(
        value(&get(&mut stub, "mistral-api-key").await.unwrap()),
        MISTRAL_VALUE
    );
    broker.stop().await;
}

#[tokio::test]
async fn a_connection_ends_when_a_reload_removes_its_ca() {
    let pki = Pki::new();
    let broker = Running::start_tls(&pki, Some(policy(&pki))).await;
    let client = pki.client("auth", AUTH);
    let (_stub, mut watch) = reading(&broker, &client).await;

    // Another CA beside this one: a reload that keeps trusting this
    // client, seen applied when a client of the other CA is served...
    let other = Pki::new();
    let ca = std::fs::read_to_string(pki.ca()).unwrap();
    let other_ca = std::fs::read_to_string(other.ca()).unwrap();
    crate::harness::replace_file(&pki.ca(), &format!("{ca}\n{other_ca}"));
    let newcomer = other.client("auth", AUTH);
    eventually(Duration::from_secs(5), "the other CA trusted", || {
        served(&broker, &newcomer)
    })
    .await;
    // ...and this client's connection goes on.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), watch.message())
            .await
            .is_err()
    );

    // Another CA only: the open connection is closed, its watch with it.
    crate::harness::replace_file(&pki.ca(), &other_ca);
    ends_within(&mut watch, Duration::from_secs(5)).await;
    broker.stop().await;
}

/// webpki checks no trust anchor's dates: the broker trusts the bundle's
/// CAs only within theirs, and reloads its config when one expires, so the
/// connections of the clients it signed are closed and new ones refused,
/// though their own certificates are still valid.
#[tokio::test]
async fn a_client_ca_that_expires_is_trusted_no_more() {
    let pki = Pki::new();
    let broker = Running::start_tls(&pki, Some(policy(&pki))).await;
    // Served once first: the broker follows its files by then.
    let (mut lasting, _watch) = reading(&broker, &pki.client("lasting", AUTH)).await;
    let expiring = Pki::with_ca_expiring(Duration::from_secs(6));
    let bundle = [pki.ca(), expiring.ca()].map(|ca| std::fs::read_to_string(ca).unwrap());
    crate::harness::replace_file(&pki.ca(), &bundle.join("\n"));
    let client = expiring.client("auth", AUTH);
    eventually(Duration::from_secs(5), "the second CA trusted", || {
        served(&broker, &client)
    })
    .await;
    let (_stub, mut watch) = reading(&broker, &client).await;

    ends_within(&mut watch, Duration::from_secs(12)).await;
    assert!(
        !served(&broker, &client).await,
        "a client of the expired CA was served again"
    );
    // The CA still in its dates goes on.
    assert_eq!(
        value(&get(&mut lasting, "mistral-api-key").await.unwrap()),
        MISTRAL_VALUE
    );
    broker.stop().await;
}

/// A CA added to the bundle ahead of its dates is taken in when they
/// begin: the reload that reads it finds no new CA to trust yet, only the
/// time when the trusted set changes.
#[tokio::test]
async fn a_client_ca_added_before_its_dates_is_trusted_when_they_begin() {
    let pki = Pki::new();
    let broker = Running::start_tls(&pki, Some(policy(&pki))).await;
    // Served once first: the broker follows its files by then.
    let _lasting = reading(&broker, &pki.client("lasting", AUTH)).await;
    let starting = Pki::with_ca_starting(Duration::from_secs(4));
    let bundle = [pki.ca(), starting.ca()].map(|ca| std::fs::read_to_string(ca).unwrap());
    crate::harness::replace_file(&pki.ca(), &bundle.join("\n"));
    let client = starting.client("auth", AUTH);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !served(&broker, &client).await,
        "a client of a CA not valid yet was served"
    );
    eventually(Duration::from_secs(10), "the CA trusted once valid", || {
        served(&broker, &client)
    })
    .await;
    broker.stop().await;
}

/// The bundle's only CA expires: no client is trusted from then on (the
/// config in force would go on trusting it), and the broker goes on
/// running, ready for a bundle that holds a CA in its dates.
#[tokio::test]
async fn when_the_only_client_ca_expires_no_client_is_trusted() {
    let pki = Pki::with_ca_expiring(Duration::from_secs(4));
    let broker = Running::start_tls(&pki, Some(policy(&pki))).await;
    let client = pki.client("auth", AUTH);
    let (_stub, mut watch) = reading(&broker, &client).await;
    ends_within(&mut watch, Duration::from_secs(10)).await;
    assert!(
        !served(&broker, &client).await,
        "a client of the expired CA was served again"
    );
    assert!(
        crate::harness::process_log()
            .text()
            .contains("no CA of the client CA bundle is within its dates"),
        "the log says why no client is trusted"
    );
    broker.stop().await;
}

/// A client that reconnects with the same TLS config (as tonic's channel
/// does) gets a full handshake each time: a resumed session would skip the
/// certificate's check, and a client whose certificate has expired would
/// be served again on every reconnect.
#[tokio::test]
async fn a_reconnecting_client_is_never_let_in_by_resuming_a_session() {
    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let pki = Pki::new();
    let broker = Running::start_tls(&pki, Some(policy(&pki))).await;
    let client = pki.client("auth", AUTH);
    let mut config = client.rustls_client(&pki.ca());
    // rustls keeps session tickets in memory by default: say so here, so
    // that the test cannot pass for want of a client that resumes.
    config.resumption = rustls::client::Resumption::in_memory_sessions(16);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from("localhost").unwrap();
    for attempt in 0..3 {
        let tcp = tokio::net::TcpStream::connect(broker.addr).await.unwrap();
        let mut tls = connector.connect(name.clone(), tcp).await.unwrap();
        assert_eq!(
            tls.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Full),
            "connection {attempt} resumed a session"
        );
        // Speak HTTP/2 and read the server's first frames: a TLS 1.3
        // server sends its session tickets before any data, and the
        // client stores them on reading, so none is missed.
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let read = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(n)) if n > 0),
            "the server's first frames: {read:?}"
        );
    }
    broker.stop().await;
}

/// A service's certificate renewed in place (as cert-manager does) is used
/// from the next connection on: the client crate reads its TLS files again
/// for each connection, so when the broker closes the connection of the
/// expiring certificate the client comes back with the renewed one,
/// without being made again.
#[tokio::test]
async fn the_client_crate_comes_back_with_a_certificate_renewed_in_place() {
    use secrets_broker_client::{ClientConfig, SecretsClient};

    let pki = Pki::new();
    let broker = Running::start_tls(&pki, Some(policy(&pki))).await;
    // Long enough for the first connection and read on a loaded machine.
    let files = expiring(&pki, Duration::from_secs(6));
    let expires = Instant::now() + Duration::from_secs(6);
    let config = ClientConfig::new(broker.addr.to_string())
        .with_tls(pki.ca(), &files.cert, &files.key)
        .with_tls_domain("localhost");
    let client = SecretsClient::connect(config).await.unwrap();
    let read = || async { client.get_secret("mistral-api-key").await };
    assert_eq!(read().await.unwrap().as_str().unwrap(), MISTRAL_VALUE);

    // Renewed: the same files, a certificate valid for an hour.
    let renewed = expiring(&pki, Duration::from_secs(3600));
    assert_eq!((renewed.cert, renewed.key), (files.cert, files.key));
    tokio::time::sleep_until((expires + Duration::from_secs(2)).into()).await;
    eventually(
        Duration::from_secs(10),
        "read with the renewed certificate",
        || async {
            read()
                .await
                .is_ok_and(|value| value.as_str() == Some(MISTRAL_VALUE))
        },
    )
    .await;
    broker.stop().await;
}

/// A TLS file that cannot be used when a connection is made (removed, or
/// half written during a renewal) fails the call (after its retries: a
/// renewal may be half done) with the crate's own words, naming the file.
#[tokio::test]
async fn a_tls_file_gone_when_the_client_connects_is_named() {
    use secrets_broker_client::{ClientConfig, Error, SecretsClient};

    let pki = Pki::new();
    let broker = Running::start_tls(&pki, Some(policy(&pki))).await;
    let files = pki.client("auth", AUTH);
    let mut config = ClientConfig::new(broker.addr.to_string())
        .with_tls(pki.ca(), &files.cert, &files.key)
        .with_tls_domain("localhost");
    config.max_retries = 0;
    let client = SecretsClient::connect(config).await.unwrap();
    // The connection is made at the first call: the key is gone by then.
    std::fs::remove_file(&files.key).unwrap();
    let error = client.get_secret("mistral-api-key").await.unwrap_err();
    assert!(
        matches!(&error, Error::Unreachable { reason, .. }
            if reason.contains("client configuration")
                && reason.contains(&*files.key.to_string_lossy())),
        "{error:?}"
    );
    broker.stop().await;
}
