"""`secrets-broker check`: validates the configuration, exits 0 or 1."""

from __future__ import annotations

import json
import re
import socket

from ops_support import SlowUpstream


def output(proc) -> str:
    return proc.stdout + proc.stderr


def test_check_dev_ok(run_cli):
    proc = run_cli("check", "--dev")
    assert proc.returncode == 0, output(proc)
    assert any(re.search(r"\bok\b", line, re.I) for line in output(proc).splitlines()), output(proc)


def test_check_plaintext_off_loopback_needs_tls(run_cli):
    proc = run_cli("check", "--dev", "--listen", "0.0.0.0:50051")
    assert proc.returncode == 1, output(proc)
    assert "TLS" in output(proc), output(proc)


def test_check_plaintext_off_loopback_from_env(run_cli):
    proc = run_cli("check", "--dev", env={"BROKER_LISTEN": "0.0.0.0:50051"})
    assert proc.returncode == 1, output(proc)
    assert "TLS" in output(proc), output(proc)


def test_check_bad_cache_ttl(run_cli):
    proc = run_cli("check", "--dev", env={"SECRET_CACHE_TTL": "soon"})
    assert proc.returncode == 1, output(proc)
    assert "SECRET_CACHE_TTL" in output(proc), output(proc)


def test_check_refuses_a_unix_socket_in_a_missing_folder(run_cli, tmp_path):
    """serve cannot make the socket's folder: check says so first."""
    socket = tmp_path / "no-such-folder" / "broker.sock"
    proc = run_cli("check", "--dev", "--listen", f"unix:{socket}")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"the folder {socket.parent} does not exist" in proc.stderr, proc.stderr
    served = run_cli("check", "--dev", "--listen", f"unix:{tmp_path / 'broker.sock'}")
    assert served.returncode == 0, served.stdout + served.stderr


def test_check_loopback_listen_is_fine(run_cli):
    proc = run_cli("check", "--dev", "--listen", "127.0.0.1:50999")
    assert proc.returncode == 0, output(proc)


def test_serve_refuses_plaintext_off_loopback(run_cli):
    """serve itself must refuse too (and exit instead of listening)."""
    proc = run_cli("serve", "--dev", "--listen", "0.0.0.0:0", timeout=15)
    assert proc.returncode == 1, output(proc)
    assert "TLS" in output(proc), output(proc)


def test_check_warns_of_policy_patterns_written_as_short_names(run_cli, tmp_path):
    """Policy patterns match full names: `production/jwt` (the short name of
    insurecove/production/jwt) matches nothing, and check says so."""
    policy = tmp_path / "policy.toml"
    policy.write_text(
        '[[grant]]\nidentity = "anonymous"\nsecrets = ["production/jwt", "insurecove/mistral-api-key"]\n'
    )
    proc = run_cli("check", "--dev", "--policy", str(policy))
    assert proc.returncode == 0, output(proc)
    warnings = [line for line in output(proc).splitlines() if "warning" in line]
    assert len(warnings) == 1, output(proc)
    assert '"production/jwt" does not start with the prefix "insurecove/"' in warnings[0], warnings
    assert '"insurecove/production/jwt"?' in warnings[0], warnings


def test_check_tests_the_event_source(run_cli, moto):
    """`check` reads the event queue's attributes (queue mode) or the
    topic's (topic mode), and fails naming the call when it cannot."""
    env = moto.broker_env()
    queue = moto.boto("sqs").create_queue(QueueName="check-events")["QueueUrl"]
    topic = moto.boto("sns").create_topic(Name="check-events")["TopicArn"]

    proc = run_cli("check", "--events-queue-url", queue, env=env)
    assert proc.returncode == 0, output(proc)
    assert f"events: queue {queue} answers" in output(proc), output(proc)

    proc = run_cli("check", "--events-topic-arn", topic, env=env)
    assert proc.returncode == 0, output(proc)
    assert f"events: topic {topic} answers" in output(proc), output(proc)

    missing = queue.rsplit("/", 1)[0] + "/no-such-queue"
    proc = run_cli("check", "--events-queue-url", missing, env=env)
    assert proc.returncode == 1, output(proc)
    assert "events: GetQueueAttributes failed" in output(proc), output(proc)
    assert len(output(proc).strip().splitlines()) <= 2, output(proc)


def test_check_warns_when_the_region_holds_no_secret_under_the_prefix(run_cli, moto):
    """A Region left at its default (or another than the secrets') answers
    ListSecrets fine, and every read NOT_FOUND: `check` says so, with the
    variable to set; with a secret under the prefix it says nothing."""
    env = moto.broker_env()
    proc = run_cli("check", env=env)
    assert proc.returncode == 0, output(proc)
    warning = [line for line in output(proc).splitlines() if "holds no secret named insurecove/*" in line]
    assert len(warning) == 1 and "AWS_REGION" in warning[0], output(proc)

    moto.create_secret("insurecove/check/present", "present-value-7a1c")
    proc = run_cli("check", env=env)
    assert proc.returncode == 0 and "holds no secret" not in output(proc), output(proc)


def test_a_start_failure_under_json_logs_is_a_json_line(run_cli):
    """A collector reading stderr as JSON lines sees why the broker stopped."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        serve = ("serve", "--dev", "--listen", f"127.0.0.1:{port}")
        proc = run_cli(*serve, env={"LOG_FORMAT": "json"}, timeout=15)
        # A RUST_LOG that leaves the broker's own events out: a plain line
        # rather than nothing.
        quiet = run_cli(*serve, env={"LOG_FORMAT": "json", "RUST_LOG": "h2=debug"}, timeout=15)
    finally:
        taken.close()
    assert proc.returncode == 1, output(proc)
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.strip()]
    stopped = [e for e in events if e.get("level") == "ERROR"]
    assert len(stopped) == 1 and f"cannot listen on 127.0.0.1:{port}" in stopped[0]["fields"]["message"], events
    # Whichever set it: the flag here, the variable in a pod's spec.
    assert "(--listen / BROKER_LISTEN)" in stopped[0]["fields"]["message"], events
    assert quiet.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in quiet.stderr, output(quiet)


def test_check_says_when_a_dotenv_file_was_read(run_cli, tmp_path):
    """A .env in the working directory applies its variables; check says
    which file, so that a stray one is found."""
    (tmp_path / "cli-cwd" / ".env").write_text("SECRET_PREFIX=fromdotenv\n")
    proc = run_cli("check", "--dev")
    assert proc.returncode == 0, output(proc)
    assert "env file: " in output(proc) and ".env" in output(proc), output(proc)
    assert 'prefix "fromdotenv"' in output(proc), output(proc)
    # A name set twice: the last line wins, as Python's dotenv and a shell
    # read the file; the environment still wins over both; a BOM is no
    # part of the first name.
    (tmp_path / "cli-cwd" / ".env").write_bytes(
        "\ufeffSECRET_ENVIRONMENT=staging\nSECRET_PREFIX=first\nSECRET_PREFIX=second\n".encode()
    )
    proc = run_cli("check", "--dev")
    assert 'prefix "second", environment "staging"' in output(proc), output(proc)
    proc = run_cli("check", "--dev", env={"SECRET_PREFIX": "fromenv"})
    assert 'prefix "fromenv"' in output(proc), output(proc)


def test_a_dotenv_line_that_cannot_be_read_stops_the_start(run_cli, tmp_path):
    """dotenv stops at a line it cannot read: the lines after it would not
    apply (here the prefix). The broker says which line, never its text."""
    (tmp_path / "cli-cwd" / ".env").write_text(
        "SECRET_ENVIRONMENT=staging\nthis line has no equals sign hunter2-env\nSECRET_PREFIX=myprefix\n"
    )
    proc = run_cli("check", "--dev")
    assert proc.returncode == 1, output(proc)
    assert "line 2 cannot be read as NAME=value" in output(proc), output(proc)
    assert "hunter2-env" not in output(proc), output(proc)
    # A byte that is not UTF-8 stops dotenv too, after the lines before it.
    (tmp_path / "cli-cwd" / ".env").write_bytes(b"A=1\n# caf\xe9\nSECRET_PREFIX=myprefix\n")
    proc = run_cli("check", "--dev")
    assert proc.returncode == 1 and "valid UTF-8" in output(proc), output(proc)


def test_check_reads_as_well_as_lists(run_cli, moto):
    """Listing alone passes when only reads are denied, or when something
    in between answers every call with an empty 200: `check` reads a name
    that does not exist too, warns when the read is refused and fails when
    it is not answered as AWS would."""
    upstream = SlowUpstream(moto.address, 0.0, delayed=None)
    try:
        env = {**moto.broker_env(), "AWS_ENDPOINT_URL": upstream.url}
        proc = run_cli("check", env=env)
        assert proc.returncode == 0, output(proc)
        assert "reads answered" in output(proc), output(proc)

        upstream.fault_only = (".GetSecretValue",)
        upstream.fault = (400, "application/x-amz-json-1.1",
                          b'{"__type":"AccessDeniedException","message":"not authorized to perform '
                          b'secretsmanager:GetSecretValue"}')
        proc = run_cli("check", env=env)
        # A role allowed only some secrets is refused this name and works:
        # a warning, not a failure.
        assert proc.returncode == 0, output(proc)
        warning = [line for line in output(proc).splitlines() if line.startswith("warning: access to secret")]
        assert len(warning) == 1 and "GetSecretValue" in warning[0], output(proc)
        # With a secret listed whose read is refused too, the role cannot
        # read at all: a failure.
        moto.create_secret("insurecove/check/refused", "refused-value-5e0d")
        proc = run_cli("check", env=env)
        assert proc.returncode == 1, output(proc)
        assert "insurecove/check/refused" in output(proc) and "refused-value" not in output(proc), output(proc)

        # Empty 200s to reads alone: the listing passes, the read does not.
        upstream.fault_only = (".GetSecretValue",)
        upstream.fault = (200, "application/x-amz-json-1.1", b"{}")
        proc = run_cli("check", env=env)
        assert proc.returncode == 1, output(proc)
        assert "GetSecretValue" in output(proc) and "configuration ok" not in output(proc), output(proc)
        # To every call: the listing already is not AWS's.
        upstream.fault_only = None
        proc = run_cli("check", env=env)
        assert proc.returncode == 1, output(proc)
        assert "ListSecrets for * without its SecretList" in output(proc), output(proc)
    finally:
        upstream.close()
