"""The broker's AWS backend (`serve` without --dev) against a real moto_server:
names and prefix, typed configs, binary values, versions and stages, the
definite errors (deleted, not found), CheckUpstream and the health status
that follows the upstream."""

from __future__ import annotations

import random
import time

import grpc

import support
from support import expect_error

SEED = support.dev_seed()
HEALTH_SERVICE = "secretsbroker.v1.SecretsService"


def get(broker, stubs, name, **kw):
    pb = stubs.secrets_service_pb2
    return broker.secrets().GetSecret(pb.GetSecretRequest(name=name, **kw), timeout=20).secret


def test_guide_secrets_and_typed_configs(moto, aws_broker, stubs):
    versions = moto.seed(SEED)
    assert set(versions) == {
        "insurecove/mistral-api-key", "insurecove/production/jwt", "insurecove/production/database",
        "insurecove/production/aws-services", "insurecove/production/security",
    }, "the dev seed changed: update this test"
    broker = aws_broker()

    for full, value in SEED.items():
        short = full.removeprefix("insurecove/")
        secret = get(broker, stubs, short)
        assert secret.name == full
        assert secret.WhichOneof("value") == "string_value", (full, secret.WhichOneof("value"))
        assert secret.string_value == value, full
        assert secret.version_id == versions[full]
        assert list(secret.version_stages) == ["AWSCURRENT"]
        assert secret.arn.startswith("arn:aws:secretsmanager:ap-east-1:") and f":secret:{full}-" in secret.arn, secret.arn
        assert secret.HasField("created_date") and secret.created_date.seconds > 0

    pb = stubs.secrets_service_pb2
    stub = broker.secrets()

    resp = stub.GetJwtConfig(pb.GetJwtConfigRequest(), timeout=20)
    seed = support.seed_json("production/jwt")
    c = resp.config
    assert (c.jwt_secret_key, c.jwt_algorithm, c.jwt_issuer, c.jwt_audience, c.jwt_access_token_expire_minutes) == (
        seed["jwt_secret_key"], seed["jwt_algorithm"], seed["jwt_issuer"], seed["jwt_audience"],
        seed["jwt_access_token_expire_minutes"],
    )
    assert resp.version_id == versions["insurecove/production/jwt"]
    assert resp.arn == get(broker, stubs, "production/jwt").arn, "the ARN of the secret read"
    # Where the settings came from, as a Secret says it: the secret was read
    # above, so the broker's cache; a bypass read is AWS's answer.
    assert resp.HasField("cache") and resp.cache.hit and not resp.cache.stale, resp.cache
    bypassed = stub.GetJwtConfig(pb.GetJwtConfigRequest(bypass_cache=True), timeout=20)
    assert not bypassed.cache.hit and not bypassed.cache.stale, bypassed.cache

    resp = stub.GetDatabaseConfig(pb.GetDatabaseConfigRequest(), timeout=20)
    seed = support.seed_json("production/database")
    c = resp.config
    assert (c.supabase_url, c.supabase_anon_key, c.supabase_service_key, c.database_password) == (
        seed["supabase_url"], seed["supabase_anon_key"], seed["supabase_service_key"], seed["database_password"],
    )
    assert resp.version_id == versions["insurecove/production/database"]
    assert resp.arn == get(broker, stubs, "production/database").arn, "the ARN of the secret read"

    resp = stub.GetAwsServicesConfig(pb.GetAwsServicesConfigRequest(), timeout=20)
    seed = support.seed_json("production/aws-services")
    c = resp.config
    assert (c.aws_ses_region, c.aws_end_user_messaging_region, c.s3_bucket_name, c.max_file_size_mb) == (
        seed["aws_ses_region"], seed["aws_end_user_messaging_region"], seed["s3_bucket_name"], seed["max_file_size_mb"],
    )
    assert resp.version_id == versions["insurecove/production/aws-services"]
    assert resp.arn == get(broker, stubs, "production/aws-services").arn, "the ARN of the secret read"

    resp = stub.GetSecurityConfig(pb.GetSecurityConfigRequest(), timeout=20)
    seed = support.seed_json("production/security")
    c = resp.config
    assert (c.encryption_key, c.encryption_salt) == (seed["encryption_key"], seed["encryption_salt"])
    assert list(c.allowed_hosts) == support.as_list(seed["allowed_hosts"])
    assert list(c.cors_origins) == support.as_list(seed["cors_origins"])
    assert resp.version_id == versions["insurecove/production/security"]
    assert resp.arn == get(broker, stubs, "production/security").arn, "the ARN of the secret read"


def test_binary_secret_byte_for_byte(moto, aws_broker, stubs):
    data = bytearray(range(256))             # every byte value, 0x00 included
    random.Random(20240917).shuffle(data)
    data = bytes(data)
    assert len(data) == 256 and b"\x00" in data
    version = moto.create_secret("insurecove/certs/blob", data)
    secret = get(aws_broker(), stubs, "certs/blob")
    assert secret.WhichOneof("value") == "binary_value"
    assert secret.binary_value == data
    assert secret.version_id == version


def test_versions_and_stages(moto, aws_broker, stubs):
    old_id = moto.create_secret("insurecove/rotating", "rotating-OLD-7c1e")
    new_id = moto.put_secret_value("insurecove/rotating", "rotating-NEW-7c1e")
    assert old_id != new_id
    broker = aws_broker()

    by_id = get(broker, stubs, "rotating", version_id=old_id)
    assert (by_id.version_id, by_id.string_value) == (old_id, "rotating-OLD-7c1e")
    assert list(by_id.version_stages) == ["AWSPREVIOUS"]

    previous = get(broker, stubs, "rotating", version_stage="AWSPREVIOUS")
    assert (previous.version_id, previous.string_value) == (old_id, "rotating-OLD-7c1e")
    assert list(previous.version_stages) == ["AWSPREVIOUS"]

    for current in (get(broker, stubs, "rotating", version_stage="AWSCURRENT"), get(broker, stubs, "rotating")):
        assert (current.version_id, current.string_value) == (new_id, "rotating-NEW-7c1e")
        assert list(current.version_stages) == ["AWSCURRENT"]

    assert get(broker, stubs, "rotating", version_id=new_id).string_value == "rotating-NEW-7c1e"
    expect_error(
        lambda: get(broker, stubs, "rotating", version_id="00000000-0000-4000-8000-000000000000"),
        grpc.StatusCode.NOT_FOUND, "SECRET_NOT_FOUND",
    )
    # A version id with a stage it does not hold: no such version, the
    # caller's mistake (not a refusal of the broker's), as on the dev backend.
    assert get(broker, stubs, "rotating", version_id=old_id, version_stage="AWSPREVIOUS").string_value == "rotating-OLD-7c1e"
    expect_error(
        lambda: get(broker, stubs, "rotating", version_id=old_id, version_stage="AWSCURRENT"),
        grpc.StatusCode.NOT_FOUND, "SECRET_NOT_FOUND", field="version_id",
    )
    # Nor is it logged as AWS refusing the broker: any caller could fill
    # the operator's warnings with it.
    assert "AWS refused a request" not in broker.log()


def test_deleted_and_missing_secrets(moto, aws_broker, stubs):
    """A secret marked for deletion answers SECRET_DELETED, never its cached
    value, and its entry is dropped; a nonexistent one SECRET_NOT_FOUND."""
    value = "doomed-value-SENTINEL-31f9"
    moto.create_secret("insurecove/doomed", value)
    moto.create_secret("insurecove/doomed-bypass", value)
    broker = aws_broker(["--cache-ttl", "1"])
    assert get(broker, stubs, "doomed").string_value == value
    assert get(broker, stubs, "doomed-bypass").string_value == value
    read_done = time.monotonic()
    moto.delete_secret("insurecove/doomed")          # 30-day recovery window
    moto.delete_secret("insurecove/doomed-bypass")

    # a bypass read within the TTL
    expect_error(
        lambda: get(broker, stubs, "doomed-bypass", bypass_cache=True),
        grpc.StatusCode.NOT_FOUND, "SECRET_DELETED", forbidden=(value,),
    )
    # a plain read once the TTL is over
    time.sleep(max(0.0, read_done + 1.2 - time.monotonic()))
    expect_error(
        lambda: get(broker, stubs, "doomed"),
        grpc.StatusCode.NOT_FOUND, "SECRET_DELETED", forbidden=(value,),
    )
    # and again (no stale value now either)
    for name in ("doomed", "doomed-bypass"):
        expect_error(
            lambda: get(broker, stubs, name),
            grpc.StatusCode.NOT_FOUND, "SECRET_DELETED", forbidden=(value,),
        )
    # the definite answers dropped the entries
    admin = broker.admin()
    apb = stubs.admin_service_pb2
    cleared = admin.ClearCache(apb.ClearCacheRequest(names=["doomed", "doomed-bypass"]), timeout=10).cleared
    assert cleared == 0, f"{cleared} cache entries of deleted secrets were still held"

    expect_error(
        lambda: get(broker, stubs, "never-created"),
        grpc.StatusCode.NOT_FOUND, "SECRET_NOT_FOUND",
    )


def wait_for_health(broker, want: str, timeout: float) -> float:
    """Polls the SecretsService health status until it is `want`; seconds taken."""
    started = time.monotonic()
    seen = []
    while True:
        status = broker.health(HEALTH_SERVICE)
        if not seen or seen[-1] != status:
            seen.append(status)
        if status == want:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(
                f"health of {HEALTH_SERVICE} not {want} after {timeout} s (seen {seen}); "
                f"broker log {broker.log_path}:\n{broker.tail()}"
            )
        time.sleep(0.1)


def test_health_and_check_upstream_follow_moto(moto, aws_broker, stubs):
    broker = aws_broker(["--watch-interval", "1"])
    apb = stubs.admin_service_pb2
    admin = broker.admin()

    resp = admin.CheckUpstream(apb.CheckUpstreamRequest(), timeout=20)
    assert resp.reachable is True, resp
    assert resp.detail, resp
    assert resp.HasField("latency") and resp.latency.ToTimedelta().total_seconds() > 0, resp
    assert resp.latency.ToTimedelta().total_seconds() < 10, resp
    wait_for_health(broker, "SERVING", 5)

    moto.stop()
    took = wait_for_health(broker, "NOT_SERVING", 5)
    assert broker.health("") == "SERVING", "the overall status must stay SERVING"
    resp = admin.CheckUpstream(apb.CheckUpstreamRequest(), timeout=30)
    assert resp.reachable is False, resp
    assert resp.detail, resp

    moto.start()
    took_back = wait_for_health(broker, "SERVING", 5)
    resp = admin.CheckUpstream(apb.CheckUpstreamRequest(), timeout=20)
    assert resp.reachable is True, resp
    print(f"NOT_SERVING after {took:.1f} s, SERVING again after {took_back:.1f} s")


def test_an_empty_endpoint_variable_means_not_set(moto, aws_broker, run_cli, stubs):
    """`AWS_ENDPOINT_URL=` left empty by a template or an env file: the SDK
    takes it for an endpoint and panics; the broker treats it as unset, so
    the service's own variable (or AWS's endpoint) is used."""
    versions = moto.seed({"insurecove/mistral-api-key": "sk-empty-endpoint"})
    env = moto.broker_env()
    env |= {
        "AWS_ENDPOINT_URL": "",
        "AWS_ENDPOINT_URL_SECRETS_MANAGER": env["AWS_ENDPOINT_URL"],
        "AWS_ENDPOINT_URL_SQS": "  ",
    }
    checked = run_cli("check", env=env, timeout=30)
    print(checked.stdout, checked.stderr)
    assert checked.returncode == 0, checked.stderr
    assert "panic" not in checked.stderr.lower()

    broker = aws_broker(env=env)
    secret = get(broker, stubs, "mistral-api-key")
    assert secret.string_value == "sk-empty-endpoint"
    assert secret.version_id == versions["insurecove/mistral-api-key"]
    assert "panic" not in broker.log().lower()


def test_a_batch_too_large_for_a_client_answers_what_fits_and_names_the_rest(moto, aws_broker, stubs):
    """100 names (the limit) of 60 KB secrets would make a 6 MB answer,
    which grpcio (like every gRPC client by default) refuses past 4 MiB:
    the whole batch lost. The broker answers the secrets that fit, and each
    one past them gets its own RESOURCE_EXHAUSTED ANSWER_TOO_LARGE, to read
    in another call; a later, smaller secret still fits."""
    big = {f"insurecove/batch/big-{i:03}": f"{i:03}" + "x" * (60_000 - 3) for i in range(80)}
    moto.seed(big | {"insurecove/batch/small": "small-value"})
    broker = aws_broker()
    pb = stubs.secrets_service_pb2
    names = [name.removeprefix("insurecove/") for name in big] + ["batch/small"]
    answer = broker.secrets().BatchGetSecrets(pb.BatchGetSecretsRequest(names=names), timeout=60)
    assert answer.ByteSize() <= 4 * 1024 * 1024

    served = [r for r in answer.results if r.WhichOneof("result") == "secret"]
    refused = [r for r in answer.results if r.WhichOneof("result") == "error"]
    assert [r.name for r in answer.results] == names, "one result per name, in order"
    assert 60 <= len(served) < 80 + 1, len(served)
    # What fits is the first secrets, in order, then the small one.
    assert [r.name for r in served] == names[: len(served) - 1] + ["batch/small"]
    for result in served[:-1]:
        assert result.secret.string_value == big["insurecove/" + result.name], result.name
    assert served[-1].secret.string_value == "small-value"
    assert refused and all(
        (r.error.code, r.error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], "ANSWER_TOO_LARGE")
        for r in refused
    ), refused[0].error
    assert "read this one in another call" in refused[0].error.message
    # Read in another call, a refused one is served.
    again = broker.secrets().BatchGetSecrets(pb.BatchGetSecretsRequest(names=[refused[0].name]), timeout=20)
    assert again.results[0].secret.string_value == big["insurecove/" + refused[0].name]
    log = broker.log()
    assert f"insurecove/{refused[0].name}=RESOURCE_EXHAUSTED/ANSWER_TOO_LARGE" in log, "the audit says which were refused"
