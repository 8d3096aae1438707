"""A fleet of brokers on one moto: change events through SNS and SQS (moto's
own), the metadata sweep's freshness and cost, bad messages, an SQS outage,
and the clean-up of a broker's own queue on SIGTERM.

Events are what EventBridge would deliver: the tests publish the event JSON
to the SNS topic, send it to a queue, or (raw queue) route it through a
moto EventBridge rule whose target is the queue. Upstream calls are counted
by moto's request recorder; each broker signs with its own access key, so
the recorder tells the replicas apart.
"""

from __future__ import annotations

import datetime
import json
import time

import grpc

import support
from moto_support import REGION, MotoServer
from watch_support import Watch, event_name, stats

LONG_TTL = "3600"
PUSH_BOUND = 2.0        # an event reaches every replica within this
SWEEP_BOUND = 2.5       # the sweep at 1 s finds a rotation within this
TOPIC = "secret-events"


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def label_event(moto: MotoServer, name: str, version: str, event_id: str) -> str:
    """EventBridge's "Secret Label Updated" for AWSCURRENT moved to version."""
    arn = moto.client.describe_secret(SecretId=name)["ARN"]
    return json.dumps({
        "version": "0", "id": event_id, "source": "aws.secretsmanager",
        "detail-type": "Secret Label Updated", "account": "123456789012",
        "time": now_rfc3339(), "region": REGION, "resources": [arn],
        "detail": {"name": name, "labelUpdated": "AWSCURRENT", "versionId": version},
    })


def cloudtrail_event(call: str, secret_id: str, event_id: str) -> str:
    return json.dumps({
        "version": "0", "id": event_id, "source": "aws.secretsmanager",
        "detail-type": "AWS API Call via CloudTrail", "time": now_rfc3339(),
        "detail": {
            "eventSource": "secretsmanager.amazonaws.com", "eventName": call,
            "requestParameters": {"secretId": secret_id},
        },
    })


def replica_env(moto: MotoServer, i: int, extra: dict | None = None) -> dict[str, str]:
    """Each replica signs with its own key (moto accepts any): the recorder
    tells them apart. All share HOSTNAME, as pods of one host could not,
    to show that queue names still differ."""
    return moto.broker_env() | {"AWS_ACCESS_KEY_ID": f"replica{i}", "HOSTNAME": "fleet-host"} | (extra or {})


def get(broker, stubs, name: str):
    pb = stubs.secrets_service_pb2
    return broker.secrets().GetSecret(pb.GetSecretRequest(name=name), timeout=10).secret


def check_upstream(broker, stubs):
    return broker.admin().CheckUpstream(stubs.admin_service_pb2.CheckUpstreamRequest(), timeout=15)


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.1f} s")
        time.sleep(0.05)


def wait_consuming(broker, stubs, timeout: float = 15.0):
    return wait_until(
        lambda: (lambda e: e if e.state == "consuming" else None)(check_upstream(broker, stubs).events),
        timeout, "the event consumer reading its queue",
    )


def fresh_everywhere(brokers, stubs, short: str, version: str, bound: float) -> float:
    """Polls plain GetSecret on every broker until all answer `version`;
    returns the seconds it took."""
    started = time.monotonic()
    pending = set(range(len(brokers)))
    while pending:
        for i in list(pending):
            if get(brokers[i], stubs, short).version_id == version:
                pending.discard(i)
        elapsed = time.monotonic() - started
        if pending and elapsed > bound:
            raise AssertionError(f"replicas {sorted(pending)} still serve an old version after {elapsed:.2f} s")
        time.sleep(0.02)
    return time.monotonic() - started


def value_reads(moto: MotoServer, key: str, name: str) -> int:
    return sum(
        1 for r in moto.recorded()
        if r.access_key == key and r.target == "secretsmanager.GetSecretValue" and r.secret_id == name
    )


def queue_depth(sqs, url: str) -> int:
    attrs = sqs.get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])


# --------------------------------------------------------------------------
# 1. Three replicas, one topic: each subscribes a queue of its own


def test_three_replicas_on_a_topic_are_fresh_within_two_seconds(moto, start_broker, stubs):
    name = "insurecove/fleet/db"
    v1 = moto.create_secret(name, "fleet-db-v1-7f3a")
    sns, sqs = moto.boto("sns"), moto.boto("sqs")
    topic = sns.create_topic(Name=TOPIC)["TopicArn"]
    brokers = [
        start_broker(["--events-topic-arn", topic, "--cache-ttl", LONG_TTL, "--watch-interval", "60"],
                     env=replica_env(moto, i), dev=False)
        for i in range(3)
    ]
    queues = [wait_consuming(b, stubs).queue_url for b in brokers]
    assert len(set(queues)) == 3, f"one queue per replica, even on one host: {queues}"
    assert all("/secrets-broker-fleet-host-" in q for q in queues), queues
    subscriptions = sns.list_subscriptions_by_topic(TopicArn=topic)["Subscriptions"]
    assert len(subscriptions) == 3, subscriptions

    for b in brokers:
        assert get(b, stubs, "fleet/db").version_id == v1
        assert get(b, stubs, "fleet/db").cache.hit, "cached before the rotation"
    watches = [Watch(b, stubs, "fleet/db") for b in brokers]
    for w in watches:
        first, _ = w.next(5)
        assert event_name(stubs, first) == "WATCH_EVENT_TYPE_CURRENT"

    moto.start_recording()
    v2 = moto.put_secret_value(name, "fleet-db-v2-7f3a")
    sns.publish(TopicArn=topic, Message=label_event(moto, name, v2, "rotation-1"))
    took = fresh_everywhere(brokers, stubs, "fleet/db", v2, PUSH_BOUND)
    print(f"\nthree replicas on a topic: fresh everywhere {took:.3f} s after the event")

    for w in watches:
        msg, _ = w.next(PUSH_BOUND)
        assert (event_name(stubs, msg), msg.secret.version_id) == ("WATCH_EVENT_TYPE_ROTATED", v2)
        w.close()
    for i, b in enumerate(brokers):
        assert get(b, stubs, "fleet/db").cache.hit, "served from the cache, no bypass"
        assert value_reads(moto, f"replica{i}", name) <= 1, f"replica {i} read the value more than once"
        s = stats(b, stubs)
        assert (s.events_received, s.events_applied) == (1, 1), s


# --------------------------------------------------------------------------
# 2. Two replicas, each on its own queue: raw events and SNS envelopes


def test_raw_and_sns_wrapped_queues(moto, start_broker, stubs):
    name = "insurecove/fleet/api"
    v1 = moto.create_secret(name, "fleet-api-v1-19be")
    sqs, sns, events = moto.boto("sqs"), moto.boto("sns"), moto.boto("events")

    # raw: a moto EventBridge rule delivers the event itself to the queue
    raw_url = sqs.create_queue(QueueName="events-raw")["QueueUrl"]
    raw_arn = sqs.get_queue_attributes(QueueUrl=raw_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    events.put_rule(Name="secret-events", EventPattern=json.dumps({"source": ["aws.secretsmanager"]}))
    events.put_targets(Rule="secret-events", Targets=[{"Id": "raw", "Arn": raw_arn}])
    # wrapped: a topic with raw delivery off puts SNS envelopes in the queue
    wrapped_url = sqs.create_queue(QueueName="events-wrapped")["QueueUrl"]
    wrapped_arn = sqs.get_queue_attributes(QueueUrl=wrapped_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    topic = sns.create_topic(Name=TOPIC)["TopicArn"]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=wrapped_arn)

    args = ["--cache-ttl", LONG_TTL, "--watch-interval", "60"]
    raw = start_broker([*args, "--events-queue-url", raw_url], env=replica_env(moto, 0), dev=False)
    wrapped = start_broker([*args, "--events-queue-url", wrapped_url], env=replica_env(moto, 1), dev=False)
    brokers = [raw, wrapped]
    for b in brokers:
        wait_consuming(b, stubs)
        assert get(b, stubs, "fleet/api").version_id == v1

    v2 = moto.put_secret_value(name, "fleet-api-v2-19be")
    event = json.loads(label_event(moto, name, v2, "rotation-2"))
    events.put_events(Entries=[{
        "Source": event["source"], "DetailType": event["detail-type"],
        "Detail": json.dumps(event["detail"]), "Resources": event["resources"],
    }])
    sns.publish(TopicArn=topic, Message=json.dumps(event))
    took = fresh_everywhere(brokers, stubs, "fleet/api", v2, PUSH_BOUND)
    print(f"\nraw and SNS-wrapped queues: fresh on both {took:.3f} s after the events")
    for b, url in ((raw, raw_url), (wrapped, wrapped_url)):
        assert stats(b, stubs).events_applied == 1
        wait_until(lambda: queue_depth(sqs, url) == 0, 5, "the queue drained")
    # the queues were given, not made: they stay
    assert {raw_url, wrapped_url} <= set(sqs.list_queues().get("QueueUrls", []))
    # A message a receive takes is hidden 5 s, not SQS's default 30 s: a
    # receive the broker gave up on (SQS unreachable for a while) may take
    # the next events when SQS answers it, and they come again that soon.
    moto.start_recording()
    wait_until(lambda: any(r.target == "AmazonSQS.ReceiveMessage" for r in moto.recorded()), 30, "a receive")
    receives = [r for r in moto.recorded() if r.target == "AmazonSQS.ReceiveMessage"]
    assert all(r.params.get("VisibilityTimeout") == 5 for r in receives), [r.params for r in receives]


# --------------------------------------------------------------------------
# 3. No queue: the sweep alone, 100 cached secrets


def test_sweep_of_100_cached_secrets_is_cheap_and_finds_a_rotation(moto, start_broker, stubs):
    names = [f"insurecove/swept/s{i:03d}" for i in range(100)]
    for n in names:
        moto.create_secret(n, f"swept-value-{n[-3:]}-c0de")
    broker = start_broker(["--watch-interval", "1", "--cache-ttl", LONG_TTL],
                          env=replica_env(moto, 0), dev=False)
    for n in names:
        get(broker, stubs, n)
    assert stats(broker, stubs).total_entries == 100

    # nothing changes: the rounds' calls, from moto's side
    wait_until(lambda: stats(broker, stubs).watch_rounds >= 1, 5, "a first round")
    moto.start_recording()
    r0 = stats(broker, stubs).watch_rounds
    time.sleep(4.2)
    r1 = stats(broker, stubs).watch_rounds
    recorded = [r for r in moto.recorded() if r.access_key == "replica0"]
    rounds = r1 - r0
    # the upstream health check's ListSecrets (MaxResults=1, no filter) aside
    sweep = [r for r in recorded if not r.is_health_check]
    reads = [r for r in sweep if r.target in ("secretsmanager.GetSecretValue", "secretsmanager.BatchGetSecretValue")]
    print(f"\nsweep of 100 cached secrets: {rounds} rounds, {len(sweep)} upstream calls, {len(reads)} value reads")
    assert rounds >= 3
    assert len(sweep) <= 5 * (rounds + 1), f"{len(sweep)} calls in {rounds} rounds"
    assert reads == [], "nothing changed: no value read"

    v2 = moto.put_secret_value(names[42], "swept-value-042-rotated")
    started = time.monotonic()
    wait_until(lambda: get(broker, stubs, names[42]).version_id == v2, SWEEP_BOUND, "the rotation served")
    print(f"sweep at 1 s: rotation served after {time.monotonic() - started:.3f} s")
    assert get(broker, stubs, names[42]).cache.hit


# --------------------------------------------------------------------------
# 4. Bad messages, and an SQS outage


def test_bad_messages_are_dropped_and_the_queue_drains(moto, start_broker, stubs):
    kept, gone = "insurecove/fleet/kept", "insurecove/fleet/gone"
    v1 = moto.create_secret(kept, "fleet-kept-v1-aa11")
    moto.create_secret(gone, "fleet-gone-v1-aa11")
    sqs = moto.boto("sqs")
    url = sqs.create_queue(QueueName="events-bad")["QueueUrl"]
    broker = start_broker(["--events-queue-url", url, "--cache-ttl", LONG_TTL, "--watch-interval", "60"],
                          env=replica_env(moto, 0), dev=False)
    wait_consuming(broker, stubs)
    assert get(broker, stubs, "fleet/kept").version_id == v1
    get(broker, stubs, "fleet/gone")
    w = Watch(broker, stubs, "fleet/gone")
    w.next(5)

    canary = "malformed-canary-5e1f"
    foreign = json.loads(label_event(moto, kept, v1, "foreign-1"))
    foreign["source"] = "aws.ec2"
    moto.delete_secret(gone)
    bodies = [
        '{"not": "an event", "canary": "' + canary + '"',         # not even JSON
        json.dumps(foreign),
        label_event(moto, kept, v1, "current-1"),                 # already current
        cloudtrail_event("PutSecretValue", "insurecove/fleet/never-read", "uncached-1"),
        cloudtrail_event("DeleteSecret", gone, "delete-1"),
        cloudtrail_event("DeleteSecret", gone, "delete-1"),       # a duplicate
        json.dumps({"Type": "SubscriptionConfirmation", "SubscribeURL": "http://127.0.0.1:9/never"}),
    ]
    for body in bodies:
        sqs.send_message(QueueUrl=url, MessageBody=body)

    wait_until(lambda: queue_depth(sqs, url) == 0, 10, "the queue drained")
    msg, _ = w.next(PUSH_BOUND)
    assert event_name(stubs, msg) == "WATCH_EVENT_TYPE_DELETED"
    w.close()
    s = wait_until(lambda: (lambda s: s if s.events_received == len(bodies) else None)(stats(broker, stubs)),
                   5, "every message counted")
    assert (s.events_applied, s.events_ignored, s.events_failed) == (1, len(bodies) - 1, 0), s
    assert get(broker, stubs, "fleet/kept").version_id == v1
    support.expect_error(lambda: get(broker, stubs, "fleet/gone"), grpc.StatusCode.NOT_FOUND, "SECRET_DELETED")
    assert canary not in broker.log(), "a message body reached the log"
    assert "an unreadable event message; dropped" in broker.log()
    assert broker.health() == "SERVING"


def test_an_sqs_outage_warns_the_sweep_goes_on_and_consumption_resumes(moto, moto_server_bin, log_path, tmp_path,
                                                                     start_broker, stubs):
    name = "insurecove/fleet/outage"
    v1 = moto.create_secret(name, "fleet-outage-v1-be77")
    # SQS on a moto of its own: stopping it takes only SQS away
    queues = MotoServer(moto_server_bin, log_path("-sqs"), tmp_path / "sqs-moto")
    queues.start()
    try:
        sqs = queues.boto("sqs")
        url = sqs.create_queue(QueueName="events-outage")["QueueUrl"]
        env = replica_env(moto, 0, {"AWS_ENDPOINT_URL_SQS": queues.url})
        broker = start_broker(["--events-queue-url", url, "--cache-ttl", LONG_TTL, "--watch-interval", "1"],
                              env=env, dev=False)
        wait_consuming(broker, stubs)
        assert get(broker, stubs, "fleet/outage").version_id == v1

        queues.stop()
        wait_until(lambda: check_upstream(broker, stubs).events.state == "failing", 30, "the consumer failing")
        events = check_upstream(broker, stubs).events
        assert "ReceiveMessage" in events.detail, events
        assert broker.health() == "SERVING", "an SQS outage never makes the broker unready"
        # A few retries (after 1 s, 2 s, ...), each logged at DEBUG only.
        wait_until(lambda: broker.log().count("the event queue still fails") >= 2, 15, "two retries")
        failed = [line for line in broker.log().splitlines() if "reading the event queue failed" in line]
        # Said once while it lasts, in one short line that names the cause.
        assert len(failed) == 1, failed
        assert len(failed[0]) < 400 and "connection refused" in failed[0], failed[0]
        assert "DispatchFailure" not in failed[0] and "ReceiveMessage" in events.detail, (failed[0], events.detail)

        v2 = moto.put_secret_value(name, "fleet-outage-v2-be77")
        wait_until(lambda: get(broker, stubs, "fleet/outage").version_id == v2, SWEEP_BOUND,
                   "the sweep serving the rotation during the outage")

        queues.start()                       # same port; state is lost: same queue again
        queues.boto("sqs").create_queue(QueueName="events-outage")
        wait_consuming(broker, stubs, timeout=40)
        before = stats(broker, stubs).events_received
        v3 = moto.put_secret_value(name, "fleet-outage-v3-be77")
        queues.boto("sqs").send_message(QueueUrl=url, MessageBody=label_event(moto, name, v3, "after-outage"))
        handled = wait_until(
            lambda: (lambda s: s if s.events_applied + s.events_ignored > before else None)(stats(broker, stubs)),
            10, "an event handled after the outage")
        assert handled.events_received == before + 1, handled
        # applied, or already current when the 1 s sweep came first
        wait_until(lambda: get(broker, stubs, "fleet/outage").version_id == v3, PUSH_BOUND, "v3 served")
        assert "the event queue answers again" in broker.log()
    finally:
        queues.stop()


# --------------------------------------------------------------------------
# 5. SIGTERM removes the broker's own queue and subscription


def test_sigterm_removes_the_brokers_queue_and_subscription(moto, start_broker, stubs):
    sns, sqs = moto.boto("sns"), moto.boto("sqs")
    topic = sns.create_topic(Name=TOPIC)["TopicArn"]
    broker = start_broker(["--events-topic-arn", topic], env=replica_env(moto, 0), dev=False)
    url = wait_consuming(broker, stubs).queue_url
    assert url in sqs.list_queues(QueueNamePrefix="secrets-broker-").get("QueueUrls", [])
    policy = json.loads(sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["Policy"])["Attributes"]["Policy"])
    (statement,) = policy["Statement"]
    assert statement["Condition"]["ArnEquals"]["aws:SourceArn"] == topic
    assert len(sns.list_subscriptions_by_topic(TopicArn=topic)["Subscriptions"]) == 1

    broker.stop()                            # SIGTERM
    assert broker.proc.returncode == 0, broker.tail()
    assert sqs.list_queues(QueueNamePrefix="secrets-broker-").get("QueueUrls", []) == []
    assert sns.list_subscriptions_by_topic(TopicArn=topic)["Subscriptions"] == []
    assert "deleted this broker's event queue" in broker.log()


def test_a_replica_whose_queue_is_deleted_makes_a_new_one_and_hears_events_again(moto, start_broker, stubs):
    """A clean-up job (or a person) deletes a live replica's queue: the
    replica notices at its next receive, unsubscribes the dead queue, and
    subscribes a new one, rather than staying sweep-only until a restart."""
    name = "insurecove/fleet/requeued"
    moto.create_secret(name, "requeued-v1-11aa")
    sns, sqs = moto.boto("sns"), moto.boto("sqs")
    topic = sns.create_topic(Name=TOPIC)["TopicArn"]
    broker = start_broker(["--events-topic-arn", topic, "--cache-ttl", LONG_TTL, "--watch-interval", "60"],
                          env=replica_env(moto, 0), dev=False)
    first = wait_consuming(broker, stubs).queue_url
    get(broker, stubs, "fleet/requeued")

    sqs.delete_queue(QueueUrl=first)
    # The long poll under way (20 s) may end before SQS says the queue is gone.
    again = wait_until(
        lambda: (lambda e: e if e.state == "consuming" and e.queue_url != first else None)(
            check_upstream(broker, stubs).events),
        35, "a new queue, subscribed",
    )
    assert again.queue_url in sqs.list_queues(QueueNamePrefix="secrets-broker-").get("QueueUrls", [])
    subscriptions = sns.list_subscriptions_by_topic(TopicArn=topic)["Subscriptions"]
    assert len(subscriptions) == 1, f"the dead queue's subscription is removed: {subscriptions}"
    assert "this broker's event queue was deleted" in broker.log()

    v2 = moto.put_secret_value(name, "requeued-v2-11aa")
    sns.publish(TopicArn=topic, Message=label_event(moto, name, v2, "after-requeue"))
    fresh_everywhere([broker], stubs, "fleet/requeued", v2, PUSH_BOUND)


def test_a_replica_whose_queue_is_unsubscribed_subscribes_a_new_one(moto, start_broker, stubs):
    """A clean-up job that failed to read SQS (or a person) unsubscribes a
    live replica's queue, which is still there: SQS would answer empty
    receives for ever while the broker said it consumed. Within its sweep
    interval (and a long poll) the replica notices, makes a new queue and
    subscribes it, and hears events again."""
    name = "insurecove/fleet/unsubscribed"
    moto.create_secret(name, "unsubscribed-v1-2c4e")
    sns = moto.boto("sns")
    topic = sns.create_topic(Name=TOPIC)["TopicArn"]
    broker = start_broker(["--events-topic-arn", topic, "--cache-ttl", LONG_TTL, "--watch-interval", "2"],
                          env=replica_env(moto, 0), dev=False)
    first = wait_consuming(broker, stubs).queue_url
    get(broker, stubs, "fleet/unsubscribed")
    for subscription in sns.list_subscriptions_by_topic(TopicArn=topic)["Subscriptions"]:
        sns.unsubscribe(SubscriptionArn=subscription["SubscriptionArn"])

    again = wait_until(
        lambda: (lambda e: e if e.state == "consuming" and e.queue_url != first else None)(
            check_upstream(broker, stubs).events),
        35, "a new queue, subscribed",
    )
    subscriptions = sns.list_subscriptions_by_topic(TopicArn=topic)["Subscriptions"]
    assert [s["Endpoint"].rsplit(":", 1)[-1] for s in subscriptions] == [again.queue_url.rsplit("/", 1)[-1]]
    assert "no longer subscribed to the topic" in broker.log()

    v2 = moto.put_secret_value(name, "unsubscribed-v2-2c4e")
    sns.publish(TopicArn=topic, Message=label_event(moto, name, v2, "after-resubscribe"))
    fresh_everywhere([broker], stubs, "fleet/unsubscribed", v2, PUSH_BOUND)


def test_a_topic_that_cannot_be_subscribed_leaves_one_queue_then_none(moto, start_broker, stubs):
    """While the topic is missing, every retry finds the one queue this run
    made (no new queue per retry), the failure is said once, and SIGTERM
    removes the queue."""
    sqs = moto.boto("sqs")
    missing = "arn:aws:sns:us-east-1:123456789012:no-such-topic"
    broker = start_broker(["--events-topic-arn", missing], env=replica_env(moto, 0), dev=False)
    # The first attempt and two retries (after 1 s and 2 s).
    wait_until(lambda: broker.log().count("the event queue still fails") >= 2, 15, "two retries")
    made = sqs.list_queues(QueueNamePrefix="secrets-broker-").get("QueueUrls", [])
    assert len(made) == 1, made
    failures = [line for line in broker.log().splitlines() if "could not be opened" in line]
    assert len(failures) == 1 and "--events-topic-arn" in failures[0], failures
    broker.stop()                            # SIGTERM
    assert broker.proc.returncode == 0, broker.tail()
    assert sqs.list_queues(QueueNamePrefix="secrets-broker-").get("QueueUrls", []) == []
