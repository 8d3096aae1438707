"""The broker through grpcio with stubs generated from proto/ in this run."""

from __future__ import annotations

import base64
import json

import grpc
import pytest

import support
from support import expect_error

SEED = support.dev_seed()


def test_get_secret(dev_broker, stubs):
    pb = stubs.secrets_service_pb2
    resp = dev_broker.secrets().GetSecret(pb.GetSecretRequest(name="mistral-api-key"), timeout=10)
    secret = resp.secret
    assert secret.WhichOneof("value") == "string_value"
    assert secret.string_value == SEED["insurecove/mistral-api-key"]
    assert secret.name == "insurecove/mistral-api-key"
    assert secret.version_id != ""
    assert "AWSCURRENT" in secret.version_stages


def test_get_secret_by_full_name(dev_broker, stubs):
    pb = stubs.secrets_service_pb2
    stub = dev_broker.secrets()
    short = stub.GetSecret(pb.GetSecretRequest(name="mistral-api-key"), timeout=10).secret
    full = stub.GetSecret(pb.GetSecretRequest(name="insurecove/mistral-api-key"), timeout=10).secret
    assert full.name == "insurecove/mistral-api-key"
    assert full.string_value == short.string_value
    assert full.version_id == short.version_id


def test_batch_get_secrets_in_request_order(dev_broker, stubs):
    pb = stubs.secrets_service_pb2
    resp = dev_broker.secrets().BatchGetSecrets(
        pb.BatchGetSecretsRequest(names=["mistral-api-key", "no-such-secret"]), timeout=10
    )
    assert [r.name for r in resp.results] == ["mistral-api-key", "no-such-secret"]
    first, second = resp.results
    assert first.WhichOneof("result") == "secret", first
    assert first.secret.name == "insurecove/mistral-api-key"
    assert first.secret.string_value == SEED["insurecove/mistral-api-key"]
    assert second.WhichOneof("result") == "error", second
    assert second.error.code == grpc.StatusCode.NOT_FOUND.value[0] == 5
    assert second.error.reason == "SECRET_NOT_FOUND"
    # the other way round: order follows the request, not success
    resp = dev_broker.secrets().BatchGetSecrets(
        pb.BatchGetSecretsRequest(names=["no-such-secret", "production/jwt", "mistral-api-key"]), timeout=10
    )
    assert [r.name for r in resp.results] == ["no-such-secret", "production/jwt", "mistral-api-key"]
    assert [r.WhichOneof("result") for r in resp.results] == ["error", "secret", "secret"]
    assert resp.results[1].secret.string_value == SEED["insurecove/production/jwt"]


def test_get_jwt_config(dev_broker, stubs):
    pb = stubs.secrets_service_pb2
    seed = support.seed_json("production/jwt")
    resp = dev_broker.secrets().GetJwtConfig(pb.GetJwtConfigRequest(), timeout=10)
    c = resp.config
    assert c.jwt_secret_key == seed["jwt_secret_key"]
    assert c.jwt_algorithm == seed["jwt_algorithm"]
    assert c.jwt_issuer == seed["jwt_issuer"]
    assert c.jwt_audience == seed["jwt_audience"]
    assert c.jwt_access_token_expire_minutes == seed["jwt_access_token_expire_minutes"]
    assert resp.version_id != ""
    # the same secret read by its explicit name
    named = dev_broker.secrets().GetJwtConfig(pb.GetJwtConfigRequest(name="production/jwt"), timeout=10)
    assert named.cache.hit, "read just before: from the broker's cache"
    named.ClearField("cache")
    resp.ClearField("cache")
    assert named == resp


def test_get_database_config(dev_broker, stubs):
    pb = stubs.secrets_service_pb2
    seed = support.seed_json("production/database")
    resp = dev_broker.secrets().GetDatabaseConfig(pb.GetDatabaseConfigRequest(), timeout=10)
    c = resp.config
    assert c.supabase_url == seed["supabase_url"]
    assert c.supabase_anon_key == seed["supabase_anon_key"]
    assert c.supabase_service_key == seed["supabase_service_key"]
    assert c.database_password == seed["database_password"]
    assert resp.version_id != ""


def test_get_aws_services_config(dev_broker, stubs):
    pb = stubs.secrets_service_pb2
    seed = support.seed_json("production/aws-services")
    resp = dev_broker.secrets().GetAwsServicesConfig(pb.GetAwsServicesConfigRequest(), timeout=10)
    c = resp.config
    assert c.aws_ses_region == seed["aws_ses_region"]
    assert c.aws_end_user_messaging_region == seed["aws_end_user_messaging_region"]
    assert c.s3_bucket_name == seed["s3_bucket_name"]
    assert c.max_file_size_mb == seed["max_file_size_mb"]
    assert resp.version_id != ""


def test_get_security_config(dev_broker, stubs):
    pb = stubs.secrets_service_pb2
    seed = support.seed_json("production/security")
    resp = dev_broker.secrets().GetSecurityConfig(pb.GetSecurityConfigRequest(), timeout=10)
    c = resp.config
    assert c.encryption_key == seed["encryption_key"]
    assert c.encryption_salt == seed["encryption_salt"]
    assert list(c.allowed_hosts) == support.as_list(seed["allowed_hosts"])
    assert list(c.cors_origins) == support.as_list(seed["cors_origins"])
    assert len(c.allowed_hosts) >= 2, "the seed's comma-separated hosts were not split"
    assert resp.version_id != ""


def test_security_lists_from_both_forms(start_broker, stubs, tmp_path):
    """allowed_hosts / cors_origins: JSON list or comma string, trimmed, empties dropped."""
    path = tmp_path / "secrets.json"
    data = {"secrets": [{
        "name": "production/security",
        "versions": [{"value": json.dumps({
            "encryption_key": "SENTINEL-enc-key-5b1d",
            "encryption_salt": "SENTINEL-enc-salt-5b1d",
            "allowed_hosts": " a.example , ,b.example,, c.example ",
            "cors_origins": [" https://x.example ", "", "https://y.example"],
        })}],
    }]}
    support.register_secrets_file(data)                 # for the leak scan
    path.write_text(json.dumps(data))
    broker = start_broker(["--secrets-file", path])
    pb = stubs.secrets_service_pb2
    c = broker.secrets().GetSecurityConfig(pb.GetSecurityConfigRequest(), timeout=10).config
    assert list(c.allowed_hosts) == ["a.example", "b.example", "c.example"]
    assert list(c.cors_origins) == ["https://x.example", "https://y.example"]


def test_error_info_not_found(dev_broker, stubs):
    pb = stubs.secrets_service_pb2
    stub = dev_broker.secrets()
    err, info = expect_error(
        lambda: stub.GetSecret(pb.GetSecretRequest(name="no-such-secret"), timeout=10),
        grpc.StatusCode.NOT_FOUND, "SECRET_NOT_FOUND",
    )
    assert info.domain == "secretsbroker"


def test_error_info_invalid_argument(dev_broker, stubs):
    pb = stubs.secrets_service_pb2
    stub = dev_broker.secrets()
    err, info = expect_error(
        lambda: stub.GetSecret(pb.GetSecretRequest(name="bad name"), timeout=10),
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SECRET_NAME",
    )
    assert info.domain == "secretsbroker"


VERSIONS_FILE = {
    "secrets": [
        {   # implicit stages: the last version is AWSCURRENT, the one before AWSPREVIOUS
            "name": "rotating",
            "versions": [
                {"value": "rotating-OLD-value-4d2c", "version_id": "rot-v1"},
                {"value": "rotating-NEW-value-4d2c", "version_id": "rot-v2"},
            ],
        },
        {   # explicit stages, the current one listed first
            "name": "staged",
            "versions": [
                {"value": "staged-CURRENT-value-8e1f", "version_id": "stg-a", "stages": ["AWSCURRENT"]},
                {"value": "staged-PREVIOUS-value-8e1f", "version_id": "stg-b", "stages": ["AWSPREVIOUS"]},
            ],
        },
        {
            "name": "blob",
            "versions": [{"binary_base64": base64.b64encode(b"\x00\x01binary\xff").decode(), "version_id": "blob-1"}],
        },
    ]
}
support.register_secrets_file(VERSIONS_FILE)     # for the leak scan


@pytest.fixture
def versions_broker(start_broker, tmp_path):
    path = tmp_path / "versions.json"
    path.write_text(json.dumps(VERSIONS_FILE))
    return start_broker(["--secrets-file", path])


@pytest.mark.parametrize(
    "name, current, previous",
    [
        ("rotating", ("rot-v2", "rotating-NEW-value-4d2c"), ("rot-v1", "rotating-OLD-value-4d2c")),
        ("staged", ("stg-a", "staged-CURRENT-value-8e1f"), ("stg-b", "staged-PREVIOUS-value-8e1f")),
    ],
)
def test_version_selection(versions_broker, stubs, name, current, previous):
    pb = stubs.secrets_service_pb2
    stub = versions_broker.secrets()

    def get(**kw):
        return stub.GetSecret(pb.GetSecretRequest(name=name, **kw), timeout=10).secret

    for secret in (get(), get(version_stage="AWSCURRENT")):
        assert (secret.version_id, secret.string_value) == current
        assert "AWSCURRENT" in secret.version_stages
        assert "AWSPREVIOUS" not in secret.version_stages
        assert secret.name == f"insurecove/{name}"
    secret = get(version_stage="AWSPREVIOUS")
    assert (secret.version_id, secret.string_value) == previous
    assert "AWSPREVIOUS" in secret.version_stages
    assert "AWSCURRENT" not in secret.version_stages
    assert (get(version_id=previous[0]).string_value) == previous[1]
    assert (get(version_id=current[0]).string_value) == current[1]
    expect_error(lambda: get(version_id="no-such-version"), grpc.StatusCode.NOT_FOUND, "SECRET_NOT_FOUND")
    expect_error(lambda: get(version_stage="AWSPENDING"), grpc.StatusCode.NOT_FOUND, "SECRET_NOT_FOUND")


def test_binary_secret(versions_broker, stubs):
    pb = stubs.secrets_service_pb2
    secret = versions_broker.secrets().GetSecret(pb.GetSecretRequest(name="blob"), timeout=10).secret
    assert secret.WhichOneof("value") == "binary_value"
    assert secret.binary_value == b"\x00\x01binary\xff"
    assert secret.version_id == "blob-1"


def test_toml_secrets_file(start_broker, stubs, tmp_path):
    path = tmp_path / "secrets.toml"
    support.register_secret("toml-value-one-93ab")      # for the leak scan
    support.register_secret("toml-value-two-93ab")
    path.write_text(
        '[[secrets]]\nname = "from-toml"\n\n'
        '[[secrets.versions]]\nvalue = "toml-value-one-93ab"\nversion_id = "t1"\n\n'
        '[[secrets.versions]]\nvalue = "toml-value-two-93ab"\nversion_id = "t2"\n'
    )
    broker = start_broker(["--secrets-file", path])
    pb = stubs.secrets_service_pb2
    stub = broker.secrets()
    secret = stub.GetSecret(pb.GetSecretRequest(name="from-toml"), timeout=10).secret
    assert (secret.name, secret.version_id, secret.string_value) == ("insurecove/from-toml", "t2", "toml-value-two-93ab")
    secret = stub.GetSecret(pb.GetSecretRequest(name="from-toml", version_stage="AWSPREVIOUS"), timeout=10).secret
    assert (secret.version_id, secret.string_value) == ("t1", "toml-value-one-93ab")
    # the file replaces the seed
    expect_error(
        lambda: stub.GetSecret(pb.GetSecretRequest(name="mistral-api-key"), timeout=10),
        grpc.StatusCode.NOT_FOUND, "SECRET_NOT_FOUND",
    )


def test_health_per_service(dev_broker):
    assert dev_broker.health("") == "SERVING"
    assert dev_broker.health("secretsbroker.v1.SecretsService") == "SERVING"


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_lists_services(dev_broker, stubs, version):
    pb = getattr(stubs, f"reflection_{version}_pb2")
    grpc_mod = getattr(stubs, f"reflection_{version}_pb2_grpc")
    stub = grpc_mod.ServerReflectionStub(dev_broker.channel())
    responses = list(stub.ServerReflectionInfo(iter([pb.ServerReflectionRequest(list_services="*")]), timeout=10))
    assert len(responses) == 1
    assert responses[0].WhichOneof("message_response") == "list_services_response", responses[0]
    names = {s.name for s in responses[0].list_services_response.service}
    assert {"secretsbroker.v1.SecretsService", "secretsbroker.v1.AdminService", "grpc.health.v1.Health"} <= names


def test_env_prefix_and_environment(start_broker, stubs, tmp_path):
    """SECRET_PREFIX and SECRET_ENVIRONMENT change name resolution."""
    path = tmp_path / "secrets.json"
    jwt = support.seed_json("production/jwt") | {"jwt_issuer": "staging-issuer-0c4e"}
    data = {"secrets": [
        {"name": "staging/jwt", "versions": [{"value": json.dumps(jwt)}]},
        {"name": "plain", "versions": [{"value": "plain-value-0c4e"}]},
    ]}
    support.register_secrets_file(data)                 # for the leak scan
    path.write_text(json.dumps(data))
    broker = start_broker(
        ["--secrets-file", path], env={"SECRET_PREFIX": "acme", "SECRET_ENVIRONMENT": "staging"}
    )
    pb = stubs.secrets_service_pb2
    stub = broker.secrets()
    assert stub.GetJwtConfig(pb.GetJwtConfigRequest(), timeout=10).config.jwt_issuer == "staging-issuer-0c4e"
    secret = stub.GetSecret(pb.GetSecretRequest(name="plain"), timeout=10).secret
    assert (secret.name, secret.string_value) == ("acme/plain", "plain-value-0c4e")
    assert stub.GetSecret(pb.GetSecretRequest(name="acme/plain"), timeout=10).secret.name == "acme/plain"


def test_dev_mode_serves_its_typed_configs_under_the_environment(start_broker, stubs):
    """A developer whose .env sets SECRET_ENVIRONMENT finds the dev seed's
    typed configs under their default names."""
    broker = start_broker(env={"SECRET_PREFIX": "acme", "SECRET_ENVIRONMENT": "staging"})
    pb = stubs.secrets_service_pb2
    stub = broker.secrets()
    answer = stub.GetJwtConfig(pb.GetJwtConfigRequest(), timeout=10)
    assert answer.config.jwt_secret_key == support.seed_json("production/jwt")["jwt_secret_key"]
    database = stub.GetDatabaseConfig(pb.GetDatabaseConfigRequest(), timeout=10)
    assert database.config.supabase_url == support.seed_json("production/database")["supabase_url"]
    secret = stub.GetSecret(pb.GetSecretRequest(name="staging/jwt"), timeout=10).secret
    assert secret.name == "acme/staging/jwt"
    expect_error(
        lambda: stub.GetSecret(pb.GetSecretRequest(name="production/jwt"), timeout=10),
        grpc.StatusCode.NOT_FOUND, "SECRET_NOT_FOUND",
    )
