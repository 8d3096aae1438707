"""Raw HTTP/2 for the attack tests: what a hostile peer writes on the wire,
frame by frame (PyPI hyperframe and hpack), without a client library that
would keep it within the rules.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field

import hpack
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
REFUSED_STREAM = 0x7


def grpc_message(payload: bytes) -> bytes:
    """One gRPC length-prefixed message (not compressed)."""
    return b"\x00" + struct.pack(">I", len(payload)) + payload


def rss_kib(pid: int) -> int:
    """Resident memory of a process, KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


@dataclass
class ServerFrames:
    """What the server sent on one raw connection, read in a thread."""

    settings: dict[int, int] = field(default_factory=dict)
    headers: dict[int, list[tuple[str, str]]] = field(default_factory=dict)
    data: dict[int, bytes] = field(default_factory=dict)
    resets: dict[int, int] = field(default_factory=dict)
    goaway: int | None = None
    closed: bool = False
    ended: set[int] = field(default_factory=set)

    def refused(self) -> int:
        return sum(1 for code in self.resets.values() if code == REFUSED_STREAM)

    def status_of(self, stream_id: int) -> dict[str, str]:
        return dict(self.headers.get(stream_id, []))


class RawH2:
    """A client connection that writes frames as told and reads every frame
    the server sends (answering PINGs and SETTINGS, as a live peer does)."""

    def __init__(self, addr: str, *, tls: ssl.SSLContext | None = None, answer: bool = True):
        host, port = addr.rsplit(":", 1)
        raw = socket.create_connection((host, int(port)), timeout=10)
        self.sock = tls.wrap_socket(raw, server_hostname=host) if tls else raw
        self.sock.settimeout(None)
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.frames = ServerFrames()
        self.answer = answer
        self._write_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def send(self, data: bytes) -> None:
        with self._write_lock:
            self.sock.sendall(data)

    def preface(self) -> None:
        self.send(PREFACE + SettingsFrame(0).serialize())

    def headers(self, stream_id: int, path: str, content_type: str = "application/grpc", *, end_stream: bool = False) -> bytes:
        """A HEADERS frame of a gRPC request (serialized, not sent)."""
        block = self.encoder.encode([
            (":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "localhost"),
            ("content-type", content_type), ("te", "trailers"),
        ])
        flags = ["END_HEADERS"] + (["END_STREAM"] if end_stream else [])
        return HeadersFrame(stream_id, data=block, flags=flags).serialize()

    def request(self, stream_id: int, path: str, payload: bytes, content_type: str = "application/grpc") -> None:
        self.send(self.headers(stream_id, path, content_type)
                  + DataFrame(stream_id, data=grpc_message(payload), flags=["END_STREAM"]).serialize())

    def wait_end(self, stream_id: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while stream_id not in self.frames.ended and stream_id not in self.frames.resets:
            if self.frames.closed or time.monotonic() > deadline:
                raise AssertionError(f"stream {stream_id} did not end: {self.frames}")
            time.sleep(0.02)

    def close(self) -> None:
        # shutdown first: close() alone does not disconnect while the reader
        # thread is blocked in recv() on the socket (it stays open until the
        # broker's next write).
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass

    def _read_exact(self, n: int) -> bytes | None:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                return None
            out += chunk
        return out

    def _read(self) -> None:
        try:
            while True:
                header = self._read_exact(9)
                if header is None:
                    break
                frame, length = Frame.parse_frame_header(memoryview(header))
                body = self._read_exact(length) if length else b""
                if body is None:
                    break
                frame.parse_body(memoryview(body))
                self._handle(frame)
        except OSError:
            pass
        self.frames.closed = True

    def _handle(self, frame) -> None:
        f = self.frames
        if isinstance(frame, SettingsFrame):
            if "ACK" not in frame.flags:
                f.settings.update(frame.settings)
                if self.answer:
                    self.send(SettingsFrame(0, flags=["ACK"]).serialize())
        elif isinstance(frame, PingFrame):
            if "ACK" not in frame.flags and self.answer:
                self.send(PingFrame(0, opaque_data=frame.opaque_data, flags=["ACK"]).serialize())
        elif isinstance(frame, HeadersFrame):
            decoded = [(k.decode() if isinstance(k, bytes) else k, v.decode() if isinstance(v, bytes) else v)
                       for k, v in self.decoder.decode(frame.data)]
            f.headers.setdefault(frame.stream_id, []).extend(decoded)
            if "END_STREAM" in frame.flags:
                f.ended.add(frame.stream_id)
        elif isinstance(frame, DataFrame):
            f.data[frame.stream_id] = f.data.get(frame.stream_id, b"") + frame.data
            if frame.flow_controlled_length and self.answer:
                self.send(WindowUpdateFrame(0, window_increment=frame.flow_controlled_length).serialize())
            if "END_STREAM" in frame.flags:
                f.ended.add(frame.stream_id)
        elif isinstance(frame, RstStreamFrame):
            f.resets[frame.stream_id] = frame.error_code
        elif isinstance(frame, GoAwayFrame):
            f.goaway = frame.error_code
