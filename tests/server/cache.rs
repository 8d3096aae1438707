//! The shared cache as a caller sees it.

use secrets_broker_client::proto::GetSecretRequest;

use crate::harness::Running;

#[tokio::test]
async fn the_second_read_is_a_cache_hit() {
    let broker = Running::start(|_| {}).await;
    let mut raw = broker.raw().await;
    let read = |bypass| GetSecretRequest {
        name: "production/jwt".into(),
        bypass_cache: bypass,
        ..Default::default()
    };
    let first = raw.get_secret(read(false)).await.unwrap().into_inner();
    let second = raw.get_secret(read(false)).await.unwrap().into_inner();
    let hit = |response: &secrets_broker_client::proto::GetSecretResponse| {
        response
            .secret
            .as_ref()
            .unwrap()
            .cache
            .as_ref()
            .unwrap()
            .hit
    };
    assert!(!hit(&first) && hit(&second));
    let bypassed = raw.get_secret(read(true)).await.unwrap().into_inner();
    assert!(!hit(&bypassed), "a bypass read asks the store");
    drop(raw);
    broker.stop().await;
}
