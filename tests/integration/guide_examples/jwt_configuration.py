# The guide's "JWT Configuration", only the import line changed.
from secrets_broker.aws_secrets import get_jwt_config
import jwt


def create_access_token(data: dict) -> str:
    """Create JWT access token"""
    config = get_jwt_config()

    return jwt.encode(
        data,
        config["jwt_secret_key"],
        algorithm=config["jwt_algorithm"]
    )


token = create_access_token({"sub": "user-42"})
config = get_jwt_config()
decoded = jwt.decode(token, config["jwt_secret_key"], algorithms=[config["jwt_algorithm"]])
print(f"token for {decoded['sub']}")
