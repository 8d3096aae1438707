"""Helpers of the WatchSecret tests (test_watch.py).

`Watch` is one WatchSecret stream read by a background thread, so that a
test can wait for the next message with a bound, and knows when each
message arrived. `reading=False` opens the stream without reading it (a
slow watcher) until `start_reading()`.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import grpc

import support

LIST_SECRETS = "secretsmanager.ListSecrets"
GET_SECRET_VALUE = "secretsmanager.GetSecretValue"

_END = object()


def event_name(stubs, msg) -> str:
    """WATCH_EVENT_TYPE_... of a WatchSecretResponse."""
    return stubs.secret_pb2.WatchEventType.Name(msg.type)


def describe(stubs, msg) -> str:
    s = msg.secret
    which = s.WhichOneof("value")
    return (
        f"{event_name(stubs, msg)} name={s.name} version={s.version_id} "
        f"stages={list(s.version_stages)} value={'<' + which + '>' if which else 'none'}"
    )


class Watch:
    """One WatchSecret stream; messages (arrival time, message) go to a queue."""

    def __init__(self, broker, stubs, name: str, *, since_version_id: str = "",
                 version_stage: str = "", channel=None, reading: bool = True):
        self.stubs = stubs
        self.name = name
        channel = channel or broker.channel()
        stub = stubs.secrets_service_pb2_grpc.SecretsServiceStub(channel)
        request = stubs.secrets_service_pb2.WatchSecretRequest(
            name=name, since_version_id=since_version_id, version_stage=version_stage,
        )
        self.opened_at = time.monotonic()
        self.call = stub.WatchSecret(request)
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.received: list = []      # every message taken with next()
        if reading:
            self.start_reading()

    def start_reading(self) -> None:
        assert self._thread is None, "already reading"
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for msg in self.call:
                self._queue.put((time.monotonic(), msg))
        except grpc.RpcError as err:
            self._queue.put((time.monotonic(), err))
            return
        self._queue.put((time.monotonic(), _END))

    def _take(self, timeout: float, what: str):
        try:
            return self._queue.get(timeout=max(0.0, timeout))
        except queue.Empty:
            raise AssertionError(
                f"watch {self.name!r}: no {what} within {timeout:.1f} s "
                f"(received so far: {[describe(self.stubs, m) for m in self.received]})"
            ) from None

    def next(self, timeout: float):
        """The next message and its arrival time (monotonic). Fails on a
        timeout, an error status or the end of the stream."""
        at, item = self._take(timeout, "message")
        if isinstance(item, grpc.RpcError):
            raise AssertionError(
                f"watch {self.name!r} ended with {item.code().name}: {item.details()!r} "
                f"(received so far: {[describe(self.stubs, m) for m in self.received]})"
            )
        if item is _END:
            raise AssertionError(f"watch {self.name!r} ended without a status error")
        self.received.append(item)
        return item, at

    def expect_error(self, timeout: float) -> tuple[grpc.RpcError, float]:
        """The status the stream ends with (no message may come first)."""
        at, item = self._take(timeout, "end of stream")
        if isinstance(item, grpc.RpcError):
            return item, at
        if item is _END:
            raise AssertionError(f"watch {self.name!r} ended with OK, not an error status")
        raise AssertionError(
            f"watch {self.name!r}: expected the end of the stream, got {describe(self.stubs, item)}"
        )

    def expect_nothing(self, duration: float) -> None:
        """No message (nor end) arrives within duration."""
        start = time.monotonic()
        try:
            at, item = self._queue.get(timeout=duration)
        except queue.Empty:
            return
        what = (
            f"{item.code().name}: {item.details()!r}" if isinstance(item, grpc.RpcError)
            else "end of stream" if item is _END else describe(self.stubs, item)
        )
        raise AssertionError(
            f"watch {self.name!r}: expected no message for {duration:.1f} s, got {what} "
            f"after {at - start:.2f} s"
        )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.call.cancel()
            if self._thread is not None:
                self._thread.join(5)


def stats(broker, stubs):
    return broker.admin().GetCacheStats(stubs.admin_service_pb2.GetCacheStatsRequest(), timeout=10)


def watch_counters(s) -> dict:
    return {k: getattr(s, k) for k in ("watchers", "watched_secrets", "watch_rounds", "watch_upstream_calls")}


def wait_for_stats(broker, stubs, predicate, timeout: float, what: str):
    """Polls GetCacheStats until predicate(stats) holds; returns those stats."""
    deadline = time.monotonic() + timeout
    while True:
        s = stats(broker, stubs)
        if predicate(s):
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout:.1f} s; stats {watch_counters(s)}")
        time.sleep(0.05)


def quiet_stats(broker, stubs, action=None, timeout: float = 10.0):
    """Watch counters read twice around action() (e.g. starting moto's
    recording), retried until the sweep made no call in between and no
    round is in flight (rounds == upstream calls, i.e. one ListSecrets page
    per round for one tracked secret). Returns (stats, action's result)."""
    deadline = time.monotonic() + timeout
    while True:
        before = stats(broker, stubs)
        result = action() if action else None
        after = stats(broker, stubs)
        a, b = watch_counters(before), watch_counters(after)
        if a == b and a["watch_rounds"] == a["watch_upstream_calls"]:
            return after, result
        if time.monotonic() > deadline:
            raise AssertionError(f"no quiet moment between sweep rounds: {a} then {b}")
        time.sleep(0.1)


def sweep_calls(moto, target: str) -> int:
    """Requests of `target` moto recorded from the broker (not boto3). For
    ListSecrets, only the sweep's pages (filtered by the prefix), not the
    upstream health check's (MaxResults=1, no filter)."""
    return sum(
        1 for r in moto.recorded()
        if r.target == target and not r.from_boto and not r.is_health_check
    )


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def put_pending(moto, name: str, value: str) -> str:
    """A new version staged AWSPENDING only (AWSCURRENT stays put); its id."""
    return moto.client.put_secret_value(
        SecretId=name, SecretString=value, VersionStages=["AWSPENDING"],
    )["VersionId"]


def promote(moto, name: str, new_version: str, old_version: str) -> None:
    """Moves AWSCURRENT from old_version to new_version (the last step of a
    Lambda rotation)."""
    moto.client.update_secret_version_stage(
        SecretId=name, VersionStage="AWSCURRENT",
        MoveToVersionId=new_version, RemoveFromVersionId=old_version,
    )


def write_atomically(path: Path, text: str) -> None:
    """Replaces path as editors and secret mounts do (write aside, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


FANOUT_REPORT = support.LOG_DIR / "watch-fanout.txt"
