"""A small loopback HTTP forward proxy that counts what it forwards.

Handles absolute-form requests (`POST http://host:port/path HTTP/1.1`: sent
on to host:port, the response relayed) and CONNECT tunnels (bytes relayed
both ways). Each request or tunnel is recorded with its target "host:port".
"""

from __future__ import annotations

import http.client
import select
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
    "proxy-authorization", "te", "trailer", "trailers", "transfer-encoding", "upgrade",
}


@dataclass(frozen=True)
class Forwarded:
    method: str        # "POST", ..., or "CONNECT"
    target: str        # "host:port"
    amz_target: str    # the X-Amz-Target header ("" for CONNECT)


class ForwardProxy:
    def __init__(self, log_path: Path):
        self.log_path = log_path
        self._lock = threading.Lock()
        self._forwarded: list[Forwarded] = []
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "a", buffering=1)
        handler = type("Handler", (_Handler,), {"proxy": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="forward-proxy", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def record(self, item: Forwarded) -> None:
        with self._lock:
            self._forwarded.append(item)
            self._log.write(f"forward {item.method} {item.target} {item.amz_target}\n")

    def log(self, line: str) -> None:
        with self._lock:
            self._log.write(line + "\n")

    def forwarded(self) -> list[Forwarded]:
        with self._lock:
            return list(self._forwarded)

    def count(self, target: str | None = None) -> int:
        return sum(1 for f in self.forwarded() if target is None or f.target == target)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._log.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    proxy: ForwardProxy  # set on the subclass

    def log_message(self, format, *args):  # noqa: A002 (http.server's name)
        self.proxy.log(f"{self.client_address[0]}:{self.client_address[1]} {format % args}")

    # -- CONNECT host:port --------------------------------------------------

    def do_CONNECT(self):
        host, _, port = self.path.rpartition(":")
        target = f"{host}:{port}"
        self.proxy.record(Forwarded("CONNECT", target, ""))
        try:
            upstream = socket.create_connection((host.strip("[]"), int(port)), timeout=10)
        except (OSError, ValueError) as error:
            self.send_error(502, f"cannot reach {target}: {error}")
            return
        self.send_response(200, "Connection established")
        self.end_headers()
        self.close_connection = True
        client = self.connection
        sockets = [client, upstream]
        try:
            while True:
                readable, _, broken = select.select(sockets, [], sockets, 30)
                if broken or not readable:
                    return
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (upstream if sock is client else client).sendall(data)
        except OSError:
            return
        finally:
            upstream.close()

    # -- absolute-form requests ---------------------------------------------

    def _forward(self):
        url = urlsplit(self.path)
        if url.scheme != "http" or not url.hostname:
            self.send_error(400, f"not an absolute-form http request: {self.path!r}")
            return
        port = url.port or 80
        target = f"{url.hostname}:{port}"
        self.proxy.record(Forwarded(self.command, target, self.headers.get("X-Amz-Target", "")))
        body = self._read_body()
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        if body is not None:
            headers = {k: v for k, v in headers.items() if k.lower() != "content-length"}
            headers["Content-Length"] = str(len(body))
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        conn = http.client.HTTPConnection(url.hostname, port, timeout=30)
        try:
            conn.request(self.command, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except OSError as error:
            self.send_error(502, f"cannot reach {target}: {error}")
            return
        finally:
            conn.close()
        self.send_response_only(resp.status, resp.reason)
        for key, value in resp.getheaders():
            if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _read_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else None

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _forward
