"""Operating the broker: the metrics and probe endpoint (--metrics-listen)
and graceful shutdown on SIGTERM under load. (The transport limits are
tested in-process: tests/server/limits.rs.)

Metrics are read from the broker's /metrics and parsed with prometheus_client's
OpenMetrics parser (ops_support.Scrape)."""

from __future__ import annotations

import signal
import subprocess
import threading
import time

import grpc
import pytest

import support
from ops_support import (
    SlowUpstream,
    http_get,
    own_channel,
    scrape,
    wait_for_scrape,
    wait_for_status,
)
from support import expect_error
from watch_support import Watch, event_name

SEED = support.dev_seed()
MISTRAL = "insurecove/mistral-api-key"


def metrics_args() -> tuple[list[str], str]:
    addr = f"127.0.0.1:{support.free_port()}"
    return ["--metrics-listen", addr], addr


def get_secret(stubs, stub, name: str, timeout: float = 10, **kw):
    return stub.GetSecret(stubs.secrets_service_pb2.GetSecretRequest(name=name, **kw), timeout=timeout).secret


# --------------------------------------------------------------------------
# 1. metrics and probes


def test_a_rust_log_that_cannot_be_read_is_said(start_broker):
    """A RUST_LOG with a typo would otherwise look obeyed."""
    broker = start_broker(env={"RUST_LOG": "secrets_broker=bogus"})
    warned = [line for line in broker.log().splitlines() if "RUST_LOG is not a filter" in line]
    assert len(warned) == 1 and "WARN" in warned[0], broker.tail()
    # Said under LOG_LEVEL=ERROR too, which would hide a warning.
    broker = start_broker(env={"RUST_LOG": "secrets_broker=bogus", "LOG_LEVEL": "ERROR"})
    assert "RUST_LOG is not a filter" in broker.log(), broker.tail()


def test_metrics_after_a_known_sequence(start_broker, stubs):
    args, maddr = metrics_args()
    broker = start_broker(args)
    pb = stubs.secrets_service_pb2
    stub = broker.secrets()

    hits = [get_secret(stubs, stub, "mistral-api-key").cache.hit for _ in range(3)]
    assert hits == [False, True, True]
    expect_error(lambda: get_secret(stubs, stub, "no-such-secret"), grpc.StatusCode.NOT_FOUND, "SECRET_NOT_FOUND")
    expect_error(lambda: get_secret(stubs, stub, "bad name"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SECRET_NAME")
    stub.GetJwtConfig(pb.GetJwtConfigRequest(), timeout=10)

    expected_calls = {
        ("GetSecret", "OK"): 3, ("GetSecret", "NOT_FOUND"): 1,
        ("GetSecret", "INVALID_ARGUMENT"): 1, ("GetJwtConfig", "OK"): 1,
    }

    def calls(s) -> dict:
        return {
            (dict(k)["rpc"], dict(k)["code"]): v
            for k, v in s.values("secretsbroker_calls_total").items()
            if dict(k).get("rpc") in ("GetSecret", "GetJwtConfig")
        }

    s = wait_for_scrape(maddr, lambda s: calls(s) == expected_calls)
    print(s.text)
    assert s.content_type.startswith("application/openmetrics-text"), s.content_type
    assert s.text.rstrip().endswith("# EOF")

    # every family is the broker's own
    foreign = sorted(n for n in s.families if not n.startswith("secretsbroker_"))
    assert not foreign, f"metric families without the secretsbroker_ prefix: {foreign}"

    # calls by rpc and code
    assert calls(s) == expected_calls, s.values("secretsbroker_calls_total")
    other_rpcs = {dict(k).get("rpc") for k in s.values("secretsbroker_calls_total")} - {"GetSecret", "GetJwtConfig"}
    print(f"other rpcs counted: {sorted(map(str, other_rpcs))}")
    assert other_rpcs <= {"Check", "grpc.health.v1.Health/Check", "Health/Check"}, other_rpcs

    # call latency histogram: one observation per call
    for rpc, n in (("GetSecret", 5), ("GetJwtConfig", 1)):
        assert s.value("secretsbroker_call_duration_seconds_count", rpc=rpc) == n, (
            rpc, s.values("secretsbroker_call_duration_seconds_count"))
        assert s.value("secretsbroker_call_duration_seconds_bucket", rpc=rpc, le="+Inf") == n
        assert s.value("secretsbroker_call_duration_seconds_sum", rpc=rpc) > 0

    # the cache: mistral miss + 2 hits, NOT_FOUND miss, jwt miss; the invalid
    # name never reaches the cache
    cache = {
        k: s.value(f"secretsbroker_cache_{k}")
        for k in ("hits_total", "misses_total", "coalesced_total", "stale_served_total", "evictions_total", "entries")
    }
    assert cache == {
        "hits_total": 2, "misses_total": 3, "coalesced_total": 0,
        "stale_served_total": 0, "evictions_total": 0, "entries": 2,
    }, cache

    # the file backend as the broker sees it: 2 reads found, 1 not found (an
    # answer, not an upstream error)
    upstream = s.by("secretsbroker_upstream_calls_total", "outcome", operation="GetSecretValue")
    assert upstream == {"ok": 2, "not_found": 1}, s.values("secretsbroker_upstream_calls_total")
    assert s.value("secretsbroker_upstream_duration_seconds_count", operation="GetSecretValue") == 3
    assert s.value("secretsbroker_upstream_duration_seconds_bucket", operation="GetSecretValue", le="+Inf") == 3

    # the rest of the documented families
    for name, want in (
        ("secretsbroker_watchers", 0), ("secretsbroker_watched_secrets", 0),
        ("secretsbroker_watch_events_total", 0), ("secretsbroker_policy_denials_total", 0),
        ("secretsbroker_connections_refused_total", 0), ("secretsbroker_tls_handshake_failures_total", 0),
    ):
        assert s.value(name) == want, (name, s.values(name))
    assert s.value("secretsbroker_watch_rounds_total") is not None
    assert s.value("secretsbroker_connections_accepted_total") >= 1
    assert not s.values("secretsbroker_tls_certificate_expiry_timestamp_seconds"), "TLS expiry without TLS"
    build = s.values("secretsbroker_build_info")
    assert len(build) == 1, build
    (labels, value), = build.items()
    assert value == 1 and dict(labels).get("version"), build

    # no secret name in any label without --metrics-secret-names
    leaks = [lv for lv in s.label_values() if "insurecove/" in lv[2] or "mistral" in lv[2]]
    assert not leaks, f"secret names in label values: {leaks}"
    assert "insurecove/" not in s.text
    assert not s.values("secretsbroker_secret_reads_total")

    # probes
    health = http_get(maddr, "/healthz")
    assert (health.status, health.body.strip()) == (200, "ok"), health
    ready = http_get(maddr, "/readyz")
    assert ready.status == 200, ready
    assert http_get(maddr, "/no-such-path").status == 404


def test_metrics_secret_names_opt_in(start_broker, stubs):
    args, maddr = metrics_args()
    broker = start_broker(args + ["--metrics-secret-names"])
    stub = broker.secrets()
    assert get_secret(stubs, stub, "mistral-api-key").string_value == SEED[MISTRAL]

    def reads(s) -> float:
        return sum(
            v for k, v in s.values("secretsbroker_secret_reads_total").items() if dict(k).get("secret") == MISTRAL
        )

    s = wait_for_scrape(maddr, lambda s: reads(s) == 1)
    assert reads(s) == 1, s.values("secretsbroker_secret_reads_total")
    secrets = {dict(k).get("secret") for k in s.values("secretsbroker_secret_reads_total")}
    assert secrets == {MISTRAL}, secrets


def test_readyz_follows_the_upstream(moto, aws_broker):
    moto.create_secret("insurecove/ready-check", "ready-check-7c1e")
    args, maddr = metrics_args()
    aws_broker(args + ["--watch-interval", "1"])

    wait_for_status(maddr, "/readyz", 200, timeout=3)
    moto.stop()
    stopped = time.monotonic()
    answer, took = wait_for_status(maddr, "/readyz", 503, timeout=6)
    print(f"/readyz 503 {took:.2f} s after moto stopped: {answer.body!r}")
    health = http_get(maddr, "/healthz")
    assert health.status == 200, f"/healthz must stay 200 while AWS is down: {health}"
    s = scrape(maddr)
    assert s.value("secretsbroker_upstream_up") == 0
    errors = sum(v for k, v in s.values("secretsbroker_upstream_calls_total").items() if dict(k).get("outcome") == "error")
    assert errors >= 1, s.values("secretsbroker_upstream_calls_total")

    moto.start()
    _, took = wait_for_status(maddr, "/readyz", 200, timeout=6)
    assert scrape(maddr).value("secretsbroker_upstream_up") == 1
    print(f"/readyz 200 again {took:.2f} s after moto restarted ({time.monotonic() - stopped:.1f} s down)")


def test_a_throttled_upstream_check_keeps_the_broker_ready(moto, aws_broker):
    """ListSecrets' quota is the account's, shared with every other tool in
    it: a burst of theirs throttles every replica's check at once, and must
    not take them all out of service (AWS answers; the cache serves)."""
    moto.create_secret("insurecove/throttled-check", "throttled-check-5d1a")
    upstream = SlowUpstream(moto.address, delay=0)
    try:
        args, maddr = metrics_args()
        aws_broker(args + ["--watch-interval", "1"], env={"AWS_ENDPOINT_URL": upstream.url})
        wait_for_status(maddr, "/readyz", 200, timeout=5)
        checks = upstream.count(".ListSecrets")
        upstream.fault_only = (".ListSecrets",)
        upstream.fault = (400, "application/x-amz-json-1.1",
                          b'{"__type":"ThrottlingException","message":"Rate exceeded"}')
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            answer = http_get(maddr, "/readyz")
            assert answer.status == 200, f"not ready while only throttled: {answer}"
            time.sleep(0.2)
        assert upstream.count(".ListSecrets") > checks + 1, "the check was not throttled meanwhile"
        assert scrape(maddr).value("secretsbroker_upstream_up") == 1
    finally:
        upstream.close()


def test_an_endpoint_answering_empty_200s_is_not_aws(moto, aws_broker, stubs):
    """Something in AWS's place (a proxy, a captive portal) answers every
    call with an empty 200: every read fails, so the broker is not ready,
    its health is NOT_SERVING and CheckUpstream says why, as `check`
    does, rather than ready on a ListSecrets answer without its list."""
    moto.create_secret("insurecove/empty-200", "empty-200-6a2f")
    upstream = SlowUpstream(moto.address, delay=0, delayed=None)
    try:
        args, maddr = metrics_args()
        broker = aws_broker(args + ["--watch-interval", "1"], env={"AWS_ENDPOINT_URL": upstream.url})
        wait_for_status(maddr, "/readyz", 200, timeout=5)
        upstream.fault = (200, "application/x-amz-json-1.1", b"{}")
        answer, took = wait_for_status(maddr, "/readyz", 503, timeout=6)
        print(f"/readyz 503 {took:.2f} s after the empty 200s began: {answer.body!r}")
        assert broker.health("secretsbroker.v1.SecretsService") == "NOT_SERVING"
        check = broker.admin().CheckUpstream(stubs.admin_service_pb2.CheckUpstreamRequest(), timeout=10)
        assert not check.reachable and "without its SecretList" in check.detail, check
        assert scrape(maddr).value("secretsbroker_upstream_up") == 0
        upstream.fault = None
        wait_for_status(maddr, "/readyz", 200, timeout=6)
    finally:
        upstream.close()


def test_check_upstream_answers_within_a_short_call_timeout(moto, aws_broker, stubs):
    """With --call-timeout under AWS's own wait, CheckUpstream still answers
    `reachable: false` and why, just before the broker's timeout, instead
    of the gate's DEADLINE_EXCEEDED that says nothing of AWS."""
    upstream = SlowUpstream(moto.address, delay=4, delayed=(".ListSecrets",))
    try:
        broker = aws_broker(["--call-timeout", "2"], env={"AWS_ENDPOINT_URL": upstream.url})
        started = time.monotonic()
        check = broker.admin().CheckUpstream(stubs.admin_service_pb2.CheckUpstreamRequest(), timeout=10)
        took = time.monotonic() - started
        assert not check.reachable, check
        assert check.detail == "AWS did not answer within the broker's call timeout (--call-timeout)", check
        assert took < 2.5, took
    finally:
        upstream.close()


def test_readyz_waits_for_the_first_upstream_check(moto, aws_broker):
    """Not ready until the upstream has answered once: a pod must not get
    traffic while its first ListSecrets is still on its way."""
    upstream = SlowUpstream(moto.address, delay=3, delayed=(".ListSecrets",))
    try:
        args, maddr = metrics_args()
        aws_broker(args, env={"AWS_ENDPOINT_URL": upstream.url})
        assert upstream.held.wait(5), "the first upstream check never started"
        waiting = http_get(maddr, "/readyz")
        assert waiting.status == 503, waiting
        assert "not checked yet" in waiting.body, waiting
        _, took = wait_for_status(maddr, "/readyz", 200, timeout=8)
        print(f"/readyz 200 {took:.2f} s after the first check started")
    finally:
        upstream.close()


# --------------------------------------------------------------------------
# 2. SIGTERM under load


LOAD_THREADS = 8
LOAD_BEFORE_SIGTERM = 1.0
WATCHERS = 3


def test_sigterm_under_load_drains(start_broker, stubs):
    broker = start_broker()
    pb = stubs.secrets_service_pb2

    watches = [Watch(broker, stubs, "mistral-api-key", channel=own_channel(broker.addr)) for _ in range(WATCHERS)]
    for w in watches:
        msg, _ = w.next(10)
        assert event_name(stubs, msg) == "WATCH_EVENT_TYPE_CURRENT"

    lock = threading.Lock()
    state = {"stop": False, "in_flight": 0, "started": 0, "ok": 0}
    failures: list[str] = []
    setup_errors: list[str] = []
    ready = threading.Barrier(LOAD_THREADS + 1)

    def worker() -> None:
        channel = own_channel(broker.addr)
        try:
            grpc.channel_ready_future(channel).result(timeout=10)
            stub = stubs.secrets_service_pb2_grpc.SecretsServiceStub(channel)
            stub.GetSecret(pb.GetSecretRequest(name="mistral-api-key"), timeout=10)
        except Exception as err:     # noqa: BLE001 - reported below
            setup_errors.append(repr(err))
        ready.wait(15)
        while True:
            with lock:
                if state["stop"]:
                    break
                state["in_flight"] += 1
                state["started"] += 1
            try:
                secret = stub.GetSecret(pb.GetSecretRequest(name="mistral-api-key"), timeout=15).secret
                if secret.string_value != SEED[MISTRAL]:
                    failures.append(f"wrong value for {secret.name}")
                else:
                    with lock:
                        state["ok"] += 1
            except grpc.RpcError as err:
                failures.append(f"{err.code().name}: {err.details()!r}")
            finally:
                with lock:
                    state["in_flight"] -= 1
        channel.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(LOAD_THREADS)]
    for t in threads:
        t.start()
    ready.wait(15)
    assert not setup_errors, setup_errors
    time.sleep(LOAD_BEFORE_SIGTERM)

    # From here on no thread starts a call: every call counted in `started`
    # was sent on an established connection before SIGTERM, and must succeed.
    with lock:
        state["stop"] = True
        in_flight_at_sigterm = state["in_flight"]
        started_before = state["started"]
        broker.proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()

    for t in threads:
        t.join(15)
    assert not any(t.is_alive() for t in threads), "load threads did not finish"

    for w in watches:
        err, at = w.expect_error(10)
        assert err.code() == grpc.StatusCode.UNAVAILABLE, f"watch ended with {err.code().name}: {err.details()!r}"
        print(f"watch ended UNAVAILABLE {at - sent:.2f} s after SIGTERM: {err.details()!r}")

    try:
        code = broker.proc.wait(10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the broker did not exit within 10 s of SIGTERM; log:\n{broker.tail()}")
    exited = time.monotonic() - sent
    for w in watches:
        w.close()

    print(
        f"{state['started']} calls started ({started_before} before SIGTERM, "
        f"{in_flight_at_sigterm} in flight at SIGTERM), {state['ok']} OK, "
        f"{len(failures)} failed; exit {code} after {exited:.2f} s"
    )
    assert state["started"] == started_before
    assert started_before >= 30, f"too little load: {started_before} calls in {LOAD_BEFORE_SIGTERM} s"
    assert in_flight_at_sigterm >= 1, "no call was in flight when SIGTERM was sent"
    assert not failures, f"{len(failures)} of {started_before} started calls failed: {failures[:5]}"
    assert state["ok"] == started_before
    assert code == 0, f"exit code {code}; log:\n{broker.tail()}"
    assert "panic" not in broker.log().lower(), broker.tail()


@pytest.fixture
def slow_upstream(moto):
    """Factory: slow_upstream(delay) -> SlowUpstream in front of this test's moto."""
    made = []

    def make(delay: float) -> SlowUpstream:
        upstream = SlowUpstream(moto.address, delay)
        made.append(upstream)
        return upstream

    yield make
    for upstream in made:
        upstream.close()


def _slow_call_then_sigterm(broker, stubs, upstream, name: str):
    """Starts GetSecret(name) in a thread, waits until its upstream read is
    held by the slow upstream, sends SIGTERM; returns (future result holder,
    thread, time SIGTERM was sent)."""
    pb = stubs.secrets_service_pb2
    stub = broker.secrets()
    result: dict = {}

    def call() -> None:
        try:
            result["secret"] = stub.GetSecret(pb.GetSecretRequest(name=name), timeout=30).secret
        except grpc.RpcError as err:
            result["error"] = err
        result["at"] = time.monotonic()

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    assert upstream.held.wait(10), "the call never reached the upstream"
    time.sleep(0.3)
    assert thread.is_alive() and not result, f"the call ended before SIGTERM: {result}"
    broker.proc.send_signal(signal.SIGTERM)
    return result, thread, time.monotonic()


def test_sigterm_lets_a_slow_call_finish(moto, aws_broker, slow_upstream, stubs):
    """A unary call held 2.5 s in the upstream when SIGTERM comes still
    answers OK, and the broker exits 0 right after it."""
    moto.create_secret("insurecove/slow-drain", "slow-drain-3e9a")
    upstream = slow_upstream(2.5)
    args, maddr = metrics_args()
    broker = aws_broker(args, env={"AWS_ENDPOINT_URL": upstream.url})
    wait_for_status(maddr, "/readyz", 200, timeout=5)
    result, thread, sent = _slow_call_then_sigterm(broker, stubs, upstream, "slow-drain")

    # While the call finishes, the probes still answer: not ready (new
    # traffic goes elsewhere), alive, and the last scrape is served.
    answer, _ = wait_for_status(maddr, "/readyz", 503, timeout=1)
    assert "shutting down" in answer.body, answer
    assert http_get(maddr, "/healthz").status == 200
    # A stop is not AWS failing: an alert on upstream_up must not fire.
    assert scrape(maddr).value("secretsbroker_upstream_up") == 1

    thread.join(15)
    assert not thread.is_alive(), "the in-flight call did not end"
    assert "error" not in result, (
        f"the call in flight at SIGTERM failed: {result['error'].code().name}: {result['error'].details()!r}; "
        f"log:\n{broker.tail()}")
    assert result["secret"].string_value == "slow-drain-3e9a"
    try:
        code = broker.proc.wait(10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the broker did not exit within 10 s of the call's end; log:\n{broker.tail()}")
    exited = time.monotonic() - sent
    print(f"call answered {result['at'] - sent:.2f} s after SIGTERM; exit {code} after {exited:.2f} s")
    assert code == 0, f"exit code {code}; log:\n{broker.tail()}"
    assert exited < 8, f"exit took {exited:.2f} s after SIGTERM"


def test_sigterm_grace_bounds_a_slow_call(moto, aws_broker, slow_upstream, stubs):
    """--shutdown-grace 1: a call held 4.5 s upstream does not keep the broker:
    it exits (code 0) about 1 s after SIGTERM."""
    moto.create_secret("insurecove/slow-grace", "slow-grace-3e9a")
    upstream = slow_upstream(4.5)      # under the SDK's 5 s attempt timeout
    broker = aws_broker(["--shutdown-grace", "1"], env={"AWS_ENDPOINT_URL": upstream.url})
    result, thread, sent = _slow_call_then_sigterm(broker, stubs, upstream, "slow-grace")
    try:
        code = broker.proc.wait(10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the broker did not exit within 10 s of SIGTERM; log:\n{broker.tail()}")
    exited = time.monotonic() - sent
    thread.join(10)
    outcome = (
        f"{result['error'].code().name}: {result['error'].details()!r}" if "error" in result
        else "OK" if "secret" in result else "no answer"
    )
    print(f"exit {code} {exited:.2f} s after SIGTERM (grace 1 s); the held call: {outcome}")
    assert exited < 3.5, f"exit took {exited:.2f} s with --shutdown-grace 1"
    assert code == 0, f"exit code {code}; log:\n{broker.tail()}"
    assert "secret" not in result, "the call held past the grace answered OK?"
    cut = [line for line in broker.log().splitlines() if " audit: " in line and "slow-grace" in line]
    assert len(cut) == 1 and 'outcome="CANCELLED"' in cut[0], f"the cut call's audit line: {cut}"


def test_sigterm_ends_a_watch_still_waiting_for_its_first_read(moto, aws_broker, slow_upstream, stubs):
    """A WatchSecret whose first read is held upstream when SIGTERM comes
    would end with the shutdown anyway: it ends at once with UNAVAILABLE
    (SHUTTING_DOWN), and does not hold the broker for the read or the grace."""
    moto.create_secret("insurecove/slow-watch", "slow-watch-3e9a")
    upstream = slow_upstream(4.5)
    broker = aws_broker(["--shutdown-grace", "30"], env={"AWS_ENDPOINT_URL": upstream.url})
    watch = Watch(broker, stubs, "slow-watch")
    try:
        assert upstream.held.wait(10), "the watch's first read never reached the upstream"
        time.sleep(0.3)
        broker.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        error, at = watch.expect_error(10)
        print(f"the watch ended {at - sent:.2f} s after SIGTERM: {error.code().name}: {error.details()!r}")
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
        assert "shutting down" in error.details(), error.details()
        assert at - sent < 2, f"the watch ended {at - sent:.2f} s after SIGTERM (its read is held 4.5 s)"
        try:
            code = broker.proc.wait(10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the broker did not exit within 10 s of SIGTERM; log:\n{broker.tail()}")
        exited = time.monotonic() - sent
        assert exited < 3.5, f"exit took {exited:.2f} s after SIGTERM; the held read takes 4.5 s"
        assert code == 0, f"exit code {code}; log:\n{broker.tail()}"
        # One call, one line: the handler's, not the gate's too.
        audit = [line for line in broker.log().splitlines() if " audit: " in line and 'rpc="WatchSecret"' in line]
        assert len(audit) == 1 and "slow-watch" in audit[0], audit
        assert 'outcome="UNAVAILABLE" reason="SHUTTING_DOWN"' in audit[0], audit
    finally:
        watch.close()


def test_a_second_signal_cuts_the_grace(moto, aws_broker, slow_upstream, stubs):
    """An operator's second Ctrl-C (or SIGTERM) during the grace stops the
    broker at once instead of waiting out --shutdown-grace."""
    moto.create_secret("insurecove/slow-second", "slow-second-3e9a")
    upstream = slow_upstream(4.5)
    broker = aws_broker(["--shutdown-grace", "30"], env={"AWS_ENDPOINT_URL": upstream.url})
    result, thread, sent = _slow_call_then_sigterm(broker, stubs, upstream, "slow-second")
    time.sleep(0.5)
    assert broker.proc.poll() is None, "the grace should still be running"
    broker.proc.send_signal(signal.SIGINT)
    try:
        code = broker.proc.wait(5)
    except subprocess.TimeoutExpired:
        pytest.fail(f"a second signal did not stop the broker; log:\n{broker.tail()}")
    exited = time.monotonic() - sent
    thread.join(10)
    print(f"exit {code} {exited:.2f} s after the first SIGTERM")
    assert exited < 3, exited
    assert code == 0
    assert "second stop signal" in broker.log(), broker.tail()
