"""The AWS Secrets Manager class services already use, served by secrets-broker.

A service switches with one import line::

    from secrets_broker.aws_secrets import AWSSecretsManager, SecretNotFoundError

Same names, same environment variables (``SECRET_PREFIX``,
``SECRET_CACHE_TTL``, the proxy variables, a ``.env`` file), same
behaviour: ``get_secret`` with its local cache, ``test_connection``,
``clear_cache``, ``get_cache_stats``, the typed configs. What changes is
underneath: the values come from the broker over gRPC (``BROKER_ENDPOINT``,
mutual TLS with ``BROKER_CA_FILE``, ``BROKER_CERT_FILE``,
``BROKER_KEY_FILE``), and a cached secret is kept fresh by the broker's
WatchSecret stream in a background thread, so a rotation reaches the local
cache within seconds instead of at the end of the TTL.
"""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import itertools
import json
import logging
import os
import math
import random
import re
import threading
import time
import weakref
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar, Union

import grpc
import grpc.aio
# googleapis-common-protos and grpcio-status ship no type information.
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status  # type: ignore[import-untyped]
from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from secretsbroker.v1 import secret_pb2, secrets_service_pb2, secrets_service_pb2_grpc

__all__ = [
    "AWSSecretsConfig",
    "AWSSecretsManager",
    "AWSSecretsManagerError",
    "BrokerUnavailableError",
    "InvalidSecretNameError",
    "MalformedSecretError",
    "SecretAccessDeniedError",
    "SecretNotFoundError",
    "SecretValue",
    "get_database_config",
    "get_jwt_config",
    "get_mistral_api_key",
    "test_aws_connection",
]



class _OneLineArgs(logging.Filter):
    """Keeps each of the package's log records on one line: an argument
    that would print a line break or another unprintable character (a
    name as the caller asked it, a version id from AWS, a gRPC error's
    several lines) is written with its escapes instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_one_line(arg) for arg in record.args)
        return True


def _one_line(arg: Any) -> Any:
    if isinstance(arg, (int, float)):
        return arg
    text = str(arg)
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


logger = logging.getLogger(__name__)
logger.addFilter(_OneLineArgs())

CALL_TIMEOUT = 10.0
# How long the first read of a key after clear_cache() gives AWS before it
# takes the broker's own copy (see _ask).
REFRESH_WAIT = 2.0
WATCH_BACKOFF_MAX = 5.0
# HTTP/2 pings: a connection silent this long is pinged, and closed when
# the answer takes longer than the timeout (the Rust client's figures).
KEEPALIVE_TIME_MS = 5_000
KEEPALIVE_TIMEOUT_MS = 5_000
# Names followed by push at once, each by one WatchSecret stream on the one
# connection: well under the broker's calls per connection (1,024 by
# default), as the Rust client does. Names past it are cached for
# SECRET_CACHE_TTL without push.
MAX_FOLLOWED = 256
# The local cache drops what has expired and is not followed once it holds
# this many entries, then again each time it has doubled since.
SWEEP_AT_LEAST = 2 * MAX_FOLLOWED


# --------------------------------------------------------------------------
# errors


class AWSSecretsManagerError(Exception):
    """Any failure to get a secret. ``code`` is the gRPC status, ``reason``
    the broker's ErrorInfo reason (e.g. ``UPSTREAM_UNAVAILABLE``), and
    ``metadata`` the ErrorInfo's metadata (e.g. ``field`` of a
    ``MALFORMED_SECRET``, ``secret_name``); empty when the broker sent none."""

    def __init__(
        self,
        message: str,
        code: Optional[grpc.StatusCode] = None,
        reason: str = "",
        metadata: Optional[dict[str, str]] = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})


class SecretNotFoundError(AWSSecretsManagerError):
    """No such secret or version, or it is marked for deletion."""


class SecretAccessDeniedError(AWSSecretsManagerError):
    """Refused by the broker's policy (``POLICY_DENIED``), by AWS IAM
    (``ACCESS_DENIED``), or no usable client certificate."""


class InvalidSecretNameError(AWSSecretsManagerError):
    """A name or version outside AWS's rules."""


class MalformedSecretError(AWSSecretsManagerError):
    """A typed config whose secret is not the JSON it should be."""


class BrokerUnavailableError(AWSSecretsManagerError):
    """The broker, or AWS behind it with nothing cached, cannot answer."""


def _is_call(error: grpc.RpcError) -> bool:
    """Whether the error carries a status: a ``grpc.Call`` (sync), or a
    ``grpc.aio.AioRpcError``, which is not one."""
    return isinstance(error, (grpc.Call, grpc.aio.AioRpcError))


def _error_from(error: grpc.RpcError, config: Optional["AWSSecretsConfig"] = None) -> AWSSecretsManagerError:
    code: Optional[grpc.StatusCode] = error.code() if _is_call(error) else None
    details = error.details() if _is_call(error) else None
    # One line, whatever the transport put in the text.
    message = " ".join(str(details or error).split())
    reason, metadata = _error_info_of(error)
    if code == grpc.StatusCode.UNAVAILABLE and not reason and config is not None:
        # The transport's own failure (no answer of the broker's): said as
        # what to check, the transport's words after it.
        hint = _transport_hint(message, config)
        message = f"{hint} ({message})" if hint else message
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED and not reason and config is not None:
        # This client's own deadline: the broker never answered in time
        # (it gives a reason, CALL_TIMEOUT, when it cuts a call itself).
        waited = f"did not answer within this client's {CALL_TIMEOUT:g} s"
        message = f"{_silent_broker(config, waited)} ({message})"
    kind: type[AWSSecretsManagerError] = AWSSecretsManagerError
    if code == grpc.StatusCode.NOT_FOUND:
        kind = SecretNotFoundError
    elif code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        kind = SecretAccessDeniedError
    elif code == grpc.StatusCode.INVALID_ARGUMENT:
        kind = InvalidSecretNameError
    elif code == grpc.StatusCode.FAILED_PRECONDITION and reason == "MALFORMED_SECRET":
        kind = MalformedSecretError
    elif code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED):
        kind = BrokerUnavailableError
    label = f"{code.name} {reason}".strip() if code is not None else "error"
    return kind(f"{label}: {message}", code=code, reason=reason, metadata=metadata)


# The broker's reasons for a read it cannot answer for now: shutting down
# (a restart), full, its call timeout, or AWS out of reach or throttling
# while it holds no copy (a broker just restarted holds none).
_NO_ANSWER_FOR_NOW = (
    "SHUTTING_DOWN",
    "TOO_MANY_CALLS",
    "CALL_TIMEOUT",
    "UPSTREAM_UNAVAILABLE",
    "UPSTREAM_THROTTLED",
    "UPSTREAM_QUEUE_FULL",
)


def _no_answer_for_now(error: grpc.RpcError) -> bool:
    """Whether a read failed for want of an answer that may come later: no
    broker reached, or none that answered within this client's deadline
    (the transport's UNAVAILABLE, DEADLINE_EXCEEDED: no reason of the
    broker's), or the broker's own ``_NO_ANSWER_FOR_NOW``. Never an answer about
    the secret (NOT_FOUND, PERMISSION_DENIED, ...)."""
    if not _is_call(error):
        return False
    reason, _ = _error_info_of(error)
    if reason:
        return reason in _NO_ANSWER_FOR_NOW
    return error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class _StreamState:
    """Whether a follower's WatchSecret stream vouches for the value it
    follows: connected (an event came on it: the broker sends the current
    version first), or broken less than ``BROKER_MAX_STALE`` ago, so that
    no rotation can have gone unheard for longer. Written by the follower,
    read by readers: each field is one atomic store."""

    def __init__(self) -> None:
        self.connected = False
        self.broke_at: Optional[float] = None
        # Whether a read was served on its word since the stream broke (the
        # warning is said once an outage, not once a read).
        self.relied_on = False

    def heard(self) -> None:
        self.connected = True
        self.relied_on = False

    def broke(self) -> None:
        if self.connected:
            self.connected = False
            self.broke_at = time.monotonic()

    def vouches(self, max_stale: float, at: Optional[float] = None) -> bool:
        """Connected, or broken less than ``max_stale`` before ``at`` (now
        by default; a read's start: its wait must not use up the bound).
        Never with ``max_stale`` 0."""
        if max_stale <= 0:
            return False
        if self.connected:
            return True
        at = time.monotonic() if at is None else at
        return self.broke_at is not None and at - self.broke_at <= max_stale


# The longest pause between reads that ask a silent broker (_BrokerSilence).
MAX_SILENCE_PAUSE = 16.0


class _BrokerSilence:
    """After a read got no answer from the broker for now, how long reads
    of values a stream vouches for are answered from memory without asking
    the broker: a frozen or partitioned broker then holds one read for
    ``REFRESH_WAIT`` every so often, not every read past its TTL. The
    pause starts at ``REFRESH_WAIT`` and doubles, up to
    ``MAX_SILENCE_PAUSE``, while the broker stays silent; any answer of the
    broker's ends it. Reads of names not held, or not followed, ask the
    broker as ever. One per client, since the broker is one for every
    name. Each field is one atomic store: threads racing move the pause by
    a read at most."""

    def __init__(self) -> None:
        self.until = 0.0
        self.pause = 0.0

    def failed(self, error: grpc.RpcError) -> None:
        """A read failed with ``error``: no answer for now starts the next
        pause (not while one holds: reads that raced the one that started
        it), an answer about the secret ends any."""
        if not _no_answer_for_now(error):
            self.answered()
            return
        now = time.monotonic()
        if now < self.until:
            return
        self.pause = min(max(self.pause * 2, REFRESH_WAIT), MAX_SILENCE_PAUSE)
        self.until = now + self.pause

    def answered(self) -> None:
        self.pause = 0.0
        self.until = 0.0

    def covers(self, what: str, name: str, stream: Optional[_StreamState], max_stale: float) -> bool:
        """Whether a read of ``name``, whose value held ``stream`` follows,
        is answered from memory now, without asking the broker (said as
        ``_serve_through_outage`` says it)."""
        if stream is None or time.monotonic() >= self.until or not stream.vouches(max_stale):
            return False
        why = f"the broker gave no answer lately (asked again within {self.pause:g} s)"
        _say_held_is_served(what, name, stream, why)
        return True


def _wait_for(stream: Optional[_StreamState], max_stale: float) -> float:
    """How long a read past its TTL waits for the broker: while a stream
    vouches for the value held, no longer than ``REFRESH_WAIT``, then the
    held value answers (``_serve_through_outage``): a frozen broker must not
    hold every read for the whole call timeout."""
    if stream is not None and stream.vouches(max_stale):
        return REFRESH_WAIT
    return CALL_TIMEOUT


def _serve_through_outage(
    what: str, name: str, stream: Optional[_StreamState], error: grpc.RpcError, max_stale: float, asked_at: float
) -> bool:
    """Whether a read of ``name`` asked at ``asked_at`` that got no answer
    for now (``_no_answer_for_now``: the broker restarting, partitioned,
    frozen, or without AWS and a copy of its own) may be answered with the
    value held, past its TTL: only while its stream vouches for it. Names
    not followed have nothing to vouch for them, and fail as before. Says
    so once an outage, at WARNING."""
    if stream is None or not _no_answer_for_now(error) or not stream.vouches(max_stale, asked_at):
        return False
    code = error.code().name if _is_call(error) else "error"
    reason, _ = _error_info_of(error)
    _say_held_is_served(what, name, stream, f"no answer from the broker for now ({code} {reason})".strip())
    return True


def _say_held_is_served(what: str, name: str, stream: _StreamState, why: str) -> None:
    """Says that a read of ``name`` was answered with the value held, past
    its TTL, because of ``why``: at WARNING once an outage, then at DEBUG."""
    log = logger.debug if stream.relied_on else logger.warning
    stream.relied_on = True
    log("%s %s: %s: the value held is served, which its watch stream vouched for within "
        "BROKER_MAX_STALE", what, name, why)


def _silent_broker(config: "AWSSecretsConfig", what: str) -> str:
    """What to check when the broker's address takes connections but
    nothing answers on them."""
    return (
        f"the broker at BROKER_ENDPOINT={config.broker_endpoint} {what}: is it overloaded, or is "
        "something at that address taking connections without answering?"
    )


def _transport_hint(details: str, config: "AWSSecretsConfig") -> str:
    text = details.lower()
    endpoint = config.broker_endpoint
    tls = bool(config.broker_ca_file)
    # grpcio's own words ("Peer name X is not in peer certificate"), and
    # other stacks'.
    if any(words in text for words in ("not in peer certificate", "hostname verification", "hostname mismatch")):
        return (
            f"the broker at {endpoint} presents a certificate for another name than the one "
            "asked: set BROKER_TLS_DOMAIN to the name its certificate carries"
        )
    if "certificate_verify_failed" in text or "certificate verify failed" in text:
        return (
            f"the broker at {endpoint} presents a certificate not signed by the CA of "
            f"BROKER_CA_FILE={config.broker_ca_file} (or for another name: BROKER_TLS_DOMAIN)"
        )
    if not tls and ("socket closed" in text or "connection reset" in text or "end of stream" in text):
        return (
            f"the broker at {endpoint} closed the connection: a TLS broker (set BROKER_CA_FILE, "
            "BROKER_CERT_FILE and BROKER_KEY_FILE)? or it is restarting, or has all its connections"
        )
    if tls and "tsi_data_corrupted" in text:
        # What grpcio says when a TLS 1.3 server refuses the client's
        # certificate: the refusal comes after the client's handshake ended.
        return (
            f"the broker at {endpoint} refused this client's certificate (BROKER_CERT_FILE="
            f"{config.broker_cert_file}): not from a CA the broker trusts, outside its dates, "
            "no longer trusted after a reload of the broker's client CA bundle, or a chain "
            "larger than the broker takes (16 KiB); the broker's log says which"
        )
    if tls and ("handshake" in text or "ssl" in text or "tls" in text or "socket closed" in text):
        return (
            f"the TLS handshake with the broker at {endpoint} failed: check BROKER_CA_FILE, "
            "BROKER_CERT_FILE and BROKER_KEY_FILE, and that the broker speaks TLS"
        )
    if "ping timeout" in text or "keepalive watchdog" in text:
        return _silent_broker(config, "did not answer this client's HTTP/2 pings")
    if "before receiving settings" in text:
        return _silent_broker(config, "took the connection but never started HTTP/2 on it")
    if "connection refused" in text or "failed to connect" in text:
        proxy = config.proxy_in_use(tls)
        if proxy is not None:
            url, variable = proxy
            return (
                f"the broker at BROKER_ENDPOINT={endpoint} is reached through the proxy {url} "
                f"({variable}), and that failed: is the proxy running and does it allow CONNECT "
                "to the broker? To reach the broker directly, name its host in NO_PROXY"
            )
        return f"nothing answers at BROKER_ENDPOINT={endpoint}: is the broker running there?"
    return ""


def _error_info_of(error: grpc.RpcError) -> tuple[str, dict[str, str]]:
    """The broker's ErrorInfo: its reason and metadata, or nothing."""
    if isinstance(error, grpc.aio.AioRpcError):
        status = _aio_status(error)
    elif isinstance(error, grpc.Call):
        status = rpc_status.from_call(error)
    else:
        return "", {}
    for detail in status.details if status is not None else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason), {str(key): str(value) for key, value in info.metadata.items()}
    return "", {}


def _aio_status(error: grpc.aio.AioRpcError) -> Any:
    """``google.rpc.Status`` of an asyncio error (grpcio-status reads only
    sync calls' trailers)."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            from google.rpc import status_pb2

            status = status_pb2.Status()
            status.ParseFromString(value)
            return status
    return None


# --------------------------------------------------------------------------
# configuration


class AWSSecretsConfig(BaseSettings):
    """Settings from the environment and a ``.env`` file, as the class this
    package replaces read them; plus where the broker is."""

    # hide_input_in_errors: a ValidationError would otherwise quote what
    # it was given, the AWS secret key included.
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False, hide_input_in_errors=True)

    aws_access_key_id: Optional[str] = None
    # Left out of repr() and str(): a service that logs its settings must
    # not log the AWS secret key, nor a proxy's user and password.
    aws_secret_access_key: Optional[str] = Field(default=None, repr=False)
    aws_default_region: str = "ap-east-1"
    http_proxy: Optional[str] = Field(default=None, repr=False)
    https_proxy: Optional[str] = Field(default=None, repr=False)
    no_proxy: Optional[str] = None
    secret_prefix: str = "insurecove"
    secret_cache_ttl: int = 300

    broker_endpoint: str = "127.0.0.1:50051"
    # How long after its WatchSecret stream broke a held value is still
    # served when the broker cannot be reached (see _serve_through_outage);
    # the Rust client's max_stale.
    broker_max_stale: int = 30
    broker_ca_file: Optional[str] = None
    broker_cert_file: Optional[str] = None
    broker_key_file: Optional[str] = None
    broker_tls_domain: Optional[str] = None

    @field_validator("secret_cache_ttl", "broker_max_stale", mode="before")
    @classmethod
    def _ttl(cls, value: Any, info: ValidationInfo) -> Any:
        """As the broker reads it: seconds, or a duration such as ``5m``,
        ``1h 30m`` or ``0.5m`` in the units ms, s, m (minutes), h and d
        (``5M`` is refused: it is no minute); empty means the default;
        never negative. Rounded up to whole seconds: only 0 turns it off."""
        if not isinstance(value, str):
            return value
        text = value.strip()
        if not text:
            return cls.model_fields[str(info.field_name)].default
        if text.startswith("-"):
            raise ValueError(f"must not be negative ({_ZERO_MEANS[str(info.field_name)]})")
        if re.fullmatch(r"\+?[0-9]+", text):
            return int(text)
        unknown = [u for u in re.split(r"[0-9.\s]+", text) if u and u not in _DURATION_UNITS]
        if unknown and re.search(r"[0-9]", text):
            raise ValueError(f"its unit {unknown[0]!r} is not one of ms, s, m (minutes), h and d")
        parts = re.findall(r"([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]+)", text)
        if not parts or re.sub(r"\s+", "", text) != "".join(n + u for n, u in parts):
            raise ValueError(f"{value!r} is not a number of seconds or a duration such as 5m")
        # Exact (8.3m is 498 s): the broker counts in whole nanoseconds.
        return math.ceil(sum(Fraction(n) * _DURATION_UNITS[u] for n, u in parts))

    @model_validator(mode="before")
    @classmethod
    def _empty_is_unset(cls, data: Any) -> Any:
        """As the broker reads its settings: a variable set to the empty
        string is unset, and its default applies. It still hides what the
        .env file says (a variable already set is never replaced by it,
        here or in the broker)."""
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value != ""}
        return data

    @field_validator("secret_prefix", "aws_default_region", mode="before")
    @classmethod
    def _trimmed(cls, value: Any) -> Any:
        """As the broker reads them: trimmed, and refused when only spaces."""
        if not isinstance(value, str):
            return value
        if not value.strip():
            raise ValueError("is only spaces")
        return value.strip()

    @field_validator("secret_cache_ttl", "broker_max_stale")
    @classmethod
    def _ttl_not_negative(cls, value: int, info: ValidationInfo) -> int:
        if value < 0:
            raise ValueError(f"must not be negative ({_ZERO_MEANS[str(info.field_name)]})")
        if value > _MAX_DURATION:
            raise ValueError("is longer than a year")
        return value

    @field_validator("broker_endpoint", mode="before")
    @classmethod
    def _endpoint(cls, value: Any) -> Any:
        """Empty means the default."""
        if not isinstance(value, str):
            return value
        return value.strip() or "127.0.0.1:50051"

    @model_validator(mode="after")
    def _plaintext_only_to_loopback(self) -> "AWSSecretsConfig":
        """The endpoint checked against the TLS files (`_target`), and
        written as the gRPC target it names."""
        self.broker_endpoint = _target(self.broker_endpoint, self._tls_files())
        return self

    def _tls_files(self) -> tuple[Optional[str], Optional[str], Optional[str]]:
        return (self.broker_ca_file, self.broker_cert_file, self.broker_key_file)

    def credentials(self) -> Optional[grpc.ChannelCredentials]:
        """Mutual TLS credentials when the three files are set; `None` for
        plaintext (to loopback or a unix socket only). Checked again here,
        where every channel is made: settings changed after they were made
        are not validated by pydantic."""
        files = self._tls_files()
        try:
            _target(self.broker_endpoint, files)
        except ValueError as error:
            raise AWSSecretsManagerError(f"invalid setting: {error}") from None
        if not any(files):
            return None
        read = []
        for variable, path in zip(("BROKER_CA_FILE", "BROKER_CERT_FILE", "BROKER_KEY_FILE"), files):
            try:
                read.append(Path(str(path)).read_bytes())
            except OSError as error:
                raise AWSSecretsManagerError(f"{variable}={path} cannot be read: {error.strerror}") from None
        ca, cert, key = read
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    def channel_options(self, tls: bool) -> list[tuple[str, Any]]:
        """The proxy (``HTTPS_PROXY``) and the name to expect in the
        broker's certificate.

        A broker on loopback or a unix socket, or whose host ``NO_PROXY``
        names (either case, environment or ``.env``), is reached directly:
        the proxy variables were set for AWS, and grpc-core itself reads
        only a lowercase ``no_proxy``. Plaintext goes only to loopback or a
        unix socket, so ``HTTP_PROXY`` is never the broker's; nor is any
        proxy variable grpc-core would read on its own (``grpc_proxy``,
        ``http_proxy``) when ``HTTPS_PROXY`` is unset."""
        # After an outage the broker is found again within seconds: gRPC's
        # own reconnect backoff grows to two minutes. Not
        # `min_reconnect_backoff_ms`: grpc-core also takes it as each
        # connection attempt's deadline (20 s by default), and a broker more
        # than that away would never be reached.
        options: list[tuple[str, Any]] = [
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 3000),
            # A broker that stops answering without closing the connection
            # (frozen, a partition, a NAT that forgot it) is noticed within
            # KEEPALIVE_TIME + KEEPALIVE_TIMEOUT: otherwise the followers
            # wait on it for as long as the kernel keeps it (a quarter of
            # an hour), and hear no rotation meanwhile. A quiet watch stream
            # sends no data, so pings must not wait for data (grpc-core
            # stops after two otherwise).
            ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.http2.min_time_between_pings_ms", KEEPALIVE_TIME_MS),
            # grpc-core waits for any ping's answer this long (a minute by
            # default), whatever the keepalive timeout says.
            ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ]
        if self.broker_endpoint.startswith(("unix:", "unix-abstract:")):
            # grpc-core would send the socket's path as :authority, which
            # HTTP/2 servers (the broker's h2) refuse as malformed.
            options.append(("grpc.default_authority", "localhost"))
        proxy = self.https_proxy if tls else None
        if self._bypasses_proxy() or not proxy:
            # Without this grpc-core would read grpc_proxy, https_proxy and
            # http_proxy itself (an AWS proxy, in lowercase) and tunnel the
            # broker's traffic through it, unsaid by proxy_in_use.
            options.append(("grpc.enable_http_proxy", 0))
        else:
            if proxy.startswith("https://"):
                # gRPC speaks to a proxy in plaintext only (CONNECT; the
                # broker's TLS runs inside the tunnel). Most proxies named
                # https:// in HTTPS_PROXY take CONNECT on the same port.
                proxy = "http://" + proxy[len("https://"):]
                # Never the credentials a proxy URL may hold.
                shown = proxy[len("http://"):].rsplit("@", 1)[-1]
                logger.warning("the proxy https://%s is reached as http:// (gRPC does not speak TLS to a proxy)", shown)
            options.append(("grpc.http_proxy", proxy))
        if tls and self.broker_tls_domain:
            options.append(("grpc.ssl_target_name_override", self.broker_tls_domain))
        return options

    def proxy_in_use(self, tls: bool) -> Optional[tuple[str, str]]:
        """The proxy the channel goes through, if any, as it may be shown
        (without credentials), with the variable that set it."""
        proxy = self.https_proxy if tls else None
        if not proxy or self._bypasses_proxy():
            return None
        scheme, separator, rest = proxy.partition("://")
        shown = f"{scheme}://{rest.rsplit('@', 1)[-1]}" if separator else proxy.rsplit("@", 1)[-1]
        return shown, "HTTPS_PROXY"

    def _bypasses_proxy(self) -> bool:
        host = _endpoint_host(self.broker_endpoint)
        return host is None or _is_loopback(host) or _named_by_no_proxy(host, self.no_proxy or "")

    def check_prefix(self, asked: str, answered: str) -> None:
        """Raises when ``SECRET_PREFIX`` is set and the broker answered for a
        secret outside it. The broker adds its own prefix to a short name
        (and takes a name that carries its prefix, or an ARN, as is); when
        the two prefixes differ, the answer is another secret than the one
        this service means, and must not be used."""
        if "secret_prefix" not in self.model_fields_set or asked.startswith("arn:"):
            return
        prefix = self.secret_prefix.strip("/")
        if prefix and not answered.startswith(prefix + "/"):
            raise AWSSecretsManagerError(
                f"the broker answered for {answered}, outside SECRET_PREFIX={prefix}: "
                "the broker serves another prefix (set its SECRET_PREFIX, or ask by ARN)"
            )

    def channel(self, own_connection: bool = False) -> grpc.Channel:
        """A channel to the broker; with ``own_connection``, one that does
        not share grpc's process-wide connections (a forked child's: those
        it inherited are the parent's)."""
        credentials = self.credentials()
        options = self.channel_options(credentials is not None)
        if own_connection:
            options.append(("grpc.use_local_subchannel_pool", 1))
        if credentials is None:
            return grpc.insecure_channel(self.broker_endpoint, options=options)
        return grpc.secure_channel(self.broker_endpoint, credentials, options=options)


# The units the broker's duration settings take, in seconds (the broker
# refuses humantime's others: 5M would be months, not minutes).
_DURATION_UNITS: dict[str, Fraction] = {
    **dict.fromkeys(("ms", "msec"), Fraction(1, 1000)),
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), Fraction(1)),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), Fraction(60)),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), Fraction(3600)),
    **dict.fromkeys(("d", "day", "days"), Fraction(86400)),
}
# As the broker: a duration past a year is a mistake.
_MAX_DURATION = 366 * 86400

# What 0 does, for the message that refuses a negative duration.
_ZERO_MEANS = {
    "secret_cache_ttl": "0 turns the local cache off",
    "broker_max_stale": "0 serves nothing held once the broker cannot be reached",
}


def settings_from_env() -> AWSSecretsConfig:
    """``AWSSecretsConfig()`` from the environment and ``.env``; a value that
    cannot be read is an ``AWSSecretsManagerError`` naming the variable."""
    try:
        return AWSSecretsConfig()
    except ValidationError as error:
        problems = "; ".join(_problem(e["loc"], e["msg"]) for e in error.errors())
        raise AWSSecretsManagerError(f"invalid setting: {problems}") from None


def _problem(loc: tuple[Any, ...], message: str) -> str:
    """One setting's problem, named by its variable. A check of several
    settings together names them in its own words (it has no `loc`)."""
    message = message.removeprefix("Value error, ")
    variable = ".".join(str(part) for part in loc).upper()
    return f"{variable}: {message}" if variable else message


def _target(endpoint: str, tls_files: tuple[Optional[str], ...]) -> str:
    """The gRPC target ``BROKER_ENDPOINT`` names, or a ``ValueError`` saying
    why it may not be used with these TLS files. As the broker serves and
    the Rust client connects: mutual TLS needs all three files; plaintext
    goes only to loopback or a unix socket (the broker refuses to serve it
    anywhere else, and a value read in plaintext across a network is a
    value anyone on the path can read or forge); a unix socket is
    plaintext. ``http://host:port`` and ``https://host:port`` (the Rust
    client's forms) become ``host:port``; ``https://`` needs the TLS
    files, ``http://`` cannot undo them."""
    tls = any(tls_files)
    if tls and not all(tls_files):
        raise ValueError("mutual TLS needs BROKER_CA_FILE, BROKER_CERT_FILE and BROKER_KEY_FILE together")
    shown = _without_user(endpoint)
    scheme, separator, rest = endpoint.partition("://")
    if separator and scheme.lower() in ("http", "https"):
        if scheme.lower() == "https" and not tls:
            raise ValueError(
                "BROKER_ENDPOINT is https://, which needs mutual TLS: set BROKER_CA_FILE, BROKER_CERT_FILE and BROKER_KEY_FILE"
            )
        if scheme.lower() == "http" and tls:
            raise ValueError(
                "BROKER_ENDPOINT is http://, which is plaintext, but mutual TLS is configured (BROKER_CA_FILE, "
                "BROKER_CERT_FILE, BROKER_KEY_FILE): use https:// or host:port"
            )
        rest = rest.rstrip("/")
        if any(mark in rest for mark in "/@?#"):
            raise ValueError(f"BROKER_ENDPOINT={shown}: only host:port is taken (no user, path or query)")
        endpoint = rest
    local = _is_local(endpoint)
    if tls and local and _endpoint_host(endpoint) is None:
        raise ValueError(
            f"BROKER_ENDPOINT={shown}: a unix socket is plaintext (only local processes reach it); "
            "leave out the TLS files"
        )
    if not tls and not local:
        raise ValueError(
            f"BROKER_ENDPOINT={shown} is not a loopback address: plaintext is only allowed to loopback or a "
            "unix socket; for a broker elsewhere set BROKER_CA_FILE, BROKER_CERT_FILE and BROKER_KEY_FILE"
        )
    if _names_no_port(endpoint):
        # gRPC would take 443, the HTTPS port, which a broker rarely is on.
        raise ValueError(
            f"BROKER_ENDPOINT={shown} names no port: write it with the broker's port (its --listen; "
            "50051 by default), e.g. localhost:50051"
        )
    return endpoint


def _without_user(endpoint: str) -> str:
    """The endpoint as it may be shown: a ``user:password@`` part dropped."""
    scheme, separator, rest = endpoint.rpartition("://")
    return f"{scheme}{separator}{rest.rsplit('@', 1)[-1]}"


def _endpoint_host(endpoint: str) -> Optional[str]:
    """The host a gRPC target names, lowercase; `None` for a unix socket."""
    named = _host_and_port(endpoint)
    return named[0] if named is not None else None


def _host_and_port(endpoint: str) -> Optional[tuple[str, str]]:
    """The host (lowercase) and port (``""`` when none is written) a gRPC
    target names; `None` for a unix socket. Target forms: host:port,
    ipv4:/ipv6:ADDR:port, dns:host:port, dns:///host:port,
    dns://resolver/host:port."""
    if endpoint.startswith(("unix:", "unix-abstract:")):
        return None
    for scheme in ("ipv4:", "ipv6:", "dns:"):
        if endpoint.startswith(scheme):
            endpoint = endpoint[len(scheme):]
            break
    if endpoint.startswith("//"):
        endpoint = endpoint[2:].split("/", 1)[-1]
    if endpoint.startswith("["):
        # [v6 address] or [v6 address]:port
        host, _, rest = endpoint[1:].partition("]")
        return host.lower(), rest.removeprefix(":")
    if endpoint.count(":") > 1:
        # A bare IPv6 address, without a port.
        return endpoint.lower(), ""
    host, _, port = endpoint.partition(":")
    return host.lower(), port


def _names_no_port(endpoint: str) -> bool:
    """Whether the target, or any address of an ``ipv4:``/``ipv6:`` list,
    leaves its port out (a unix socket has none to give, and a
    ``vsock:CID:PORT`` is not a host)."""
    if endpoint.startswith("vsock:"):
        return False
    for scheme in ("ipv4:", "ipv6:"):
        if endpoint.startswith(scheme):
            addresses = endpoint[len(scheme):].split(",")
            return any(not (_host_and_port(scheme + address) or ("", "-"))[1] for address in addresses)
    named = _host_and_port(endpoint)
    return named is not None and not named[1]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_local(endpoint: str) -> bool:
    """A unix socket or loopback addresses only: where plaintext may go.
    A ``dns://server/name`` target asks that DNS server what ``name`` is,
    so even ``localhost`` there may be another host. gRPC percent-decodes
    a target and takes an ``ipv4:``/``ipv6:`` list of addresses separated
    by commas: a ``%`` is refused, and every address of a list must be
    loopback."""
    if endpoint.startswith(("unix:", "unix-abstract:")):
        return True
    if "%" in endpoint:
        return False
    if endpoint.startswith("dns://") and not endpoint.startswith("dns:///"):
        return False
    for scheme in ("ipv4:", "ipv6:"):
        if endpoint.startswith(scheme):
            addresses = endpoint[len(scheme):].split(",")
            return all(_is_loopback(_endpoint_host(address) or "") for address in addresses)
    host = _endpoint_host(endpoint)
    return host is not None and _is_loopback(host)


def _named_by_no_proxy(host: str, no_proxy: str) -> bool:
    """Whether ``NO_PROXY`` (comma-separated hosts or domains, ``*`` for
    all, ports ignored) names ``host``, as curl and requests read it."""
    host = host.lower()
    for entry in no_proxy.split(","):
        entry = entry.strip().lower()
        if entry == "*":
            return True
        domain = entry.rsplit(":", 1)[0] if entry.count(":") == 1 else entry
        domain = domain.lstrip(".")
        if domain and (host == domain or host.endswith("." + domain)):
            return True
    return False


# --------------------------------------------------------------------------
# values


@dataclass(frozen=True, repr=False)
class SecretValue:
    """One version of a secret. ``repr`` never shows the value.

    ``value`` is, as in the class this package replaces, a dict when the
    secret is a JSON object, else the text (or bytes, for a binary
    secret); ``as_string`` gives the text exactly as stored."""

    value: Union[str, bytes, dict[str, Any]] = field(hash=False)
    version_id: str
    created_date: Optional[datetime]
    secret_name: str
    _text: Optional[str] = field(default=None, compare=False)
    # The secret's ARN ("" where the broker's backend has none).
    arn: str = ""

    def is_same_version(self, other: "SecretValue") -> bool:
        """The same version of the same secret: the same version id under
        the same ARN (a secret deleted and created again under its name may
        be given its old version ids, with other values, under a new ARN).
        An ARN missing on either side leaves the version id to say it."""
        return self.version_id == other.version_id and (self.arn == other.arn or not self.arn or not other.arn)

    def as_dict(self) -> dict[str, Any]:
        """The value as a JSON object."""
        if isinstance(self.value, dict):
            # A copy: the value is shared with the cache and other callers.
            return copy.deepcopy(self.value)
        text = self._decoded()
        try:
            parsed = json.loads(text)
        except ValueError:
            raise AWSSecretsManagerError(f"secret {self.secret_name} is not JSON") from None
        if not isinstance(parsed, dict):
            raise AWSSecretsManagerError(f"secret {self.secret_name} is not a JSON object")
        return parsed

    def as_string(self) -> str:
        """The value as text."""
        if self._text is not None:
            return self._text
        if isinstance(self.value, dict):
            return json.dumps(self.value)
        return self._decoded()

    def _decoded(self) -> str:
        if not isinstance(self.value, bytes):
            return self.value  # type: ignore[return-value]
        try:
            return self.value.decode()
        except UnicodeDecodeError:
            raise AWSSecretsManagerError(
                f"secret {self.secret_name} is binary and not UTF-8 text: use .value (bytes)"
            ) from None

    def _for_caller(self) -> "SecretValue":
        """This value, with a dict of its own: a caller changing it must not
        change what the cache (and every other caller) holds."""
        if isinstance(self.value, dict):
            return dataclasses.replace(self, value=copy.deepcopy(self.value))
        return self

    def __repr__(self) -> str:
        return f"SecretValue(secret_name={self.secret_name!r}, version_id={self.version_id!r}, value=<redacted>)"

    __str__ = __repr__

    @classmethod
    def from_proto(cls, secret: secret_pb2.Secret) -> "SecretValue":
        which = secret.WhichOneof("value")
        created = (
            secret.created_date.ToDatetime(tzinfo=timezone.utc) if secret.HasField("created_date") else None
        )
        if which == "binary_value":
            return cls(value=secret.binary_value, version_id=secret.version_id, created_date=created,
                       secret_name=secret.name, arn=secret.arn)
        text = secret.string_value
        value: Union[str, dict[str, Any]] = text
        if text.lstrip().startswith("{"):
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                value = parsed
        return cls(value=value, version_id=secret.version_id, created_date=created, secret_name=secret.name,
                   _text=text, arn=secret.arn)


def _get_secret_request(
    name: str, version_id: Optional[str], use_cache: bool, version_stage: Optional[str]
) -> secrets_service_pb2.GetSecretRequest:
    """``get_secret``'s request, sync and asyncio alike."""
    return secrets_service_pb2.GetSecretRequest(
        name=name,
        version_id=version_id or "",
        version_stage=version_stage or "",
        bypass_cache=not use_cache,
    )


def _refuse_stale_bypass(secret: secret_pb2.Secret, use_cache: bool) -> None:
    """``use_cache=False`` asks AWS now. When AWS fails transiently the
    broker answers with its last good value marked stale: for this caller
    that is not what was asked (a service re-reading a credential that was
    just rotated would go on with the old one), so it is an error, as it
    was when the class called AWS itself."""
    if use_cache or not secret.cache.stale:
        return
    age = secret.cache.age.ToTimedelta().total_seconds()
    raise BrokerUnavailableError(
        f"UNAVAILABLE UPSTREAM_UNAVAILABLE: AWS could not be read now for {secret.name} "
        f"(use_cache=False); the broker holds a value read {age:.0f} s ago, which "
        "use_cache=True returns",
        code=grpc.StatusCode.UNAVAILABLE,
        reason="UPSTREAM_UNAVAILABLE",
    )


def _read_at(secret: secret_pb2.Secret, sent_at: float) -> float:
    """When (this process's monotonic clock) the broker read this answer
    from AWS, at the earliest: when it was asked for (a miss or bypass
    read is made after that), less its age if its cache answered."""
    return sent_at - secret.cache.age.ToTimedelta().total_seconds() if secret.cache.hit else sent_at


def _older_news(held: Optional[SecretValue], held_read_at: float, value: SecretValue, read_at: float) -> bool:
    """Whether an answer (``value``, read from AWS at ``read_at``) of
    another version than the one held is older news than it: read before
    the held one was (for a pushed version: before the push came). A
    replica behind a rotation another replica pushed answers so at a TTL's
    end, with round-robin across replicas, and so may a slow read that
    crossed the push. Taken, it would put the old version back for a whole
    TTL, and the follower, which holds the new one, would not correct it.
    An answer read from AWS after is taken: a rollback is news too."""
    if held is None or held.is_same_version(value):
        return False
    return read_at < held_read_at


def _has_stage(key: tuple[str, Optional[str]]) -> bool:
    """Whether a cache key is of a read by a stage other than the current
    (with or without a version id)."""
    selector = key[1]
    return selector is not None and (selector.startswith("stage:") or " stage:" in selector)


def _cache_key(name: str, version_id: Optional[str], version_stage: Optional[str]) -> tuple[str, Optional[str]]:
    """The local cache's key: the name, and which version (``None`` for the
    current one, which is the one followed by push)."""
    if version_id:
        # Both: a version id asked together with a stage is answered only
        # while that version holds the stage.
        # A space parts them: the broker takes no space in either, so no
        # id or stage read is kept under another's key.
        return (name, f"id:{version_id}" + (f" stage:{version_stage}" if version_stage else ""))
    if version_stage and version_stage != "AWSCURRENT":
        return (name, f"stage:{version_stage}")
    return (name, None)


K = TypeVar("K")
V = TypeVar("V")


def _sweep_expired(
    cache: dict[K, V], ttl: float, stored_at: Callable[[V], float], followed: Callable[[K, V], bool]
) -> None:
    """Drops from ``cache`` the entries older than ``ttl`` that nothing
    follows: a read of one asks the broker anyway, and a process that reads
    many distinct names once would otherwise hold every value it ever read.
    Followed entries stay (their watch keeps them current). Callers sweep
    again once what is left has doubled, so the work per entry stays
    constant."""
    now = time.monotonic()
    for key in [key for key, entry in cache.items() if not followed(key, entry) and now - stored_at(entry) >= ttl]:
        del cache[key]


@dataclass
class _Entry:
    value: SecretValue
    stored_at: float
    # When the broker read it from AWS (a push: when it came): see _older_news.
    read_at: float
    follower: Optional["_Follower"] = None
    # When a caller last read it: see _room_to_follow.
    last_read: float = field(default_factory=time.monotonic)


def _stream_of(entry: Union[_Entry, "_ConfigEntry", None]) -> Optional[_StreamState]:
    """The state of the entry's stream, if it is followed."""
    return entry.follower.stream if entry is not None and entry.follower is not None else None


@dataclass
class _ConfigEntry:
    value: dict[str, Any] = field(repr=False)  # a typed config's settings: secret
    stored_at: float
    follower: Optional["_Follower"] = None
    # The version it was read from (followed again after a fork).
    source: Optional[SecretValue] = None
    # When a caller last read it: see _room_to_follow.
    last_read: float = field(default_factory=time.monotonic)


# --------------------------------------------------------------------------
# the class


class AWSSecretsManager:
    """Secrets through secrets-broker, with a local cache kept fresh by push."""

    def __init__(self, config: Optional[AWSSecretsConfig] = None) -> None:
        self.config = config or settings_from_env()
        self._connection = _Connection()
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, Optional[str]], _Entry] = {}
        self._sweep_at = SWEEP_AT_LEAST
        # Before this, no followed entry can have gone unread for the TTL
        # (see _coldest_followed).
        self._no_cold_before = 0.0
        # Typed configs, by (RPC, name asked).
        self._configs: dict[tuple[str, str], _ConfigEntry] = {}
        self._since_clear = AskedSinceClear()
        self._silence = _BrokerSilence()
        # Rotations heard, per name: a read by stage answered before one and
        # stored after it would keep the stage from before it.
        self._rotations: dict[str, int] = {}
        # What a fork took the followers of, to follow again after it.
        # With the state of each one's stream, which its next follower
        # takes on: a fork while the broker is away must not end what the
        # stream vouches for.
        self._unfollowed_at_fork: list[tuple[Union[_Entry, _ConfigEntry], _StreamState]] = []
        # An instance nobody holds any more stops its watch threads and
        # closes its connection, as close() does: services make one per
        # call (a health check that makes one each time does), and each would otherwise
        # leave its threads and streams behind until the broker's calls per
        # connection, which every channel of the process shares, ran out.
        # The watch threads hold the instance only weakly.
        self._finalizer = weakref.finalize(
            self, _release, self._lock, self._cache, self._configs, self._connection
        )
        _INSTANCES.add(self)

    # -- the connection (lazy, one per instance) ---------------------------

    def _connect(self) -> tuple[grpc.Channel, secrets_service_pb2_grpc.SecretsServiceStub]:
        with self._lock:
            connection = self._connection
            if connection.channel is None or connection.stub is None:
                connection.channel = self.config.channel(own_connection=connection.forked)
                connection.stub = secrets_service_pb2_grpc.SecretsServiceStub(connection.channel)
            return connection.channel, connection.stub

    def _secrets(self) -> secrets_service_pb2_grpc.SecretsServiceStub:
        return self._connect()[1]

    def close(self) -> None:
        """Stops the watch threads and closes the connection (a later call
        opens a new one). Done by itself when the instance is no longer
        used."""
        _release(self._lock, self._cache, self._configs, self._connection)

    def _before_fork(self) -> list["_Follower"]:
        """Before ``fork()``: gRPC can make a child safe only when no thread
        is inside a call, and every watch thread is (its stream). They are
        stopped. What is cached stays (a fork while the broker is down
        must not cost this process what it holds), and is followed again
        after the fork, from the versions held. Returns the threads, to be
        waited for."""
        with self._lock:
            entries = _entries(self._cache, self._configs)
            followed = [(entry, entry.follower) for entry in entries if entry.follower is not None]
            followers = [follower for _, follower in followed]
            for entry, _ in followed:
                entry.follower = None
            self._unfollowed_at_fork = [(entry, follower.stream) for entry, follower in followed]
        for follower in followers:
            follower.stop()
        return followers

    def _after_fork_in_parent(self) -> None:
        """After ``fork()``, in this process: the secrets and typed configs
        held are followed again, from their versions (a rotation meanwhile
        comes first)."""
        with self._lock:
            unfollowed = {id(entry): stream for entry, stream in self._unfollowed_at_fork}
            self._unfollowed_at_fork = []
            # Exactly what was followed before, if still held (a read may
            # have replaced or dropped it meanwhile).
            for (name, _), entry in self._cache.items():
                if id(entry) in unfollowed and entry.follower is None:
                    entry.follower = _Follower(
                        weakref.ref(self), name, entry.value.version_id, arn=entry.value.arn,
                        stream=unfollowed[id(entry)],
                    )
                    entry.follower.start()
            for key, config in self._configs.items():
                if id(config) in unfollowed and config.follower is None and config.source is not None:
                    config.follower = self._config_follower(key, config, config.source, unfollowed[id(config)])
                    config.follower.start()

    def _forked(self) -> None:
        """In a child made by ``fork()`` (gunicorn ``--preload``,
        multiprocessing): no watch thread came along, and a lock another
        thread held stays held. The child starts empty, with a lock and a
        channel of its own; its reads fill and follow its cache again."""
        self._finalizer.detach()
        parents = self._connection.channel
        if parents is not None:
            # Not closed here: it is the parent's.
            _PARENTS_CHANNELS.append(parents)
        self._lock = threading.Lock()
        self._cache = {}
        self._sweep_at = SWEEP_AT_LEAST
        self._configs = {}
        self._rotations = {}
        self._unfollowed_at_fork = []
        self._connection = _Connection(forked=True)
        self._finalizer = weakref.finalize(
            self, _release, self._lock, self._cache, self._configs, self._connection
        )

    def __enter__(self) -> "AWSSecretsManager":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- secrets -----------------------------------------------------------

    def get_secret(
        self,
        secret_name: str,
        version_id: Optional[str] = None,
        use_cache: bool = True,
        version_stage: Optional[str] = None,
    ) -> SecretValue:
        """The secret (by short name: the broker adds its ``SECRET_PREFIX``;
        see ``AWSSecretsConfig.check_prefix``), from the local cache when it
        holds it within ``SECRET_CACHE_TTL``. ``version_id`` or
        ``version_stage`` (e.g. ``AWSPREVIOUS``) reads another version than
        the current one; only the current one is followed by push."""
        key = _cache_key(secret_name, version_id, version_stage)
        if use_cache:
            with self._lock:
                entry = self._cache.get(key)
                now = time.monotonic()
                if entry is not None and now - entry.stored_at < self.config.secret_cache_ttl:
                    self._mark_read(key, entry, now)
                    logger.debug("get_secret %s: from the local cache", secret_name)
                    return entry.value._for_caller()
        asked = ("secret", *key)
        with self._lock:
            again = self._since_clear.first_read(asked)
            generation = self._since_clear.generation
            rotations = self._rotations.get(secret_name, 0)
            # Asked of stage reads only: it counts the followed names.
            heard = not _has_stage(key) or self._hears_rotations(secret_name)
        if again and use_cache:
            logger.debug("get_secret %s: asking AWS, the first read since clear_cache()", secret_name)
        request = _get_secret_request(secret_name, version_id, use_cache and not again, version_stage)
        max_stale = self.config.broker_max_stale
        with self._lock:
            held = self._cache.get(key) if use_cache else None
        # Outside the lock, as an outage read: covers() may log.
        if held is not None and not again and self._silence.covers(
            "get_secret", secret_name, _stream_of(held), max_stale
        ):
            with self._lock:
                self._mark_read(key, held, time.monotonic())
            return held.value._for_caller()
        wait = _wait_for(_stream_of(held), max_stale)
        sent_at = time.monotonic()
        try:
            answer = _ask(self._secrets().GetSecret, request, refresh=again and use_cache, timeout=wait)
        except grpc.RpcError as error:
            logger.debug("get_secret %s: the broker answered %s", secret_name, error.code())
            self._silence.failed(error)
            with self._lock:
                held = self._cache.get(key) if use_cache else None
            if held is not None and _serve_through_outage(
                "get_secret", secret_name, _stream_of(held), error, max_stale, sent_at
            ):
                with self._lock:
                    self._mark_read(key, held, time.monotonic())
                return held.value._for_caller()
            raise _error_from(error, self.config) from None
        finally:
            if again:
                with self._lock:
                    self._since_clear.answered(asked, generation)
        self._silence.answered()
        _log_answer("get_secret", secret_name, answer.secret)
        self.config.check_prefix(secret_name, answer.secret.name)
        _refuse_stale_bypass(answer.secret, use_cache)
        value = SecretValue.from_proto(answer.secret)
        kept = self._store(key, value, generation, _read_at(answer.secret, sent_at), (rotations, heard))._for_caller()
        if _has_stage(key) and not heard and self.config.secret_cache_ttl > 0:
            # After the stage's read, which succeeded: a read of the current
            # version first would double the time a failing read takes.
            self._follow_for_stages(secret_name)
        return kept

    def _hears_rotations(self, name: str) -> bool:
        """Whether a rotation of ``name`` reaches this cache (under the
        lock): its current value is followed, or can no longer be (past
        ``MAX_FOLLOWED`` names are kept for the TTL, unfollowed)."""
        current = self._cache.get((name, None))
        followed = current is not None and current.follower is not None
        if followed:
            return True
        # Past MAX_FOLLOWED a place can still be made (_room_to_follow).
        return self._followed() >= MAX_FOLLOWED and self._coldest_followed(time.monotonic()) is None

    def _mark_read(self, key: tuple[str, Optional[str]], entry: _Entry, now: float) -> None:
        """Notes a read of ``key`` (under the lock): a read by stage or
        version is a read of the name too, whose followed current value its
        freshness relies on (``_room_to_follow`` lets go of names not read)."""
        entry.last_read = now
        current = self._cache.get((key[0], None))
        if current is not None:
            current.last_read = now

    def _follow_for_stages(self, name: str) -> None:
        """A rotation drops what was read by stage, and only a followed
        current value hears of rotations: it is read once, so that
        ``AWSPREVIOUS`` read alone does not stay as it was for the TTL."""
        try:
            self.get_secret(name)
        except AWSSecretsManagerError as error:
            logger.debug("get_secret %s: its current version not followed: %s", name, type(error).__name__)

    def _store(
        self,
        key: tuple[str, Optional[str]],
        value: SecretValue,
        generation: int,
        read_at: float,
        when_sent: tuple[int, bool],
    ) -> SecretValue:
        """Keeps what was read (and follows it); returns what to answer:
        what was read, or the value held when that is newer news.
        ``when_sent``: the rotations heard of the name when the read was
        sent, and whether one would have been heard then. A read by stage
        is kept only if no rotation could have passed unheard since: one
        sent before the name was followed is answered, not kept (the next
        read, followed, is)."""
        if self.config.secret_cache_ttl <= 0:
            return value  # the local cache is off: nothing kept, nothing followed
        # Followers let go of for a newer name (_room_to_follow), stopped
        # once the lock is left: a follower opening its stream takes it.
        let_go: list[_Follower] = []
        try:
            with self._lock:
                rotations, heard = when_sent
                if _has_stage(key) and (not heard or self._rotations.get(key[0], 0) != rotations):
                    return value
                entry = self._cache.get(key)
                read_before = entry is not None
                # Followed: the held version may be one pushed since (see
                # _older_news), and the follower keeps it fresh meanwhile.
                if (
                    entry is not None
                    and entry.follower is not None
                    and _older_news(entry.value, entry.read_at, value, read_at)
                ):
                    logger.debug("get_secret %s: the broker's copy is older than the one held; kept", key[0])
                    entry.stored_at = time.monotonic()
                    self._mark_read(key, entry, entry.stored_at)
                    return entry.value
                if generation != self._since_clear.generation:
                    return value  # read before a clear_cache(): not kept after it
                if entry is not None:
                    entry.value, entry.stored_at, entry.read_at = value, time.monotonic(), read_at
                else:
                    entry = _Entry(value=value, stored_at=time.monotonic(), read_at=read_at)
                    self._cache[key] = entry
                    self._sweep_if_grown()
                self._mark_read(key, entry, entry.stored_at)
                name, selector = key
                # A version id names an immutable version, and a stage other
                # than the current one is not what WatchSecret follows. An
                # entry stored while MAX_FOLLOWED names were followed is
                # followed once there is room again (its stage reads are kept
                # only then).
                if selector is None and entry.follower is None and self._room_to_follow(let_go, read_before):
                    entry.follower = _Follower(weakref.ref(self), name, value.version_id, arn=value.arn)
                    entry.follower.start()
            return value
        finally:
            for follower in let_go:
                follower.stop()

    def _room_to_follow(self, let_go: list["_Follower"], read_before: bool) -> bool:
        """Whether one more name may be followed (under the lock): below
        ``MAX_FOLLOWED``, or, for a name ``read_before`` (still held from
        an earlier read), once the name followed that was read least
        recently, and not within the TTL, is let go for it (its follower
        into ``let_go``). What is followed is what the process reads now,
        not the first names it ever read; a name read once, as a process
        reading many names once does, opens no stream in another's place."""
        if self._followed() < MAX_FOLLOWED:
            return True
        if not read_before:
            return False
        coldest = self._coldest_followed(time.monotonic())
        if coldest is None:
            return False
        key, entry = coldest
        assert entry.follower is not None
        let_go.append(entry.follower)
        entry.follower = None
        if isinstance(entry, _Entry):
            # Its stage reads were kept because a rotation would be heard:
            # it no longer would.
            for staged in [held for held in self._cache if held[0] == key[0] and held[1] is not None]:
                del self._cache[staged]
        logger.debug("%s no longer followed: not read within SECRET_CACHE_TTL, another name is", key[-1] or key[0])
        return True

    def _coldest_followed(
        self, now: float
    ) -> Optional[tuple[tuple[str, Optional[str]], Union[_Entry, _ConfigEntry]]]:
        """The followed entry read least recently, if it was not read within
        the TTL (under the lock). A look finding none notes when the first
        could be (reads only move ``last_read`` on), and the next looks
        before then are free: once 256 are followed, every store asks."""
        if now < self._no_cold_before:
            return None
        ttl = self.config.secret_cache_ttl
        coldest: Optional[tuple[tuple[str, Optional[str]], Union[_Entry, _ConfigEntry]]] = None
        held: Iterable[tuple[tuple[str, Optional[str]], Union[_Entry, _ConfigEntry]]] = itertools.chain(
            self._cache.items(), self._configs.items()
        )
        for key, entry in held:
            if entry.follower is not None and (coldest is None or entry.last_read < coldest[1].last_read):
                coldest = (key, entry)
        if coldest is None or now - coldest[1].last_read < ttl:
            self._no_cold_before = now + ttl if coldest is None else coldest[1].last_read + ttl
            return None
        return coldest

    def _sweep_if_grown(self) -> None:
        """Drops what has expired and is not followed, secrets and typed
        configs, once they have grown to ``_sweep_at`` (under the lock)."""
        if len(self._cache) + len(self._configs) < self._sweep_at:
            return
        ttl = self.config.secret_cache_ttl
        _sweep_expired(self._cache, ttl, lambda held: held.stored_at, lambda _, held: held.follower is not None)
        _sweep_expired(self._configs, ttl, lambda held: held.stored_at, lambda _, held: held.follower is not None)
        self._sweep_at = max(SWEEP_AT_LEAST, 2 * (len(self._cache) + len(self._configs)))

    def _rotated(self, name: str, value: Optional[SecretValue]) -> None:
        """A watch event: the cached value replaced (or dropped) in place.
        An event always means the current version moved (the follower asks
        from the version it holds), so what was read by stage is read
        again, even when a read that bypassed the cache already holds the
        new current version."""
        let_go: Optional[_Follower] = None
        with self._lock:
            self._rotations[name] = self._rotations.get(name, 0) + 1
            entry = self._cache.get((name, None))
            if entry is None:
                return
            arns = [(key, cached.value.arn) for key, cached in self._cache.items()]
            if value is None:
                del self._cache[(name, None)]
                let_go = entry.follower
            else:
                entry.value, entry.stored_at = value, time.monotonic()
                entry.read_at = entry.stored_at
            # A rotation or deletion moves the stages: what was read by stage
            # (AWSPREVIOUS...) is read again. A version id's value never
            # changes, but with a stage it may no longer hold it; a deleted
            # secret has no readable version at all.
            for key in _changed_keys(arns, name, value):
                del self._cache[key]
        # Outside the lock: a follower opening its stream takes it.
        if let_go is not None:
            let_go.stop()

    def test_connection(self) -> bool:
        """Whether the broker answers and reaches AWS. Never raises."""
        try:
            channel, _ = self._connect()
            check = channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=_health_request,
                response_deserializer=_health_status,
            )
            status: int = check("secretsbroker.v1.SecretsService", timeout=5.0)
            return status == 1  # SERVING
        except Exception as error:  # noqa: BLE001 - the contract is "False, never an exception"
            logger.debug("test_connection failed: %s", error)
            return False

    def clear_cache(self) -> None:
        """Empties the local cache. As in the class this replaces, the next
        read of each secret and typed config asks AWS (through the broker,
        whose shared cache it refreshes for every caller); later reads are
        cached again."""
        with self._lock:
            self._since_clear.clear()
        _clear(self._lock, self._cache, self._configs)

    def get_cache_stats(self) -> dict[str, Any]:
        """``total_entries``, ``valid_entries`` and ``expired_entries`` of the
        local cache: secrets and typed configs (a typed config counts as an
        entry, as it did in the ``AWSSecretsManager`` class this replaces)."""
        now = time.monotonic()
        with self._lock:
            entries = _entries(self._cache, self._configs)
        total = len(entries)
        valid = sum(1 for e in entries if now - e.stored_at < self.config.secret_cache_ttl)
        return {
            "total_entries": total,
            "valid_entries": valid,
            "expired_entries": total - valid,
            "ttl_seconds": self.config.secret_cache_ttl,
        }

    # -- typed configs ---------------------------------------------------------

    def get_database_config(self, name: str = "") -> dict[str, Any]:
        """``<environment>/database`` (or ``name``) as a dict, validated by
        the broker; cached and kept fresh like ``get_secret``."""
        return self._typed("GetDatabaseConfig", name)

    def get_jwt_config(self, name: str = "") -> dict[str, Any]:
        """``<environment>/jwt`` (or ``name``) as a dict, validated by the
        broker; cached and kept fresh like ``get_secret``."""
        return self._typed("GetJwtConfig", name)

    def get_aws_services_config(self, name: str = "") -> dict[str, Any]:
        """``<environment>/aws-services`` (or ``name``) as a dict."""
        return self._typed("GetAwsServicesConfig", name)

    def get_security_config(self, name: str = "") -> dict[str, Any]:
        """``<environment>/security`` (or ``name``) as a dict."""
        return self._typed("GetSecurityConfig", name)

    def _typed(self, rpc: str, name: str) -> dict[str, Any]:
        """A typed config: from the local cache within ``SECRET_CACHE_TTL``,
        else from the broker, then followed by push (a new version of its
        secret drops it, and the next call reads it again)."""
        key = (rpc, name)
        with self._lock:
            cached = self._configs.get(key)
            now = time.monotonic()
            if cached is not None and now - cached.stored_at < self.config.secret_cache_ttl:
                cached.last_read = now
                return copy.deepcopy(cached.value)
        asked = ("config", *key)
        with self._lock:
            again = self._since_clear.first_read(asked)
            generation = self._since_clear.generation
        request = getattr(secrets_service_pb2, f"{rpc}Request")(name=name, bypass_cache=again)
        max_stale = self.config.broker_max_stale
        with self._lock:
            held = self._configs.get(key)
        if held is not None and not again and self._silence.covers(
            rpc, name or "(default)", _stream_of(held), max_stale
        ):
            held.last_read = time.monotonic()
            return copy.deepcopy(held.value)
        wait = _wait_for(_stream_of(held), max_stale)
        sent_at = time.monotonic()
        try:
            answer = _ask(getattr(self._secrets(), rpc), request, refresh=again, timeout=wait)
        except grpc.RpcError as error:
            self._silence.failed(error)
            with self._lock:
                held = self._configs.get(key)
            if held is not None and _serve_through_outage(
                rpc, name or "(default)", _stream_of(held), error, max_stale, sent_at
            ):
                held.last_read = time.monotonic()
                return copy.deepcopy(held.value)
            raise _error_from(error, self.config) from None
        finally:
            if again:
                with self._lock:
                    self._since_clear.answered(asked, generation)
        self._silence.answered()
        self.config.check_prefix(name, answer.name)
        value = config_dict(answer.config)
        if self.config.secret_cache_ttl <= 0:
            return value  # the local cache is off: nothing kept, nothing followed
        # Read before a clear_cache(): not kept after it (checked again
        # under the lock that stores).
        def cleared() -> bool:
            return generation != self._since_clear.generation

        let_go: list[_Follower] = []
        with self._lock:
            if cleared():
                return value
            held = self._configs.get(key)
            # A config followed already keeps its place (its new follower
            # takes over from the old one).
            room = (held is not None and held.follower is not None) or self._room_to_follow(let_go, held is not None)
        for follower in let_go:
            follower.stop()
        if not room:
            with self._lock:
                replaced = None if cleared() else self._configs.get(key)
                if not cleared():
                    self._configs[key] = _ConfigEntry(value=value, stored_at=time.monotonic())
                    self._sweep_if_grown()
            if replaced is not None and replaced.follower is not None:
                replaced.follower.stop()
            return copy.deepcopy(value)
        # The version the config was read from, of which secret (its ARN:
        # one deleted and created again under the name may reuse version
        # ids); any other drops the config.
        source = SecretValue(
            value="", version_id=answer.version_id, created_date=None, secret_name=answer.name, arn=answer.arn
        )
        entry = _ConfigEntry(value=value, stored_at=time.monotonic(), source=source)
        entry.follower = self._config_follower(key, entry, source)
        with self._lock:
            if cleared():
                return copy.deepcopy(value)
            replaced = self._configs.get(key)
            replaced_follower = replaced.follower if replaced is not None else None
            self._configs[key] = entry
            # Started under the lock, as _store does: a fork, which takes
            # the followers of what is stored under it, cannot come between.
            entry.follower.start()
            self._sweep_if_grown()
        if replaced_follower is not None:
            replaced_follower.stop()
        return copy.deepcopy(value)

    def _config_follower(
        self,
        key: tuple[str, str],
        entry: _ConfigEntry,
        source: SecretValue,
        stream: Optional[_StreamState] = None,
    ) -> "_Follower":
        """The follower of a typed config read from ``source``: another
        version of its secret drops the config (read again when next asked).
        ``stream``: the state of the stream it takes over from (a fork)."""
        manager = weakref.ref(self)  # the watch thread must not keep it alive

        def changed(new: Optional[SecretValue]) -> None:
            held = manager()
            if held is None:
                return
            if new is not None and new.is_same_version(source):
                return
            held._drop_config(key, entry)

        return _Follower(
            manager, source.secret_name, source.version_id, arn=source.arn, on_event=changed,
            stream=stream or _StreamState(),
        )

    def _followed(self) -> int:
        """Names followed by push now (under the lock)."""
        return sum(1 for entry in _entries(self._cache, self._configs) if entry.follower is not None)

    def _drop_config(self, key: tuple[str, str], entry: _ConfigEntry) -> None:
        with self._lock:
            if self._configs.get(key) is entry:
                del self._configs[key]
        if entry.follower is not None:
            entry.follower.stop()

    def get_mistral_api_key(self) -> str:
        """The Mistral API key, as text."""
        return self.get_secret("mistral-api-key").as_string()


@dataclass
class _Connection:
    """An instance's channel to the broker, opened on first use; apart from
    the instance, so that its finalizer can close it."""

    channel: Optional[grpc.Channel] = None
    stub: Optional[secrets_service_pb2_grpc.SecretsServiceStub] = None
    # Made in a forked child: see `AWSSecretsConfig.channel`.
    forked: bool = False


_Cache = dict[tuple[str, Optional[str]], _Entry]
_Configs = dict[tuple[str, str], _ConfigEntry]


def _entries(cache: _Cache, configs: _Configs) -> list[Union[_Entry, _ConfigEntry]]:
    """An instance's cached secrets and typed configs (take its lock)."""
    return [*cache.values(), *configs.values()]


# What a refresh that ran out of REFRESH_WAIT ends with: the broker could
# not answer from AWS in time and had no copy to give.
_NOT_IN_TIME = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)


def _ask(call: Callable[..., Any], request: Any, refresh: bool, timeout: float = CALL_TIMEOUT) -> Any:
    """Calls the broker, waiting at most ``timeout``. A refresh (the first
    read of a key after ``clear_cache()``, asking AWS through the broker)
    gives AWS ``REFRESH_WAIT``: a broker that holds the key answers its
    copy, marked stale, by then, so a slow AWS does not stall a read for
    the whole call timeout. When it held none, the read is asked again, of
    the broker's cache, within what is left of the call timeout."""
    if not refresh:
        return call(request, timeout=timeout)
    try:
        return call(request, timeout=REFRESH_WAIT)
    except grpc.RpcError as error:
        if not isinstance(error, grpc.Call) or error.code() not in _NOT_IN_TIME:
            raise
    request.bypass_cache = False
    return call(request, timeout=CALL_TIMEOUT - REFRESH_WAIT)


class AskedSinceClear:
    """Which reads have asked AWS since ``clear_cache()``. The class this
    package replaces read AWS on the next read of each secret after a
    clear, which is how a service made it pick up a rotation it knew of.
    Here the reads of each key (a secret and version, or a typed config)
    after a clear are bypass reads until the first of them is answered,
    whatever its outcome: the broker reads AWS and refreshes its shared
    cache for every caller, and joins bypass reads of one secret that come
    together (a read of the broker's cache meanwhile could answer the old
    value last). Before any clear, nothing is asked again.

    ``generation`` counts the clears: a read that started before one must
    not store what it read after it (the old value, in the emptied cache).
    Callers hold their instance's lock (sync) or run on its loop."""

    def __init__(self) -> None:
        # Per key: True once answered, False while its first read runs.
        self._asked: Optional[dict[tuple[Optional[str], ...], bool]] = None
        self.generation = 0

    def clear(self) -> None:
        self._asked = {}
        self.generation += 1

    def first_read(self, key: tuple[Optional[str], ...]) -> bool:
        """Whether this read must ask AWS: the key has not been answered
        since a clear. Noted as under way."""
        if self._asked is None or self._asked.get(key, False):
            return False
        self._asked[key] = False
        return True

    def answered(self, key: tuple[Optional[str], ...], generation: int) -> None:
        """A read that asked AWS for ``key`` since clear number
        ``generation`` is done (whatever it found); one from before a later
        clear says nothing of it."""
        if generation == self.generation and self._asked is not None and key in self._asked:
            self._asked[key] = True


def _clear(lock: threading.Lock, cache: _Cache, configs: _Configs) -> list["_Follower"]:
    """An instance's clear_cache(): its local cache emptied, its watch
    threads stopped (returned, to be waited for)."""
    with lock:
        entries = _entries(cache, configs)
        cache.clear()
        configs.clear()
    followers = [entry.follower for entry in entries if entry.follower is not None]
    for follower in followers:
        follower.stop()
    return followers


def _release(lock: threading.Lock, cache: _Cache, configs: _Configs, connection: _Connection) -> None:
    """An instance's close(): its local cache emptied and its watch threads
    stopped, then its channel closed. Takes the parts, not the instance, so
    that the instance's finalizer can run it."""
    # The watches first: one reopening its stream meanwhile does it on the
    # channel still there (and is cancelled), never on a new one that would
    # outlive the close.
    _clear(lock, cache, configs)
    with lock:
        channel, connection.channel, connection.stub = connection.channel, None, None
    if channel is not None:
        channel.close()


def config_dict(config: Any) -> dict[str, Any]:
    """A typed config (JwtConfig, DatabaseConfig, ...) as a dict of its
    settings' names, in the contract's order; lists for repeated fields."""
    out: dict[str, Any] = {}
    for field_ in config.DESCRIPTOR.fields:
        value = getattr(config, field_.name)
        out[field_.name] = value if isinstance(value, (str, bytes, int, float)) else list(value)
    return out


def _changed_keys(
    held: Iterable[tuple[tuple[str, Optional[str]], str]], name: str, now: Optional[SecretValue]
) -> list[tuple[str, Optional[str]]]:
    """The local cache keys of ``name`` an event makes untrue, from the
    (key, ARN) pairs held, ``now`` being what the event says ``name`` is
    (``None``: deleted): those read by stage (with or without a version id)
    when it rotated; those of another secret (another ARN, neither empty),
    when it was deleted and created again, whose version ids the new one
    may reuse; every one when it was deleted (the broker answers NOT_FOUND
    for each of its versions)."""

    def untrue(key: tuple[str, Optional[str]], arn: str) -> bool:
        return now is None or _has_stage(key) or bool(arn and now.arn and arn != now.arn)

    return [key for key, arn in held if key[0] == name and key[1] is not None and untrue(key, arn)]


def _log_answer(call: str, name: str, secret: Any) -> None:
    """At DEBUG, where a read was answered from (never the value), as the
    class this replaces logged its AWS calls."""
    if logger.isEnabledFor(logging.DEBUG):
        cache = secret.cache
        source = "the broker's cache" if cache.hit else "AWS, through the broker"
        stale = " (stale)" if cache.stale else ""
        logger.debug("%s %s: version %s from %s%s", call, name, secret.version_id, source, stale)


def _jittered(delay: float) -> float:
    """A retry's delay, spread between half and all of it: after a broker
    restarts, every process's streams do not come back at the same instant."""
    return delay * random.uniform(0.5, 1.0)


def _health_request(service: str) -> bytes:
    """grpc.health.v1.HealthCheckRequest{service} on the wire."""
    data = service.encode()
    return b"\x0a" + _varint(len(data)) + data


def _health_status(data: bytes) -> int:
    """HealthCheckResponse.status (field 1, a varint); 0 when absent."""
    if len(data) >= 2 and data[0] == 0x08:
        return data[1]
    return 0


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


# --------------------------------------------------------------------------
# keeping a cached secret fresh


def _first_marked(events: Iterable[Any]) -> Iterator[tuple[bool, Any]]:
    """A watch stream's events, the first marked. A follower always asks
    from the version it holds, so a first CURRENT tells nothing new: the
    broker says ROTATED (or DELETED) when AWS shows a change. It is not
    taken, so that no broker can put back a version older than the one
    held."""
    first = True
    for event in events:
        yield first, event
        first = False


@dataclass
class _Follower:
    """A daemon thread holding the WatchSecret stream of one cached name. It
    reconnects with the version it holds, so a rotation missed while
    disconnected arrives first. It holds its manager weakly and ends with
    it."""

    manager: "weakref.ReferenceType[AWSSecretsManager]"
    name: str
    version_id: str
    # The ARN of the secret `version_id` belongs to, once an event said it.
    arn: str = ""
    _stopped: threading.Event = field(default_factory=threading.Event)
    _call: Optional[Any] = None
    _thread: Optional[threading.Thread] = None
    # Orders stop() and a stream being opened: a stop that comes while the
    # stream opens must still cancel it.
    _call_lock: threading.Lock = field(default_factory=threading.Lock)
    # What an event does; by default, the manager's cached secret is
    # replaced or dropped.
    on_event: Optional[Callable[[Optional[SecretValue]], None]] = None
    # Whether the stream vouches for what it follows.
    stream: _StreamState = field(default_factory=_StreamState)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"watch-{self.name}", daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        """Waits, at most ``timeout``, for the thread to end (after ``stop``)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def stop(self) -> None:
        with self._call_lock:
            self._stopped.set()
            call = self._call
        if call is not None:
            call.cancel()

    def _run(self) -> None:
        backoff = 0.1
        while not self._stopped.is_set():
            try:
                for first, event in _first_marked(self._events()):
                    backoff = 0.1
                    self.stream.heard()
                    if first and event.type == secret_pb2.WATCH_EVENT_TYPE_CURRENT:
                        continue  # see _first_marked
                    if event.type == secret_pb2.WATCH_EVENT_TYPE_DELETED:
                        self._tell(None)
                        return
                    value = SecretValue.from_proto(event.secret)
                    self.version_id, self.arn = value.version_id, value.arn
                    self._tell(value)
            except grpc.RpcError as error:
                self.stream.broke()
                if self._stopped.is_set():
                    return
                code = error.code() if isinstance(error, grpc.Call) else None
                if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED):
                    self._tell(None)
                    return
            except Exception as error:  # noqa: BLE001 - keep following
                logger.debug("watch of %s: %s", self.name, error)
            self.stream.broke()
            self._stopped.wait(_jittered(backoff))
            backoff = min(backoff * 2, WATCH_BACKOFF_MAX)

    def _tell(self, value: Optional[SecretValue]) -> None:
        if self.on_event is not None:
            self.on_event(value)
        elif (manager := self.manager()) is not None:
            manager._rotated(self.name, value)

    def _events(self) -> Iterator[secrets_service_pb2.WatchSecretResponse]:
        request = secrets_service_pb2.WatchSecretRequest(
            name=self.name, since_version_id=self.version_id, since_arn=self.arn
        )
        # Opened under the lock, and not at all once stopped: a stop (and the
        # manager's close) cannot pass in between and leave a stream, or a
        # channel reopened, behind.
        with self._call_lock:
            manager = self.manager()
            if self._stopped.is_set() or manager is None:
                self._stopped.set()
                return iter(())
            call = manager._secrets().WatchSecret(request)
            self._call = call
        return iter(call)


# --------------------------------------------------------------------------
# module functions, on one shared instance


_default: Optional[AWSSecretsManager] = None
_default_lock = threading.Lock()

# Every live instance, for a forked child to start afresh (`_forked`).
_INSTANCES: "weakref.WeakSet[AWSSecretsManager]" = weakref.WeakSet()
_PARENTS_CHANNELS: list[grpc.Channel] = []


# How long a fork waits for the watch threads to leave their calls.
_FORK_WAIT = 2.0


def _before_fork() -> None:
    followers = [f for instance in list(_INSTANCES) for f in instance._before_fork()]
    deadline = time.monotonic() + _FORK_WAIT
    for follower in followers:
        follower.join(max(0.0, deadline - time.monotonic()))


def _after_fork_in_parent() -> None:
    for instance in list(_INSTANCES):
        instance._after_fork_in_parent()


def _after_fork_in_child() -> None:
    global _default_lock
    _default_lock = threading.Lock()
    for instance in list(_INSTANCES):
        instance._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child
    )


def _shared_instance() -> AWSSecretsManager:
    """The instance the module-level functions share, made on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = AWSSecretsManager()
        return _default


def get_database_config() -> dict[str, Any]:
    """The database config, from a shared ``AWSSecretsManager``."""
    return _shared_instance().get_database_config()


def get_jwt_config() -> dict[str, Any]:
    """The JWT config, from a shared ``AWSSecretsManager``."""
    return _shared_instance().get_jwt_config()


def get_mistral_api_key() -> str:
    """The Mistral API key, from a shared ``AWSSecretsManager``."""
    return _shared_instance().get_mistral_api_key()


def test_aws_connection() -> bool:
    """Whether the broker answers and reaches AWS. Never raises: settings
    that cannot be used are False too (and logged)."""
    try:
        return _shared_instance().test_connection()
    except AWSSecretsManagerError as error:
        logger.error("the broker cannot be asked: %s", error)
        return False
