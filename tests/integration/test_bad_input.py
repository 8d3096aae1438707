"""Bad names and malformed typed configs: precise errors, no value echoed.

One broker for the whole module, on a custom --secrets-file; the last test
checks that it is still alive and SERVING after all of it.
"""

from __future__ import annotations

import json

import grpc
import pytest

import support
from conftest import launch_broker
from support import expect_error

INVALID = grpc.StatusCode.INVALID_ARGUMENT
FAILED = grpc.StatusCode.FAILED_PRECONDITION

JWT_OK = {
    "jwt_secret_key": "SENTINEL-jwt-signing-key-a41f",
    "jwt_algorithm": "HS256",
    "jwt_issuer": "SENTINEL-issuer-a41f",
    "jwt_audience": "SENTINEL-audience-a41f",
    "jwt_access_token_expire_minutes": 30,
}
DB_OK = {
    "supabase_url": "https://sentinel-project.supabase.invalid",
    "supabase_anon_key": "SENTINEL-anon-key-77d0",
    "supabase_service_key": "SENTINEL-service-key-77d0",
    "database_password": "SENTINEL-db-password-77d0",
}
AWS_OK = {
    "aws_ses_region": "ap-east-1",
    "aws_end_user_messaging_region": "ap-southeast-1",
    "s3_bucket_name": "SENTINEL-bucket-19be",
    "max_file_size_mb": 10,
}
SEC_OK = {
    "encryption_key": "SENTINEL-encryption-key-e2a7",
    "encryption_salt": "SENTINEL-encryption-salt-e2a7",
    "allowed_hosts": "localhost",
    "cors_origins": ["http://localhost:3000"],
}


def without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


NOT_JSON = "SENTINEL-not-json-3c9b {this is: not json"

# short name -> value (a dict is stored as its JSON text)
BAD_SECRETS = {
    "bad/not-json": NOT_JSON,
    "bad/jwt-no-issuer": without(JWT_OK, "jwt_issuer"),
    "bad/jwt-zero-expire": JWT_OK | {"jwt_access_token_expire_minutes": 0},
    "bad/jwt-negative-expire": JWT_OK | {"jwt_access_token_expire_minutes": -1},
    "bad/jwt-string-expire": JWT_OK | {"jwt_access_token_expire_minutes": "30"},
    "bad/jwt-issuer-number": JWT_OK | {"jwt_issuer": 42},
    "bad/db-bad-url": DB_OK | {"supabase_url": "not a url"},
    "bad/db-no-password": without(DB_OK, "database_password"),
    "bad/aws-negative-size": AWS_OK | {"max_file_size_mb": -5},
    "bad/aws-string-size": AWS_OK | {"max_file_size_mb": "10"},
    "bad/aws-zero-size": AWS_OK | {"max_file_size_mb": 0},
    "bad/aws-fraction-size": AWS_OK | {"max_file_size_mb": 2.5},
    "bad/aws-no-bucket": without(AWS_OK, "s3_bucket_name"),
    "bad/sec-no-key": without(SEC_OK, "encryption_key"),
    "bad/sec-hosts-number": SEC_OK | {"allowed_hosts": 7},
    "good/jwt": JWT_OK,
}


def raw_value(short: str) -> str:
    value = BAD_SECRETS[short]
    return value if isinstance(value, str) else json.dumps(value)


def forbidden(short: str) -> tuple[str, ...]:
    """What must never appear in the error for this secret: its raw value,
    every distinctive string inside it, and the bad URL."""
    value = BAD_SECRETS[short]
    found = [raw_value(short)]
    if isinstance(value, dict):
        found += [v for v in value.values() if isinstance(v, str) and ("SENTINEL" in v or v == "not a url")]
        found += [v for v in value.values() if isinstance(v, str) and "sentinel" in v]
    return tuple(found)


# every value of the secrets file, and what must never be echoed, for the
# leak scan (test_zz_log_scan.py)
for _short in BAD_SECRETS:
    support.register_secret(raw_value(_short))
    for _value in forbidden(_short):
        support.register_secret(_value)


@pytest.fixture(scope="module")
def broker(broker_bin, stubs, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("bad-input")
    path = workdir / "secrets.json"
    path.write_text(json.dumps({"secrets": [
        {"name": name, "versions": [{"value": raw_value(name)}]} for name in BAD_SECRETS
    ]}))
    b = launch_broker(
        broker_bin, stubs, support.LOG_DIR / "test_bad_input.log",
        listen=f"127.0.0.1:{support.free_port()}",
        extra_args=["--secrets-file", path], cwd=workdir,
    )
    yield b
    b.stop()


@pytest.fixture(scope="module")
def stub(broker):
    return broker.secrets()


@pytest.fixture(scope="module")
def pb(stubs):
    return stubs.secrets_service_pb2


BAD_NAMES = {
    "empty": "",
    "513 chars": "a" * 513,
    "full name 513 chars": "a" * (513 - len("insurecove/")),
    "space": "bad name",
    "star": "bad*name",
    "star only": "*",
    "newline": "bad\nname",
    "non-ascii": "geheim-schlüssel",
}


@pytest.mark.parametrize("name", list(BAD_NAMES.values()), ids=list(BAD_NAMES))
def test_get_secret_invalid_name(stub, pb, name):
    expect_error(lambda: stub.GetSecret(pb.GetSecretRequest(name=name), timeout=10), INVALID, "INVALID_SECRET_NAME")


def test_name_of_512_chars_is_valid(stub, pb):
    name = "a" * (512 - len("insurecove/"))
    assert len(support.full_name(name)) == 512
    expect_error(
        lambda: stub.GetSecret(pb.GetSecretRequest(name=name), timeout=10),
        grpc.StatusCode.NOT_FOUND, "SECRET_NOT_FOUND",
    )


@pytest.mark.parametrize("rpc", ["GetJwtConfig", "GetDatabaseConfig", "GetAwsServicesConfig", "GetSecurityConfig"])
@pytest.mark.parametrize("name", ["bad name", "bad*name", "a" * 513], ids=["space", "star", "513"])
def test_typed_config_invalid_name(stub, pb, rpc, name):
    request = getattr(pb, f"{rpc}Request")(name=name)
    expect_error(lambda: getattr(stub, rpc)(request, timeout=10), INVALID, "INVALID_SECRET_NAME")


def test_batch_invalid_names_answered_per_item(stub, pb):
    names = ["good/jwt", "bad name", "", "bad*name", "no-such-secret"]
    resp = stub.BatchGetSecrets(pb.BatchGetSecretsRequest(names=names), timeout=10)
    assert [r.name for r in resp.results] == names
    kinds = [r.WhichOneof("result") for r in resp.results]
    assert kinds == ["secret", "error", "error", "error", "error"], resp
    assert resp.results[0].secret.string_value == raw_value("good/jwt")
    for result in resp.results[1:4]:
        assert (result.error.code, result.error.reason) == (3, "INVALID_SECRET_NAME"), result
    assert (resp.results[4].error.code, resp.results[4].error.reason) == (5, "SECRET_NOT_FOUND")


@pytest.mark.parametrize("rpc", ["GetJwtConfig", "GetDatabaseConfig", "GetAwsServicesConfig", "GetSecurityConfig"])
def test_non_json_as_typed_config(stub, pb, rpc):
    request = getattr(pb, f"{rpc}Request")(name="bad/not-json")
    expect_error(
        lambda: getattr(stub, rpc)(request, timeout=10), FAILED, "MALFORMED_SECRET",
        forbidden=forbidden("bad/not-json") + ("this is: not json",),
    )


MALFORMED = [
    # (rpc, secret, field)
    ("GetJwtConfig", "bad/jwt-no-issuer", "jwt_issuer"),
    ("GetJwtConfig", "bad/jwt-zero-expire", "jwt_access_token_expire_minutes"),
    ("GetJwtConfig", "bad/jwt-negative-expire", "jwt_access_token_expire_minutes"),
    ("GetJwtConfig", "bad/jwt-string-expire", "jwt_access_token_expire_minutes"),
    ("GetJwtConfig", "bad/jwt-issuer-number", "jwt_issuer"),
    ("GetDatabaseConfig", "bad/db-bad-url", "supabase_url"),
    ("GetDatabaseConfig", "bad/db-no-password", "database_password"),
    ("GetAwsServicesConfig", "bad/aws-negative-size", "max_file_size_mb"),
    ("GetAwsServicesConfig", "bad/aws-string-size", "max_file_size_mb"),
    ("GetAwsServicesConfig", "bad/aws-zero-size", "max_file_size_mb"),
    ("GetAwsServicesConfig", "bad/aws-fraction-size", "max_file_size_mb"),
    ("GetAwsServicesConfig", "bad/aws-no-bucket", "s3_bucket_name"),
    ("GetSecurityConfig", "bad/sec-no-key", "encryption_key"),
    ("GetSecurityConfig", "bad/sec-hosts-number", "allowed_hosts"),
]


@pytest.mark.parametrize("rpc, secret, field", MALFORMED, ids=[m[1] for m in MALFORMED])
def test_malformed_typed_config(stub, pb, rpc, secret, field):
    request = getattr(pb, f"{rpc}Request")(name=secret)
    err, info = expect_error(
        lambda: getattr(stub, rpc)(request, timeout=10), FAILED, "MALFORMED_SECRET",
        field=field, forbidden=forbidden(secret),
    )
    assert field in err.details(), f"the message does not name {field}: {err.details()!r}"


def test_typed_config_on_wrong_kind_of_secret(stub, pb):
    """A valid JWT secret read as database settings is malformed, not echoed."""
    expect_error(
        lambda: stub.GetDatabaseConfig(pb.GetDatabaseConfigRequest(name="good/jwt"), timeout=10),
        FAILED, "MALFORMED_SECRET", forbidden=forbidden("good/jwt"),
    )


def test_good_secret_in_the_same_file_still_decodes(stub, pb):
    config = stub.GetJwtConfig(pb.GetJwtConfigRequest(name="good/jwt"), timeout=10).config
    assert config.jwt_issuer == JWT_OK["jwt_issuer"]
    assert config.jwt_access_token_expire_minutes == 30


def test_broker_survives_all_of_it(broker):
    """Runs last in this module (pytest keeps file order)."""
    assert broker.alive(), f"the broker exited with {broker.proc.returncode}:\n{broker.tail()}"
    assert broker.health("") == "SERVING"
    assert broker.health("secretsbroker.v1.SecretsService") == "SERVING"
