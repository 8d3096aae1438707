"""Helpers of the operational tests (test_operations.py): the broker's
plain-HTTP metrics/probe endpoint and channels that own their connection.

Scrapes are parsed with prometheus_client's OpenMetrics parser (the broker
serves application/openmetrics-text), never with regular expressions.
"""

from __future__ import annotations

import http.client
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from prometheus_client.openmetrics.parser import text_string_to_metric_families

import support

# No proxy for loopback scrapes, whatever the environment says.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# grpc-core shares one connection (subchannel) between channels with equal
# arguments; a local pool gives each channel its own TCP connection, which
# the per-connection limits need.
OWN_CONNECTION_OPTIONS = support.CHANNEL_OPTIONS + [("grpc.use_local_subchannel_pool", 1)]


def own_channel(addr: str) -> grpc.Channel:
    """A channel on a TCP connection of its own (not shared with other channels)."""
    return grpc.insecure_channel(addr, options=OWN_CONNECTION_OPTIONS)


@dataclass
class HttpAnswer:
    status: int
    content_type: str
    body: str


def http_get(addr: str, path: str, timeout: float = 5.0) -> HttpAnswer:
    """GET http://addr/path; any HTTP status is returned, not raised."""
    try:
        with _OPENER.open(f"http://{addr}{path}", timeout=timeout) as resp:
            return HttpAnswer(resp.status, resp.headers.get("Content-Type", ""), resp.read().decode())
    except urllib.error.HTTPError as err:
        return HttpAnswer(err.code, err.headers.get("Content-Type", ""), err.read().decode(errors="replace"))


class Scrape:
    """One parsed /metrics exposition."""

    def __init__(self, text: str, content_type: str):
        self.text = text
        self.content_type = content_type
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = [s for f in self.families.values() for s in f.samples]

    def values(self, sample_name: str) -> dict[frozenset, float]:
        """labels (frozenset of items) -> value for every sample of that name."""
        return {
            frozenset(s.labels.items()): s.value for s in self.samples if s.name == sample_name
        }

    def value(self, sample_name: str, **labels) -> float | None:
        """The sample with exactly these labels, None when absent."""
        return self.values(sample_name).get(frozenset(labels.items()))

    def by(self, sample_name: str, label: str, **fixed) -> dict[str, float]:
        """label value -> sample value, over the samples whose other labels are `fixed`."""
        out = {}
        for s in self.samples:
            if s.name != sample_name:
                continue
            rest = {k: v for k, v in s.labels.items() if k != label}
            if rest == fixed and label in s.labels:
                out[s.labels[label]] = s.value
        return out

    def label_values(self) -> list[tuple[str, str, str]]:
        """(sample, label, value) for every label of every sample."""
        return [(s.name, k, v) for s in self.samples for k, v in s.labels.items()]


def scrape(addr: str) -> Scrape:
    answer = http_get(addr, "/metrics")
    assert answer.status == 200, f"/metrics answered {answer.status}: {answer.body[:500]!r}"
    return Scrape(answer.body, answer.content_type)


def wait_for_scrape(addr: str, predicate, timeout: float = 3.0) -> Scrape:
    """Scrapes until predicate(scrape) holds (metrics recorded just after a
    response was sent may lag a moment); returns the last scrape either way,
    the caller asserts on it."""
    deadline = time.monotonic() + timeout
    while True:
        s = scrape(addr)
        if predicate(s) or time.monotonic() > deadline:
            return s
        time.sleep(0.05)


def wait_for_status(addr: str, path: str, status: int, timeout: float) -> tuple[HttpAnswer, float]:
    """Polls GET path until it answers status; returns (answer, seconds taken).
    Fails with the last answer after timeout."""
    start = time.monotonic()
    while True:
        try:
            answer = http_get(addr, path, timeout=2.0)
        except OSError as err:           # connection refused, timeout
            answer = HttpAnswer(-1, "", repr(err))
        took = time.monotonic() - start
        if answer.status == status:
            return answer, took
        if took > timeout:
            raise AssertionError(
                f"GET {path} did not answer {status} within {timeout:.1f} s; "
                f"last answer {answer.status}: {answer.body[:300]!r}"
            )
        time.sleep(0.1)


# --------------------------------------------------------------------------
# A slow upstream: a loopback reverse proxy in front of moto that holds
# requests for `delay` seconds before forwarding them (GetSecretValue only by
# default; `delayed=None`: every request), so that a call is certainly in
# flight inside the broker when a test wants. It counts what it forwards (by
# X-Amz-Target) and the most requests under way at once.

class SlowUpstream:
    def __init__(self, moto_address: str, delay: float, delayed: tuple[str, ...] | None = (".GetSecretValue",)):
        self.moto_address = moto_address          # "127.0.0.1:PORT"
        self.delay = delay
        self.delayed = delayed
        self.held = threading.Event()             # set when a request is being held
        self.lock = threading.Lock()
        self.in_flight = 0
        self.most_in_flight = 0
        self.targets: list[str] = []
        # (status, content type, body) answered instead of AWS's, when set:
        # a proxy's error page, or an error AWS may give.
        self.fault: tuple[int, str, bytes] | None = None
        # X-Amz-Target suffixes the fault answers (None: every request).
        self.fault_only: tuple[str, ...] | None = None
        handler = type("Handler", (_SlowHandler,), {"upstream": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._server.request_queue_size = 1024
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def count(self, suffix: str) -> int:
        """Requests forwarded whose X-Amz-Target ends with suffix."""
        with self.lock:
            return sum(1 for t in self.targets if t.endswith(suffix))

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _enter(self, target: str) -> None:
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            self.targets.append(target)

    def _leave(self) -> None:
        with self.lock:
            self.in_flight -= 1


class _SlowHandler(BaseHTTPRequestHandler):
    upstream: SlowUpstream
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:      # quiet
        pass

    def do_POST(self) -> None:
        up = self.upstream
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        target = self.headers.get("X-Amz-Target", "")
        up._enter(target)
        fault = up.fault
        if fault is not None and (up.fault_only is None or target.endswith(up.fault_only)):
            up._leave()
            status, content_type, data = fault
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        try:
            if up.delayed is None or target.endswith(up.delayed):
                up.held.set()
                time.sleep(up.delay)
            conn = http.client.HTTPConnection(up.moto_address, timeout=30)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
                conn.request("POST", self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            finally:
                conn.close()
        finally:
            up._leave()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
