"""The broker through the real grpcurl binary (1.8.6: reflection v1alpha).

One broker for the module, started with exactly `serve --dev` and no
--listen, so the default address 127.0.0.1:50051 is what is tested.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess

import pytest

import support
from conftest import launch_broker

DEFAULT_ADDR = "127.0.0.1:50051"

SECRETS_RPCS = {
    "GetSecret",
    "BatchGetSecrets",
    "GetJwtConfig",
    "GetDatabaseConfig",
    "GetAwsServicesConfig",
    "GetSecurityConfig",
    "WatchSecret",
}
ADMIN_RPCS = {"GetCacheStats", "ClearCache", "RefreshSecret", "CheckUpstream"}


@pytest.fixture(scope="module")
def default_broker(broker_bin, stubs, tmp_path_factory):
    if not support.port_is_free(50051):
        pytest.fail(
            f"{DEFAULT_ADDR} is already in use: this test needs the broker's default port",
            pytrace=False,
        )
    broker = launch_broker(
        broker_bin,
        stubs,
        support.LOG_DIR / "test_grpcurl-serve-dev-default-listen.log",
        listen=None,
        cwd=tmp_path_factory.mktemp("grpcurl-broker-cwd"),
    )
    assert broker.args[1:] == ["serve", "--dev"]
    yield broker
    broker.stop()


@pytest.fixture
def grpcurl(grpcurl_bin):
    def run(*args, data: str | None = None) -> str:
        cmd = [str(grpcurl_bin), "-max-time", "10", "-plaintext"]
        if data is not None:
            cmd += ["-d", data]
        cmd += [DEFAULT_ADDR, *args]
        proc = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
            env=support.broker_env(),
        )
        assert proc.returncode == 0, (
            f"{shlex.join(cmd)} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
        )
        return proc.stdout

    return run


def rpc_names(describe_output: str) -> set[str]:
    return set(re.findall(r"^\s*rpc\s+(\w+)\s*\(", describe_output, re.M))


def test_grpcurl_is_1_8_6(grpcurl_bin):
    proc = subprocess.run([str(grpcurl_bin), "-version"], capture_output=True, text=True, timeout=30)
    assert "1.8.6" in proc.stdout + proc.stderr


def test_list_services(default_broker, grpcurl):
    services = set(grpcurl("list").split())
    expected = {"secretsbroker.v1.SecretsService", "secretsbroker.v1.AdminService", "grpc.health.v1.Health"}
    assert expected <= services, f"missing {expected - services}; listed {sorted(services)}"


def test_describe_secrets_service(default_broker, grpcurl):
    out = grpcurl("describe", "secretsbroker.v1.SecretsService")
    assert rpc_names(out) == SECRETS_RPCS, out
    assert re.search(r"rpc WatchSecret\s*\(.*\)\s*returns\s*\(\s*stream\b", out), out


def test_describe_admin_service(default_broker, grpcurl):
    out = grpcurl("describe", "secretsbroker.v1.AdminService")
    assert rpc_names(out) == ADMIN_RPCS, out


def test_get_secret(default_broker, grpcurl):
    out = grpcurl("secretsbroker.v1.SecretsService/GetSecret", data='{"name":"mistral-api-key"}')
    secret = json.loads(out)["secret"]
    assert secret["name"] == "insurecove/mistral-api-key"
    assert secret["stringValue"] == support.dev_seed()["insurecove/mistral-api-key"]
    assert secret.get("versionId"), secret
    assert "AWSCURRENT" in secret.get("versionStages", []), secret


def test_get_jwt_config_default_name(default_broker, grpcurl):
    out = grpcurl("secretsbroker.v1.SecretsService/GetJwtConfig", data="{}")
    resp = json.loads(out)
    seed = support.seed_json("production/jwt")
    assert resp["config"] == {
        "jwtSecretKey": seed["jwt_secret_key"],
        "jwtAlgorithm": seed["jwt_algorithm"],
        "jwtIssuer": seed["jwt_issuer"],
        "jwtAudience": seed["jwt_audience"],
        # uint32 is a JSON number (only 64-bit integers are strings)
        "jwtAccessTokenExpireMinutes": seed["jwt_access_token_expire_minutes"],
    }
    assert resp.get("versionId"), resp


def test_health_check(default_broker, grpcurl):
    out = grpcurl("grpc.health.v1.Health/Check", data="{}")
    assert json.loads(out) == {"status": "SERVING"}
    out = grpcurl("grpc.health.v1.Health/Check", data='{"service":"secretsbroker.v1.SecretsService"}')
    assert json.loads(out) == {"status": "SERVING"}


def test_startup_prints_a_working_grpcurl_line(default_broker, grpcurl_bin):
    lines = [line for line in default_broker.log().splitlines()[1:] if "grpcurl" in line]
    assert lines, f"no grpcurl line in the startup output:\n{default_broker.tail()}"
    line = lines[0]
    assert "-plaintext" in line and DEFAULT_ADDR in line, line
    # The printed command works as printed (with our grpcurl binary).
    argv = shlex.split(line[line.index("grpcurl"):])
    assert argv[0] == "grpcurl", line
    proc = subprocess.run(
        [str(grpcurl_bin), *argv[1:]], stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=30, env=support.broker_env(),
    )
    assert proc.returncode == 0, f"{line!r} failed: {proc.stderr}"
    json.loads(proc.stdout)
