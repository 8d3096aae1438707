//! Errors carry their gRPC code and a machine-readable reason.

use secrets_broker_client::Error;

use crate::harness::Running;

#[tokio::test]
async fn errors_carry_their_code_and_reason() {
    let broker = Running::start(|_| {}).await;
    let client = broker.client().await;
    let missing = client.get_secret("no-such-secret").await.unwrap_err();
    assert_eq!(missing.reason(), Some("SECRET_NOT_FOUND"), "{missing}");
    let invalid = client.get_secret("has space").await.unwrap_err();
    assert!(
        matches!(&invalid, Error::InvalidArgument { field: Some(f), .. } if f == "name"),
        "{invalid}"
    );
    // A version that is not there is named, with its field.
    for (read, field, value) in [
        (
            client
                .get_secret("mistral-api-key")
                .version_stage("AWSPREVIOUS"),
            "version_stage",
            "AWSPREVIOUS",
        ),
        (
            client
                .get_secret("mistral-api-key")
                .version_id("no-such-version"),
            "version_id",
            "no-such-version",
        ),
    ] {
        let absent = read.await.unwrap_err();
        assert_eq!(absent.reason(), Some("SECRET_NOT_FOUND"), "{absent}");
        let shown = absent.to_string();
        assert!(
            shown.contains(field) && shown.contains(value) && shown.contains("mistral-api-key"),
            "{shown}"
        );
    }
    let smuggled = "arn:aws:secretsmanager:ap-east-1:123456789012:secret:a:b";
    let refused = client.get_secret(smuggled).await.unwrap_err();
    assert_eq!(refused.reason(), Some("INVALID_SECRET_NAME"), "{refused}");
    drop(client);
    broker.stop().await;
}
