//! A bound on what the broker asks of the upstream at once.
//!
//! At most `concurrency` upstream calls are under way; up to `queue` more
//! wait their turn (first come, first served), and past that a call fails at
//! once with `StoreError::QueueFull` (RESOURCE_EXHAUSTED to callers with
//! nothing cached). A flood of distinct misses therefore costs AWS a fixed
//! number of connections and requests at a time, instead of one each. A
//! waiting call gives up with its caller (the fetch's caller's deadline
//! ends it). The upstream health check takes a turn too, so that nothing
//! the broker sends AWS exceeds the bound.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering::Relaxed},
};

use async_trait::async_trait;
use tokio::sync::{Semaphore, SemaphorePermit};

use super::{SecretDescription, SecretPage, SecretStore, StoreError, VersionSelector};
pub use crate::config::UpstreamLimits;
use crate::secret::SecretVersion;

/// A store whose calls wait for one of `concurrency` turns.
pub struct BoundedStore {
    inner: Arc<dyn SecretStore>,
    turns: Semaphore,
    concurrency: usize,
    queue: usize,
    waiting: AtomicUsize,
    refused: AtomicUsize,
}

/// What the bound looks like now, for the stats and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UpstreamLoad {
    /// Calls under way.
    pub in_flight: u64,
    /// Calls waiting for a turn.
    pub waiting: u64,
    /// Calls refused because the queue was full, so far.
    pub refused: u64,
}

impl BoundedStore {
    /// Bounds the calls to `inner`.
    pub fn wrap(inner: Arc<dyn SecretStore>, limits: UpstreamLimits) -> Arc<Self> {
        let concurrency = limits.concurrency.max(1);
        Arc::new(Self {
            inner,
            turns: Semaphore::new(concurrency),
            concurrency,
            queue: limits.queue,
            waiting: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
        })
    }

    /// What the bound looks like now.
    pub fn load(&self) -> UpstreamLoad {
        UpstreamLoad {
            in_flight: self
                .concurrency
                .saturating_sub(self.turns.available_permits()) as u64,
            waiting: self.waiting.load(Relaxed) as u64,
            refused: self.refused.load(Relaxed) as u64,
        }
    }

    async fn turn(&self) -> Result<SemaphorePermit<'_>, StoreError> {
        if let Ok(turn) = self.turns.try_acquire() {
            return Ok(turn);
        }
        if self.waiting.fetch_add(1, Relaxed) >= self.queue {
            self.waiting.fetch_sub(1, Relaxed);
            self.refused.fetch_add(1, Relaxed);
            return Err(StoreError::QueueFull);
        }
        let _leave = LeaveQueue(&self.waiting);
        self.turns
            .acquire()
            .await
            .map_err(|_| StoreError::Unavailable {
                detail: "the broker is stopping".into(),
            })
    }
}

/// Leaves the queue when the wait ends, however it ends.
struct LeaveQueue<'a>(&'a AtomicUsize);

impl Drop for LeaveQueue<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

#[async_trait]
impl SecretStore for BoundedStore {
    async fn get_secret_value(
        &self,
        name: &str,
        selector: &VersionSelector,
    ) -> Result<SecretVersion, StoreError> {
        let _turn = self.turn().await?;
        self.inner.get_secret_value(name, selector).await
    }

    async fn describe_secret(&self, name: &str) -> Result<SecretDescription, StoreError> {
        let _turn = self.turn().await?;
        self.inner.describe_secret(name).await
    }

    async fn check(&self) -> Result<String, StoreError> {
        let _turn = self.turn().await?;
        self.inner.check().await
    }

    async fn list_secrets(
        &self,
        prefix: &str,
        page: Option<String>,
    ) -> Result<SecretPage, StoreError> {
        let _turn = self.turn().await?;
        self.inner.list_secrets(prefix, page).await
    }

    fn change_signal(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.inner.change_signal()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::backend::fake::FakeStore;

    #[tokio::test(start_paused = true)]
    async fn calls_wait_their_turn_and_the_queue_is_bounded() {
        let fake = FakeStore::with(&["s"]);
        *fake.delay.lock().unwrap() = Duration::from_secs(1);
        let store = BoundedStore::wrap(
            fake.clone(),
            UpstreamLimits {
                concurrency: 2,
                queue: 3,
            },
        );
        let calls: Vec<_> = (0..6)
            .map(|_| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    store
                        .get_secret_value("s", &VersionSelector::current())
                        .await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(
            store.load(),
            UpstreamLoad {
                in_flight: 2,
                waiting: 3,
                refused: 1
            }
        );
        let mut outcomes = Vec::new();
        for call in calls {
            outcomes.push(call.await.unwrap());
        }
        let refused = outcomes
            .iter()
            .filter(|o| matches!(o, Err(StoreError::QueueFull)))
            .count();
        assert_eq!((refused, outcomes.len() - refused), (1, 5));
        assert_eq!(
            fake.calls(),
            5,
            "never more than the bound at once, all served"
        );
        assert_eq!(store.load().waiting, 0);
    }
}
