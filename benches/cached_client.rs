//! Reads per second from the cached client (process memory, kept fresh by
//! WatchSecret) against plain GetSecret calls to the same broker, in the
//! same run: the broker runs in this process on the dev backend, the client
//! talks to it over loopback HTTP/2. Median of five rounds each, and their
//! ratio.
//!
//! Run: `cargo bench --bench cached_client`.

use std::time::{Duration, Instant};

use secrets_broker::{
    app::{App, Listeners},
    config::{BrokerArgs, Settings},
};
use secrets_broker_client::{CacheLimits, ClientConfig, SecretsClient};

const NAME: &str = "mistral-api-key";

/// Reads per second of `read`, done `count` times in sequence.
async fn rate<F, Fut>(count: u32, read: F) -> f64
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let started = Instant::now();
    for _ in 0..count {
        read().await;
    }
    f64::from(count) / started.elapsed().as_secs_f64()
}

fn median(mut rounds: Vec<f64>) -> f64 {
    rounds.sort_by(f64::total_cmp);
    rounds[rounds.len() / 2]
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let args = BrokerArgs {
            dev: true,
            listen: Some("127.0.0.1:0".into()),
            log_level: Some("ERROR".into()),
            ..BrokerArgs::default()
        };
        let settings = Settings::resolve(&args, &|_| None).expect("settings");
        let listeners = Listeners::bind(&settings).await.expect("bound");
        let addr = listeners.grpc_addr().expect("an address");
        let app = App::build(&settings, listeners).expect("built");
        tokio::spawn(app.run(std::future::pending()));

        let client = SecretsClient::connect(ClientConfig::new(addr.to_string()))
            .await
            .expect("a client");
        let cached = client.cached(CacheLimits::default());
        cached.get(NAME).await.expect("a first read");
        client.get_secret(NAME).await.expect("a plain read");
        tokio::time::sleep(Duration::from_millis(200)).await;

        let mut plain = Vec::new();
        let mut memory = Vec::new();
        for _ in 0..5 {
            plain.push(
                rate(2_000, || async {
                    client.get_secret(NAME).await.expect("a plain read");
                })
                .await,
            );
            memory.push(
                rate(500_000, || async {
                    cached.get(NAME).await.expect("a cached read");
                })
                .await,
            );
        }
        let (plain, memory) = (median(plain), median(memory));
        println!(
            "plain GetSecret: {plain:>12.0} reads/s  {:>9.0} ns/read",
            1e9 / plain
        );
        println!(
            "cached client:   {memory:>12.0} reads/s  {:>9.0} ns/read",
            1e9 / memory
        );
        println!(
            "cached / plain = {:.0}x (medians of 5 rounds)",
            memory / plain
        );
    });
}
