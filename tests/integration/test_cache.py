"""The shared cache in front of a real moto_server: coalescing, TTL and
bypass, stale-on-error within its bound, stats, eviction, ClearCache and
RefreshSecret. Upstream calls are counted by moto's request recorder
(moto.get_secret_value_calls) as well as by the broker's own stats."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from support import expect_error

BURST = 200
CHANNELS = 8


def get(broker, stubs, name, *, stub=None, **kw):
    pb = stubs.secrets_service_pb2
    stub = stub or broker.secrets()
    return stub.GetSecret(pb.GetSecretRequest(name=name, **kw), timeout=30).secret


def stats(broker, stubs):
    return broker.admin().GetCacheStats(stubs.admin_service_pb2.GetCacheStatsRequest(), timeout=10)


def counters(s) -> dict:
    return {
        k: getattr(s, k) for k in (
            "total_entries", "valid_entries", "expired_entries", "hits", "misses", "coalesced",
            "stale_served", "upstream_calls", "upstream_errors", "evictions",
        )
    }


def sleep_until(deadline: float) -> None:
    time.sleep(max(0.0, deadline - time.monotonic()))


# --------------------------------------------------------------------------
# coalescing


def burst(broker, stubs, name: str, n: int) -> list:
    """n GetSecret calls for name from n threads over CHANNELS ready channels,
    released together by a barrier. Returns each call's secret or RpcError."""
    pb = stubs.secrets_service_pb2
    stubs_ = []
    for _ in range(CHANNELS):
        ch = broker.channel()
        grpc.channel_ready_future(ch).result(timeout=10)
        stubs_.append(stubs.secrets_service_pb2_grpc.SecretsServiceStub(ch))
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def one(i: int) -> None:
        barrier.wait(timeout=30)
        try:
            results[i] = stubs_[i % CHANNELS].GetSecret(pb.GetSecretRequest(name=name), timeout=30).secret
        except grpc.RpcError as err:
            results[i] = err

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "burst threads did not finish"
    return results


def test_concurrent_misses_make_one_upstream_call(moto, aws_broker, stubs):
    value = "burst-value-6a0d"
    moto.create_secret("insurecove/burst", value)
    broker = aws_broker()
    moto.start_recording()

    results = burst(broker, stubs, "burst", BURST)
    failures = [r for r in results if isinstance(r, grpc.RpcError)]
    assert not failures, f"{len(failures)} calls failed, first: {failures[0].code()}: {failures[0].details()}"
    assert all(r.string_value == value for r in results)

    assert moto.get_secret_value_calls("insurecove/burst") == 1, moto.recorded()
    s = stats(broker, stubs)
    assert (s.upstream_calls, s.misses, s.coalesced + s.hits) == (1, 1, BURST - 1), counters(s)
    # the answers served from the fresh entry are the ones marked hit
    assert sum(1 for r in results if r.cache.hit) == s.hits, counters(s)
    print(f"first burst: {s.coalesced} coalesced, {s.hits} hits")
    assert s.upstream_errors == 0 and s.total_entries == 1, counters(s)

    # a second burst within the TTL: all hits, nothing upstream
    results = burst(broker, stubs, "burst", BURST)
    assert all(not isinstance(r, grpc.RpcError) and r.string_value == value and r.cache.hit for r in results)
    assert moto.get_secret_value_calls("insurecove/burst") == 1
    s2 = stats(broker, stubs)
    assert s2.upstream_calls == 1, counters(s2)
    assert s2.hits == s.hits + BURST, (counters(s), counters(s2))
    assert (s2.misses, s2.coalesced) == (s.misses, s.coalesced), (counters(s), counters(s2))


# --------------------------------------------------------------------------
# TTL and bypass


def test_ttl_and_bypass(moto, aws_broker, stubs):
    ttl = 4
    name = "insurecove/ttl-bypass"
    moto.create_secret(name, "ttl-v1-2b7e")
    broker = aws_broker(["--cache-ttl", str(ttl)])
    moto.start_recording()

    first = get(broker, stubs, "ttl-bypass")
    assert (first.string_value, first.cache.hit) == ("ttl-v1-2b7e", False)
    v2 = moto.put_secret_value(name, "ttl-v2-2b7e")

    cached = get(broker, stubs, "ttl-bypass")
    assert (cached.string_value, cached.cache.hit, cached.cache.stale) == ("ttl-v1-2b7e", True, False)

    bypass = get(broker, stubs, "ttl-bypass", bypass_cache=True)
    bypass_done = time.monotonic()
    assert (bypass.string_value, bypass.version_id, bypass.cache.hit) == ("ttl-v2-2b7e", v2, False)

    # another caller, on another channel, sees the bypass's value from the cache
    other = get(broker, stubs, "ttl-bypass", stub=broker.secrets())
    assert (other.string_value, other.version_id, other.cache.hit) == ("ttl-v2-2b7e", v2, True)
    assert moto.get_secret_value_calls(name) == 2

    v3 = moto.put_secret_value(name, "ttl-v3-2b7e")
    sleep_until(bypass_done + ttl + 0.3)
    after = get(broker, stubs, "ttl-bypass")
    assert (after.string_value, after.version_id, after.cache.hit) == ("ttl-v3-2b7e", v3, False)
    assert moto.get_secret_value_calls(name) == 3


def test_expired_entry_is_revalidated_with_describe_secret(moto, aws_broker, stubs):
    """Past its TTL, an unchanged secret costs one DescribeSecret, not a
    GetSecretValue; a moved stage is read again."""
    ttl = 1
    name = "insurecove/revalidate"
    moto.create_secret(name, "reval-v1-7d21")
    broker = aws_broker(["--cache-ttl", str(ttl)])
    moto.start_recording()

    first = get(broker, stubs, "revalidate")
    read_done = time.monotonic()
    sleep_until(read_done + ttl + 0.3)
    renewed = get(broker, stubs, "revalidate")
    assert (renewed.string_value, renewed.version_id) == ("reval-v1-7d21", first.version_id)
    describes = [
        r for r in moto.recorded()
        if r.target == "secretsmanager.DescribeSecret" and not r.from_boto and r.secret_id == name
    ]
    assert (moto.get_secret_value_calls(name), len(describes)) == (1, 1)
    again = get(broker, stubs, "revalidate")
    assert again.cache.hit, "the revalidated entry is fresh again"

    v2 = moto.put_secret_value(name, "reval-v2-7d21")
    sleep_until(time.monotonic() + ttl + 0.3)
    moved = get(broker, stubs, "revalidate")
    assert (moved.string_value, moved.version_id) == ("reval-v2-7d21", v2)
    assert moto.get_secret_value_calls(name) == 2


# --------------------------------------------------------------------------
# stale-on-error


def test_stale_on_error_within_bound(moto, aws_broker, stubs):
    # A failed read is decided after the SDK's retries (up to ~3 s of
    # backoff with moto down): the bound leaves room for them.
    ttl, max_stale = 1, 8
    moto.create_secret("insurecove/stale-a", "stale-a-OLD-91c3")
    moto.create_secret("insurecove/stale-b", "stale-b-91c3")
    broker = aws_broker(["--cache-ttl", str(ttl), "--cache-max-stale", str(max_stale)])

    assert get(broker, stubs, "stale-a").string_value == "stale-a-OLD-91c3"
    read_done = time.monotonic()

    moto.stop()
    sleep_until(read_done + ttl + 0.1)
    started = time.monotonic()
    stale = get(broker, stubs, "stale-a")
    took_stale = time.monotonic() - started
    assert stale.string_value == "stale-a-OLD-91c3"
    assert stale.cache.stale is True, stale.cache
    assert stale.cache.age.ToTimedelta().total_seconds() >= ttl, stale.cache

    started = time.monotonic()
    expect_error(
        lambda: get(broker, stubs, "stale-b"),
        grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE",
    )
    took_unavailable = time.monotonic() - started
    assert took_unavailable < 15, f"UNAVAILABLE took {took_unavailable:.1f} s"

    # past ttl + max_stale: no more stale value
    sleep_until(read_done + ttl + max_stale + 0.3)
    expect_error(
        lambda: get(broker, stubs, "stale-a"),
        grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE", forbidden=("stale-a-OLD-91c3",),
    )

    s = stats(broker, stubs)
    assert s.stale_served >= 1 and s.upstream_errors >= 1, counters(s)

    moto.start()                                       # same port, empty
    new_version = moto.create_secret("insurecove/stale-a", "stale-a-NEW-91c3")
    fresh = get(broker, stubs, "stale-a")
    assert (fresh.string_value, fresh.version_id) == ("stale-a-NEW-91c3", new_version)
    assert (fresh.cache.stale, fresh.cache.hit) == (False, False), fresh.cache
    print(f"stale answer in {took_stale:.2f} s, UNAVAILABLE in {took_unavailable:.2f} s")


# --------------------------------------------------------------------------
# stats and AdminService


def test_stats_of_a_known_sequence(moto, aws_broker, stubs):
    moto.create_secret("insurecove/counted", "counted-4e2a")
    broker = aws_broker()
    moto.start_recording()
    s = stats(broker, stubs)
    assert counters(s) == dict.fromkeys(counters(s), 0) and s.hit_ratio == 0.0, counters(s)

    assert get(broker, stubs, "counted").cache.hit is False           # miss
    for _ in range(3):
        assert get(broker, stubs, "counted").cache.hit is True        # hits
    assert get(broker, stubs, "counted", bypass_cache=True).cache.hit is False   # bypass: a miss

    s = stats(broker, stubs)
    assert counters(s) == {
        "total_entries": 1, "valid_entries": 1, "expired_entries": 0,
        "hits": 3, "misses": 2, "coalesced": 0, "stale_served": 0,
        "upstream_calls": 2, "upstream_errors": 0, "evictions": 0,
    }, counters(s)
    assert s.hit_ratio == pytest.approx(3 / 5)
    assert moto.get_secret_value_calls("insurecove/counted") == 2

    expect_error(lambda: get(broker, stubs, "not-there"), grpc.StatusCode.NOT_FOUND, "SECRET_NOT_FOUND")
    s = stats(broker, stubs)
    assert (s.misses, s.upstream_calls, s.upstream_errors, s.total_entries) == (3, 3, 1, 1), counters(s)


def test_lru_eviction(moto, aws_broker, stubs):
    for n in (1, 2, 3):
        moto.create_secret(f"insurecove/lru-{n}", f"lru-{n}-d81f")
    broker = aws_broker(["--cache-max-entries", "2"])
    for n in (1, 2, 3):
        assert get(broker, stubs, f"lru-{n}").cache.hit is False
    s = stats(broker, stubs)
    assert (s.evictions, s.total_entries) == (1, 2), counters(s)

    # lru-1 was the least recently used: gone; its return evicts lru-2
    assert get(broker, stubs, "lru-1").cache.hit is False
    assert get(broker, stubs, "lru-3").cache.hit is True
    s = stats(broker, stubs)
    assert (s.evictions, s.total_entries, s.upstream_calls) == (2, 2, 4), counters(s)


def test_clear_cache(moto, aws_broker, stubs):
    moto.create_secret("insurecove/clear-x", "clear-x-OLD-55aa")
    moto.put_secret_value("insurecove/clear-x", "clear-x-NEW-55aa")
    moto.create_secret("insurecove/clear-y", "clear-y-55aa")
    broker = aws_broker()
    apb = stubs.admin_service_pb2
    admin = broker.admin()

    get(broker, stubs, "clear-x")                                   # X: 2 entries
    get(broker, stubs, "clear-x", version_stage="AWSPREVIOUS")
    get(broker, stubs, "clear-y")                                   # Y: 1 entry
    assert stats(broker, stubs).total_entries == 3

    assert admin.ClearCache(apb.ClearCacheRequest(names=["clear-x"]), timeout=10).cleared == 2
    assert stats(broker, stubs).total_entries == 1
    assert get(broker, stubs, "clear-y").cache.hit is True
    x = get(broker, stubs, "clear-x")
    assert (x.string_value, x.cache.hit) == ("clear-x-NEW-55aa", False)

    # full names work too, and an unknown name clears nothing
    assert admin.ClearCache(apb.ClearCacheRequest(names=["insurecove/clear-y", "nothing-cached"]), timeout=10).cleared == 1
    assert get(broker, stubs, "clear-y").cache.hit is False

    # everything
    assert admin.ClearCache(apb.ClearCacheRequest(), timeout=10).cleared == 2
    s = stats(broker, stubs)
    assert s.total_entries == 0, counters(s)
    assert get(broker, stubs, "clear-x").cache.hit is False
    assert get(broker, stubs, "clear-y").cache.hit is False


def test_refresh_secret(moto, aws_broker, stubs):
    name = "insurecove/refreshed"
    v1 = moto.create_secret(name, "refreshed-v1-0f3b")
    broker = aws_broker()
    apb = stubs.admin_service_pb2
    admin = broker.admin()
    assert get(broker, stubs, "refreshed").version_id == v1
    v2 = moto.put_secret_value(name, "refreshed-v2-0f3b")
    moto.start_recording()

    resp = admin.RefreshSecret(apb.RefreshSecretRequest(name="refreshed"), timeout=30)
    assert resp.changed is True, resp
    assert (resp.secret.name, resp.secret.version_id) == (name, v2), resp
    assert "AWSCURRENT" in resp.secret.version_stages
    assert resp.secret.WhichOneof("value") is None, "RefreshSecret must not return the value"
    assert b"refreshed-v2-0f3b" not in resp.SerializeToString()
    assert moto.get_secret_value_calls(name) == 1

    # the refresh replaced the cached entry
    cached = get(broker, stubs, "refreshed")
    assert (cached.string_value, cached.version_id, cached.cache.hit) == ("refreshed-v2-0f3b", v2, True)

    resp = admin.RefreshSecret(apb.RefreshSecretRequest(name="refreshed"), timeout=30)
    assert (resp.changed, resp.secret.version_id) == (False, v2), resp
    assert resp.secret.WhichOneof("value") is None
    assert moto.get_secret_value_calls(name) == 2
