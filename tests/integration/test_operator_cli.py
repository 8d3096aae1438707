"""The operator's client commands (`get`, `watch`, `stats`), which go
through the secrets-broker-client crate like any service would."""

from __future__ import annotations

import subprocess
import time

import support


def get(broker_bin, *args) -> subprocess.CompletedProcess:
    """`secrets-broker get ...`, not through run_cli: stdout holds a secret
    value (what the operator asked for) and must not land in a test log."""
    return subprocess.run(
        [str(broker_bin), "get", *args], capture_output=True, text=True,
        stdin=subprocess.DEVNULL, env=support.broker_env(), timeout=30,
    )


def test_get_prints_the_value_on_stdout_and_the_version_on_stderr(dev_broker, broker_bin):
    value = support.dev_seed()["insurecove/mistral-api-key"]
    got = get(broker_bin, "mistral-api-key", "--endpoint", dev_broker.addr)
    assert got.returncode == 0, got.stderr
    assert got.stdout == value + "\n"
    assert "insurecove/mistral-api-key version" in got.stderr
    assert value not in got.stderr

    missing = get(broker_bin, "no-such-secret", "--endpoint", dev_broker.addr)
    assert missing.returncode == 1
    assert "SECRET_NOT_FOUND" in missing.stderr and missing.stdout == ""


def test_stats_prints_the_counters(dev_broker, broker_bin, run_cli):
    assert get(broker_bin, "production/jwt", "--endpoint", dev_broker.addr).returncode == 0
    stats = run_cli("stats", "--endpoint", dev_broker.addr)
    assert stats.returncode == 0, stats.stderr
    counters = dict(line.split(" ", 1) for line in stats.stdout.splitlines())
    assert counters["misses"] == "1" and counters["total_entries"] == "1", counters
    assert "hit_ratio" in counters


def test_watch_prints_events_without_values(dev_broker, broker_bin, log_path):
    value = support.dev_seed()["insurecove/production/jwt"]
    log = log_path("-watch")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(broker_bin), "watch", "production/jwt", "--endpoint", dev_broker.addr],
            stdout=subprocess.PIPE, stderr=out, text=True, env=support.broker_env(),
        )
        try:
            first = proc.stdout.readline()
        finally:
            support.stop_process(proc, 5)
    assert first.startswith("Current insurecove/production/jwt version "), first
    assert value not in first


def test_watch_says_when_its_stream_breaks_and_when_it_is_back(start_broker, broker_bin):
    """A broker restart: the watch keeps running, and stderr says the stream
    broke and came back, so that silence is not taken for an unchanged
    secret."""
    import threading

    broker = start_broker()
    proc = subprocess.Popen(
        [str(broker_bin), "watch", "production/jwt", "--endpoint", broker.addr],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=support.broker_env(),
    )
    stderr_lines: list[str] = []
    reader = threading.Thread(target=lambda: stderr_lines.extend(proc.stderr), daemon=True)
    reader.start()

    def wait_for(text: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in stderr_lines):
                return
            assert proc.poll() is None, f"watch exited: {stderr_lines}"
            time.sleep(0.05)
        raise AssertionError(f"no {text!r} on stderr within {timeout} s: {stderr_lines}")

    try:
        first = proc.stdout.readline()
        assert first.startswith("Current insurecove/production/jwt version "), first
        assert not stderr_lines, "the first connection is not news"
        broker.stop()
        wait_for("the stream to the broker broke; reconnecting")
        start_broker(listen=broker.addr)
        wait_for("the stream to the broker is back")
        assert proc.poll() is None, "the watch goes on"
    finally:
        support.stop_process(proc, 5)
    assert sum("broke;" in line for line in stderr_lines) == 1, stderr_lines


def test_watch_of_a_missing_secret_says_not_found_once(moto, aws_broker, broker_bin):
    """The broker answers NOT_FOUND: the watch ends with that, exit 1,
    without a 'cannot be reached; retrying' line first (it was reached)."""
    broker = aws_broker([])
    proc = subprocess.run(
        [str(broker_bin), "watch", "production/no-such-secret", "--endpoint", broker.addr],
        capture_output=True, text=True, env=support.broker_env(), timeout=20,
    )
    assert proc.returncode == 1, proc
    assert "not found" in proc.stderr, proc.stderr
    assert "cannot be reached" not in proc.stderr and "retrying" not in proc.stderr, proc.stderr
    assert proc.stdout == "", proc.stdout


def test_watch_says_why_the_broker_cannot_be_reached(broker_bin):
    """Nothing listens at the endpoint: the watch keeps retrying, and its
    one line on stderr says what failed, not only that something did."""
    port = support.free_port()
    proc = subprocess.Popen(
        [str(broker_bin), "watch", "production/jwt", "--endpoint", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=support.broker_env(),
    )
    import threading

    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(proc.stderr.readline()), daemon=True)
    reader.start()
    try:
        reader.join(15)
        assert lines, "nothing on stderr within 15 s"
        assert proc.poll() is None, "the watch goes on"
    finally:
        support.stop_process(proc, 5)
    line = lines[0]
    assert line.startswith("the broker cannot be reached yet; retrying: "), line
    assert f"127.0.0.1:{port}" in line and "refused" in line.lower(), line


def test_plaintext_to_a_remote_address_is_refused(run_cli):
    started = time.monotonic()
    refused = run_cli("get", "x", "--endpoint", "10.1.2.3:50051")
    assert refused.returncode == 1
    assert "loopback" in refused.stderr
    assert time.monotonic() - started < 5, "refused before any connection attempt"


def test_a_unix_socket_broker_under_a_strict_umask(broker_bin, log_path, tmp_path):
    """Started with umask 077 (systemd's UMask=0077), the socket is still
    read-write for the broker's group, and the operator's client reaches it
    at a `unix:` endpoint."""
    import os
    import stat

    sock = tmp_path / "broker.sock"
    log = open(log_path(), "wb")
    proc = subprocess.Popen(
        ["sh", "-c", 'umask 077 && exec "$0" serve --dev --listen "unix:$1"', str(broker_bin), str(sock)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=support.broker_env(), cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 15
        got = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, support.log_tail(log_path())
            if sock.exists():
                got = get(broker_bin, "mistral-api-key", "--endpoint", f"unix:{sock}")
                if got.returncode == 0:
                    break
            time.sleep(0.1)
        assert got is not None and got.returncode == 0, got and got.stderr
        assert got.stdout == support.dev_seed()["insurecove/mistral-api-key"] + "\n"
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660, oct(os.stat(sock).st_mode)

        # A second broker on the same path must not cut the first off.
        second = subprocess.run(
            [str(broker_bin), "serve", "--dev", "--listen", f"unix:{sock}"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, env=support.broker_env(), timeout=20,
        )
        assert second.returncode != 0, second.stderr
        assert "another process is listening on this socket" in second.stderr, second.stderr
        again = get(broker_bin, "mistral-api-key", "--endpoint", f"unix:{sock}")
        assert again.returncode == 0, again.stderr
    finally:
        support.stop_process(proc, 5)
        log.close()
    assert not sock.exists(), "a clean stop removes its socket file"


def test_the_dev_hint_names_no_secret_a_secrets_file_lacks(broker_bin, tmp_path):
    """`--dev` prints a grpcurl line to try; with a secrets file its names
    are the file's own, and a hint naming a built-in one would answer
    NOT_FOUND to the first call a newcomer copies."""
    secrets = tmp_path / "secrets.json"
    secrets.write_text('{"secrets": [{"name": "team/api-key", "versions": [{"value": "k-5e2a"}]}]}')
    port = support.free_port()
    proc = subprocess.Popen(
        [str(broker_bin), "serve", "--dev", "--secrets-file", str(secrets),
         "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=support.broker_env(),
    )
    try:
        banner = proc.stdout.readline()
        hint = proc.stdout.readline()
    finally:
        support.stop_process(proc, 5)
    assert str(secrets) in banner, banner
    assert hint.startswith("try: grpcurl -plaintext"), hint
    assert "mistral-api-key" not in hint and '"name":"NAME"' in hint, hint
