//! A clean stop: when the run returns, nothing of the broker is left.

use std::time::Duration;

use crate::harness::Running;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_run_the_port_is_free_and_no_task_is_left() {
    let tasks_before = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    let broker = Running::start(|_| {}).await;
    let addr = broker.addr;
    let client = broker.client().await;
    assert_eq!(
        client.get_secret("mistral-api-key").await.unwrap().name(),
        "insurecove/mistral-api-key"
    );
    drop(client);
    broker.stop().await;
    std::net::TcpListener::bind(addr).expect("the port can be bound again at once");
    // Tasks end asynchronously after being aborted; give them a moment.
    let mut alive = usize::MAX;
    for _ in 0..50 {
        alive = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        if alive <= tasks_before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        alive <= tasks_before,
        "{alive} tasks alive after the run, {tasks_before} before"
    );
}
