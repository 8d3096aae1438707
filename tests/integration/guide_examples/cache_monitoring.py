# The guide's "Cache Monitoring", only the import line changed (and two reads
# so that there is something to monitor).
from secrets_broker.aws_secrets import AWSSecretsManager

secrets_manager = AWSSecretsManager()
secrets_manager.get_secret("mistral-api-key")
secrets_manager.get_secret("mistral-api-key")

# Get cache statistics
stats = secrets_manager.get_cache_stats()
print(f"Cache entries: {stats['total_entries']}")
print(f"Valid entries: {stats['valid_entries']}")
print(f"Cache hit ratio: {stats['valid_entries'] / max(1, stats['total_entries']):.2%}")
