"""secrets-broker's Python client: ``secrets_broker.aws_secrets`` offers the
``AWSSecretsManager`` class services already use, served by the broker;
``secrets_broker.aio`` the same for asyncio services."""

from secrets_broker.aws_secrets import (
    AWSSecretsConfig,
    AWSSecretsManager,
    AWSSecretsManagerError,
    SecretAccessDeniedError,
    SecretNotFoundError,
    SecretValue,
)

__all__ = [
    "AWSSecretsConfig",
    "AWSSecretsManager",
    "AWSSecretsManagerError",
    "SecretAccessDeniedError",
    "SecretNotFoundError",
    "SecretValue",
]
