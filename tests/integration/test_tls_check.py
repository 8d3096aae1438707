"""`secrets-broker check` with mutual TLS and a policy: the certificates
(dates, key, CA) and the policy are validated; exit 0 with "configuration
ok", or 1 with a message that says what is wrong. `serve` refuses the same
files at start."""

from __future__ import annotations

import datetime as dt
import re

import pytest

import support
from tls_support import AUTH, OPS, pki, policy_toml, tls_files  # noqa: F401  (fixtures)

POLICY = policy_toml(
    {"identity": AUTH, "secrets": ["insurecove/production/jwt", "insurecove/shared/*", "insurecove/svc/**"]},
    {"identity": OPS, "admin": True},
)


def output(proc) -> str:
    return proc.stdout + proc.stderr


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@pytest.fixture
def files(tls_files):
    tls_files.write_policy(POLICY)
    return tls_files


def check(run_cli, files, *extra, listen=None, cert=None, key=None, ca=None, policy=None):
    args = [
        "check", "--dev", "--listen", listen or f"127.0.0.1:{support.free_port()}",
        "--tls-cert", cert or files.cert, "--tls-key", key or files.key,
        "--tls-client-ca", ca or files.client_ca, "--policy", policy or files.policy, *extra,
    ]
    return run_cli(*args)


def test_check_good_tls_files_and_policy(run_cli, files):
    proc = check(run_cli, files)
    assert proc.returncode == 0, output(proc)
    assert "configuration ok" in output(proc), output(proc)


def test_check_tls_allows_a_non_loopback_listen(run_cli, files):
    proc = check(run_cli, files, listen="0.0.0.0:50051")
    assert proc.returncode == 0, output(proc)
    assert "configuration ok" in output(proc), output(proc)


def test_check_reads_the_tls_environment(run_cli, files, pki):
    env = {
        "BROKER_TLS_CERT": str(files.cert), "BROKER_TLS_KEY": str(files.key),
        "BROKER_TLS_CLIENT_CA": str(files.client_ca), "BROKER_POLICY": str(files.policy),
    }
    proc = run_cli("check", "--dev", "--listen", "0.0.0.0:50051", env=env)
    assert proc.returncode == 0, output(proc)
    assert "configuration ok" in output(proc), output(proc)
    # the same with a key from the environment that does not fit: refused
    proc = run_cli("check", "--dev", env=env | {"BROKER_TLS_KEY": str(pki.auth.key_path)})
    assert proc.returncode == 1, output(proc)


def test_check_key_of_another_certificate(run_cli, files, pki):
    proc = check(run_cli, files, key=pki.auth.key_path)
    assert proc.returncode == 1, output(proc)
    assert re.search(r"\bkey\b", output(proc), re.I), output(proc)
    assert str(pki.auth.key_path) in output(proc), output(proc)
    assert "configuration ok" not in output(proc)


def test_check_expired_server_certificate(run_cli, files, pki):
    expired = pki.make_server("server-expired", not_before=now() - dt.timedelta(days=60), not_after=now() - dt.timedelta(days=1))
    proc = check(run_cli, files, cert=expired.cert_path, key=expired.key_path)
    assert proc.returncode == 1, output(proc)
    assert str(expired.cert_path) in output(proc), output(proc)
    assert re.search(r"expire|not valid", output(proc), re.I), output(proc)


def test_check_server_certificate_expiring_within_7_days(run_cli, files, pki):
    soon = pki.make_server("server-soon", not_after=now() + dt.timedelta(days=3))
    proc = check(run_cli, files, cert=soon.cert_path, key=soon.key_path)
    assert proc.returncode == 1, output(proc)
    assert re.search(r"expire", output(proc), re.I), output(proc)
    # 30 days left is fine
    later = pki.make_server("server-later", not_after=now() + dt.timedelta(days=30))
    proc = check(run_cli, files, cert=later.cert_path, key=later.key_path)
    assert proc.returncode == 0, output(proc)


def test_check_unparsable_client_ca(run_cli, files, tmp_path):
    bad = tmp_path / "bad-ca.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    proc = check(run_cli, files, ca=bad)
    assert proc.returncode == 1, output(proc)
    assert str(bad) in output(proc), output(proc)
    empty = tmp_path / "empty-ca.pem"
    empty.write_text("")
    proc = check(run_cli, files, ca=empty)
    assert proc.returncode == 1, output(proc)
    assert str(empty) in output(proc), output(proc)


@pytest.mark.parametrize("text", [
    "[[grant]\nidentity = ",
    '[[grant]]\nidentity = "spiffe://insurecove/x"\nsecrets = ["insurecove/[oops"]\n',
    '[[grant]]\nidentity = "spiffe://insurecove/x"\nadmin = "yes"\n',
    '[[grant]]\nidentity = "spiffe://insurecove/x"\nsecret = ["insurecove/typo-field"]\n',
], ids=["not-toml", "bad-glob", "admin-not-bool", "unknown-field"])
def test_check_broken_policy(run_cli, files, tmp_path, text):
    policy = tmp_path / "broken-policy.toml"
    policy.write_text(text)
    proc = check(run_cli, files, policy=policy)
    assert proc.returncode == 1, output(proc)
    assert str(policy) in output(proc), output(proc)


def test_check_missing_files(run_cli, files, tmp_path):
    for flag in ("cert", "key", "ca", "policy"):
        missing = tmp_path / f"missing-{flag}.pem"
        proc = check(run_cli, files, **{flag: missing})
        assert proc.returncode == 1, (flag, output(proc))
        assert str(missing) in output(proc), (flag, output(proc))


def test_serve_refuses_bad_tls_files_and_policy(run_cli, files, pki, tmp_path):
    """serve exits 1 instead of listening with files check would refuse."""
    broken = tmp_path / "broken.toml"
    broken.write_text("[[grant]\n")
    for case, kw in {
        "key of another certificate": {"key": pki.auth.key_path},
        "broken policy": {"policy": broken},
    }.items():
        args = {"cert": files.cert, "key": files.key, "ca": files.client_ca, "policy": files.policy} | kw
        proc = run_cli(
            "serve", "--dev", "--listen", f"127.0.0.1:{support.free_port()}",
            "--tls-cert", args["cert"], "--tls-key", args["key"], "--tls-client-ca", args["ca"],
            "--policy", args["policy"], timeout=15,
        )
        assert proc.returncode == 1, (case, output(proc))


def test_check_warns_of_certificates_every_client_would_refuse(run_cli, files, pki):
    """A client certificate given as the server's (clientAuth only), and a
    leaf given as the client CA: the files load, and every handshake would
    fail. check says so."""
    good = check(run_cli, files)
    assert "warning" not in output(good), output(good)
    proc = check(run_cli, files, cert=pki.auth.cert_path, key=pki.auth.key_path, ca=pki.auth.cert_path)
    assert proc.returncode == 0, output(proc)
    warnings = [line for line in output(proc).splitlines() if line.startswith("warning:")]
    assert any("not for server authentication" in line for line in warnings), output(proc)
    assert any("holds no CA" in line for line in warnings), output(proc)
