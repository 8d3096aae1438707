"""What an attack run found, each tried again the way the attacker did:
ARN smuggling, identity confusion between certificate name kinds, audit
forgery through a certificate's CN, HTTP/2 stream floods, silent
connections, non-gRPC content types, an admin learning about secrets it may
not read, and the call timeout's answer.

Peers are real: moto_server for AWS, grpcio and raw HTTP/2 frames
(hyperframe/hpack, attack_support.RawH2) for callers, certificates made in the
test (tls_support.PKI)."""

from __future__ import annotations

import json
import re
import signal
import socket
import ssl
import subprocess
import threading
import time

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import support
from attack_support import PREFACE, RawH2, grpc_message, rss_kib
from hyperframe.frame import DataFrame, SettingsFrame
from ops_support import SlowUpstream, own_channel
from support import expect_error
from tls_support import (  # noqa: F401  (fixtures)
    AUTH,
    OPS,
    pki,
    policy_toml,
    start_tls_broker,
    tls_files,
)

SEED = support.dev_seed()
MISTRAL = "insurecove/mistral-api-key"
JWT = "insurecove/production/jwt"
GET_SECRET = "/secretsbroker.v1.SecretsService/GetSecret"
ACCOUNT = "123456789012"          # moto's default account


def get(stub, stubs, name, timeout=10, **kw):
    return stub.GetSecret(stubs.secrets_service_pb2.GetSecretRequest(name=name, **kw), timeout=timeout).secret


def client_cert(pki, label, *, cn=None, uris=(), dns=()):
    """A CA-1 client certificate with exactly these names."""
    # _validate=False: a CN over 64 characters, as an attacker would write it
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn, _validate=False)]) if cn is not None else x509.Name([])
    sans = [x509.UniformResourceIdentifier(u) for u in uris] + [x509.DNSName(d) for d in dns]
    return pki.issue(label, ca=pki.ca1, subject=subject, sans=sans, usage=ExtendedKeyUsageOID.CLIENT_AUTH)


# --------------------------------------------------------------------------
# 1. ARN smuggling


def test_arns_are_parsed_and_authorized_by_the_name_inside(moto, aws_broker, stubs, tmp_path):
    shared, database = "insurecove/shared/x", "insurecove/production/database"
    moto.create_secret(shared, "shared-value-5d1c")
    moto.create_secret(database, "database-value-5d1c")
    long_name = "insurecove/shared/" + "l" * 462            # 480 characters
    moto.create_secret(long_name, "long-value-5d1c")
    arn = {name: moto.client.describe_secret(SecretId=name)["ARN"] for name in (shared, database, long_name)}
    region = arn[shared].split(":")[3]
    policy = tmp_path / "policy.toml"
    # the grant an attacker abused: every ARN under shared/ (it now means
    # the names under shared/, whatever account or region the ARN says)
    policy.write_text(policy_toml({"identity": "anonymous", "secrets": ["insurecove/shared/**"]}))
    broker = aws_broker(["--policy", str(policy)])
    stub = broker.secrets()

    smuggled = f"arn:aws:secretsmanager:{region}:{ACCOUNT}:secret:{shared}:{database}"
    expect_error(lambda: get(stub, stubs, smuggled), grpc.StatusCode.INVALID_ARGUMENT,
                 "INVALID_SECRET_NAME", field="name", forbidden=("database-value-5d1c",))
    for bad in (
        f"arn:aws:s3:{region}:{ACCOUNT}:secret:{shared}",
        f"arn:aws:secretsmanager:{region}:12345:secret:{shared}",
        f"arn:aws:secretsmanager:{region}:{ACCOUNT}:parameter:{shared}",
    ):
        expect_error(lambda: get(stub, stubs, bad), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SECRET_NAME")

    assert get(stub, stubs, arn[shared]).string_value == "shared-value-5d1c"
    assert len(arn[long_name]) > 512
    assert get(stub, stubs, arn[long_name]).string_value == "long-value-5d1c"
    expect_error(lambda: get(stub, stubs, arn[database]), grpc.StatusCode.PERMISSION_DENIED,
                 "POLICY_DENIED", forbidden=("database-value-5d1c",))

    # another account's ARN of an allowed name: whatever moto answers, the
    # broker returns no value that is not the one asked for
    foreign = arn[shared].replace(f":{ACCOUNT}:", ":999999999999:")
    try:
        secret = get(stub, stubs, foreign)
    except grpc.RpcError as err:
        print(f"another account's ARN: {err.code().name}: {err.details()!r}")
        assert "shared-value-5d1c" not in (err.details() or "")
    else:
        pytest.fail(f"another account's ARN was answered with {secret.name} ({secret.arn})")

    audit = [line for line in broker.log().splitlines() if " audit: " in line]
    assert sum('outcome="INVALID_ARGUMENT"' in line for line in audit) == 4, audit
    assert not [line for line in audit if database in line and 'outcome="OK"' in line], audit


# --------------------------------------------------------------------------
# 2. identity confusion


def test_long_arns_reach_grpcio_with_their_own_code(start_broker, stubs):
    """An ARN padded to AWS's 2,048 characters through its partition is
    refused as a bad ARN; the longest ARN a secret can have is NOT_FOUND,
    whole in the error. Each answer's headers echo the name (grpc-message
    and the error details), and grpc-core refuses headers past 8 KiB at
    random, as RESOURCE_EXHAUSTED: 300 calls of each get their own code."""
    broker = start_broker()
    stub = broker.secrets()

    def codes_of(name: str) -> tuple[dict[str, int], grpc.RpcError]:
        codes: dict[str, int] = {}
        for _ in range(300):
            try:
                get(stub, stubs, name)
                codes["OK"] = codes.get("OK", 0) + 1
            except grpc.RpcError as err:
                codes[err.code().name] = codes.get(err.code().name, 0) + 1
                last = err
        return codes, last

    padded = f"arn:aws{'-abcdefghij' * 180}:secretsmanager:us-east-1:{ACCOUNT}:secret:insurecove/padded"
    codes, last = codes_of(padded[:2048])
    assert codes == {"INVALID_ARGUMENT": 300}, codes
    assert "partition" in last.details() and len(last.details()) < 300, last.details()

    longest = f"arn:aws-iso-b:secretsmanager:us-isob-east-1:{ACCOUNT}:secret:insurecove/{'x' * 501}-AbCdEf"
    codes, last = codes_of(longest)
    assert codes == {"NOT_FOUND": 300}, codes
    assert last.details() == f"secret {longest} was not found (or has no such version)", last.details()


def test_identities_are_typed(start_tls_broker, tls_files, stubs, pki):
    apb = stubs.admin_service_pb2
    tls_files.write_policy(policy_toml(
        {"identity": OPS, "secrets": [], "admin": True},
        {"identity": "anonymous", "secrets": [MISTRAL], "admin": True},
        {"identity": "dns:api.internal", "secrets": [JWT]},
        {"identity": "cn:legacy-client", "secrets": [MISTRAL]},
    ))
    broker = start_tls_broker()
    stats = lambda who: broker.admin(who).GetCacheStats(apb.GetCacheStatsRequest(), timeout=10)  # noqa: E731

    cn_ops = client_cert(pki, "cn-ops", cn=OPS)
    dns_ops = client_cert(pki, "dns-ops", dns=["ops.insurecove.internal"], cn=OPS)
    cn_anonymous = client_cert(pki, "cn-anonymous", cn="anonymous")
    for who in (cn_ops, dns_ops, cn_anonymous):
        expect_error(lambda: stats(who), grpc.StatusCode.PERMISSION_DENIED, "POLICY_DENIED")
    expect_error(lambda: get(broker.secrets(cn_anonymous), stubs, MISTRAL),
                 grpc.StatusCode.PERMISSION_DENIED, "POLICY_DENIED", forbidden=(SEED[MISTRAL],))
    stats(pki.ops)        # the real URI identity is admin

    two_uris = client_cert(pki, "two-uris", uris=[AUTH, OPS])
    expect_error(lambda: stats(two_uris), grpc.StatusCode.UNAUTHENTICATED, "NO_CLIENT_IDENTITY")
    expect_error(lambda: get(broker.secrets(two_uris), stubs, MISTRAL),
                 grpc.StatusCode.UNAUTHENTICATED, "NO_CLIENT_IDENTITY")

    api = client_cert(pki, "api", dns=["other.internal", "api.internal"])
    assert get(broker.secrets(api), stubs, JWT).string_value == SEED[JWT]
    # The audit names the name the grant matched, not only the first one.
    assert any('identity="dns:other.internal, dns:api.internal"' in line and 'outcome="OK"' in line
               for line in broker.log().splitlines() if " audit: " in line), broker.log()[-2000:]
    legacy = client_cert(pki, "legacy", cn="legacy-client")
    assert get(broker.secrets(legacy), stubs, MISTRAL).string_value == SEED[MISTRAL]
    # a CN counts only when the certificate has no SAN
    legacy_with_san = client_cert(pki, "legacy-san", cn="legacy-client", uris=["spiffe://insurecove/legacy"])
    expect_error(lambda: get(broker.secrets(legacy_with_san), stubs, MISTRAL),
                 grpc.StatusCode.PERMISSION_DENIED, "POLICY_DENIED")
    # a DNS name does not match a URI-looking grant, nor the other way round
    expect_error(lambda: get(broker.secrets(pki.auth), stubs, JWT), grpc.StatusCode.PERMISSION_DENIED, "POLICY_DENIED")


def test_check_warns_about_bare_identities(run_cli, tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_toml({"identity": "reporting.internal", "secrets": ["insurecove/x"]}))
    result = run_cli("check", "--dev", "--policy", str(policy))
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'dns:reporting.internal' in result.stdout, result.stdout


# --------------------------------------------------------------------------
# 3. audit forgery


FORGED = '2026-11-30T00:00:00.000000Z  INFO audit: identity=spiffe://insurecove/ops rpc="GetSecret" outcome="OK"'


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_certificate_cannot_write_log_lines(start_tls_broker, tls_files, stubs, pki, log_format):
    tls_files.write_policy(policy_toml({"identity": OPS, "secrets": [JWT], "admin": True}))
    env = {"LOG_FORMAT": "json"} if log_format == "json" else None
    broker = start_tls_broker(env=env)
    # Every way a line breaks: \n and \r for any reader, NEL and U+2028/9
    # for Python's str.splitlines() and JavaScript; spaces and quotes to
    # fake fields on the line itself.
    breaks = "".join(f"{sep}{FORGED}" for sep in ("\n", "\r", "\x85", "\u2028", "\u2029"))
    forger = client_cert(pki, f"forger-{log_format}",
                         cn=f'x" outcome="OK" secrets="{JWT}{breaks}\r\x1b[2K')
    expect_error(lambda: get(broker.secrets(forger), stubs, JWT), grpc.StatusCode.PERMISSION_DENIED,
                 "POLICY_DENIED", forbidden=(SEED[JWT],))
    time.sleep(0.3)     # the log writer is asynchronous
    lines = broker.log().splitlines()
    assert not [line for line in lines if line.startswith("2026-11-30T00:00:00")], "a forged line was written"
    mine = [line for line in lines if "cn:x" in line]
    assert mine, broker.tail()
    assert all("\x1b" not in line and "\r" not in line for line in mine), mine
    if log_format == "json":
        for line in lines:
            if line.startswith("{"):
                json.loads(line)
        events = [json.loads(line)["fields"] for line in mine]
        audit = [e for e in events if e.get("rpc") == "GetSecret"]
        assert [(e["outcome"], e["reason"]) for e in audit] == [("PERMISSION_DENIED", "POLICY_DENIED")], events
        assert audit[0]["identity"].startswith('cn:x" outcome="OK" secrets="'), audit
    else:
        assert any("PERMISSION_DENIED" in line and "\\n2026-11-30" in line for line in mine), mine
        audit = [text_fields(line) for line in mine if line.split(maxsplit=3)[1:3] == ["INFO", "audit:"]]
        assert len(audit) == 1, mine
        keys = [key for key, _ in audit[0]]
        assert keys == ["identity", "rpc", "secrets", "outcome", "reason"], audit
        assert dict(audit[0])["outcome"] == '"PERMISSION_DENIED"', audit
        assert dict(audit[0])["reason"] == '"POLICY_DENIED"', audit


TEXT_FIELD = re.compile(r' *(\w+)=("(?:[^"\\]|\\.)*"|[^\s"]+)')


def text_fields(line):
    """The key=value fields of a text-layout event, in order; every value is
    a bare word or a quoted string with backslash escapes."""
    rest = line.split(": ", 1)[1]
    fields, at = [], 0
    while at < len(rest):
        field = TEXT_FIELD.match(rest, at)
        assert field, f"not a key=value field at {rest[at:]!r} in {line!r}"
        fields.append((field[1], field[2]))
        at = field.end()
    return fields


# --------------------------------------------------------------------------
# 4. stream floods


def test_a_stream_flood_is_capped_and_costs_little_memory(start_broker, stubs):
    broker = start_broker()
    pid = broker.proc.pid
    assert get(broker.secrets(), stubs, "mistral-api-key").string_value == SEED[MISTRAL]
    before = rss_kib(pid)
    flood = RawH2(broker.addr)
    flood.preface()
    streams = 10_000
    frames = b"".join(flood.headers(2 * i + 1, GET_SECRET) for i in range(streams))
    peak = [before]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            peak[0] = max(peak[0], rss_kib(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        try:
            flood.send(frames)
        except OSError as err:          # the server may end the connection first
            print(f"flood write ended: {err!r}")
        # meanwhile, another connection is served
        other = own_channel(broker.addr)
        try:
            stub = stubs.secrets_service_pb2_grpc.SecretsServiceStub(other)
            assert get(stub, stubs, "mistral-api-key").string_value == SEED[MISTRAL]
        finally:
            other.close()
        deadline = time.monotonic() + 10
        cap = 2 * 1024
        while time.monotonic() < deadline:
            answered = flood.frames.refused() + len(flood.frames.ended)
            if flood.frames.closed or flood.frames.goaway is not None or answered >= streams - cap:
                break
            time.sleep(0.05)
    finally:
        sampling.set()
        sampler.join()
        flood.close()
    f = flood.frames
    grown = (peak[0] - before) / 1024
    print(f"advertised MAX_CONCURRENT_STREAMS={f.settings.get(0x3)}; refused {f.refused()}, "
          f"answered {len(f.ended)}, goaway={f.goaway}, closed={f.closed}; RSS +{grown:.1f} MiB")
    assert f.settings.get(0x3) == 2048, f.settings
    assert f.closed or f.goaway is not None or f.refused() + len(f.ended) >= streams - 2048
    assert grown < 64, f"RSS grew {grown:.1f} MiB during the flood"
    assert broker.alive()
    assert get(broker.secrets(), stubs, "mistral-api-key").string_value == SEED[MISTRAL]


def test_health_and_reflection_streams_count_against_the_limit(start_broker, stubs):
    broker = start_broker(["--max-concurrent-calls-per-connection", "3"])
    channel = own_channel(broker.addr)
    try:
        health = stubs.health_pb2_grpc.HealthStub(channel)
        watches = [health.Watch(stubs.health_pb2.HealthCheckRequest(service="")) for _ in range(3)]
        for w in watches:
            next(w)             # each stream is open and answered
        secrets = stubs.secrets_service_pb2_grpc.SecretsServiceStub(channel)
        expect_error(lambda: get(secrets, stubs, "mistral-api-key", timeout=5),
                     grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_CALLS")
        check = lambda: health.Check(stubs.health_pb2.HealthCheckRequest(service=""), timeout=5)  # noqa: E731
        expect_error(check, grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_CALLS")
        for w in watches:
            w.cancel()
        deadline = time.monotonic() + 3
        while True:
            try:
                assert get(secrets, stubs, "mistral-api-key", timeout=5).string_value == SEED[MISTRAL]
                break
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    finally:
        channel.close()


# --------------------------------------------------------------------------
# 5. silent connections


def _client_tls_context(pki) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(pki.ca1.cert_path))
    ctx.load_cert_chain(str(pki.auth.cert_path), str(pki.auth.key_path))
    ctx.set_alpn_protocols(["h2"])
    return ctx


def _sigterm_exits_fast(broker) -> float:
    time.sleep(0.3)
    sent = time.monotonic()
    broker.proc.send_signal(signal.SIGTERM)
    try:
        code = broker.proc.wait(5)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the broker did not exit within 5 s of SIGTERM; log:\n{broker.tail()}")
    took = time.monotonic() - sent
    print(f"exit {code} {took:.2f} s after SIGTERM")
    assert code == 0, broker.tail()
    return took


def test_sigterm_with_silent_plaintext_connections(start_broker):
    broker = start_broker()
    host, port = broker.addr.rsplit(":", 1)
    silent = socket.create_connection((host, int(port)))
    # one that sent its preface and SETTINGS, then never answers anything
    idle = RawH2(broker.addr, answer=False)
    idle.preface()
    try:
        assert _sigterm_exits_fast(broker) < 2
        assert "still in flight" not in broker.log(), broker.tail()
    finally:
        silent.close()
        idle.close()


def test_sigterm_with_a_silent_tls_connection(start_tls_broker, pki):
    broker = start_tls_broker()
    host, port = broker.addr.rsplit(":", 1)
    raw = socket.create_connection((host, int(port)))
    silent = _client_tls_context(pki).wrap_socket(raw, server_hostname=host)   # handshake done, then nothing
    try:
        assert _sigterm_exits_fast(broker) < 2
    finally:
        silent.close()


def _tls_connection_when_a_slot_is_free(pki, host: str, port: int) -> ssl.SSLSocket:
    """The launcher's health probe may hold a connection slot for a moment:
    a connection closed at once (no slot) is tried again."""
    deadline = time.monotonic() + 5
    while True:
        try:
            return _client_tls_context(pki).wrap_socket(socket.create_connection((host, port)), server_hostname=host)
        except (ssl.SSLError, ConnectionResetError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_a_connection_that_says_nothing_is_dropped(start_tls_broker, pki):
    broker = start_tls_broker(["--first-request-timeout", "1", "--max-connections", "2"])
    host, port = broker.addr.rsplit(":", 1)
    tls = _tls_connection_when_a_slot_is_free(pki, host, int(port))
    plain = socket.create_connection((host, int(port)))
    started = time.monotonic()
    for sock in (tls, plain):
        sock.settimeout(5)
        try:
            assert sock.recv(1) == b"", "the server sent something to a silent client"
        except (ConnectionResetError, ssl.SSLError):
            pass
    took = time.monotonic() - started
    print(f"silent connections dropped after {took:.2f} s")
    assert took < 3, f"silent connections kept {took:.2f} s with --first-request-timeout 1"
    plain.close()
    tls.close()
    # their slots are free again: the health probe (max 2 connections) answers
    assert broker.health("") == "SERVING"


# --------------------------------------------------------------------------
# 6. content types


@pytest.mark.parametrize("content_type", [
    "application/json", "text/plain", "application/grpc-web", "application/grpc-web+proto",
    "application/grpc-web-text", "application/grpc+json",
])
def test_only_grpc_content_types_are_served(start_broker, stubs, content_type):
    broker = start_broker()
    payload = stubs.secrets_service_pb2.GetSecretRequest(name="mistral-api-key").SerializeToString()
    conn = RawH2(broker.addr)
    try:
        conn.preface()
        conn.request(1, GET_SECRET, payload, content_type)
        conn.request(3, GET_SECRET, payload)           # the same, as gRPC
        conn.wait_end(1)
        conn.wait_end(3)
        refused, served = conn.frames.status_of(1), conn.frames.status_of(3)
        assert refused.get(":status") == "415", refused
        assert SEED[MISTRAL].encode() not in conn.frames.data.get(1, b"")
        assert served.get(":status") == "200" and served.get("grpc-status") == "0", served
        assert SEED[MISTRAL].encode() in conn.frames.data.get(3, b"")
    finally:
        conn.close()


# --------------------------------------------------------------------------
# 7. least privilege for admins


def test_refresh_secret_needs_the_read_grant(start_tls_broker, tls_files, stubs, pki):
    apb = stubs.admin_service_pb2
    tls_files.write_policy(policy_toml(
        {"identity": OPS, "secrets": [MISTRAL], "admin": True},
    ))
    broker = start_tls_broker()
    admin = broker.admin(pki.ops)
    for name in (JWT, "insurecove/production/no-such-secret"):
        expect_error(lambda: admin.RefreshSecret(apb.RefreshSecretRequest(name=name), timeout=10),
                     grpc.StatusCode.PERMISSION_DENIED, "POLICY_DENIED")
    refreshed = admin.RefreshSecret(apb.RefreshSecretRequest(name="mistral-api-key"), timeout=10)
    assert refreshed.secret.name == MISTRAL


# --------------------------------------------------------------------------
# 8. the call timeout's answer


def test_call_timeout_answers_deadline_exceeded_with_a_reason(moto, aws_broker, stubs):
    moto.create_secret("insurecove/slow-timeout", "slow-timeout-8c2e")
    upstream = SlowUpstream(moto.address, 4)
    try:
        broker = aws_broker(["--call-timeout", "1"], env={"AWS_ENDPOINT_URL": upstream.url})
        started = time.monotonic()
        # the client's own deadline (10 s) is far past the broker's (1 s)
        expect_error(lambda: get(broker.secrets(), stubs, "slow-timeout", timeout=10),
                     grpc.StatusCode.DEADLINE_EXCEEDED, "CALL_TIMEOUT", forbidden=("slow-timeout-8c2e",))
        took = time.monotonic() - started
        print(f"DEADLINE_EXCEEDED after {took:.2f} s")
        assert took < 3
        time.sleep(0.3)
        # Audited with the reason the caller got: the broker cut it, the
        # caller did not give up.
        audit = [line for line in broker.log().splitlines() if " audit: " in line and "slow-timeout" in line]
        assert len(audit) == 1, broker.tail()
        assert 'outcome="DEADLINE_EXCEEDED" reason="CALL_TIMEOUT"' in audit[0], audit
    finally:
        upstream.close()


def test_a_low_open_files_limit_still_hands_slots_to_callers(broker_bin, stubs, log_path, tmp_path):
    """Started with RLIMIT_NOFILE 600 (hard) and the default 10,000
    connections: descriptors would run out first, accept would fail, and a
    peer holding 700 silent sockets would lock every caller out. The broker
    fits its connection limit to the descriptors (and says so), so the
    silent sockets are closed or displaced and a caller is served."""
    from conftest import launch_broker

    limited = tmp_path / "broker-nofile-600"
    limited.write_text(f'#!/bin/sh\nulimit -n 600 || exit 99\nexec "{broker_bin}" "$@"\n')
    limited.chmod(0o755)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    listen = f"127.0.0.1:{support.free_port()}"
    broker = launch_broker(limited, stubs, log_path(), listen=listen, cwd=cwd)
    try:
        host, port = listen.rsplit(":", 1)
        silent = []
        for _ in range(700):
            try:
                silent.append(socket.create_connection((host, int(port)), timeout=2))
            except OSError:
                break
        # More than the broker's 600 descriptors can hold at once.
        assert len(silent) >= 600, f"only {len(silent)} connections could be opened"
        time.sleep(0.5)
        channel = own_channel(listen)
        stub = stubs.secrets_service_pb2_grpc.SecretsServiceStub(channel)
        # Well within the first-request timeout (10 s), after which the
        # silent sockets would be dropped anyway.
        secret = get(stub, stubs, "mistral-api-key", timeout=3)
        assert secret.string_value == SEED[MISTRAL]
        channel.close()
        for sock in silent:
            sock.close()
    finally:
        broker.stop()
    assert re.search(r"RLIMIT_NOFILE\) is 600: room for 88 connections, not the 10000", broker.log()), broker.tail()
    assert "panic" not in broker.log().lower()


REFLECTION_INFO = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"


@pytest.mark.parametrize("window, path, request_ends, locks_out, bound", [
    # A window of zero: no answer's bytes go out, every call keeps its slot.
    (0, "/grpc.health.v1.Health/Check", True, True, 8),
    # One byte: hyper hands each answer to h2 and lets its slot go; the rest
    # of the bytes wait in h2's queue, with the stream.
    (1, "/grpc.health.v1.Health/Check", True, False, 8),
    # Reflection's stream may rightly last a call timeout: a period more.
    # Its share of the slots (a sixteenth: 2 here) takes two streams, the
    # rest are refused at once: no lock-out, but two answers untaken.
    (0, REFLECTION_INFO, False, False, 12),
], ids=["window-0", "window-1", "reflection-window-0"])
def test_a_peer_that_never_takes_its_answers_loses_its_connection_not_the_brokers_slots(
    start_broker, window, path, request_ends, locks_out, bound,
):
    """A client that never widens its streams' windows gets no (or one)
    byte of each answer: without a bound its calls kept their slots, or
    their answers and streams, for as long as it answered pings; 32 of them
    locked every caller out here (Health/Check needs no grant; reflection
    neither, but its streams have a share of the slots). Its connection is closed once an answer has waited past a call
    timeout (within two; three for reflection), and the slots come back."""
    broker = start_broker(["--max-concurrent-calls", "32", "--call-timeout", "2"])
    stalled = RawH2(broker.addr)
    stalled.send(PREFACE + SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: window}).serialize())
    # grpc.reflection.v1 ServerReflectionRequest{list_services: ""}; Health/Check's is empty.
    payload = b"\x3a\x00" if path == REFLECTION_INFO else b""
    try:
        for stream_id in range(1, 64, 2):
            flags = ["END_STREAM"] if request_ends else []
            stalled.send(stalled.headers(stream_id, path)
                         + DataFrame(stream_id, data=grpc_message(payload), flags=flags).serialize())
        deadline = time.monotonic() + 2
        while len(stalled.frames.headers) < 32 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(stalled.frames.headers) == 32, "every call answered (headers; no window for the rest)"
        health = own_channel(broker.addr)
        check = health.unary_unary("/grpc.health.v1.Health/Check")
        if locks_out:
            expect_error(lambda: check(b"", timeout=5), grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_CALLS")
        started = time.monotonic()
        while not stalled.frames.closed:
            assert time.monotonic() - started < bound, f"the stalled connection is still open: {broker.tail()}"
            time.sleep(0.05)
        assert check(b"", timeout=5) == b"\x08\x01"      # SERVING
        assert "answers untaken past the call timeout" in broker.log(), broker.tail()
        health.close()
    finally:
        stalled.close()
