"""AWS and broker failures told as a person can act on them: one short line
that names the cause and the fix, from `check`, the broker's log and the
operator's client.

Real peers: moto_server (stopped, for an unreachable endpoint), a closed
loopback port as a proxy that refuses, a TLS broker with a CA the client
does not trust."""

from __future__ import annotations

import subprocess
import time

from cryptography import x509

import support
from tls_support import PKI, pki, start_tls_broker, tls_files  # noqa: F401  (fixtures)

CREDENTIAL_FREE = {
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_DEFAULT_REGION": "ap-east-1",
}


def lines_of(proc) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]


def assert_short(lines: list[str]) -> None:
    assert 1 <= len(lines) <= 3, lines
    assert all(len(line) <= 300 for line in lines), [len(line) for line in lines]


def test_check_without_credentials_says_how_to_provide_them(run_cli, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = CREDENTIAL_FREE | {
        "HOME": str(home),
        "AWS_CONFIG_FILE": str(home / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "credentials"),
    }
    started = time.monotonic()
    proc = run_cli("check", env=env, timeout=30)
    took = time.monotonic() - started
    lines = lines_of(proc)
    print(f"exit {proc.returncode} after {took:.1f} s: {lines}")
    assert proc.returncode == 1
    assert took < 10
    assert_short(lines)
    text = " ".join(lines)
    assert "no AWS credentials" in text and "AWS_PROFILE" in text and "AWS_ACCESS_KEY_ID" in text, text
    assert "DispatchFailure" not in text and "SdkBody" not in text


def test_check_names_an_unreachable_endpoint(run_cli, moto):
    env = moto.broker_env()
    endpoint = env["AWS_ENDPOINT_URL"]
    moto.stop()
    proc = run_cli("check", env=env, timeout=60)
    lines = lines_of(proc)
    print(lines)
    assert proc.returncode == 1
    assert_short(lines)
    text = " ".join(lines)
    assert endpoint in text and "connection refused" in text, text


def test_check_names_a_refusing_proxy(run_cli, moto):
    closed = f"http://127.0.0.1:{support.free_port()}"
    env = moto.broker_env() | {"HTTP_PROXY": closed, "HTTPS_PROXY": closed}
    proc = run_cli("check", env=env, timeout=60)
    lines = lines_of(proc)
    print(lines)
    assert proc.returncode == 1
    assert_short(lines)
    text = " ".join(lines)
    assert f"proxy {closed}" in text and "HTTP_PROXY" in text, text


def test_an_upstream_outage_is_logged_once_each_way(moto, aws_broker, stubs):
    moto.create_secret("insurecove/outage", "outage-value-61c2")
    broker = aws_broker(["--watch-interval", "1", "--cache-ttl", "1"])
    stub = broker.secrets()
    pb = stubs.secrets_service_pb2
    assert stub.GetSecret(pb.GetSecretRequest(name="outage"), timeout=10).secret.string_value == "outage-value-61c2"
    moto.stop()
    until = time.monotonic() + 5.5          # five intervals
    while time.monotonic() < until:
        secret = stub.GetSecret(pb.GetSecretRequest(name="outage"), timeout=10).secret
        assert secret.string_value == "outage-value-61c2"
        time.sleep(0.5)
    moto.start()
    moto.create_secret("insurecove/outage", "outage-value-61c2")
    deadline = time.monotonic() + 10
    while "upstream check succeeds again" not in broker.log():
        assert time.monotonic() < deadline, broker.tail()
        time.sleep(0.2)
    lines = [line for line in broker.log().splitlines() if (" WARN " in line or " INFO " in line)
             and " audit: " not in line]
    failures = [line for line in lines if "upstream check failed" in line]
    recoveries = [line for line in lines if "succeeds again" in line]
    print("\n".join(failures + recoveries))
    assert len(failures) == 1 and len(recoveries) == 1, "\n".join(lines)
    # The sweep (every second here) lists secrets too: it fails with the
    # check, which says so; a line of its own would say it twice.
    sweep = [line for line in lines if "the sweep" in line or "could not list" in line]
    assert not sweep, "\n".join(sweep)
    assert "cannot reach AWS at" in failures[0] and "connection refused" in failures[0], failures[0]
    long_lines = [line for line in lines if len(line) >= 300]
    assert not long_lines, long_lines


def get(broker_bin, *args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(broker_bin), "get", *args], capture_output=True, text=True,
        stdin=subprocess.DEVNULL, env=support.broker_env(env), timeout=30,
    )


def tls_env(ca, identity) -> dict[str, str]:
    """The client's TLS settings: trust `ca`, present `identity`."""
    return {
        "BROKER_CA_FILE": str(ca.cert_path),
        "BROKER_CERT_FILE": str(identity.cert_path),
        "BROKER_KEY_FILE": str(identity.key_path),
    }


def failure_line(got: subprocess.CompletedProcess) -> str:
    """The one line a failed `get` prints, nothing on stdout."""
    lines = lines_of(got)
    print(lines)
    assert got.returncode == 1 and got.stdout == ""
    assert len(lines) == 1, lines
    return lines[0]


def test_get_names_a_closed_endpoint(broker_bin):
    endpoint = f"127.0.0.1:{support.free_port()}"
    got = get(broker_bin, "mistral-api-key", "--endpoint", endpoint)
    line = failure_line(got)
    assert endpoint in line and "connection refused" in line, line


def test_get_names_a_tls_broker_it_does_not_trust(start_tls_broker, pki, broker_bin, tmp_path):
    broker = start_tls_broker()
    other = PKI(tmp_path / "other-pki")          # a CA the broker's certificate is not from
    env = tls_env(other.ca1, pki.auth)
    got = get(broker_bin, "mistral-api-key", "--endpoint", broker.addr, env=env)
    line = failure_line(got)
    assert broker.addr in line and "unknown CA" in line and "BROKER_CA_FILE" in line, line


def test_get_names_a_plaintext_client_to_a_tls_broker(start_tls_broker, broker_bin):
    broker = start_tls_broker()
    got = get(broker_bin, "mistral-api-key", "--endpoint", broker.addr)
    line = failure_line(got)
    assert broker.addr in line and "BROKER_CA_FILE" in line, line


def test_get_names_a_tls_client_to_a_plaintext_broker(dev_broker, pki, broker_bin):
    env = tls_env(pki.ca1, pki.auth)
    got = get(broker_bin, "mistral-api-key", "--endpoint", dev_broker.addr, env=env)
    line = failure_line(got)
    assert dev_broker.addr in line and "did not answer in TLS" in line, line
    assert "plaintext broker" in line and "BROKER_CA_FILE" in line, line


def test_get_names_a_unix_socket_that_is_not_there(broker_bin, tmp_path):
    endpoint = f"unix:{tmp_path / 'broker.sock'}"
    got = get(broker_bin, "mistral-api-key", "--endpoint", endpoint)
    line = failure_line(got)
    assert endpoint in line and "no such socket" in line, line


def test_get_names_a_client_certificate_the_broker_refuses(start_tls_broker, pki, broker_bin, tmp_path):
    """A client certificate from a CA the broker does not trust: under TLS
    1.3 the client learns it from the broker's alert after its own side of
    the handshake, and must not be told it spoke plaintext to a TLS broker."""
    broker = start_tls_broker()
    other = PKI(tmp_path / "other-pki")          # the client's certificate is from this CA
    env = tls_env(pki.ca1, other.auth)
    got = get(broker_bin, "mistral-api-key", "--endpoint", broker.addr, env=env)
    line = failure_line(got)
    # The broker's alert, or the connection it closes, depending on which
    # the last attempt saw first: either way the certificate is named.
    assert "refuse" in line and "this client's certificate" in line, line
    assert "BROKER_CERT_FILE" in line, line
    assert "plaintext" not in line, line


def test_get_names_a_version_1_client_certificate(start_tls_broker, pki, broker_bin, tmp_path):
    """`openssl x509 -req` without an extension file makes a version 1
    certificate, which TLS does not take: the client names the certificate
    file and the fix, not the key file and the parser's debug text."""
    broker = start_tls_broker()
    legacy = pki.make_v1_client("legacy-v1", "legacy-client")
    assert legacy.cert.version == x509.Version.v1
    got = get(broker_bin, "mistral-api-key", "--endpoint", broker.addr, env=tls_env(pki.ca1, legacy))
    line = failure_line(got)
    assert f"BROKER_CERT_FILE {legacy.cert_path}: an X.509 v1 certificate" in line, line
    assert "extendedKeyUsage=clientAuth" in line and "OtherError" not in line, line
