# The guide's "Error Handling Example", only the import line changed (and a
# logger and a manager, which the guide's snippet assumes).
import logging
import sys

from secrets_broker.aws_secrets import (
    AWSSecretsManager,
    SecretNotFoundError,
    SecretAccessDeniedError,
    AWSSecretsManagerError
)

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stdout)
logger = logging.getLogger("example")
secrets_manager = AWSSecretsManager()

try:
    secret = secrets_manager.get_secret(sys.argv[1] if len(sys.argv) > 1 else "my-secret")
    value = secret.as_dict()
except SecretNotFoundError:
    logger.error("Secret not found - check secret name")
except SecretAccessDeniedError:
    logger.error("Access denied - check IAM permissions")
except AWSSecretsManagerError as e:
    logger.error(f"AWS error: {e}")
except Exception as e:
    logger.error(f"Unexpected error: {e}")
