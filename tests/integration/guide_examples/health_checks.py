# The guide's "Health Checks", only the import line changed.
import json

from secrets_broker.aws_secrets import AWSSecretsManager


def health_check():
    """Application health check including AWS connectivity"""
    try:
        secrets_manager = AWSSecretsManager()
        if not secrets_manager.test_connection():
            return {"status": "unhealthy", "aws_secrets": "disconnected"}

        cache_stats = secrets_manager.get_cache_stats()
        return {
            "status": "healthy",
            "aws_secrets": "connected",
            "cache_stats": cache_stats
        }
    except Exception as e:
        return {"status": "unhealthy", "error": str(e)}


print(json.dumps(health_check()))
