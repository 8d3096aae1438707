"""The asyncio side: ``AsyncAWSSecretsManager``, on ``grpc.aio``, with the
same methods as ``AWSSecretsManager`` as coroutines and the same local
cache (TTL ``SECRET_CACHE_TTL``; ``use_cache=False`` asks the broker with
bypass)."""

from __future__ import annotations

import time
from typing import Any, Optional

import grpc
import grpc.aio

from secrets_broker.aws_secrets import (
    CALL_TIMEOUT,
    AWSSecretsConfig,
    SecretValue,
    _cache_key,
    _error_from,
    _get_secret_request,
    _health_request,
    _health_status,
    database_dict,
    jwt_dict,
)
from secretsbroker.v1 import secrets_service_pb2, secrets_service_pb2_grpc

__all__ = ["AsyncAWSSecretsManager"]


class AsyncAWSSecretsManager:
    """Secrets through secrets-broker for asyncio services."""

    def __init__(self, config: Optional[AWSSecretsConfig] = None) -> None:
        self.config = config or AWSSecretsConfig()
        self._channel: Optional[grpc.aio.Channel] = None
        self._cache: dict[tuple[str, Optional[str]], tuple[SecretValue, float]] = {}

    def _connect(self) -> grpc.aio.Channel:
        if self._channel is None:
            credentials = self.config.credentials()
            options = self.config.channel_options(credentials is not None)
            endpoint = self.config.broker_endpoint
            if credentials is None:
                self._channel = grpc.aio.insecure_channel(endpoint, options=options)
            else:
                self._channel = grpc.aio.secure_channel(endpoint, credentials, options=options)
        return self._channel

    def _secrets(self) -> secrets_service_pb2_grpc.SecretsServiceAsyncStub:
        # The async stub type exists in the type stubs only (mypy-protobuf).
        return secrets_service_pb2_grpc.SecretsServiceStub(self._connect())

    async def close(self) -> None:
        """Closes the connection."""
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def get_secret(
        self,
        secret_name: str,
        version_id: Optional[str] = None,
        use_cache: bool = True,
        version_stage: Optional[str] = None,
    ) -> SecretValue:
        """As ``AWSSecretsManager.get_secret``."""
        key = _cache_key(secret_name, version_id, version_stage)
        cached = self._cache.get(key)
        if use_cache and cached is not None and time.monotonic() - cached[1] < self.config.secret_cache_ttl:
            return cached[0]
        request = _get_secret_request(secret_name, version_id, use_cache, version_stage)
        try:
            answer = await self._secrets().GetSecret(request, timeout=CALL_TIMEOUT)
        except grpc.RpcError as error:
            raise _error_from(error) from None
        self.config.check_prefix(secret_name, answer.secret.name)
        value = SecretValue.from_proto(answer.secret)
        self._cache[key] = (value, time.monotonic())
        return value

    async def test_connection(self) -> bool:
        """Whether the broker answers and reaches AWS. Never raises."""
        try:
            check = self._connect().unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=_health_request,
                response_deserializer=_health_status,
            )
            status: int = await check("secretsbroker.v1.SecretsService", timeout=5.0)
            return status == 1
        except Exception:  # noqa: BLE001 - the contract is "False, never an exception"
            return False

    def clear_cache(self) -> None:
        """Empties the local cache."""
        self._cache.clear()

    def get_cache_stats(self) -> dict[str, Any]:
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

    async def get_jwt_config(self) -> dict[str, Any]:
        """As ``AWSSecretsManager.get_jwt_config``."""
        try:
            answer = await self._secrets().GetJwtConfig(secrets_service_pb2.GetJwtConfigRequest(), timeout=CALL_TIMEOUT)
        except grpc.RpcError as error:
            raise _error_from(error) from None
        return jwt_dict(answer.config)

    async def get_database_config(self) -> dict[str, Any]:
        """As ``AWSSecretsManager.get_database_config``."""
        try:
            answer = await self._secrets().GetDatabaseConfig(
                secrets_service_pb2.GetDatabaseConfigRequest(), timeout=CALL_TIMEOUT
            )
        except grpc.RpcError as error:
            raise _error_from(error) from None
        return database_dict(answer.config)

    async def get_mistral_api_key(self) -> str:
        """The Mistral API key, as text."""
        return (await self.get_secret("mistral-api-key")).as_string()
