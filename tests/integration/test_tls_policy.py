"""Mutual TLS, caller identity, per-identity authorization and audit.

Certificates are made in the test (tls_support.PKI, CA-1 trusted, CA-2 not);
brokers are started with --tls-cert/--tls-key/--tls-client-ca and --policy
and waited for over mTLS (tls_support.launch_tls_broker).

What needs the real binary or another TLS stack stays here: the upstream
untouched by refusals (moto), handshakes with OpenSSL, reloads of the
certificates and of the policy on SIGHUP, grpcurl and grpcio over mTLS, the
audit lines. The policy's rules, its reload from the file, the shared cache
under it and unnamed certificates are tested in-process
(tests/server/policy.rs).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import ssl
import subprocess
import time

import grpc
import pytest

import support
from support import expect_error
from tls_support import (  # noqa: F401  (fixtures)
    AUTH,
    BILLING,
    OPS,
    credentials,
    pki,
    policy_toml,
    replace_file,
    start_tls_broker,
    tls_files,
    wait_for,
    TLS_CHANNEL_OPTIONS,
)

SEED = support.dev_seed()
MISTRAL = "insurecove/mistral-api-key"
JWT = "insurecove/production/jwt"
DATABASE = "insurecove/production/database"
NOWHERE = "insurecove/production/no-such-secret"

DENIED = grpc.StatusCode.PERMISSION_DENIED
RELOAD_BOUND = 2.0

# auth-service: the JWT, the Mistral key and anything under missing/ (which
# does not exist: NOT_FOUND behind an allowed pattern); billing: the
# database; ops: admin, no secrets.
BASE_POLICY = policy_toml(
    {"identity": AUTH, "secrets": [JWT, MISTRAL, "insurecove/missing/*"]},
    {"identity": BILLING, "secrets": [DATABASE]},
    {"identity": OPS, "secrets": [], "admin": True},
)


def get(stub, stubs, name, **kw):
    return stub.GetSecret(stubs.secrets_service_pb2.GetSecretRequest(name=name, **kw), timeout=10).secret


def denied(call, name: str):
    """call() (a read of the full name `name`) must fail PERMISSION_DENIED /
    POLICY_DENIED, naming no value."""
    return expect_error(call, DENIED, "POLICY_DENIED", forbidden=tuple(SEED.values()))


def without_name(text: str, name: str) -> str:
    return text.replace(name, "<NAME>")


# --------------------------------------------------------------------------
# 1. reads the policy allows; refusals before the cache and the upstream


def test_allowed_reads_and_denials_never_reach_upstream(moto, start_tls_broker, tls_files, stubs, pki):
    versions = moto.seed(SEED)
    tls_files.write_policy(BASE_POLICY)
    broker = start_tls_broker(env=moto.broker_env(), dev=False)
    pb = stubs.secrets_service_pb2
    moto.start_recording()
    auth = broker.secrets(pki.auth)

    secret = get(auth, stubs, "production/jwt")
    assert (secret.name, secret.string_value, secret.version_id) == (JWT, SEED[JWT], versions[JWT])
    assert get(auth, stubs, "mistral-api-key").string_value == SEED[MISTRAL]
    seed = support.seed_json("production/jwt")
    config = auth.GetJwtConfig(pb.GetJwtConfigRequest(), timeout=10).config
    assert (config.jwt_secret_key, config.jwt_issuer, config.jwt_access_token_expire_minutes) == (
        seed["jwt_secret_key"], seed["jwt_issuer"], seed["jwt_access_token_expire_minutes"],
    )

    # outside the grant: the same answer whether the secret exists or not
    err_existing, info_existing = denied(lambda: get(auth, stubs, "production/database"), DATABASE)
    err_missing, info_missing = denied(lambda: get(auth, stubs, "production/no-such-secret"), NOWHERE)
    assert without_name(err_existing.details(), DATABASE) == without_name(err_missing.details(), NOWHERE), (
        err_existing.details(), err_missing.details(),
    )
    assert {k: without_name(v, DATABASE) for k, v in info_existing.metadata.items()} == {
        k: without_name(v, NOWHERE) for k, v in info_missing.metadata.items()
    }, (dict(info_existing.metadata), dict(info_missing.metadata))
    denied(lambda: get(auth, stubs, "production/database", bypass_cache=True), DATABASE)
    denied(lambda: auth.GetDatabaseConfig(pb.GetDatabaseConfigRequest(), timeout=10), DATABASE)

    # a batch answers per name
    resp = auth.BatchGetSecrets(
        pb.BatchGetSecretsRequest(names=["production/jwt", "production/database", "production/no-such-secret"]),
        timeout=10,
    )
    kinds = [r.WhichOneof("result") for r in resp.results]
    assert kinds == ["secret", "error", "error"], resp
    assert resp.results[0].secret.string_value == SEED[JWT]
    for result in resp.results[1:]:
        assert (result.error.code, result.error.reason) == (7, "POLICY_DENIED"), result
        assert SEED[DATABASE] not in result.error.message

    # the upstream saw the allowed reads, and nothing at all of the refused ones
    assert moto.get_secret_value_calls(JWT) >= 1, moto.recorded()
    for name in (DATABASE, NOWHERE):
        assert moto.get_secret_value_calls(name) == 0, moto.recorded()
        touching = [r for r in moto.recorded() if r.secret_id == name and not r.from_boto]
        assert touching == [], f"the upstream was asked about {name}: {touching}"


def test_handshake_refused_without_a_valid_client_certificate(start_tls_broker, tls_files, stubs, pki):
    tls_files.write_policy(BASE_POLICY)
    broker = start_tls_broker()
    pb = stubs.secrets_service_pb2

    # control: the good certificate gets through, TLS 1.3 and 1.2, ALPN h2
    ok = broker.handshake(pki.auth)
    assert ok.accepted and ok.alpn == "h2" and ok.version == "TLSv1.3", ok.describe()
    assert ok.peer_der == pki.server.der
    ok12 = broker.handshake(pki.auth, max_version=ssl.TLSVersion.TLSv1_2)
    assert ok12.accepted and ok12.version == "TLSv1.2" and ok12.alpn == "h2", ok12.describe()
    assert get(broker.secrets(pki.auth), stubs, "mistral-api-key").string_value == SEED[MISTRAL]

    cases = {"no client certificate": None, "certificate from CA-2": pki.foreign, "expired certificate": pki.expired}
    for case, client in cases.items():
        channel = grpc.secure_channel(broker.addr, credentials(pki, client), options=TLS_CHANNEL_OPTIONS)
        try:
            stub = stubs.secrets_service_pb2_grpc.SecretsServiceStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                stub.GetSecret(pb.GetSecretRequest(name="mistral-api-key"), timeout=10)
        finally:
            channel.close()
        err = caught.value
        assert err.code() == grpc.StatusCode.UNAVAILABLE, f"{case}: {err.code()}: {err.details()}"
        # grpc core names its TLS layer TSI: with TLS 1.3 the refusal arrives
        # as an alert after the client's side of the handshake, e.g.
        # "Unwrap failed (TSI_DATA_CORRUPTED)"; with 1.2 "Handshake failed"
        assert re.search(r"\bTSI_|ssl|tls|handshake|certificate|alert", err.details() or "", re.I), (
            f"{case}: UNAVAILABLE without a TLS error: {err.details()!r}"
        )
        assert SEED[MISTRAL] not in (err.details() or "")

        for version in (None, ssl.TLSVersion.TLSv1_2):
            shake = broker.handshake(client, max_version=version)
            assert not shake.accepted, f"{case} (max {version}): {shake.describe()}"
            assert "SSLError" in shake.error or "alert" in shake.error.lower(), (
                f"{case} (max {version}): not refused by TLS: {shake.error}"
            )
            print(f"{case}, max {version}: {shake.error} | grpc: {err.details()}")

    assert broker.alive(), broker.tail()
    assert get(broker.secrets(pki.auth), stubs, "mistral-api-key").string_value == SEED[MISTRAL]



# --------------------------------------------------------------------------
# 2. reload without restart


def count_warnings(broker, pattern: str) -> int:
    return sum(1 for line in broker.log().splitlines() if "WARN" in line and re.search(pattern, line, re.I))


def test_sighup_reads_a_broken_policy_again_and_keeps_the_old_rules(start_tls_broker, tls_files, stubs, pki):
    """SIGHUP re-reads the policy; a broken file (each kind of breakage is
    tested in-process: tests/server/policy.rs) keeps the rules in force."""
    tls_files.write_policy(BASE_POLICY)
    broker = start_tls_broker()
    auth, billing = broker.secrets(pki.auth), broker.secrets(pki.billing)

    def rules_unchanged() -> None:
        assert get(auth, stubs, "mistral-api-key").string_value == SEED[MISTRAL]
        assert get(billing, stubs, "production/database").string_value == SEED[DATABASE]
        denied(lambda: get(billing, stubs, "mistral-api-key"), MISTRAL)

    broken = {
        "not TOML": "[[grant]\nidentity = ",
        "unknown field": f'[[grant]]\nidentity = "{BILLING}"\nsecrets = ["{MISTRAL}"]\nsuperuser = true\n',
        "bad glob": f'[[grant]]\nidentity = "{BILLING}"\nsecrets = ["insurecove/[unclosed"]\n',
    }
    for case, text in broken.items():
        warnings = count_warnings(broker, "policy")
        tls_files.write_policy(text)
        wait_for(lambda: count_warnings(broker, "policy") > warnings, RELOAD_BOUND,
                 what=f"a warning about the broken policy ({case})")
        rules_unchanged()
        warnings = count_warnings(broker, "policy")
        broker.hangup()
        wait_for(lambda: count_warnings(broker, "policy") > warnings, RELOAD_BOUND,
                 what=f"a warning after SIGHUP ({case})")
        rules_unchanged()
    assert broker.alive(), broker.tail()

    # a good file again takes effect
    tls_files.write_policy(policy_toml({"identity": BILLING, "secrets": [MISTRAL]}))
    wait_for(lambda: _reads(billing, stubs, "mistral-api-key"), RELOAD_BOUND, what="the repaired policy")


def test_a_server_certificate_near_its_end_is_warned_about_at_start(start_tls_broker, tls_files, pki):
    """What `check` fails on, the start says (and still serves)."""
    tls_files.write_policy(BASE_POLICY)
    now = dt.datetime.now(dt.timezone.utc)
    tls_files.install_server(pki.make_server("server-soon", not_after=now + dt.timedelta(days=3)))
    broker = start_tls_broker()
    warned = [line for line in broker.log().splitlines() if "the server certificate expires within 7 days" in line]
    assert len(warned) == 1 and "WARN" in warned[0], broker.tail()


def test_sighup_with_nothing_changed_reloads_nothing(start_tls_broker, tls_files, stubs, pki):
    """A SIGHUP that finds the files as they were says nothing and counts
    no reload; one after a change does."""
    tls_files.write_policy(BASE_POLICY)
    broker = start_tls_broker()
    reloaded = re.compile(r"(policy|TLS certificates) reloaded")
    for _ in range(3):
        broker.hangup()
    time.sleep(1)
    assert not reloaded.search(broker.log()), broker.tail()
    assert get(broker.secrets(pki.auth), stubs, "mistral-api-key").string_value == SEED[MISTRAL]
    tls_files.install_server(pki.make_server("server-hup"))
    wait_for(lambda: "TLS certificates reloaded" in broker.log(), RELOAD_BOUND, what="the new certificate's reload")
    assert "policy reloaded" not in broker.log(), broker.tail()


def _reads(stub, stubs, name) -> bool:
    try:
        get(stub, stubs, name)
        return True
    except grpc.RpcError:
        return False


def test_server_certificate_and_client_ca_reload(start_tls_broker, tls_files, stubs, pki):
    tls_files.write_policy(BASE_POLICY)
    broker = start_tls_broker()
    assert broker.handshake(pki.auth).peer_der == pki.server.der

    new_server = pki.make_server("server-2")
    assert new_server.serial != pki.server.serial
    tls_files.install_server(new_server)
    _, took = wait_for(lambda: broker.handshake(pki.auth).peer_der == new_server.der, RELOAD_BOUND,
                       what="the new server certificate on new handshakes")
    assert get(broker.secrets(pki.auth), stubs, "mistral-api-key").string_value == SEED[MISTRAL]

    # the client CA: CA-2 only
    tls_files.install_client_ca(pki.ca2)
    wait_for(lambda: broker.handshake(pki.foreign).accepted, RELOAD_BOUND, what="CA-2 clients accepted")
    assert not broker.handshake(pki.auth).accepted, "a CA-1 client still accepted after the CA bundle changed"

    # broken files keep the last good configuration
    for case, (path, data) in {
        "garbage certificate": (tls_files.cert, b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n"),
        "key of another certificate": (tls_files.key, pki.auth.key_pem),
        "empty CA bundle": (tls_files.client_ca, b""),
    }.items():
        warnings = count_warnings(broker, r"tls|certificat")
        original = path.read_bytes()
        replace_file(path, data)
        wait_for(lambda: count_warnings(broker, r"tls|certificat") > warnings, RELOAD_BOUND,
                 what=f"a warning about the broken TLS files ({case})")
        shake = broker.handshake(pki.foreign)
        assert shake.accepted and shake.peer_der == new_server.der, f"{case}: {shake.describe()}"
        replace_file(path, original)
        time.sleep(0.3)          # let that reload (of good files) pass
    # a certificate past its dates (with its own key) is broken too
    now = dt.datetime.now(dt.timezone.utc)
    expired = pki.make_server("server-expired", not_before=now - dt.timedelta(days=60),
                              not_after=now - dt.timedelta(days=1))
    refused = count_warnings(broker, r"not valid now")
    tls_files.install_server(expired)
    wait_for(lambda: count_warnings(broker, r"not valid now") > refused, RELOAD_BOUND,
             what="a warning about the expired server certificate")
    time.sleep(0.3)
    shake = broker.handshake(pki.foreign)
    assert shake.accepted and shake.peer_der == new_server.der, f"expired: {shake.describe()}"
    tls_files.install_server(new_server)
    assert broker.alive(), broker.tail()
    print(f"new certificate served after {took:.2f} s")


# --------------------------------------------------------------------------
# 3. real clients: grpcurl and grpcio


def test_grpcurl_and_grpcio_over_mtls(start_tls_broker, tls_files, stubs, pki, grpcurl_bin, proto_dir):
    tls_files.write_policy(BASE_POLICY)
    broker = start_tls_broker()

    def grpcurl(*args, client=pki.auth, proto=True):
        cmd = [str(grpcurl_bin), "-max-time", "10", "-cacert", str(pki.ca1.cert_path)]
        if client is not None:
            cmd += ["-cert", str(client.cert_path), "-key", str(client.key_path)]
        if proto:
            cmd += ["-import-path", str(proto_dir), "-proto", "secretsbroker/v1/secrets_service.proto"]
        cmd += ["-d", '{"name":"mistral-api-key"}', broker.addr, *args]
        return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
                              env=support.broker_env())

    for proto in (True, False):          # with the .proto files, then by reflection
        run = grpcurl("secretsbroker.v1.SecretsService/GetSecret", proto=proto)
        assert run.returncode == 0, f"grpcurl (proto={proto}) exited {run.returncode}: {run.stderr}"
        secret = json.loads(run.stdout)["secret"]
        assert (secret["name"], secret["stringValue"]) == (MISTRAL, SEED[MISTRAL])

    run = grpcurl("secretsbroker.v1.SecretsService/GetSecret", client=None)
    assert run.returncode != 0 and SEED[MISTRAL] not in run.stdout, run
    run = grpcurl("secretsbroker.v1.SecretsService/GetSecret", client=pki.billing)
    assert run.returncode != 0 and "PermissionDenied" in run.stdout + run.stderr, run

    creds = grpc.ssl_channel_credentials(
        root_certificates=pki.ca1.cert_path.read_bytes(),
        private_key=pki.auth.key_path.read_bytes(),
        certificate_chain=pki.auth.cert_path.read_bytes(),
    )
    with grpc.secure_channel(broker.addr, creds, options=support.CHANNEL_OPTIONS) as channel:
        stub = stubs.secrets_service_pb2_grpc.SecretsServiceStub(channel)
        secret = get(stub, stubs, "mistral-api-key")
        assert (secret.name, secret.string_value) == (MISTRAL, SEED[MISTRAL])


# --------------------------------------------------------------------------
# 4. audit


def audit_events(broker) -> list[dict]:
    events = []
    for line in broker.log().splitlines():
        if not line.startswith("{"):
            continue
        entry = json.loads(line)
        if entry.get("target") == "audit":
            events.append(entry)
    return events


def test_audit_one_json_event_per_call(start_tls_broker, tls_files, stubs, pki):
    tls_files.write_policy(BASE_POLICY)
    broker = start_tls_broker(env={"LOG_FORMAT": "json"})
    pb, apb = stubs.secrets_service_pb2, stubs.admin_service_pb2
    auth, billing = broker.secrets(pki.auth), broker.secrets(pki.billing)
    auth_admin, ops_admin = broker.admin(pki.auth), broker.admin(pki.ops)
    assert audit_events(broker) == [], "audit events before any call (health checks are not calls)"

    expected = []  # (identity, rpc, secrets, outcome, cache_hit or None for "not a read")

    def call(identity, rpc, secrets, outcome, cache_hit, fn):
        try:
            fn()
        except grpc.RpcError as err:
            assert err.code().name == outcome, f"{rpc} by {identity}: {err.code()} {err.details()}"
        else:
            assert outcome == "OK", f"{rpc} by {identity} succeeded, expected {outcome}"
        expected.append((identity, rpc, secrets, outcome, cache_hit))

    call(AUTH, "GetSecret", MISTRAL, "OK", False, lambda: get(auth, stubs, "mistral-api-key"))
    call(AUTH, "GetSecret", MISTRAL, "OK", True, lambda: get(auth, stubs, "mistral-api-key"))
    call(AUTH, "GetJwtConfig", JWT, "OK", False, lambda: auth.GetJwtConfig(pb.GetJwtConfigRequest(), timeout=10))
    call(AUTH, "GetSecret", "insurecove/missing/thing", "NOT_FOUND", None, lambda: get(auth, stubs, "missing/thing"))
    call(AUTH, "GetSecret", DATABASE, "PERMISSION_DENIED", None, lambda: get(auth, stubs, "production/database"))
    call(BILLING, "GetSecret", DATABASE, "OK", False, lambda: get(billing, stubs, "production/database"))
    call(BILLING, "GetSecret", MISTRAL, "PERMISSION_DENIED", None, lambda: get(billing, stubs, "mistral-api-key"))
    # Batch items carry their own outcome, and for reads whether the cache
    # answered (mistral-api-key was read above: a hit).
    call(AUTH, "BatchGetSecrets", f"{MISTRAL}=OK/hit {DATABASE}=PERMISSION_DENIED/POLICY_DENIED insurecove/missing/x=NOT_FOUND/SECRET_NOT_FOUND", "OK", None,
         lambda: auth.BatchGetSecrets(pb.BatchGetSecretsRequest(names=["mistral-api-key", "production/database", "missing/x"]), timeout=10))
    call(AUTH, "GetCacheStats", "", "PERMISSION_DENIED", None, lambda: auth_admin.GetCacheStats(apb.GetCacheStatsRequest(), timeout=10))
    call(AUTH, "ClearCache", "", "PERMISSION_DENIED", None, lambda: auth_admin.ClearCache(apb.ClearCacheRequest(), timeout=10))
    call(OPS, "GetCacheStats", "", "OK", None, lambda: ops_admin.GetCacheStats(apb.GetCacheStatsRequest(), timeout=10))

    wait_for(lambda: len(audit_events(broker)) >= len(expected), 2.0, what=f"{len(expected)} audit events")
    time.sleep(0.3)                      # and no more than that
    events = audit_events(broker)
    summary = "\n".join(json.dumps(e.get("fields")) for e in events)
    assert len(events) == len(expected), f"{len(events)} audit events for {len(expected)} calls:\n{summary}"

    problems = []
    for n, (event, (identity, rpc, secrets, outcome, cache_hit)) in enumerate(zip(events, expected)):
        f = event.get("fields", {})
        assert event.get("level") == "INFO" and "timestamp" in event, event
        got = (f.get("identity"), f.get("rpc"), f.get("outcome"))
        if got != (identity, rpc, outcome):
            problems.append(f"#{n}: {got} != {(identity, rpc, outcome)}")
        # (a refused single read's secrets: test_audit_of_a_refused_read_names_the_secret)
        refused_read = outcome == "PERMISSION_DENIED" and rpc == "GetSecret"
        if not refused_read and f.get("secrets", "") != secrets:
            problems.append(f"#{n} {rpc} {outcome}: secrets {f.get('secrets')!r} != {secrets!r}")
        if cache_hit is not None and f.get("cache_hit") != cache_hit:
            problems.append(f"#{n} {rpc}: cache_hit {f.get('cache_hit')!r} != {cache_hit!r}")
    assert not problems, "\n".join(problems) + f"\nevents:\n{summary}"

    text = broker.log()
    for value in (SEED[MISTRAL], SEED[JWT], SEED[DATABASE], support.seed_json("production/jwt")["jwt_secret_key"]):
        assert value not in text and json.dumps(value)[1:-1] not in text, "a secret value is in the log"


def test_an_unauthenticated_callers_audit_names_what_it_asked(start_tls_broker, tls_files, stubs, pki):
    """A certificate that names nobody is refused before its names are
    checked, and its audit lines still say what it asked for."""
    tls_files.write_policy(BASE_POLICY)
    broker = start_tls_broker(env={"LOG_FORMAT": "json"})
    pb = stubs.secrets_service_pb2
    nobody = broker.secrets(pki.unnamed)
    asks = [
        lambda: get(nobody, stubs, "mistral-api-key"),
        lambda: get(nobody, stubs, "bad name!"),
        lambda: nobody.GetJwtConfig(pb.GetJwtConfigRequest(), timeout=10),
        lambda: nobody.BatchGetSecrets(pb.BatchGetSecretsRequest(names=["mistral-api-key", "production/jwt"]), timeout=10),
    ]
    for ask in asks:
        with pytest.raises(grpc.RpcError) as refused:
            ask()
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, refused.value.details()
    events, _ = wait_for(lambda: len(audit_events(broker)) >= 4 and audit_events(broker), 2.0, what="4 audit events")
    got = [(e["fields"].get("rpc"), e["fields"].get("secrets"), e["fields"].get("outcome")) for e in events]
    assert got == [
        ("GetSecret", MISTRAL, "UNAUTHENTICATED"),
        ("GetSecret", '"bad name!"', "UNAUTHENTICATED"),
        ("GetJwtConfig", JWT, "UNAUTHENTICATED"),
        ("BatchGetSecrets", f"{MISTRAL} {JWT}", "UNAUTHENTICATED"),
    ], got


def test_audit_of_a_refused_read_names_the_secret(start_tls_broker, tls_files, stubs, pki):
    """The audit event of a read the policy refused carries the secret's
    resolved name, as the batch items and the allowed reads do."""
    tls_files.write_policy(BASE_POLICY)
    broker = start_tls_broker(env={"LOG_FORMAT": "json"})
    pb = stubs.secrets_service_pb2
    auth, billing = broker.secrets(pki.auth), broker.secrets(pki.billing)
    denied(lambda: get(billing, stubs, "mistral-api-key"), MISTRAL)
    denied(lambda: get(auth, stubs, "production/no-such-secret"), NOWHERE)
    denied(lambda: auth.GetDatabaseConfig(pb.GetDatabaseConfigRequest(), timeout=10), DATABASE)
    # Allowed by the policy, refused by AWS: another reason, the same code.
    with pytest.raises(grpc.RpcError) as missing:
        get(auth, stubs, "missing/audit-reason")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND, missing.value.details()
    events, _ = wait_for(lambda: len(audit_events(broker)) >= 4 and audit_events(broker), 2.0, what="4 audit events")
    got = [tuple(e["fields"].get(key) for key in ("identity", "rpc", "secrets", "outcome", "reason"))
           for e in events]
    assert got == [
        (BILLING, "GetSecret", MISTRAL, "PERMISSION_DENIED", "POLICY_DENIED"),
        (AUTH, "GetSecret", NOWHERE, "PERMISSION_DENIED", "POLICY_DENIED"),
        (AUTH, "GetDatabaseConfig", DATABASE, "PERMISSION_DENIED", "POLICY_DENIED"),
        (AUTH, "GetSecret", "insurecove/missing/audit-reason", "NOT_FOUND", "SECRET_NOT_FOUND"),
    ], f"audit events of refused reads: {got}"


def test_audit_whatever_the_log_level(start_tls_broker, tls_files, stubs, pki):
    tls_files.write_policy(BASE_POLICY)
    broker = start_tls_broker(env={"LOG_FORMAT": "json", "LOG_LEVEL": "ERROR"})
    get(broker.secrets(pki.auth), stubs, "mistral-api-key")
    events, _ = wait_for(lambda: audit_events(broker), 2.0, what="an audit event at LOG_LEVEL=ERROR")
    assert len(events) == 1 and events[0]["fields"]["identity"] == AUTH, events
    assert events[0]["fields"]["outcome"] == "OK" and events[0]["fields"]["secrets"] == MISTRAL, events
