# The guide's "Basic Usage", only the import line changed.
from secrets_broker.aws_secrets import AWSSecretsManager, SecretNotFoundError

# Initialize the secrets manager
secrets_manager = AWSSecretsManager()

# Test connection
if secrets_manager.test_connection():
    print("✅ Connected to AWS Secrets Manager")

# Retrieve a secret
try:
    secret = secrets_manager.get_secret("mistral-api-key")
    api_key = secret.as_string()
    print(f"API Key: {api_key}")
except SecretNotFoundError:
    print("Secret not found")
