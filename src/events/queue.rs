//! The SQS side of the event path: the queue read, and in topic mode the
//! queue the broker makes for itself, subscribes to the topic, and removes
//! on a graceful shutdown.
//!
//! Each replica needs a queue of its own for SNS to fan out to. Its name
//! is `secrets-broker-`, the host's (pod's) name and a random part, at most
//! 80 characters: replicas on one host must not collide, and AWS refuses a
//! name deleted less than 60 seconds ago, which a restarted pod would
//! otherwise reuse. Retention is short (`RETENTION`): a crashed replica's
//! queue holds only recent events until someone deletes it (README,
//! "Running a fleet"). The queue policy lets only the topic send to it.

use std::time::Duration;

use aws_sdk_sns::Client as SnsClient;
use aws_sdk_sqs::{
    Client as SqsClient,
    config::http::HttpResponse,
    config::timeout::TimeoutConfig,
    error::{ProvideErrorMetadata, SdkError},
    types::{DeleteMessageBatchRequestEntry, QueueAttributeName},
};

use crate::{
    backend::aws_error::{Service, Upstream, explain_call},
    config::EventSource,
};

/// The longest a receive waits for a message (SQS's maximum long poll).
const LONG_POLL: Duration = Duration::from_secs(20);
/// How long the broker's own queue keeps a message: events older than this
/// are covered by the sweep anyway.
const RETENTION: Duration = Duration::from_secs(300);
/// The most messages one receive returns (SQS's maximum).
const BATCH: i32 = 10;
/// How long a received message stays hidden from other receives. A
/// receive the broker gave up on (SQS unreachable for a while) may still
/// be held by SQS and take the next messages when it answers, to nobody:
/// they are hidden this long (30 s at SQS's default), then delivered
/// again. A batch is handled well within it; one handled past it (AWS slow)
/// comes again, and its events are known by id.
const VISIBILITY: Duration = Duration::from_secs(5);
/// Prefix of the queues the broker makes; the IAM policy scopes to it.
pub(super) const QUEUE_PREFIX: &str = "secrets-broker-";
/// AWS's longest queue name.
const MAX_QUEUE_NAME: usize = 80;

/// One message as received: its body and what deletes it.
pub(super) struct Received {
    pub(super) id: String,
    pub(super) body: String,
    pub(super) receipt: String,
}

/// A failed SQS or SNS call, in one line.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{action} failed: {detail}")]
pub(super) struct QueueError {
    action: &'static str,
    detail: String,
    /// SQS answered that the queue does not exist (deleted).
    pub(super) queue_gone: bool,
}

impl QueueError {
    fn of<E>(
        service: Service,
        action: &'static str,
        error: &SdkError<E, HttpResponse>,
        region: &str,
    ) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let upstream = Upstream::of(service, region, &|var| std::env::var(var).ok());
        // The query protocol's code, or the JSON protocol's.
        let queue_gone = error
            .as_service_error()
            .and_then(|e| e.code())
            .is_some_and(|code| {
                code == "QueueDoesNotExist" || code == "AWS.SimpleQueueService.NonExistentQueue"
            });
        Self {
            action,
            detail: explain_call(error, service, action, &upstream),
            queue_gone,
        }
    }
}

/// The queue being read; in topic mode, also what the broker made.
pub(super) struct Queue {
    sqs: SqsClient,
    url: String,
    /// For the messages of failed calls.
    region: String,
    owned: Option<Owned>,
}

/// What the broker made in topic mode, and removes on shutdown.
struct Owned {
    sns: SnsClient,
    topic: String,
    subscription: String,
}

impl Queue {
    /// Opens the source: the given queue, or a new queue subscribed to the
    /// given topic.
    ///
    /// In topic mode the queue is named `name`, the same for every attempt
    /// to open it (the consumer picks a new name only to make the queue
    /// again after it was deleted, since SQS refuses a name deleted less
    /// than 60 s ago): a queue made by an attempt whose subscription failed
    /// is kept and found again by the next attempt (CreateQueue of an
    /// existing name answers its URL), rather than a new one made and
    /// deleted at every retry. `remove_made` deletes it if the broker stops
    /// first.
    pub(super) async fn open(
        source: &EventSource,
        region: &str,
        name: &str,
    ) -> Result<Self, QueueError> {
        let config = crate::backend::aws::sdk_config(region).await;
        // A long poll outlasts the SDK's usual attempt timeout.
        let sqs_config = aws_sdk_sqs::config::Builder::from(&config)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(3))
                    .operation_attempt_timeout(LONG_POLL + Duration::from_secs(5))
                    .operation_timeout(LONG_POLL + Duration::from_secs(10))
                    .build(),
            )
            .build();
        let sqs = SqsClient::from_conf(sqs_config);
        match source {
            EventSource::Queue(url) => Ok(Self {
                sqs,
                url: url.clone(),
                region: region.to_owned(),
                owned: None,
            }),
            EventSource::Topic(topic) => {
                Self::subscribe(sqs, SnsClient::new(&config), topic, region, name).await
            }
        }
    }

    async fn subscribe(
        sqs: SqsClient,
        sns: SnsClient,
        topic: &str,
        region: &str,
        name: &str,
    ) -> Result<Self, QueueError> {
        let created = sqs
            .create_queue()
            .queue_name(name)
            .attributes(
                QueueAttributeName::MessageRetentionPeriod,
                RETENTION.as_secs().to_string(),
            )
            .tags("secrets-broker", "events-queue")
            .send()
            .await
            .map_err(|e| QueueError::of(Service::Sqs, "CreateQueue", &e, region))?;
        let url = created.queue_url().unwrap_or_default().to_owned();
        let mut queue = Self {
            sqs,
            url,
            region: region.to_owned(),
            owned: None,
        };
        let subscription = queue.attach(sns.clone(), topic).await?;
        queue.owned = Some(Owned {
            sns,
            topic: topic.to_owned(),
            subscription,
        });
        tracing::info!(queue = %queue.url, topic, "subscribed a queue of this broker to the events topic");
        Ok(queue)
    }

    /// What `check` says of the event source, reading only: the queue's
    /// message count (queue mode), or that the topic can be seen (topic mode).
    /// Nothing is received, made or subscribed, so a running broker reading
    /// the same queue loses nothing.
    pub(super) async fn check_source(
        source: &EventSource,
        region: &str,
    ) -> Result<String, QueueError> {
        let config = crate::backend::aws::sdk_config(region).await;
        match source {
            EventSource::Queue(url) => {
                let sqs = SqsClient::new(&config);
                let answer = sqs
                    .get_queue_attributes()
                    .queue_url(url)
                    .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
                    .send()
                    .await
                    .map_err(|e| QueueError::of(Service::Sqs, "GetQueueAttributes", &e, region))?;
                let waiting = answer
                    .attributes()
                    .and_then(|a| a.get(&QueueAttributeName::ApproximateNumberOfMessages))
                    .map_or("?", String::as_str)
                    .to_owned();
                Ok(format!("queue {url} answers ({waiting} messages waiting)"))
            }
            EventSource::Topic(topic) => {
                let sns = SnsClient::new(&config);
                sns.get_topic_attributes()
                    .topic_arn(topic)
                    .send()
                    .await
                    .map_err(|e| QueueError::of(Service::Sns, "GetTopicAttributes", &e, region))?;
                Ok(format!(
                    "topic {topic} answers (each replica subscribes a queue of its own at start)"
                ))
            }
        }
    }

    /// Deletes the queue named `name` if an attempt of this run made it
    /// (topic mode, the broker stopping before its subscription worked).
    pub(super) async fn remove_made(region: &str, name: &str) {
        let config = crate::backend::aws::sdk_config(region).await;
        let sqs = SqsClient::new(&config);
        let Ok(found) = sqs.get_queue_url().queue_name(name).send().await else {
            return;
        };
        let queue = Self {
            sqs,
            url: found.queue_url().unwrap_or_default().to_owned(),
            region: region.to_owned(),
            owned: None,
        };
        queue.delete_queue().await;
    }

    /// Lets only the topic send to the queue, and subscribes it.
    async fn attach(&self, sns: SnsClient, topic: &str) -> Result<String, QueueError> {
        let attributes = self
            .sqs
            .get_queue_attributes()
            .queue_url(&self.url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .map_err(|e| QueueError::of(Service::Sqs, "GetQueueAttributes", &e, &self.region))?;
        let queue_arn = attributes
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::QueueArn))
            .cloned()
            .unwrap_or_default();
        self.sqs
            .set_queue_attributes()
            .queue_url(&self.url)
            .attributes(QueueAttributeName::Policy, queue_policy(&queue_arn, topic))
            .send()
            .await
            .map_err(|e| QueueError::of(Service::Sqs, "SetQueueAttributes", &e, &self.region))?;
        let subscribed = sns
            .subscribe()
            .topic_arn(topic)
            .protocol("sqs")
            .endpoint(&queue_arn)
            .return_subscription_arn(true)
            .send()
            .await
            .map_err(|e| QueueError::of(Service::Sns, "Subscribe", &e, &self.region))?;
        Ok(subscribed.subscription_arn().unwrap_or_default().to_owned())
    }

    /// Whether the topic still delivers to this queue (topic mode; a
    /// given queue is someone else's to wire): its subscription is among
    /// the topic's. It may not be while the queue is there: unsubscribed by
    /// a person or a clean-up job, or the topic deleted and made again. SQS
    /// would then answer empty receives for ever, and the broker would
    /// report it consumes.
    pub(super) async fn still_subscribed(&self) -> Result<bool, QueueError> {
        let Some(owned) = &self.owned else {
            return Ok(true);
        };
        let mut page = None;
        // At most 100 subscriptions a page; a topic with thousands of
        // replicas' queues is read to the end all the same.
        loop {
            let listed = owned
                .sns
                .list_subscriptions_by_topic()
                .topic_arn(&owned.topic)
                .set_next_token(page)
                .send()
                .await
                .map_err(|e| {
                    QueueError::of(Service::Sns, "ListSubscriptionsByTopic", &e, &self.region)
                })?;
            let ours = |s: &aws_sdk_sns::types::Subscription| {
                s.subscription_arn() == Some(owned.subscription.as_str())
            };
            if listed.subscriptions().iter().any(ours) {
                return Ok(true);
            }
            match listed.next_token() {
                Some(next) if !next.is_empty() => page = Some(next.to_owned()),
                _ => return Ok(false),
            }
        }
    }

    /// The queue's URL.
    pub(super) fn url(&self) -> &str {
        &self.url
    }

    /// Whether the broker made this queue (topic mode).
    pub(super) fn is_own(&self) -> bool {
        self.owned.is_some()
    }

    /// The broker's own queue was said deleted: its subscription is
    /// removed (it would deliver to nothing), and the queue deleted in case
    /// SQS said so of a queue still there (it may, just after making one);
    /// that a deleted queue cannot be deleted again is no news.
    pub(super) async fn forget(self) {
        if let Some(owned) = &self.owned {
            self.unsubscribe(owned).await;
            let _ = self.sqs.delete_queue().queue_url(&self.url).send().await;
        }
    }

    /// Waits up to the long poll for up to `BATCH` messages.
    pub(super) async fn receive(&self) -> Result<Vec<Received>, QueueError> {
        let output = self
            .sqs
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(BATCH)
            .wait_time_seconds(LONG_POLL.as_secs() as i32)
            .visibility_timeout(VISIBILITY.as_secs() as i32)
            .send()
            .await
            .map_err(|e| QueueError::of(Service::Sqs, "ReceiveMessage", &e, &self.region))?;
        Ok(output
            .messages()
            .iter()
            .filter_map(|m| {
                Some(Received {
                    id: m.message_id().unwrap_or_default().to_owned(),
                    body: m.body().unwrap_or_default().to_owned(),
                    receipt: m.receipt_handle()?.to_owned(),
                })
            })
            .collect())
    }

    /// Deletes handled messages (whatever they said: no poison loops).
    pub(super) async fn delete(&self, receipts: Vec<String>) -> Result<(), QueueError> {
        if receipts.is_empty() {
            return Ok(());
        }
        let entries = receipts
            .into_iter()
            .enumerate()
            .filter_map(|(i, receipt)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(receipt)
                    .build()
                    .ok()
            })
            .collect();
        let output = self
            .sqs
            .delete_message_batch()
            .queue_url(&self.url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| QueueError::of(Service::Sqs, "DeleteMessageBatch", &e, &self.region))?;
        if !output.failed().is_empty() {
            tracing::warn!(
                failed = output.failed().len(),
                "some handled event messages could not be deleted; they will come again and be dropped as duplicates"
            );
        }
        Ok(())
    }

    /// In topic mode, unsubscribes and deletes the broker's own queue.
    pub(super) async fn close(self) {
        let Some(owned) = &self.owned else {
            return;
        };
        self.unsubscribe(owned).await;
        self.delete_queue().await;
    }

    async fn unsubscribe(&self, owned: &Owned) {
        if let Err(error) = owned
            .sns
            .unsubscribe()
            .subscription_arn(&owned.subscription)
            .send()
            .await
        {
            tracing::warn!(error = %QueueError::of(Service::Sns, "Unsubscribe", &error, &self.region), "could not unsubscribe this broker's queue from the events topic; not tried again (the clean-up job in the README removes what is left)");
        }
    }

    async fn delete_queue(&self) {
        match self.sqs.delete_queue().queue_url(&self.url).send().await {
            Ok(_) => tracing::info!(queue = %self.url, "deleted this broker's event queue"),
            Err(error) => {
                tracing::warn!(queue = %self.url, error = %QueueError::of(Service::Sqs, "DeleteQueue", &error, &self.region), "could not delete this broker's event queue; not tried again (the clean-up job in the README removes what is left)")
            }
        }
    }
}

/// `secrets-broker-<host>-<random>`, within SQS's alphabet and length.
pub(super) fn queue_name(host: &str) -> String {
    let random = format!("{:08x}", fastrand::u32(..));
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let host = if host.is_empty() { "broker" } else { &host };
    let room = MAX_QUEUE_NAME - QUEUE_PREFIX.len() - 1 - random.len();
    let host: String = host.chars().take(room).collect();
    format!("{QUEUE_PREFIX}{host}-{random}")
}

/// A queue policy that lets only `topic` send to the queue.
pub(super) fn queue_policy(queue_arn: &str, topic: &str) -> String {
    serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "OnlyTheSecretEventsTopic",
            "Effect": "Allow",
            "Principal": {"Service": "sns.amazonaws.com"},
            "Action": "sqs:SendMessage",
            "Resource": queue_arn,
            "Condition": {"ArnEquals": {"aws:SourceArn": topic}}
        }]
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_names_are_unique_valid_and_bounded() {
        let a = queue_name("api-7d9f8-xk2p1");
        let b = queue_name("api-7d9f8-xk2p1");
        assert_ne!(a, b, "two replicas on one host");
        assert!(a.starts_with("secrets-broker-api-7d9f8-xk2p1-"), "{a}");
        let long = queue_name(&"h.o/st".repeat(40));
        assert_eq!(long.len(), MAX_QUEUE_NAME);
        assert!(
            long.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
        assert!(queue_name("").starts_with("secrets-broker-broker-"));
    }

    #[test]
    fn the_queue_policy_admits_only_the_topic() {
        let topic = "arn:aws:sns:ap-east-1:123456789012:secret-events";
        let queue = "arn:aws:sqs:ap-east-1:123456789012:secrets-broker-x";
        let policy: serde_json::Value = serde_json::from_str(&queue_policy(queue, topic)).unwrap();
        let statements = policy["Statement"].as_array().unwrap();
        assert_eq!(statements.len(), 1);
        let only = &statements[0];
        assert_eq!(only["Effect"], "Allow");
        assert_eq!(
            only["Principal"],
            serde_json::json!({"Service": "sns.amazonaws.com"})
        );
        assert_eq!(only["Action"], "sqs:SendMessage");
        assert_eq!(only["Resource"], queue);
        assert_eq!(only["Condition"]["ArnEquals"]["aws:SourceArn"], topic);
    }
}
