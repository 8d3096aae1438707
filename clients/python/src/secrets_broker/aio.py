"""The asyncio side: ``AsyncAWSSecretsManager``, on ``grpc.aio``, with the
same methods as ``AWSSecretsManager`` as coroutines and the same local
cache (TTL ``SECRET_CACHE_TTL``; ``use_cache=False`` asks the broker with
bypass), kept fresh by push: each cached current value is followed by a
WatchSecret stream in a task of the event loop that read it.

A gRPC channel belongs to the event loop it was made in: used from another
loop (a second ``asyncio.run``), the manager opens a new channel there and
starts its cache afresh."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import weakref
from typing import Any, Awaitable, Callable, Optional, TypeVar

import grpc
import grpc.aio

from secrets_broker.aws_secrets import (
    CALL_TIMEOUT,
    MAX_FOLLOWED,
    REFRESH_WAIT,
    SWEEP_AT_LEAST,
    WATCH_BACKOFF_MAX,
    AskedSinceClear,
    AWSSecretsConfig,
    AWSSecretsManagerError,
    _OneLineArgs,
    SecretValue,
    _cache_key,
    _error_from,
    _get_secret_request,
    _health_request,
    _health_status,
    _jittered,
    _NOT_IN_TIME,
    _log_answer,
    _older_news,
    _read_at,
    _has_stage,
    _refuse_stale_bypass,
    _changed_keys,
    _serve_through_outage,
    _BrokerSilence,
    _StreamState,
    _wait_for,
    _sweep_expired,
    config_dict,
    settings_from_env,
)
from secretsbroker.v1 import secret_pb2, secrets_service_pb2, secrets_service_pb2_grpc

__all__ = ["AsyncAWSSecretsManager"]

T = TypeVar("T")

logger = logging.getLogger(__name__)
logger.addFilter(_OneLineArgs())


class AsyncAWSSecretsManager:
    """Secrets through secrets-broker for asyncio services."""

    def __init__(self, config: Optional[AWSSecretsConfig] = None) -> None:
        self.config = config or settings_from_env()
        self._channel: Optional[grpc.aio.Channel] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._cache: dict[tuple[str, Optional[str]], tuple[SecretValue, float]] = {}
        self._sweep_at = SWEEP_AT_LEAST
        # When the broker read each followed value from AWS (a push: when
        # it came): see _older_news.
        self._learned_at: dict[str, float] = {}
        # The WatchSecret task of each followed name. They hold the
        # instance weakly: one nobody holds any more has its tasks
        # cancelled (see AWSSecretsManager's finalizer for why).
        self._followers: dict[str, asyncio.Task[None]] = {}
        # Whether each follower's stream vouches for its value.
        self._streams: dict[str, _StreamState] = {}
        # When a caller last read each followed name: see _room_to_follow.
        self._last_read: dict[str, float] = {}
        self._since_clear = AskedSinceClear()
        self._silence = _BrokerSilence()
        # Rotations heard, per name (see AWSSecretsManager._rotations).
        self._rotations: dict[str, int] = {}
        # Counts close(): a call cut by one is told apart from a task
        # cancelled by its owner.
        self._closes = 0
        weakref.finalize(self, _cancel, self._followers)

    def _connect(self) -> grpc.aio.Channel:
        loop = asyncio.get_running_loop()
        if self._channel is not None and self._loop is not loop:
            # The channel and the watch tasks belong to a loop that has
            # ended (or is another): they cannot be used from this one.
            self._channel = None
            self._followers.clear()
            self._streams.clear()
            self._last_read.clear()
            self._cache.clear()
            self._learned_at.clear()
        if self._channel is None:
            credentials = self.config.credentials()
            options = self.config.channel_options(credentials is not None)
            endpoint = self.config.broker_endpoint
            if credentials is None:
                self._channel = grpc.aio.insecure_channel(endpoint, options=options)
            else:
                self._channel = grpc.aio.secure_channel(endpoint, credentials, options=options)
            self._loop = loop
        return self._channel

    async def _ask(self, call: Callable[..., Any], request: Any, refresh: bool, timeout: float = CALL_TIMEOUT) -> Any:
        """As the sync client's ``_ask``: a refresh gives AWS
        ``REFRESH_WAIT``, then asks the broker's cache."""
        if not refresh:
            return await self._unless_closed(call(request, timeout=timeout))
        try:
            return await self._unless_closed(call(request, timeout=REFRESH_WAIT))
        except grpc.aio.AioRpcError as error:
            if error.code() not in _NOT_IN_TIME:
                raise
        request.bypass_cache = False
        return await self._unless_closed(call(request, timeout=CALL_TIMEOUT - REFRESH_WAIT))

    async def _unless_closed(self, call: Awaitable[T]) -> T:
        """Awaits a call; one cut by ``close()`` raises what the sync client
        raises then (grpc.aio cancels it: an ``asyncio.CancelledError`` in a
        task nobody cancelled, which ``except Exception`` does not catch)."""
        closes = self._closes
        try:
            return await call
        except asyncio.CancelledError:
            # Only where a task's own cancellation can be told apart (3.11+):
            # swallowing it would be worse than an unexpected CancelledError.
            task = asyncio.current_task()
            if (
                self._closes == closes
                or sys.version_info < (3, 11)
                or task is None
                or task.cancelling() > 0
            ):
                raise
            raise AWSSecretsManagerError(
                "CANCELLED: the client was closed (close()) while this call was under way",
                code=grpc.StatusCode.CANCELLED,
            ) from None

    def _secrets(self) -> secrets_service_pb2_grpc.SecretsServiceAsyncStub:
        # The async stub type exists in the type stubs only (mypy-protobuf).
        return secrets_service_pb2_grpc.SecretsServiceStub(self._connect())

    async def close(self) -> None:
        """Stops the watch tasks and closes the connection. A call under
        way fails with ``AWSSecretsManagerError`` (``CANCELLED``), as in the
        sync client (on Python 3.11 and later; on 3.10 with
        ``asyncio.CancelledError``, which cannot be told apart there from
        the task's own cancellation)."""
        self._closes += 1
        self._drop_local()
        if self._channel is not None and self._loop is asyncio.get_running_loop():
            await self._channel.close()
        self._channel = None

    async def __aenter__(self) -> "AsyncAWSSecretsManager":
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def get_secret(
        self,
        secret_name: str,
        version_id: Optional[str] = None,
        use_cache: bool = True,
        version_stage: Optional[str] = None,
    ) -> SecretValue:
        """As ``AWSSecretsManager.get_secret``."""
        self._connect()  # first: a cache of another event loop is dropped
        key = _cache_key(secret_name, version_id, version_stage)
        cached = self._cache.get(key)
        now = time.monotonic()
        if use_cache and cached is not None and now - cached[1] < self.config.secret_cache_ttl:
            self._mark_read(key[0], now)
            logger.debug("get_secret %s: from the local cache", secret_name)
            return cached[0]._for_caller()
        asked = ("secret", *key)
        again = self._since_clear.first_read(asked)
        generation = self._since_clear.generation
        rotations = self._rotations.get(key[0], 0)
        # As the sync client's _hears_rotations.
        heard = key[0] in self._followers or (
            len(self._followers) >= MAX_FOLLOWED and self._coldest_followed(now) is None
        )
        if again and use_cache:
            logger.debug("get_secret %s: asking AWS, the first read since clear_cache()", secret_name)
        request = _get_secret_request(secret_name, version_id, use_cache and not again, version_stage)
        max_stale = self.config.broker_max_stale
        # Only the current version is followed.
        stream = self._streams.get(key[0]) if key[1] is None else None
        held = self._cache.get(key) if use_cache else None
        if held is not None and not again and self._silence.covers("get_secret", secret_name, stream, max_stale):
            self._mark_read(key[0], time.monotonic())
            return held[0]._for_caller()
        wait = _wait_for(stream, max_stale) if held is not None else CALL_TIMEOUT
        sent_at = time.monotonic()
        try:
            answer = await self._ask(self._secrets().GetSecret, request, refresh=again and use_cache, timeout=wait)
        except grpc.RpcError as error:
            logger.debug("get_secret %s: the broker answered %s", secret_name, error.code())
            self._silence.failed(error)
            held = self._cache.get(key) if use_cache else None
            stream = self._streams.get(key[0]) if key[1] is None else None
            if held is not None and _serve_through_outage(
                "get_secret", secret_name, stream, error, max_stale, sent_at
            ):
                self._mark_read(key[0], time.monotonic())
                return held[0]._for_caller()
            raise _error_from(error, self.config) from None
        finally:
            if again:
                self._since_clear.answered(asked, generation)
        self._silence.answered()
        _log_answer("get_secret", secret_name, answer.secret)
        self.config.check_prefix(secret_name, answer.secret.name)
        _refuse_stale_bypass(answer.secret, use_cache)
        value = SecretValue.from_proto(answer.secret)
        held = self._cache.get(key)
        name, selector = key
        # Followed: see AWSSecretsManager.get_secret.
        if (
            held is not None
            and selector is None
            and name in self._followers
            and _older_news(held[0], self._learned_at.get(name, 0.0), value, _read_at(answer.secret, sent_at))
        ):
            logger.debug("get_secret %s: the broker's copy is older than the one held; kept", secret_name)
            self._cache[key] = (held[0], time.monotonic())
            self._mark_read(name, time.monotonic())
            return held[0]._for_caller()
        if _has_stage(key) and not heard and self.config.secret_cache_ttl > 0:
            # After the stage's read, which succeeded: as the sync client.
            await self._follow_for_stages(name)
        if (
            self.config.secret_cache_ttl <= 0
            or generation != self._since_clear.generation
            or (_has_stage(key) and (not heard or self._rotations.get(name, 0) != rotations))
        ):
            # Not kept: the local cache is off, or was cleared meanwhile
            # (what was read before a clear is not kept after it), or a
            # stage was read while a rotation could pass unheard (before
            # the name was followed) or was heard (it may predate it).
            return value._for_caller()
        self._cache[key] = (value, time.monotonic())
        if len(self._cache) >= self._sweep_at:
            _sweep_expired(
                self._cache,
                self.config.secret_cache_ttl,
                lambda held: held[1],
                lambda held_key, _: held_key[1] is None and held_key[0] in self._followers,
            )
            self._sweep_at = max(SWEEP_AT_LEAST, 2 * len(self._cache))
            # Consulted only for followed names.
            for unfollowed in [held for held in self._learned_at if held not in self._followers]:
                del self._learned_at[unfollowed]
        if selector is None:
            self._learned_at[name] = _read_at(answer.secret, sent_at)
        if selector is None and name not in self._followers and self._room_to_follow(held is not None):
            stream = self._streams[name] = _StreamState()
            self._followers[name] = asyncio.get_running_loop().create_task(
                _follow(weakref.ref(self), name, value.version_id, value.arn, stream), name=f"watch-{name}"
            )
        self._mark_read(name, time.monotonic())
        return value._for_caller()

    def _mark_read(self, name: str, now: float) -> None:
        """Notes a read of ``name`` (of any version: a stage read relies on
        the current value being followed), for a name followed only: the
        others need no note (``_room_to_follow`` lets go of followed names
        not read)."""
        if name in self._followers:
            self._last_read[name] = now

    def _coldest_followed(self, now: float) -> Optional[str]:
        """The followed name read least recently, if not within the TTL."""
        if not self._followers:
            return None
        name = min(self._followers, key=lambda followed: self._last_read.get(followed, 0.0))
        return name if now - self._last_read.get(name, 0.0) >= self.config.secret_cache_ttl else None

    def _room_to_follow(self, read_before: bool) -> bool:
        """As ``AWSSecretsManager._room_to_follow``: below ``MAX_FOLLOWED``,
        or, for a name read before, once the name followed that was read
        least recently, and not within the TTL, is let go for it."""
        if len(self._followers) < MAX_FOLLOWED:
            return True
        if not read_before:
            return False
        name = self._coldest_followed(time.monotonic())
        if name is None:
            return False
        task = self._followers.pop(name)
        self._streams.pop(name, None)
        self._last_read.pop(name, None)
        if task is not asyncio.current_task() and not task.done():
            task.cancel()
        # Its stage reads were kept because a rotation would be heard.
        for staged in [key for key in self._cache if key[0] == name and key[1] is not None]:
            del self._cache[staged]
        logger.debug("%s no longer followed: not read within SECRET_CACHE_TTL, another name is", name)
        return True

    async def _follow_for_stages(self, name: str) -> None:
        """As ``AWSSecretsManager._follow_for_stages``."""
        try:
            await self.get_secret(name)
        except AWSSecretsManagerError as error:
            logger.debug("get_secret %s: its current version not followed: %s", name, type(error).__name__)

    def _rotated(self, name: str, value: Optional[SecretValue]) -> None:
        """A watch event: the cached value replaced (or dropped), and what
        was read by stage read again (an event always means the current
        version moved: see ``AWSSecretsManager._rotated``)."""
        self._rotations[name] = self._rotations.get(name, 0) + 1
        if value is None:
            self._cache.pop((name, None), None)
            self._followers.pop(name, None)
            self._streams.pop(name, None)
            self._last_read.pop(name, None)
            self._learned_at.pop(name, None)
        else:
            self._cache[(name, None)] = (value, time.monotonic())
            self._learned_at[name] = time.monotonic()
        arns = [(key, cached[0].arn) for key, cached in self._cache.items()]
        for key in _changed_keys(arns, name, value):
            del self._cache[key]

    async def test_connection(self) -> bool:
        """Whether the broker answers and reaches AWS. Never raises."""
        try:
            check = self._connect().unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=_health_request,
                response_deserializer=_health_status,
            )
            status: int = await self._unless_closed(check("secretsbroker.v1.SecretsService", timeout=5.0))
            return status == 1
        except Exception:  # noqa: BLE001 - the contract is "False, never an exception"
            return False

    async def clear_cache(self) -> None:
        """Empties the local cache and stops its watch tasks; the next read
        of each secret and typed config asks AWS, as
        ``AWSSecretsManager.clear_cache`` says."""
        self._since_clear.clear()
        self._drop_local()

    def _drop_local(self) -> None:
        followers = list(self._followers.values())
        self._followers.clear()
        self._streams.clear()
        self._last_read.clear()
        self._cache.clear()
        self._learned_at.clear()
        current = asyncio.current_task()
        for task in followers:
            if task is not current and not task.done() and task.get_loop() is asyncio.get_running_loop():
                task.cancel()

    async def get_cache_stats(self) -> dict[str, Any]:
        """As ``AWSSecretsManager.get_cache_stats``."""
        now = time.monotonic()
        total = len(self._cache)
        valid = sum(1 for _, at in self._cache.values() if now - at < self.config.secret_cache_ttl)
        return {
            "total_entries": total,
            "valid_entries": valid,
            "expired_entries": total - valid,
            "ttl_seconds": self.config.secret_cache_ttl,
        }

    async def get_jwt_config(self, name: str = "") -> dict[str, Any]:
        """As ``AWSSecretsManager.get_jwt_config`` (read from the broker's
        cache each time: not cached here)."""
        return await self._typed("GetJwtConfig", name)

    async def get_database_config(self, name: str = "") -> dict[str, Any]:
        """As ``AWSSecretsManager.get_database_config`` (not cached here)."""
        return await self._typed("GetDatabaseConfig", name)

    async def get_aws_services_config(self, name: str = "") -> dict[str, Any]:
        """As ``AWSSecretsManager.get_aws_services_config`` (not cached here)."""
        return await self._typed("GetAwsServicesConfig", name)

    async def get_security_config(self, name: str = "") -> dict[str, Any]:
        """As ``AWSSecretsManager.get_security_config`` (not cached here)."""
        return await self._typed("GetSecurityConfig", name)

    async def _typed(self, rpc: str, name: str) -> dict[str, Any]:
        asked = ("config", rpc, name)
        again = self._since_clear.first_read(asked)
        generation = self._since_clear.generation
        request = getattr(secrets_service_pb2, f"{rpc}Request")(name=name, bypass_cache=again)
        try:
            answer = await self._ask(getattr(self._secrets(), rpc), request, refresh=again)
        except grpc.RpcError as error:
            raise _error_from(error, self.config) from None
        finally:
            if again:
                self._since_clear.answered(asked, generation)
        self.config.check_prefix(name, answer.name)
        return config_dict(answer.config)

    async def get_mistral_api_key(self) -> str:
        """The Mistral API key, as text."""
        return (await self.get_secret("mistral-api-key")).as_string()


async def _follow(
    manager: "weakref.ReferenceType[AsyncAWSSecretsManager]",
    name: str,
    version_id: str,
    arn: str,
    stream_state: _StreamState,
) -> None:
    """Keeps ``name``'s cached value current until it is dropped or its
    manager is gone; after a lost stream, asks again from the version it
    holds, so that a rotation missed meanwhile comes first. The manager is
    held only for each step, never across an await. ``stream_state`` says
    whether the stream is there to vouch for the value."""
    backoff = 0.1
    while True:
        held = manager()
        if held is None:
            return
        request = secrets_service_pb2.WatchSecretRequest(name=name, since_version_id=version_id, since_arn=arn)
        stream = held._secrets().WatchSecret(request)
        held = None
        first = True
        try:
            async for event in stream:
                backoff = 0.1
                stream_state.heard()
                # As the sync follower (_first_marked): a first CURRENT
                # tells nothing new.
                if first and event.type == secret_pb2.WATCH_EVENT_TYPE_CURRENT:
                    first = False
                    continue
                first = False
                held = manager()
                if held is None:
                    stream.cancel()
                    return
                if event.type == secret_pb2.WATCH_EVENT_TYPE_DELETED:
                    held._rotated(name, None)
                    # Not followed any more: the stream must end on the
                    # broker too (it would stay open, waiting for a restore).
                    stream.cancel()
                    return
                value = SecretValue.from_proto(event.secret)
                version_id, arn = value.version_id, value.arn
                held._rotated(name, value)
                held = None
        except grpc.aio.AioRpcError as error:
            stream_state.broke()
            if error.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED):
                if (held := manager()) is not None:
                    held._rotated(name, None)
                return
        except Exception as error:  # noqa: BLE001 - keep following
            logger.debug("watch of %s: %s", name, error)
        stream_state.broke()
        held = None
        await asyncio.sleep(_jittered(backoff))
        backoff = min(backoff * 2, WATCH_BACKOFF_MAX)


def _cancel(followers: dict[str, asyncio.Task[None]]) -> None:
    """A manager's finalizer: its watch tasks cancelled, from whichever
    thread the collection happens on."""
    for task in list(followers.values()):
        loop = task.get_loop()
        if not task.done() and not loop.is_closed():
            loop.call_soon_threadsafe(task.cancel)
    followers.clear()
