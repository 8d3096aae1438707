"""WatchSecret (rotation notifications) against the real binary: moto as
AWS Secrets Manager, the file backend, grpcurl and grpc.aio for fan-out.

The sweep's cost is read from GetCacheStats (watch_rounds,
watch_upstream_calls) and from moto's request recorder.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time

import grpc
import pytest

import support
from support import expect_error
from watch_support import (
    FANOUT_REPORT,
    GET_SECRET_VALUE,
    LIST_SECRETS,
    Watch,
    describe,
    sweep_calls,
    event_name,
    promote,
    put_pending,
    quiet_stats,
    rss_kib,
    stats,
    wait_for_stats,
    watch_counters,
)

CURRENT = "WATCH_EVENT_TYPE_CURRENT"
ROTATED = "WATCH_EVENT_TYPE_ROTATED"
DELETED = "WATCH_EVENT_TYPE_DELETED"
RESTORED = "WATCH_EVENT_TYPE_RESTORED"

INTERVAL = 1                 # --watch-interval of the moto tests (seconds)
DETECT_BOUND = INTERVAL + 2  # a change must reach watchers within this
FIRST_BOUND = 2.0            # "at once": the first message / an error


def get(broker, stubs, name, **kw):
    pb = stubs.secrets_service_pb2
    return broker.secrets().GetSecret(pb.GetSecretRequest(name=name, **kw), timeout=10).secret


def refresh(broker, stubs, name):
    apb = stubs.admin_service_pb2
    return broker.admin().RefreshSecret(apb.RefreshSecretRequest(name=name), timeout=10)


def first_message(stubs, watch, bound=FIRST_BOUND):
    msg, at = watch.next(bound)
    assert at - watch.opened_at < bound, f"first message after {at - watch.opened_at:.2f} s"
    return msg


def assert_event(stubs, msg, event, *, name, version, value=None):
    """msg is `event` for secret `name` at `version`; value=None: no value."""
    got = (event_name(stubs, msg), msg.secret.name, msg.secret.version_id)
    assert got == (event, name, version), f"expected {(event, name, version)}, got {describe(stubs, msg)}"
    if value is None:
        assert msg.secret.WhichOneof("value") is None, f"a value in {describe(stubs, msg)}"
    else:
        assert msg.secret.string_value == value, f"wrong value in {describe(stubs, msg)}"
    assert msg.HasField("observed_at") and msg.observed_at.seconds > 0, msg.observed_at


def wait_rounds(broker, stubs, n, timeout):
    """Waits until the sweep has run n more rounds; returns the stats."""
    start = stats(broker, stubs).watch_rounds
    return wait_for_stats(
        broker, stubs, lambda s: s.watch_rounds >= start + n, timeout, f"{n} sweep rounds",
    )


# --------------------------------------------------------------------------
# 1. CURRENT at once, ROTATED within interval + 2 s, the cache follows


def test_current_then_rotated(moto, aws_broker, stubs):
    name = "insurecove/watch-basic"
    v1 = moto.create_secret(name, "basic-v1-5e1a")
    broker = aws_broker(["--watch-interval", str(INTERVAL)])

    w = Watch(broker, stubs, "watch-basic")
    msg = first_message(stubs, w)
    assert_event(stubs, msg, CURRENT, name=name, version=v1, value="basic-v1-5e1a")
    assert "AWSCURRENT" in msg.secret.version_stages, describe(stubs, msg)

    v2 = moto.put_secret_value(name, "basic-v2-5e1a")
    put_done = time.monotonic()
    msg, at = w.next(DETECT_BOUND)
    print(f"ROTATED {at - put_done:.2f} s after put-secret-value")
    assert at - put_done < DETECT_BOUND
    assert_event(stubs, msg, ROTATED, name=name, version=v2, value="basic-v2-5e1a")
    assert "AWSCURRENT" in msg.secret.version_stages, describe(stubs, msg)

    # the sweep put the new version in the cache in the same step
    got = get(broker, stubs, "watch-basic")
    assert (got.version_id, got.string_value, got.cache.hit) == (v2, "basic-v2-5e1a", True), got

    # one message per change: nothing more for the same version
    w.expect_nothing(1.5 * INTERVAL)
    s = stats(broker, stubs)
    assert (s.watchers, s.watched_secrets) == (1, 1), watch_counters(s)


# --------------------------------------------------------------------------
# 2. AWS-style rotation: AWSPENDING, then AWSCURRENT moved: one event


def test_staged_rotation_gives_exactly_one_event(moto, start_broker, stubs):
    """A version staged AWSPENDING is no change for an AWSCURRENT watcher;
    moving AWSCURRENT to it (UpdateSecretVersionStage) is one, found by the
    sweep in ListSecrets' stages and read by stage, once."""
    name = "insurecove/watch-staged"
    v1 = moto.create_secret(name, "staged-v1-c402")
    broker = start_broker(["--watch-interval", str(INTERVAL)], env=moto.broker_env(), dev=False)
    w = Watch(broker, stubs, "watch-staged")
    assert_event(stubs, first_message(stubs, w), CURRENT, name=name, version=v1, value="staged-v1-c402")

    v2 = put_pending(moto, name, "staged-v2-c402")
    # at least two sweep rounds see AWSPENDING only: no event
    rounds_before = stats(broker, stubs).watch_rounds
    w.expect_nothing(2.5 * INTERVAL)
    s = stats(broker, stubs)
    assert s.watch_rounds >= rounds_before + 2, watch_counters(s)

    promote(moto, name, v2, v1)
    moved = time.monotonic()
    by_stage = moto.client.get_secret_value(SecretId=name, VersionStage="AWSCURRENT")
    assert by_stage["VersionId"] == v2, "moto answers a read by stage with the moved version"
    msg, at = w.next(DETECT_BOUND)
    assert at - moved < DETECT_BOUND
    assert_event(stubs, msg, ROTATED, name=name, version=v2, value="staged-v2-c402")
    assert "AWSCURRENT" in msg.secret.version_stages, describe(stubs, msg)

    # at least three more rounds after the move: no second event
    rounds_after_event = stats(broker, stubs).watch_rounds
    w.expect_nothing(max(0.0, moved + 3.3 * INTERVAL - time.monotonic()))
    s = stats(broker, stubs)
    assert s.watch_rounds >= rounds_after_event + 2, watch_counters(s)
    assert [event_name(stubs, m) for m in w.received] == [CURRENT, ROTATED]


# --------------------------------------------------------------------------
# 3. Reconnect with since_version_id


def test_reconnect_with_since_version_id(moto, aws_broker, stubs):
    name = "insurecove/watch-reconnect"
    v1 = moto.create_secret(name, "reconnect-v1-81d0")
    broker = aws_broker(["--watch-interval", str(INTERVAL)])

    w = Watch(broker, stubs, "watch-reconnect")
    first = first_message(stubs, w)
    assert_event(stubs, first, CURRENT, name=name, version=v1, value="reconnect-v1-81d0")
    held = first.secret.version_id
    w.close()
    wait_for_stats(broker, stubs, lambda s: s.watchers == 0, 3, "the closed watcher is no longer counted")

    # rotated while nobody watches; give the broker more than a round
    v2 = moto.put_secret_value(name, "reconnect-v2-81d0")
    time.sleep(1.5 * INTERVAL)

    back = Watch(broker, stubs, "watch-reconnect", since_version_id=held)
    msg = first_message(stubs, back)
    if event_name(stubs, msg) != ROTATED or msg.secret.version_id != v2:
        try:
            later = describe(stubs, back.next(DETECT_BOUND)[0])
        except AssertionError as err:
            later = f"nothing ({err})"
        pytest.fail(
            f"reconnect with since_version_id={held} after a rotation to {v2}: first message "
            f"{describe(stubs, msg)} (expected ROTATED {v2}); next message within "
            f"{DETECT_BOUND} s: {later}"
        )
    assert_event(stubs, msg, ROTATED, name=name, version=v2, value="reconnect-v2-81d0")
    back.close()

    again = Watch(broker, stubs, "watch-reconnect", since_version_id=v2)
    assert_event(stubs, first_message(stubs, again), CURRENT, name=name, version=v2, value="reconnect-v2-81d0")
    again.expect_nothing(1.5 * INTERVAL)


# --------------------------------------------------------------------------
# 4. Delete (recovery window) and restore


def test_deleted_then_restored(moto, aws_broker, stubs):
    name = "insurecove/watch-delete"
    v1 = moto.create_secret(name, "delete-v1-3f77")
    broker = aws_broker(["--watch-interval", str(INTERVAL)])
    w = Watch(broker, stubs, "watch-delete")
    assert_event(stubs, first_message(stubs, w), CURRENT, name=name, version=v1, value="delete-v1-3f77")

    moto.delete_secret(name)  # default 30-day recovery window
    deleted = time.monotonic()
    msg, at = w.next(DETECT_BOUND)
    assert at - deleted < DETECT_BOUND
    assert_event(stubs, msg, DELETED, name=name, version=v1, value=None)
    assert b"delete-v1-3f77" not in msg.SerializeToString()
    # the cache follows: a read says deleted, not the old value
    expect_error(lambda: get(broker, stubs, "watch-delete"), grpc.StatusCode.NOT_FOUND,
                 "SECRET_DELETED", forbidden=("delete-v1-3f77",))

    moto.client.restore_secret(SecretId=name)
    restored = time.monotonic()
    msg, at = w.next(DETECT_BOUND)
    assert at - restored < DETECT_BOUND
    assert_event(stubs, msg, RESTORED, name=name, version=v1, value="delete-v1-3f77")
    w.expect_nothing(1.5 * INTERVAL)
    assert [event_name(stubs, m) for m in w.received] == [CURRENT, DELETED, RESTORED]


def test_new_watcher_of_known_deleted_secret_starts_with_deleted(moto, aws_broker, stubs):
    """The contract: the first message is DELETED if the topic is known deleted."""
    name = "insurecove/watch-known-deleted"
    v1 = moto.create_secret(name, "known-deleted-v1-0b9e")
    broker = aws_broker(["--watch-interval", str(INTERVAL)])
    w = Watch(broker, stubs, "watch-known-deleted")
    assert_event(stubs, first_message(stubs, w), CURRENT, name=name, version=v1, value="known-deleted-v1-0b9e")
    moto.delete_secret(name)
    assert_event(stubs, w.next(DETECT_BOUND)[0], DELETED, name=name, version=v1, value=None)

    # the topic is known deleted (w still watches it): a second watcher
    second = Watch(broker, stubs, "watch-known-deleted")
    try:
        msg = first_message(stubs, second)
    except AssertionError as err:
        pytest.fail(f"a new watcher of a secret its topic knows deleted: {err}")
    assert_event(stubs, msg, DELETED, name=name, version=v1, value=None)


# --------------------------------------------------------------------------
# 5. Fan-out: 1,000 watchers, one sweep call per round


FANOUT_CHANNELS = 4
FANOUT_PER_CHANNEL = 250
FANOUT = FANOUT_CHANNELS * FANOUT_PER_CHANNEL


async def _fanout(broker, stubs, moto, name, v1):
    """Opens FANOUT watchers, measures, rotates; returns a report dict."""
    pb = stubs.secrets_service_pb2
    options = support.CHANNEL_OPTIONS + [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(broker.addr, options=options) for _ in range(FANOUT_CHANNELS)]
    clients = [stubs.secrets_service_pb2_grpc.SecretsServiceStub(ch) for ch in channels]
    firsts: list = [None] * FANOUT
    seconds: list = [None] * FANOUT
    calls: list = []
    all_current = asyncio.Event()
    counted = 0
    report: dict = {}

    async def one(i: int) -> None:
        nonlocal counted
        call = clients[i % FANOUT_CHANNELS].WatchSecret(pb.WatchSecretRequest(name=name))
        calls.append(call)
        try:
            msg = await call.read()
            firsts[i] = (time.monotonic(), msg)
        except grpc.aio.AioRpcError as err:
            firsts[i] = (time.monotonic(), err)
        counted += 1
        if counted == FANOUT:
            all_current.set()
        if isinstance(firsts[i][1], grpc.aio.AioRpcError):
            return
        try:
            msg = await call.read()
            seconds[i] = (time.monotonic(), msg)
        except grpc.aio.AioRpcError as err:
            seconds[i] = (time.monotonic(), err)

    rss_before = rss_kib(broker.proc.pid)
    opened = time.monotonic()
    tasks = [asyncio.create_task(one(i)) for i in range(FANOUT)]
    try:
        try:
            await asyncio.wait_for(all_current.wait(), 30)
        except asyncio.TimeoutError:
            raise AssertionError(f"only {counted} of {FANOUT} watchers got a first message within 30 s")
        report["open_all_s"] = time.monotonic() - opened
        bad = [(i, f) for i, f in enumerate(firsts)
               if isinstance(f[1], grpc.aio.AioRpcError) or f[1] is grpc.aio.EOF
               or (event_name(stubs, f[1]), f[1].secret.version_id, f[1].secret.string_value)
               != (CURRENT, v1, "fanout-v1-44c2")]
        assert not bad, f"{len(bad)} watchers got a wrong first message, e.g. #{bad[0][0]}: {bad[0][1]}"

        s = await asyncio.to_thread(
            wait_for_stats, broker, stubs, lambda s: s.watchers == FANOUT, 5, f"{FANOUT} watchers counted")
        assert s.watched_secrets == 1, watch_counters(s)
        await asyncio.sleep(0.5)
        rss_after = rss_kib(broker.proc.pid)
        report["rss_before_kib"] = rss_before
        report["rss_after_kib"] = rss_after
        report["per_watcher_kib"] = (rss_after - rss_before) / FANOUT

        # sweep cost with FANOUT watchers, from its stats and moto's recorder
        s0, _ = await asyncio.to_thread(quiet_stats, broker, stubs, moto.start_recording)
        await asyncio.to_thread(
            wait_for_stats, broker, stubs, lambda s: s.watch_rounds >= s0.watch_rounds + 3,
            4.5 * INTERVAL, "3 sweep rounds with 1,000 watchers")
        s1, recorded = await asyncio.to_thread(
            quiet_stats, broker, stubs,
            lambda: (sweep_calls(moto, LIST_SECRETS), sweep_calls(moto, GET_SECRET_VALUE)))
        rounds = s1.watch_rounds - s0.watch_rounds
        upstream = s1.watch_upstream_calls - s0.watch_upstream_calls
        report["many_rounds"] = rounds
        report["many_upstream_calls"] = upstream
        report["many_recorded_list"], report["many_recorded_get"] = recorded

        # one rotation reaches every watcher
        put_start = time.monotonic()
        v2 = await asyncio.to_thread(moto.put_secret_value, name, "fanout-v2-44c2")
        put_done = time.monotonic()
        report["put_s"] = put_done - put_start
        done, pending = await asyncio.wait(tasks, timeout=DETECT_BOUND + 5)
        report["v2"] = v2
        report["put_done"] = put_done
        report["seconds"] = list(seconds)
        report["pending"] = len(pending)
    finally:
        for call in calls:
            call.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ch in channels:
            await ch.close()
    return report


def test_fanout_1000_watchers(moto, aws_broker, stubs):
    name = "insurecove/watch-fanout"
    v1 = moto.create_secret(name, "fanout-v1-44c2")
    broker = aws_broker(["--watch-interval", str(INTERVAL)])

    # one watcher: the sweep's calls per round
    single = Watch(broker, stubs, "watch-fanout")
    assert_event(stubs, first_message(stubs, single), CURRENT, name=name, version=v1, value="fanout-v1-44c2")
    one = wait_for_stats(broker, stubs, lambda s: s.watch_rounds >= 3, 4.5 * INTERVAL, "3 rounds, 1 watcher")
    one, _ = quiet_stats(broker, stubs)
    assert (one.watchers, one.watched_secrets) == (1, 1), watch_counters(one)
    ratio_one = one.watch_upstream_calls / one.watch_rounds
    single.close()
    wait_for_stats(broker, stubs, lambda s: s.watchers == 0, 3, "the single watcher closed")

    report = asyncio.run(_fanout(broker, stubs, moto, name, v1))

    seconds = report["seconds"]
    arrived = [s for s in seconds if s is not None and not isinstance(s[1], grpc.aio.AioRpcError)]
    times = sorted(t for t, _ in arrived)
    spread = times[-1] - times[0] if times else float("nan")
    ratio_many = report["many_upstream_calls"] / report["many_rounds"]
    lines = [
        f"watchers: {FANOUT} ({FANOUT_CHANNELS} channels x {FANOUT_PER_CHANNEL} streams), "
        f"all CURRENT after {report['open_all_s']:.2f} s",
        f"ROTATED delivered to {len(arrived)}/{FANOUT}; first {times[0] - report['put_done']:.3f} s, "
        f"last {times[-1] - report['put_done']:.3f} s after put-secret-value returned "
        f"(the put took {report['put_s']:.3f} s)" if times else "ROTATED delivered to 0",
        f"fan-out spread (first to last delivery): {spread * 1000:.1f} ms",
        f"sweep upstream calls per round: 1 watcher {ratio_one:.2f} "
        f"({one.watch_upstream_calls}/{one.watch_rounds}); {FANOUT} watchers {ratio_many:.2f} "
        f"({report['many_upstream_calls']}/{report['many_rounds']}); moto recorded "
        f"{report['many_recorded_list']} ListSecrets, {report['many_recorded_get']} GetSecretValue "
        f"in those rounds",
        f"broker RSS: {report['rss_before_kib']} KiB before, {report['rss_after_kib']} KiB with "
        f"{FANOUT} idle watchers: {report['per_watcher_kib']:.2f} KiB per watcher (debug build)",
    ]
    text = "\n".join(lines) + "\n"
    FANOUT_REPORT.parent.mkdir(parents=True, exist_ok=True)
    FANOUT_REPORT.write_text(text)
    print("\n" + text)

    wrong = [(i, s) for i, s in enumerate(seconds)
             if s is None or isinstance(s[1], grpc.aio.AioRpcError) or s[1] is grpc.aio.EOF
             or (event_name(stubs, s[1]), s[1].secret.version_id, s[1].secret.string_value)
             != (ROTATED, report["v2"], "fanout-v2-44c2")]
    assert not wrong, (
        f"{len(wrong)} of {FANOUT} watchers did not get ROTATED {report['v2']}; e.g. #{wrong[0][0]}: "
        f"{wrong[0][1] if wrong[0][1] is None else wrong[0][1][1]}"
    )
    assert times[0] - report["put_done"] < DETECT_BOUND, lines[1]
    assert spread < 2.0, lines[2]
    assert (ratio_one, ratio_many) == (1.0, 1.0), lines[3]
    assert report["many_rounds"] >= 3, lines[3]
    assert (report["many_recorded_list"], report["many_recorded_get"]) == (report["many_rounds"], 0), lines[3]
    assert 0 <= report["per_watcher_kib"] < 64, lines[4]


# --------------------------------------------------------------------------
# 6. grpcurl streams WatchSecret


def test_grpcurl_watch_prints_current(dev_broker, grpcurl_bin):
    cmd = [str(grpcurl_bin), "-plaintext", "-max-time", "3", "-d", '{"name":"production/jwt"}',
           dev_broker.addr, "secretsbroker.v1.SecretsService/WatchSecret"]
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=20, env=support.broker_env())
    out = proc.stdout
    decoder, messages, pos = json.JSONDecoder(), [], 0
    while out[pos:].strip():
        pos += len(out[pos:]) - len(out[pos:].lstrip())
        msg, end = decoder.raw_decode(out, pos)
        messages.append(msg)
        pos = end
    context = f"exit {proc.returncode}\nstdout: {out}\nstderr: {proc.stderr}"
    assert len(messages) == 1, context
    msg = messages[0]
    assert msg["type"] == CURRENT, context
    assert msg["secret"]["name"] == "insurecove/production/jwt", context
    assert msg["secret"]["stringValue"] == support.dev_seed()["insurecove/production/jwt"], context
    assert msg["secret"].get("versionId") and msg.get("observedAt"), context
    # the stream stays open until -max-time ends it
    assert proc.returncode != 0 and "DeadlineExceeded" in proc.stderr, context


# --------------------------------------------------------------------------
# 7. A slow watcher gets the latest state, never older after newer


def _slow_watcher(moto, aws_broker, stubs, short, rotations_n, value_of, channel_options=()):
    """Opens a watcher, rotates rotations_n times (each made immediate by
    RefreshSecret) without reading it, then reads. Returns the versions
    received after CURRENT and the rotation order."""
    name = support.full_name(short)
    v1 = moto.create_secret(name, value_of(1))
    broker = aws_broker(["--watch-interval", "60"])
    channel = grpc.insecure_channel(broker.addr, options=support.CHANNEL_OPTIONS + list(channel_options))
    try:
        w = Watch(broker, stubs, short, channel=channel, reading=False)
        wait_for_stats(broker, stubs, lambda s: s.watchers == 1, 3, "the slow watcher is open")

        rotations = []
        for n in range(2, rotations_n + 2):
            version = moto.put_secret_value(name, value_of(n))
            resp = refresh(broker, stubs, short)
            assert (resp.changed, resp.secret.version_id) == (True, version), resp
            rotations.append((version, value_of(n)))

        w.start_reading()
        assert_event(stubs, w.next(FIRST_BOUND)[0], CURRENT, name=name, version=v1, value=value_of(1))
        order = [version for version, _ in rotations]
        latest = order[-1]
        got = []
        while not got or got[-1] != latest:
            msg, _ = w.next(2.0)
            version = msg.secret.version_id
            assert version in order, f"unknown version {describe(stubs, msg)}; rotations {order}"
            assert_event(stubs, msg, ROTATED, name=name, version=version, value=dict(rotations)[version])
            got.append(version)
            assert len(got) <= len(order), f"more messages than rotations: {got}"
        indices = [order.index(v) for v in got]
        assert indices == sorted(set(indices)), (
            f"versions out of order or repeated: rotations #{indices} of 0..{len(order) - 1}"
        )
        w.expect_nothing(1.0)
        w.close()
    finally:
        channel.close()
    print(f"slow watcher received rotations #{indices} of 0..{len(order) - 1}")
    return indices


def test_slow_watcher_gets_latest_in_order(moto, aws_broker, stubs):
    _slow_watcher(moto, aws_broker, stubs, "watch-slow", 3, lambda n: f"slow-v{n}-d21c")


def test_slow_watcher_under_backpressure_gets_latest_in_order(moto, aws_broker, stubs):
    """12 rotations of 60 KB values, and the client's HTTP/2 window left at
    64 KB (no BDP probing): the stream cannot take them all while the
    watcher does not read, so the broker has to keep only the latest."""
    _slow_watcher(
        moto, aws_broker, stubs, "watch-slow-big", 12, lambda n: f"big-v{n}-" + "x" * 60_000,
        channel_options=[("grpc.http2.bdp_probe", 0)],
    )


# --------------------------------------------------------------------------
# 8. RefreshSecret and a bypass read notify at once


def test_refresh_and_bypass_notify_at_once(moto, aws_broker, stubs):
    name = "insurecove/watch-refresh"
    v1 = moto.create_secret(name, "refresh-v1-6b13")
    broker = aws_broker(["--watch-interval", "60"])
    w = Watch(broker, stubs, "watch-refresh")
    assert_event(stubs, first_message(stubs, w), CURRENT, name=name, version=v1, value="refresh-v1-6b13")

    v2 = moto.put_secret_value(name, "refresh-v2-6b13")
    resp = refresh(broker, stubs, "watch-refresh")
    refreshed = time.monotonic()
    assert (resp.changed, resp.secret.version_id) == (True, v2), resp
    msg, at = w.next(1.0)
    assert at - refreshed < 1.0
    assert_event(stubs, msg, ROTATED, name=name, version=v2, value="refresh-v2-6b13")

    v3 = moto.put_secret_value(name, "refresh-v3-6b13")
    got = get(broker, stubs, "watch-refresh", bypass_cache=True)
    read = time.monotonic()
    assert (got.version_id, got.string_value) == (v3, "refresh-v3-6b13"), got
    msg, at = w.next(1.0)
    assert at - read < 1.0
    assert_event(stubs, msg, ROTATED, name=name, version=v3, value="refresh-v3-6b13")

    # the sweep did not run: the events came from the refresh and the read
    s = stats(broker, stubs)
    assert (s.watch_rounds, s.watch_upstream_calls) == (0, 0), watch_counters(s)


def test_a_label_added_is_read_once_the_sweep_lists_it(moto, aws_broker, stubs):
    """A stage read before it existed is remembered missing (30 s); once the
    sweep's listing shows the label, it is read at the next ask."""
    name = "insurecove/watch-label"
    v1 = moto.create_secret(name, "label-v1-81c4")
    broker = aws_broker(["--watch-interval", "1"])
    watch = Watch(broker, stubs, "watch-label")   # the secret is swept
    try:
        first, _ = watch.next(5)
        assert event_name(stubs, first) == CURRENT, describe(stubs, first)
        expect_error(lambda: get(broker, stubs, "watch-label", version_stage="GREEN"),
                     grpc.StatusCode.NOT_FOUND, "SECRET_NOT_FOUND")
        moto.client.update_secret_version_stage(SecretId=name, VersionStage="GREEN", MoveToVersionId=v1)
        added = time.monotonic()
        while True:
            try:
                green = get(broker, stubs, "watch-label", version_stage="GREEN")
                break
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.NOT_FOUND, error
                assert time.monotonic() - added < 6, "GREEN still remembered missing"
                time.sleep(0.2)
        assert (green.version_id, green.string_value) == (v1, "label-v1-81c4")
        print(f"GREEN read {time.monotonic() - added:.2f} s after it was added")
    finally:
        watch.close()


def test_a_label_moved_between_versions_reaches_the_cached_stage_lists(moto, aws_broker, stubs):
    """A label put on the current version, then moved to the previous one,
    changes no stage's version, only the stages each version carries: the
    sweep sees it in the metadata and the cached answers say it too."""
    name = "insurecove/watch-relabel"
    v1 = moto.create_secret(name, "relabel-v1-5e0a")
    v2 = moto.put_secret_value(name, "relabel-v2-5e0a")
    broker = aws_broker(["--watch-interval", "1", "--cache-ttl", "3600"])

    def stages_seen() -> tuple[list[str], list[str]]:
        current = get(broker, stubs, "watch-relabel")
        previous = get(broker, stubs, "watch-relabel", version_stage="AWSPREVIOUS")
        assert (current.version_id, previous.version_id) == (v2, v1)
        return sorted(current.version_stages), sorted(previous.version_stages)

    def until(wanted: tuple[list[str], list[str]]) -> None:
        since = time.monotonic()
        while (seen := stages_seen()) != wanted:
            assert time.monotonic() - since < 8, f"still {seen}, not {wanted}"
            time.sleep(0.2)
        print(f"{wanted} seen {time.monotonic() - since:.2f} s later")

    assert stages_seen() == (["AWSCURRENT"], ["AWSPREVIOUS"])
    moto.client.update_secret_version_stage(SecretId=name, VersionStage="BLUE", MoveToVersionId=v2)
    until((["AWSCURRENT", "BLUE"], ["AWSPREVIOUS"]))
    moto.client.update_secret_version_stage(
        SecretId=name, VersionStage="BLUE", MoveToVersionId=v1, RemoveFromVersionId=v2
    )
    until((["AWSCURRENT"], ["AWSPREVIOUS", "BLUE"]))


def test_refresh_and_bypass_reach_every_watcher_of_the_secret(moto, aws_broker, stubs):
    """A RefreshSecret by name, or a bypass read by ARN, that finds a new
    version tells the secret's other watchers too (by ARN, by name,
    AWSPREVIOUS), at once, not at the next sweep."""
    name = "insurecove/watch-spread"
    moto.create_secret(name, "spread-v1-2c7f")
    v2 = moto.put_secret_value(name, "spread-v2-2c7f")
    arn = moto.client.describe_secret(SecretId=name)["ARN"]
    broker = aws_broker(["--watch-interval", "600"])
    watches = {
        "name": Watch(broker, stubs, "watch-spread"),
        "arn": Watch(broker, stubs, arn),
        "previous": Watch(broker, stubs, "watch-spread", version_stage="AWSPREVIOUS"),
    }
    try:
        for watch in watches.values():
            first, _ = watch.next(5)
            assert event_name(stubs, first) == CURRENT, describe(stubs, first)

        v3 = moto.put_secret_value(name, "spread-v3-2c7f")
        assert refresh(broker, stubs, "watch-spread").changed
        for kind, watch in watches.items():
            msg, _ = watch.next(2.0)
            want = v2 if kind == "previous" else v3
            assert (event_name(stubs, msg), msg.secret.version_id) == (ROTATED, want), \
                f"{kind}: {describe(stubs, msg)}"

        v4 = moto.put_secret_value(name, "spread-v4-2c7f")
        assert get(broker, stubs, arn, bypass_cache=True).version_id == v4
        for kind, watch in watches.items():
            msg, _ = watch.next(2.0)
            want = v3 if kind == "previous" else v4
            assert (event_name(stubs, msg), msg.secret.version_id) == (ROTATED, want), \
                f"{kind}: {describe(stubs, msg)}"
        assert get(broker, stubs, "watch-spread").version_id == v4
    finally:
        for watch in watches.values():
            watch.close()


# --------------------------------------------------------------------------
# 9. Not found at once


def test_watch_missing_secret_is_not_found(aws_broker, stubs):
    # (over the file backend: tests/server/watch.rs)
    broker = aws_broker()
    pb = stubs.secrets_service_pb2
    stub = broker.secrets()
    start = time.monotonic()
    expect_error(
        lambda: next(stub.WatchSecret(pb.WatchSecretRequest(name="watch-no-such-secret"), timeout=5)),
        grpc.StatusCode.NOT_FOUND, "SECRET_NOT_FOUND",
    )
    assert time.monotonic() - start < FIRST_BOUND
    s = stats(broker, stubs)
    assert (s.watchers, s.watched_secrets) == (0, 0), watch_counters(s)


def test_a_resume_from_something_not_an_arn_is_refused_by_name(dev_broker, stubs):
    """since_arn is taken from a Secret message: anything else (here, text
    with a line break, an ARN of another service, a partial ARN, which
    would be taken for another secret) is refused naming the field, not
    compared."""
    pb = stubs.secrets_service_pb2
    stub = dev_broker.secrets()
    partial = "arn:aws:secretsmanager:us-east-1:123456789012:secret:insurecove/mistral-api-key"
    for since_arn in ("not-an-arn\nforged", "arn:aws:s3:::bucket", partial):
        _, info = expect_error(
            lambda: next(stub.WatchSecret(pb.WatchSecretRequest(
                name="mistral-api-key", since_version_id="v1", since_arn=since_arn), timeout=5)),
            grpc.StatusCode.INVALID_ARGUMENT, "INVALID_VERSION", field="since_arn",
        )
    arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:insurecove/mistral-api-key-AbCdEf"
    first = next(stub.WatchSecret(pb.WatchSecretRequest(
        name="mistral-api-key", since_version_id="v1", since_arn=arn), timeout=5))
    assert first.secret.name == "insurecove/mistral-api-key", first


# --------------------------------------------------------------------------
# 10. SIGTERM ends every stream with UNAVAILABLE, exit 0


def test_sigterm_ends_streams_with_unavailable(dev_broker, stubs):
    broker = dev_broker
    names = ["mistral-api-key", "production/jwt", "mistral-api-key"]
    watches = [Watch(broker, stubs, n, channel=broker.channel()) for n in names]
    for w in watches:
        assert event_name(stubs, first_message(stubs, w)) == CURRENT
    s = stats(broker, stubs)
    assert (s.watchers, s.watched_secrets) == (3, 2), watch_counters(s)

    broker.proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    for w in watches:
        err, at = w.expect_error(max(0.1, sent + 5 - time.monotonic()))
        assert err.code() == grpc.StatusCode.UNAVAILABLE, f"{w.name}: {err.code().name}: {err.details()!r}"
        print(f"{w.name}: UNAVAILABLE after {at - sent:.2f} s: {err.details()!r}")
    try:
        code = broker.proc.wait(max(0.1, sent + 10 - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the broker did not exit within 10 s of SIGTERM; log:\n{broker.tail()}")
    exited = time.monotonic() - sent
    assert code == 0, f"exit code {code}; log:\n{broker.tail()}"
    assert "panicked" not in broker.log(), broker.tail()
    print(f"broker exited 0 {exited:.2f} s after SIGTERM")


def test_a_secret_read_by_its_arn_then_replaced_under_its_name(moto, aws_broker, stubs):
    """Force-deleted and created again under the same name: a new secret, with
    a new ARN. Readers and watchers of the old ARN learn it is gone (its value
    is not served for the cache's hour); those of the name get the new secret
    as a rotation, never a DELETED."""
    name = "insurecove/arn-replaced"
    moto.create_secret(name, "arn-replaced-old-7d1e")
    old_arn = moto.client.describe_secret(SecretId=name)["ARN"]
    broker = aws_broker(["--watch-interval", "1", "--cache-ttl", "3600"])
    pb = stubs.secrets_service_pb2

    def get(ident: str):
        return broker.secrets().GetSecret(pb.GetSecretRequest(name=ident), timeout=10).secret

    assert get(old_arn).string_value == "arn-replaced-old-7d1e"
    assert get("arn-replaced").arn == old_arn
    by_arn = Watch(broker, stubs, old_arn)
    by_name = Watch(broker, stubs, "arn-replaced")
    try:
        for watch in (by_arn, by_name):
            first, _ = watch.next(5)
            assert event_name(stubs, first) == "WATCH_EVENT_TYPE_CURRENT", describe(stubs, first)

        moto.client.delete_secret(SecretId=name, ForceDeleteWithoutRecovery=True)
        moto.create_secret(name, "arn-replaced-new-7d1e")
        new_arn = moto.client.describe_secret(SecretId=name)["ARN"]
        assert new_arn != old_arn

        gone, _ = by_arn.next(10)
        assert event_name(stubs, gone) == "WATCH_EVENT_TYPE_DELETED", describe(stubs, gone)
        expect_error(lambda: get(old_arn), grpc.StatusCode.NOT_FOUND, "SECRET_NOT_FOUND",
                     forbidden=("arn-replaced-old-7d1e",))
        rotated, _ = by_name.next(10)
        assert (event_name(stubs, rotated), rotated.secret.arn) == ("WATCH_EVENT_TYPE_ROTATED", new_arn), \
            describe(stubs, rotated)
        assert rotated.secret.string_value == "arn-replaced-new-7d1e"
        by_name.expect_nothing(3)
        assert get("arn-replaced").string_value == "arn-replaced-new-7d1e"
    finally:
        by_arn.close()
        by_name.close()
