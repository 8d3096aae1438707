"""The Python package (clients/python) as a service team would use it:
installed with pip into a fresh virtualenv, then the guide's own examples
(only the import line changed), the FastAPI example under uvicorn, mypy
--strict, a rotation reaching the local cache by push, and a denial under
mutual TLS. The broker runs on moto."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

import support
from tls_support import (  # noqa: F401  (fixtures)
    AUTH,
    pki,
    policy_toml,
    start_tls_broker,
    tls_files,
)

PACKAGE = support.REPO_ROOT / "clients" / "python"
GUIDE = Path(__file__).parent / "guide_examples"
FASTAPI = support.REPO_ROOT / "examples" / "fastapi"

MISTRAL = "insurecove/mistral-api-key"
MISTRAL_VALUE = "package-mistral-key-41c9"
JWT = "insurecove/production/jwt"
JWT_VALUE = json.dumps({
    "jwt_secret_key": "package-jwt-signing-key-7e11",
    "jwt_algorithm": "HS256",
    "jwt_issuer": "insurecove-package",
    "jwt_audience": "insurecove-package-users",
    "jwt_access_token_expire_minutes": 30,
})
DATABASE = "insurecove/production/database"
DATABASE_VALUE = json.dumps({
    "supabase_url": "https://package.supabase.invalid",
    # JWT-shaped, as supabase's client checks keys' form.
    "supabase_anon_key": "eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoiYW5vbiJ9.cGFja2FnZS1hbm9u",
    "supabase_service_key": "package-service-key-2b2b",
    "database_password": "package-db-password-3c3c",
})
# What the examples import, beside the package itself.
EXTRAS = ["PyJWT==2.15.1", "supabase==2.34.1", "fastapi==0.163.2", "uvicorn==0.54.0",
          "mypy==2.4.1", "types-grpcio==1.85.0.20261028", "types-protobuf==7.35.1.20260906"]


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh virtualenv with `pip install clients/python` and the extras."""
    root = tmp_path_factory.mktemp("package-venv")
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
    python = root / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(PACKAGE), *EXTRAS],
        capture_output=True, text=True, timeout=600,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    return python


@pytest.fixture
def seeded_broker(moto, aws_broker):
    versions = moto.seed({MISTRAL: MISTRAL_VALUE, JWT: JWT_VALUE, DATABASE: DATABASE_VALUE})
    broker = aws_broker(["--watch-interval", "1"])
    return broker, versions


def run(python: Path, script: Path, env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(python), str(script), *args], env=env, cwd=cwd or script.parent,
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )


def probe_answer(python: Path, tmp_path: Path, name: str, text: str, env: dict[str, str]) -> Any:
    """Runs a probe script (`text`, saved as `name`) in the venv; what it
    printed, as JSON. A probe that fails fails the test with its stderr."""
    probe = tmp_path / name
    probe.write_text(text)
    proc = run(python, probe, env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def start_probe(python: Path, cwd: Path, env: dict[str, str], probe: str, *args: str) -> subprocess.Popen:
    """A probe script (`probe`'s text) running in the venv, its stdin,
    stdout and stderr piped: it waits on its stdin where the test acts."""
    return subprocess.Popen(
        [str(python), "-c", probe, *args], env=env,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
    )


def go_on(proc: subprocess.Popen) -> None:
    """Tells a probe waiting on its stdin to go on."""
    proc.stdin.write("go\n")
    proc.stdin.flush()


def package_env(broker, **extra: str) -> dict[str, str]:
    return support.broker_env({"BROKER_ENDPOINT": broker.addr, **extra})


def test_the_guides_examples_run_as_the_guide_says(venv, seeded_broker, tmp_path):
    broker, _ = seeded_broker
    env = package_env(broker)
    outputs = {}
    for example in ("basic_usage", "error_handling", "cache_monitoring", "health_checks",
                    "database_connection", "jwt_configuration"):
        proc = run(venv, GUIDE / f"{example}.py", env, cwd=tmp_path)
        assert proc.returncode == 0, f"{example}: {proc.stdout}{proc.stderr}"
        outputs[example] = proc.stdout
        print(f"--- {example}\n{proc.stdout}")
    assert "✅ Connected to AWS Secrets Manager" in outputs["basic_usage"]
    assert f"API Key: {MISTRAL_VALUE}" in outputs["basic_usage"]
    assert "ERROR Secret not found - check secret name" in outputs["error_handling"]
    assert "Cache entries: 1\nValid entries: 1\nCache hit ratio: 100.00%" in outputs["cache_monitoring"]
    health = json.loads(outputs["health_checks"])
    assert health["status"] == "healthy" and health["aws_secrets"] == "connected", health
    assert "supabase client for https://package.supabase.invalid" in outputs["database_connection"]
    assert "token for user-42" in outputs["jwt_configuration"]
    # the repr never shows a value; the error example on a JSON secret works
    proc = run(venv, GUIDE / "error_handling.py", env, "production/jwt", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr
    probe = "from secrets_broker.aws_secrets import AWSSecretsManager as M; print(repr(M().get_secret('mistral-api-key')))"
    shown = subprocess.run([str(venv), "-c", probe], env=env, capture_output=True, text=True, timeout=30)
    assert "<redacted>" in shown.stdout and MISTRAL_VALUE not in shown.stdout, shown.stdout + shown.stderr


GUIDE_SEMANTICS_PROBE = """
import asyncio, json, os
from secrets_broker.aws_secrets import AWSSecretsConfig, AWSSecretsManager, AWSSecretsManagerError, SecretNotFoundError
from secrets_broker.aio import AsyncAWSSecretsManager
out = {}
m = AWSSecretsManager()
jwt = m.get_secret("production/jwt")
out["jwt_value_is_dict"] = isinstance(jwt.value, dict) and jwt.value["jwt_algorithm"] == "HS256"
out["jwt_text_kept"] = json.loads(jwt.as_string()) == jwt.as_dict() == jwt.value
copied = jwt.as_dict(); copied["jwt_algorithm"] = "none"
out["as_dict_is_a_copy"] = m.get_secret("production/jwt").value["jwt_algorithm"] == "HS256"
out["mistral_value"] = m.get_secret("mistral-api-key").value
out["staged"] = [m.get_secret("staged", version_stage="AWSPREVIOUS").as_string(), m.get_secret("staged").as_string()]

async def missing():
    try:
        await AsyncAWSSecretsManager().get_secret("no-such-secret")
    except SecretNotFoundError as error:
        return [error.code.name, error.reason, "\\n" in str(error)]
    return "no error"
out["async_missing"] = asyncio.run(missing())

def prefixed(prefix):
    try:
        return AWSSecretsManager(AWSSecretsConfig(secret_prefix=prefix)).get_secret("mistral-api-key").as_string()
    except AWSSecretsManagerError as error:
        return "refused: SECRET_PREFIX" if "SECRET_PREFIX=acme" in str(error) else str(error)
out["prefix_other"] = prefixed("acme")
out["prefix_same"] = prefixed("insurecove")

def options(**settings):
    return {k: v for k, v in AWSSecretsConfig(**settings).channel_options(False) if "proxy" in k}
# A broker elsewhere is reached with mutual TLS only (the files are read
# when a channel is made, not here), through HTTPS_PROXY.
TLS = dict(broker_ca_file="ca.pem", broker_cert_file="client.pem", broker_key_file="client-key.pem")
def tls_options(**settings):
    return {k: v for k, v in AWSSecretsConfig(**TLS, **settings).channel_options(True) if "proxy" in k}
out["reconnect_within_s"] = dict(AWSSecretsConfig().channel_options(False))["grpc.max_reconnect_backoff_ms"] / 1000
out["loopback_skips_proxy"] = options(http_proxy="http://proxy.invalid:3128")
out["grpc_target_loopback"] = options(http_proxy="http://proxy.invalid:3128", broker_endpoint="ipv4:127.0.0.1:50051")
out["remote_uses_proxy"] = tls_options(https_proxy="http://proxy.invalid:3128", broker_endpoint="broker.example:50051")
# NO_PROXY comes from the environment, in capitals.
out["no_proxy_names_it"] = tls_options(https_proxy="http://proxy.invalid:3128", broker_endpoint="broker.internal:50051")
# No HTTPS_PROXY: grpc-core must not take http_proxy (set for AWS) itself.
out["remote_without_https_proxy"] = tls_options(broker_endpoint="broker.example:50051")

# An https:// proxy is reached as http://, and the warning says which one.
import io, logging
said = io.StringIO()
logging.getLogger("secrets_broker").addHandler(logging.StreamHandler(said))
out["https_proxy"] = tls_options(https_proxy="https://u:pw@proxy.invalid:8080", broker_endpoint="broker.example:50051")
tls_options(https_proxy="https://proxy.company.invalid:8080", broker_endpoint="broker.example:50051")
out["https_proxy_said"] = said.getvalue().splitlines()
print(json.dumps(out))
"""


def test_the_client_follows_the_guides_semantics(venv, seeded_broker, moto, tmp_path):
    """SecretValue.value is a dict for a JSON object; a stage can be read;
    asyncio errors map to
    the guide's exceptions; SECRET_PREFIX, when set, is the prefix asked
    for (never silently another); the proxy is for AWS: a loopback broker,
    or one NO_PROXY names, is reached directly."""
    broker, _ = seeded_broker
    moto.create_secret("insurecove/staged", "staged-v1")
    moto.put_secret_value("insurecove/staged", "staged-v2")
    probe = tmp_path / "probe.py"
    probe.write_text(GUIDE_SEMANTICS_PROBE)
    # A dead proxy: a broker on loopback must still answer.
    env = package_env(broker, HTTP_PROXY=f"http://127.0.0.1:{support.free_port()}",
                      NO_PROXY="localhost,.internal")
    proc = run(venv, probe, env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    assert out["jwt_value_is_dict"] and out["jwt_text_kept"] and out["as_dict_is_a_copy"], out
    assert out["mistral_value"] == MISTRAL_VALUE
    assert out["staged"] == ["staged-v1", "staged-v2"], out
    assert out["async_missing"] == ["NOT_FOUND", "SECRET_NOT_FOUND", False], out
    assert out["prefix_other"] == "refused: SECRET_PREFIX", out
    assert out["prefix_same"] == MISTRAL_VALUE, out
    assert out["loopback_skips_proxy"] == {"grpc.enable_http_proxy": 0}, out
    assert out["grpc_target_loopback"] == {"grpc.enable_http_proxy": 0}, out
    assert out["remote_uses_proxy"] == {"grpc.http_proxy": "http://proxy.invalid:3128"}, out
    assert out["no_proxy_names_it"] == {"grpc.enable_http_proxy": 0}, out
    assert out["remote_without_https_proxy"] == {"grpc.enable_http_proxy": 0}, out
    assert out["https_proxy"] == {"grpc.http_proxy": "http://u:pw@proxy.invalid:8080"}, out
    assert [line.split(" is reached")[0] for line in out["https_proxy_said"]] == [
        "the proxy https://proxy.invalid:8080", "the proxy https://proxy.company.invalid:8080"], out
    assert out["reconnect_within_s"] <= 5, out


def test_an_unreachable_broker_is_false_not_an_exception(venv, tmp_path):
    env = support.broker_env({"BROKER_ENDPOINT": f"127.0.0.1:{support.free_port()}"})
    proc = run(venv, GUIDE / "health_checks.py", env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"status": "unhealthy", "aws_secrets": "disconnected"}


class Relay:
    """A TCP relay to `target`. It holds each chunk `delay` seconds, each way
    (a broker in another region, or one under load); after `silence()`,
    what the connections open then carry is read and dropped, and nothing
    is closed (a frozen broker, a partition), while connections made later
    are relayed as usual."""

    def __init__(self, target: str, delay: float = 0.0):
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.delay = delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.addr = f"127.0.0.1:{self.listener.getsockname()[1]}"
        # Connections numbered below this one are silent.
        self.silent_below = 0
        self.opened = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def silence(self) -> None:
        with self.lock:
            self.silent_below = self.opened

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self.lock:
                number, self.opened = self.opened, self.opened + 1
            for source, sink in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(number, source, sink), daemon=True).start()

    def _pump(self, number: int, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if self.delay:
                    time.sleep(self.delay)
                if number >= self.silent_below:
                    sink.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()


SLOW_LINK_PROBE = """
import json, time
from secrets_broker.aws_secrets import AWSSecretsManager
started = time.monotonic()
value = AWSSecretsManager().get_secret("mistral-api-key").value
print(json.dumps({"value": value, "took": time.monotonic() - started}))
"""


def test_a_broker_slow_to_connect_to_is_waited_for(venv, start_broker, tmp_path):
    """A broker 600 ms away (round trip): the first read waits for the
    connection, within the client's 10 s, rather than failing at once as
    if nothing answered (grpc-core takes `min_reconnect_backoff_ms` as
    each connection attempt's deadline too)."""
    broker = start_broker()
    relay = Relay(broker.addr, delay=0.3)
    try:
        answer = probe_answer(venv, tmp_path, "slow_link.py", SLOW_LINK_PROBE,
                              support.broker_env({"BROKER_ENDPOINT": relay.addr}))
    finally:
        relay.close()
    assert answer["value"] == support.dev_seed()[MISTRAL], answer
    assert answer["took"] < 8, answer


SILENT_BROKER_PROBE = """
import json, time
from secrets_broker.aws_secrets import AWSSecretsManager, BrokerUnavailableError
started = time.monotonic()
try:
    AWSSecretsManager().get_secret("mistral-api-key")
    print(json.dumps({"read": True}))
except BrokerUnavailableError as error:
    print(json.dumps({"error": str(error), "took": time.monotonic() - started}))
"""


def test_a_broker_that_accepts_but_never_answers_is_named_in_the_timeout(venv, tmp_path):
    """Something at BROKER_ENDPOINT takes the connection and says nothing:
    the read ends at the client's 10 s with the endpoint named and what to
    check, not grpc's bare "Deadline Exceeded"."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(listener.accept()[0]), daemon=True).start()
    endpoint = f"127.0.0.1:{listener.getsockname()[1]}"
    try:
        seen = probe_answer(venv, tmp_path, "silent_broker.py", SILENT_BROKER_PROBE,
                            support.broker_env({"BROKER_ENDPOINT": endpoint}))
    finally:
        listener.close()
        for connection in held:
            connection.close()
    # At 10 s the call's deadline and the connection's unanswered pings
    # (5 s, then 5 s to answer) end it together: either is said so.
    assert seen["error"].startswith((
        f"DEADLINE_EXCEEDED: the broker at BROKER_ENDPOINT={endpoint} did not answer within this client's 10 s: ",
        f"UNAVAILABLE: the broker at BROKER_ENDPOINT={endpoint} did not answer this client's HTTP/2 pings: ",
    )), seen
    assert "taking connections without answering?" in seen["error"], seen
    assert 9 < seen["took"] < 12, seen


UNIX_SOCKET_PROBE = """
import json
from secrets_broker.aws_secrets import AWSSecretsManager
m = AWSSecretsManager()
print(json.dumps({"connected": m.test_connection(), "value": m.get_secret("mistral-api-key").value}))
"""


def test_the_client_reaches_a_broker_on_a_unix_socket(venv, start_broker, tmp_path):
    """BROKER_ENDPOINT=unix:/path: grpc-core would send the path as
    :authority, which the broker's HTTP/2 refuses; the client sends
    `localhost` instead."""
    sock = tmp_path / "broker.sock"
    broker = start_broker(listen=f"unix:{sock}")
    seen = probe_answer(venv, tmp_path, "unix_probe.py", UNIX_SOCKET_PROBE, package_env(broker))
    assert seen == {"connected": True, "value": support.dev_seed()[MISTRAL]}, seen


ENDPOINT_RULES_PROBE = """
import json, sys
from secrets_broker.aws_secrets import AWSSecretsManager, AWSSecretsManagerError, test_aws_connection
try:
    AWSSecretsManager()
    print(json.dumps("made"))
except AWSSecretsManagerError as error:
    # The module's health check says False, as it promises, never raises.
    assert test_aws_connection() is False
    print(json.dumps(str(error)))
"""

CHANGED_SETTINGS_PROBE = """
import asyncio, json
from secrets_broker.aws_secrets import AWSSecretsConfig, AWSSecretsManager, AWSSecretsManagerError
from secrets_broker.aio import AsyncAWSSecretsManager
config = AWSSecretsConfig()
config.broker_endpoint = "192.0.2.2:50051"      # not validated by pydantic
seen = {}
try:
    AWSSecretsManager(config).get_secret("mistral-api-key")
    seen["sync"] = "read"
except AWSSecretsManagerError as error:
    seen["sync"] = str(error)
async def main():
    try:
        await AsyncAWSSecretsManager(config).get_secret("mistral-api-key")
        return "read"
    except AWSSecretsManagerError as error:
        return str(error)
seen["async"] = asyncio.run(main())
print(json.dumps(seen))
"""


def test_settings_changed_after_they_were_made_are_checked_where_channels_are_made(venv, tmp_path):
    seen = probe_answer(venv, tmp_path, "changed.py", CHANGED_SETTINGS_PROBE, support.broker_env({}))
    for client in ("sync", "async"):
        assert "BROKER_ENDPOINT=192.0.2.2:50051 is not a loopback address" in seen[client], seen


@pytest.mark.parametrize("endpoint, tls, refusal", [
    # Plaintext to another host: the broker would refuse to serve it; a
    # value read so could be read or forged on the way.
    ("broker.internal:50051", False, "BROKER_ENDPOINT=broker.internal:50051 is not a loopback address"),
    ("http://192.0.2.2:50051", False, "BROKER_ENDPOINT=http://192.0.2.2:50051 is not a loopback address"),
    ("ipv4:10.0.0.1:50051", False, "is not a loopback address"),
    ("localhost.example.com:50051", False, "is not a loopback address"),
    # Another DNS server decides what "localhost" is.
    ("dns://192.0.2.53/localhost:50051", False, "is not a loopback address"),
    ("dns:///localhost:50051", False, None),
    # http:// must not undo the TLS files, nor https:// go without them.
    ("http://127.0.0.1:50051", True, "BROKER_ENDPOINT is http://, which is plaintext, but mutual TLS"),
    ("https://broker.internal:50051", False, "BROKER_ENDPOINT is https://, which needs mutual TLS"),
    # A user part would connect to the host after it (and is not shown).
    ("http://u:pw@127.0.0.1:1@192.0.2.2:50051", False, "BROKER_ENDPOINT=http://192.0.2.2:50051: only host:port"),
    # gRPC percent-decodes a target and reads a list of addresses: each one
    # must be loopback.
    ("ipv4:127.0.0.1:1,10.0.0.5%3A50051", False, "is not a loopback address"),
    ("ipv4:127.0.0.1:1,10.0.0.5:50051", False, "is not a loopback address"),
    ("ipv6:[::1]:1,%5B2001%3Adb8%3A%3A5%5D%3A50051", False, "is not a loopback address"),
    ("ipv4:127.0.0.1:1,127.0.0.2:1", False, None),
    ("[::1]:50051", False, None),
    # No port: gRPC would take 443, which the broker is rarely on.
    ("[::1]", False, "BROKER_ENDPOINT=[::1] names no port"),
    ("localhost", False, "BROKER_ENDPOINT=localhost names no port: write it with the broker's port"),
    ("dns:///localhost", False, "names no port"),
    # Mutual TLS takes the three files, and not to a unix socket.
    ("broker.internal:50051", "ca only", "needs BROKER_CA_FILE, BROKER_CERT_FILE and BROKER_KEY_FILE together"),
    ("unix:/run/secrets-broker.sock", True, "a unix socket is plaintext"),
    ("http://127.0.0.1:50051/path", False, "only host:port is taken"),
    # Allowed.
    ("http://127.0.0.1:50051", False, None),
    ("localhost:50051", False, None),
    ("ipv6:[::1]:50051", False, None),
    ("unix:/run/secrets-broker.sock", False, None),
    ("https://broker.internal:50051", True, None),
    ("broker.internal:50051", True, None),
])
def test_plaintext_goes_only_to_loopback(venv, tmp_path, endpoint, tls, refusal):
    """As the broker serves and the Rust client connects: plaintext only to
    loopback or a unix socket, said when the client is made."""
    extra = {"BROKER_ENDPOINT": endpoint}
    if tls == "ca only":
        extra.update(BROKER_CA_FILE="ca.pem")
    elif tls:
        # Read only when a channel is made: names are enough here.
        extra.update(BROKER_CA_FILE="ca.pem", BROKER_CERT_FILE="client.pem", BROKER_KEY_FILE="client-key.pem")
    seen = probe_answer(venv, tmp_path, "endpoint_probe.py", ENDPOINT_RULES_PROBE, support.broker_env(extra))
    if refusal is None:
        assert seen == "made", seen
    else:
        assert refusal in seen and seen.startswith("invalid setting: "), seen


DELETION_PROBE = """
import json, sys, time
from secrets_broker.aws_secrets import AWSSecretsManager, SecretNotFoundError
m = AWSSecretsManager()
first = m.get_secret("py-deleted").version_id          # followed by push
m.get_secret("py-deleted", version_id=first)          # a version id, cached too
print(json.dumps({"first": first}), flush=True)
sys.stdin.readline()                                  # the test deletes the secret now
started = time.monotonic()
seen = {}
while time.monotonic() - started < 10 and len(seen) < 2:
    for label, read in (("current", lambda: m.get_secret("py-deleted")),
                        ("version", lambda: m.get_secret("py-deleted", version_id=first))):
        if label not in seen:
            try:
                read()
            except SecretNotFoundError:
                seen[label] = round(time.monotonic() - started, 2)
    time.sleep(0.05)
print(json.dumps(seen), flush=True)
"""


def test_a_deletion_drops_every_version_of_the_secret_from_the_local_cache(venv, seeded_broker, moto, tmp_path):
    """A deleted secret has no readable version: the push that says so
    drops what was read by version id as well as the current value."""
    broker, _ = seeded_broker
    moto.create_secret("insurecove/py-deleted", "py-deleted-value-3c9e")
    proc = start_probe(venv, tmp_path, package_env(broker, SECRET_CACHE_TTL="3600"), DELETION_PROBE)
    try:
        assert "first" in json.loads(proc.stdout.readline())
        time.sleep(0.5)                   # the watch stream is open
        moto.delete_secret("insurecove/py-deleted")
        go_on(proc)
        seen = json.loads(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait(10)
    assert set(seen) == {"current", "version"}, f"still served from the local cache after 10 s: {seen}"


RECREATED_PROBE = """
import json
from secrets_broker.aio import AsyncAWSSecretsManager
from secrets_broker.aws_secrets import AWSSecretsManager, SecretValue, _Entry

OLD = "arn:aws:secretsmanager:us-east-1:123456789012:secret:insurecove/db-AAAAAA"
NEW = "arn:aws:secretsmanager:us-east-1:123456789012:secret:insurecove/db-BBBBBB"

def value(arn, version="v1", text="old-value"):
    return SecretValue(value=text, version_id=version, created_date=None, secret_name="insurecove/db", arn=arn)

HELD = {("db", None): value(OLD), ("db", "id:v1"): value(OLD), ("db", "id:v0"): value(""),
        ("db", "stage:AWSPREVIOUS"): value(OLD, "v0"), ("other", "id:v1"): value(OLD)}

def left(event):
    sync = AWSSecretsManager()
    sync._cache = {key: _Entry(value=held, stored_at=0.0, read_at=0.0) for key, held in HELD.items()}
    sync._rotated("db", event)
    aio = AsyncAWSSecretsManager()
    aio._cache = {key: (held, 0.0) for key, held in HELD.items()}
    aio._rotated("db", event)
    kept = sorted(str(key) for key in sync._cache)
    assert kept == sorted(str(key) for key in aio._cache), (kept, aio._cache.keys())
    return kept

print(json.dumps({
    "created_again": left(value(NEW, "v1", "new-value")),
    "rotated": left(value(OLD, "v2")),
    "deleted": left(None),
}))
"""


def test_an_event_of_a_secret_created_again_drops_its_version_id_reads(venv, tmp_path):
    """A secret deleted and created again under its name (another ARN) may
    reuse its version ids with other values: what was read by version id of
    the old one is dropped from the local cache with the event that says so,
    in both clients; a rotation of the same secret keeps it (a version id's
    value never changes); a deletion drops every read. (An ARN missing on
    either side leaves the version id to say it: `id:v0` has none.)"""
    out = probe_answer(venv, tmp_path, "recreated.py", RECREATED_PROBE, support.broker_env({}))
    assert out["created_again"] == ["('db', 'id:v0')", "('db', None)", "('other', 'id:v1')"], out
    assert out["rotated"] == ["('db', 'id:v0')", "('db', 'id:v1')", "('db', None)", "('other', 'id:v1')"], out
    assert out["deleted"] == ["('other', 'id:v1')"], out


ROTATION_PROBE = """
import json, sys, time
from secrets_broker.aws_secrets import AWSSecretsManager
m = AWSSecretsManager()
first = m.get_secret("mistral-api-key").version_id
for _ in range(30):
    m.get_secret("mistral-api-key")
print(json.dumps({"first": first}), flush=True)
sys.stdin.readline()                      # the test rotates the secret now
started = time.monotonic()
while time.monotonic() - started < 10:
    current = m.get_secret("mistral-api-key")
    if current.version_id != first:
        break
    time.sleep(0.02)
print(json.dumps({"after": current.version_id, "took": time.monotonic() - started, "value": current.as_string() == "rotated-package-value-5f5f"}), flush=True)
"""


def probe_across_a_rotation(venv, broker, tmp_path, probe_text, before_rotation, rotate):
    """Runs a probe (local TTL of an hour) that prints a JSON line, waits on
    its stdin, then prints another: `before_rotation` checks the first,
    `rotate` rotates once the watch streams are open. What both returned,
    and the probe's second line."""
    proc = start_probe(venv, tmp_path, package_env(broker, SECRET_CACHE_TTL="3600"), probe_text)
    try:
        checked = before_rotation(json.loads(proc.stdout.readline()))
        time.sleep(0.5)                   # the watch streams are open
        rotated = rotate()
        go_on(proc)
        after = json.loads(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait(10)
    return checked, rotated, after


def test_a_rotation_reaches_the_local_cache_by_push(venv, seeded_broker, moto, tmp_path):
    broker, versions = seeded_broker
    calls_before = broker.log().count('rpc="GetSecret"')

    def before_rotation(first):
        assert first["first"] == versions[MISTRAL]
        calls = broker.log().count('rpc="GetSecret"') - calls_before
        assert calls < 10, f"31 local reads made {calls} broker calls"
        return calls

    calls, rotated, after = probe_across_a_rotation(
        venv, broker, tmp_path, ROTATION_PROBE, before_rotation,
        lambda: moto.put_secret_value(MISTRAL, "rotated-package-value-5f5f"),
    )
    print(f"rotation in the local cache after {after['took']:.2f} s; {calls} broker reads for 31 local ones")
    assert after["after"] == rotated and after["value"], after
    assert after["took"] < 2.0, after


STAGES_PROBE = """
import asyncio, json, sys, time
from secrets_broker.aws_secrets import AWSSecretsManager
from secrets_broker.aio import AsyncAWSSecretsManager
NAME = "staged-rotation"
def previous(manager):
    return manager.get_secret(NAME, version_stage="AWSPREVIOUS").version_id
alone, bypassing = AWSSecretsManager(), AWSSecretsManager()

async def main():
    aio_alone = AsyncAWSSecretsManager()
    async def aio_previous():
        return (await aio_alone.get_secret(NAME, version_stage="AWSPREVIOUS")).version_id
    # Read by stage alone; read by stage and current.
    before = [previous(alone), await aio_previous(), previous(bypassing), bypassing.get_secret(NAME).version_id]
    print(json.dumps({"before": before}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # the test rotates now
    # The rotation taken by a read that bypasses the cache, before the push.
    bypassed = bypassing.get_secret(NAME, use_cache=False).version_id
    deadline = time.monotonic() + 5
    while True:
        after = [previous(alone), await aio_previous(), previous(bypassing)]
        if len(set(after)) == 1 and after[0] != before[0] or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    print(json.dumps({"bypassed": bypassed, "after": after}), flush=True)
asyncio.run(main())
"""


def test_a_rotation_moves_what_was_read_by_stage(venv, seeded_broker, moto, tmp_path):
    """AWSPREVIOUS read alone, or read beside a current value that a read
    bypassing the cache already moved to the new version, is read again
    once the rotation is pushed (sync and asyncio): not kept for the TTL."""
    broker, _ = seeded_broker
    name = "insurecove/staged-rotation"
    first = moto.create_secret(name, "staged-package-value-1a1a")
    second = moto.put_secret_value(name, "staged-package-value-2b2b")

    def before_rotation(before):
        assert before["before"] == [first, first, first, second], before

    _, third, after = probe_across_a_rotation(
        venv, broker, tmp_path, STAGES_PROBE, before_rotation,
        lambda: moto.put_secret_value(name, "staged-package-value-3c3c"),
    )
    assert after["bypassed"] == third, after
    assert after["after"] == [second, second, second], after


SILENT_PROBE = """
import json, sys, time
from secrets_broker.aws_secrets import AWSSecretsManager
m = AWSSecretsManager()
first = m.get_secret("mistral-api-key").version_id
print(json.dumps({"first": first}), flush=True)
sys.stdin.readline()                      # the connection is silent and the secret rotated now
started = time.monotonic()
while time.monotonic() - started < 40:
    current = m.get_secret("mistral-api-key")
    if current.version_id != first:
        break
    time.sleep(0.1)
print(json.dumps({"after": current.version_id, "took": time.monotonic() - started}), flush=True)
"""


def test_a_broker_connection_gone_silent_is_left_and_the_rotation_still_arrives(venv, seeded_broker, moto, tmp_path):
    """The connection to the broker stops carrying anything without being
    closed: the client's pings notice it (5 s, then 5 s to answer), it
    connects again and its follower hears the rotation it missed. Without
    pings it waited on the dead connection for as long as the kernel kept
    it, serving the old value."""
    broker, versions = seeded_broker
    relay = Relay(broker.addr)
    env = support.broker_env({"BROKER_ENDPOINT": relay.addr, "SECRET_CACHE_TTL": "3600"})
    proc = start_probe(venv, tmp_path, env, SILENT_PROBE)
    try:
        assert json.loads(proc.stdout.readline())["first"] == versions[MISTRAL]
        time.sleep(0.5)                   # the watch stream is open
        relay.silence()
        rotated = moto.put_secret_value(MISTRAL, "rotated-while-silent-2b7c")
        go_on(proc)
        after = json.loads(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait(10)
        relay.close()
    print(f"the rotation reached the local cache {after['took']:.1f} s after the connection went silent")
    assert after["after"] == rotated, f"still the old version after 40 s: {after}"
    assert after["took"] < 25, after


# A parent that read (and follows) a secret, then forks, as gunicorn
# --preload does: the child, whose watch threads did not come along, must
# still hear the rotation.
FORKED_ROTATION_PROBE = """
import json, os, sys, time
from secrets_broker.aws_secrets import AWSSecretsManager, get_mistral_api_key
m = AWSSecretsManager()
first = m.get_secret("mistral-api-key").version_id
get_mistral_api_key()
time.sleep(0.3)                           # the parent's watch stream is open
pid = os.fork()
if pid:
    # The parent keeps what it holds (it may not reach the broker now)
    # and follows it again.
    kept = m.get_cache_stats()["total_entries"]
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"parent": m.get_secret("mistral-api-key").version_id, "kept": kept}), flush=True)
    sys.exit(os.waitstatus_to_exitcode(status))
print(json.dumps({"first": m.get_secret("mistral-api-key").version_id}), flush=True)
sys.stdin.readline()                      # the test rotates the secret now
started = time.monotonic()
while time.monotonic() - started < 10:
    current = m.get_secret("mistral-api-key").version_id
    if current != first:
        break
    time.sleep(0.02)
print(json.dumps({"after": current, "took": time.monotonic() - started, "module": len(get_mistral_api_key()) > 0}), flush=True)
os._exit(0)
"""


def test_a_forked_child_still_hears_rotations(venv, seeded_broker, moto, tmp_path):
    broker, versions = seeded_broker
    proc = start_probe(venv, tmp_path, package_env(broker, SECRET_CACHE_TTL="3600"), FORKED_ROTATION_PROBE)
    try:
        first = json.loads(proc.stdout.readline() or "{}")
        assert first.get("first") == versions[MISTRAL], (first, proc.stderr.read() if proc.poll() is not None else "")
        time.sleep(0.5)                   # the child's watch stream is open
        rotated = moto.put_secret_value(MISTRAL, "rotated-after-fork-7a7a")
        go_on(proc)
        after = json.loads(proc.stdout.readline() or "{}")
        parent = json.loads(proc.stdout.readline() or "{}")
        assert proc.wait(10) == 0, proc.stderr.read()
    finally:
        proc.kill()
        proc.wait(10)
    print(f"rotation in the forked child's cache after {after.get('took', -1):.2f} s")
    assert after.get("after") == rotated and after.get("module"), after
    assert after["took"] < 3.0, after
    assert parent.get("parent") == rotated and parent.get("kept") == 1, parent


CLEAR_CACHE_PROBE = """
import asyncio, json, sys
from secrets_broker.aws_secrets import AWSSecretsConfig, AWSSecretsManager
from secrets_broker.aio import AsyncAWSSecretsManager
m = AWSSecretsManager()
uncached = AWSSecretsManager(AWSSecretsConfig(secret_cache_ttl=0))
am = AsyncAWSSecretsManager()
loop = asyncio.new_event_loop()
def mistral(manager):
    return manager.get_secret("mistral-api-key").as_string()
def step(out):
    print(json.dumps(out), flush=True)
    sys.stdin.readline()                  # the test rotates in moto, unseen by the broker
values = lambda: [mistral(m), m.get_jwt_config()["jwt_issuer"], mistral(uncached),
                  loop.run_until_complete(am.get_secret("mistral-api-key")).as_string()]
step({"first": values()})
out = {"before_clear": values()}
m.clear_cache()
out["sync"] = [mistral(m), m.get_jwt_config()["jwt_issuer"]]
step(out)
uncached.clear_cache()
out = {"uncached": mistral(uncached)}
step(out)
# The uncached instance's reads after its first are the broker's cache's.
out = {"uncached_later": mistral(uncached)}
async def cleared():
    await am.clear_cache()
    return (await am.get_secret("mistral-api-key")).as_string()
out["async"] = loop.run_until_complete(cleared())
print(json.dumps(out), flush=True)
"""


def test_clear_cache_makes_the_next_read_of_each_secret_ask_aws_once(venv, moto, aws_broker, tmp_path):
    """As in the class the package replaces, the first read of a secret
    (or typed config) after clear_cache() reads AWS: through the broker,
    with a bypass read, so a rotation the broker has not seen yet is picked
    up. Only the first: a later read is the broker's cache's again. Each
    client's read after its clear is of a rotation no read has refreshed."""
    moto.seed({MISTRAL: MISTRAL_VALUE, JWT: JWT_VALUE})
    # No events and a sweep far off: the broker learns of a change in moto
    # only by reading AWS.
    broker = aws_broker(["--watch-interval", "1h"])
    proc = start_probe(venv, tmp_path, package_env(broker), CLEAR_CACHE_PROBE)
    read = lambda: json.loads(proc.stdout.readline())
    try:
        first = read()
        assert first["first"] == [MISTRAL_VALUE, "insurecove-package", MISTRAL_VALUE, MISTRAL_VALUE], first
        moto.put_secret_value(MISTRAL, "package-mistral-key-rotated-1")
        moto.put_secret_value(JWT, JWT_VALUE.replace("insurecove-package\"", "insurecove-rotated\""))
        go_on(proc)
        out = read()
        # Nothing told the broker: without a clear, every reader has the old values.
        assert out["before_clear"] == first["first"], out
        assert out["sync"] == ["package-mistral-key-rotated-1", "insurecove-rotated"], out
        moto.put_secret_value(MISTRAL, "package-mistral-key-rotated-2")
        go_on(proc)
        assert read() == {"uncached": "package-mistral-key-rotated-2"}
        moto.put_secret_value(MISTRAL, "package-mistral-key-rotated-3")
        go_on(proc)
        out = read()
        # No local cache (TTL 0), yet the second read after the clear is
        # the broker's cached value, not AWS's; the asyncio client's read
        # after its clear is AWS's.
        assert out == {"uncached_later": "package-mistral-key-rotated-2",
                       "async": "package-mistral-key-rotated-3"}, out
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


CLIENT_EDGES_PROBE = """
import json, sys, threading, time
import os
import socket
from secrets_broker.aws_secrets import AWSSecretsConfig, AWSSecretsManager, AWSSecretsManagerError
out = {}
# SECRET_CACHE_TTL as the broker reads it; a bad one is the package's error.
os.environ["SECRET_CACHE_TTL"] = "5m"
out["ttl_5m"] = AWSSecretsManager().config.secret_cache_ttl
os.environ["SECRET_CACHE_TTL"] = "0.5m"
out["ttl_half_minute"] = AWSSecretsManager().config.secret_cache_ttl
for unit in ("5M", "2w"):  # months and weeks: the broker refuses them
    os.environ["SECRET_CACHE_TTL"] = unit
    try:
        AWSSecretsManager()
        out["ttl_" + unit] = "accepted"
    except AWSSecretsManagerError as error:
        out["ttl_" + unit] = "refused" if "is not one of ms, s, m (minutes), h and d" in str(error) else str(error)
os.environ["SECRET_CACHE_TTL"] = "3600"
# As the broker reads them: trimmed, and empty is the default.
os.environ["SECRET_PREFIX"], os.environ["AWS_DEFAULT_REGION"] = " insurecove ", ""
trimmed = AWSSecretsConfig()
out["prefix_region"] = [trimmed.secret_prefix, trimmed.aws_default_region]
# Empty is unset (no prefix check), and hides the .env's value, as in the broker.
with open(".env", "w") as dotenv:
    dotenv.write("SECRET_PREFIX=fromdotenv\\n")
os.environ["SECRET_PREFIX"] = ""
empty = AWSSecretsConfig()
out["empty_prefix"] = [empty.secret_prefix, "secret_prefix" in empty.model_fields_set]
os.remove(".env")
del os.environ["SECRET_PREFIX"], os.environ["AWS_DEFAULT_REGION"]
os.environ["SECRET_CACHE_TTL"] = "-5"
try:
    AWSSecretsManager()
    out["ttl_negative"] = "accepted"
except AWSSecretsManagerError as error:
    out["ttl_negative"] = "refused" if "SECRET_CACHE_TTL" in str(error) else str(error)
os.environ["SECRET_CACHE_TTL"] = "3600"
# BROKER_MAX_STALE reads as SECRET_CACHE_TTL does, with a default of its own.
max_stale = []
for text in ("2m", " ", "-1"):
    os.environ["BROKER_MAX_STALE"] = text
    try:
        max_stale.append(AWSSecretsManager().config.broker_max_stale)
    except AWSSecretsManagerError as error:
        max_stale.append("refused" if "BROKER_MAX_STALE" in str(error) and "0 serves nothing" in str(error)
                         else str(error))
del os.environ["BROKER_MAX_STALE"]
out["max_stale"] = max_stale
m = AWSSecretsManager()

# The package's DEBUG lines stay one line whatever the name asked.
import io, logging
captured = io.StringIO()
handler = logging.StreamHandler(captured)
logging.getLogger("secrets_broker").addHandler(handler)
logging.getLogger("secrets_broker").setLevel(logging.DEBUG)
try:
    m.get_secret("x\\nLOG forged line")
except AWSSecretsManagerError:
    pass
logging.getLogger("secrets_broker").removeHandler(handler)
out["debug_lines"] = captured.getvalue().splitlines()

# Changing a returned value changes nothing in the cache.
m.get_secret("production/jwt").value["jwt_algorithm"] = "MUTATED"
out["value_is_the_callers"] = m.get_secret("production/jwt").value["jwt_algorithm"]

# clear_cache while threads read: every watch stream it stops is cancelled,
# even one still opening.
stop = threading.Event()
def read():
    while not stop.is_set():
        m.get_secret("mistral-api-key")
readers = [threading.Thread(target=read) for _ in range(4)]
for t in readers: t.start()
for _ in range(200):
    m.clear_cache()
stop.set()
for t in readers: t.join()
m.clear_cache()
deadline = time.monotonic() + 10
while time.monotonic() < deadline and any(t.name.startswith("watch-") for t in threading.enumerate()):
    time.sleep(0.05)
out["watch_threads_left"] = sum(1 for t in threading.enumerate() if t.name.startswith("watch-"))

# A binary value that is not text is an AWSSecretsManagerError to read as text.
try:
    m.get_secret("binary-blob").as_string()
    out["binary"] = "read as text"
except AWSSecretsManagerError as error:
    out["binary"] = "refused: " + ("binary" if "binary" in str(error) else str(error))

# A typed config outside SECRET_PREFIX is refused, as get_secret is.
try:
    AWSSecretsManager(AWSSecretsConfig(secret_prefix="acme")).get_jwt_config()
    out["config_prefix_other"] = "served"
except AWSSecretsManagerError as error:
    out["config_prefix_other"] = "refused" if "SECRET_PREFIX=acme" in str(error) else str(error)

# Typed configs are cached, and a rotation of their secret reaches them by push.
first = m.get_jwt_config()
for _ in range(20):
    m.get_jwt_config()
print(json.dumps({"first_issuer": first["jwt_issuer"]}), flush=True)
sys.stdin.readline()                      # the test counts calls, then rotates
started = time.monotonic()
while time.monotonic() - started < 10 and m.get_jwt_config()["jwt_issuer"] == first["jwt_issuer"]:
    time.sleep(0.02)
out["rotated_issuer"] = m.get_jwt_config()["jwt_issuer"]
out["took"] = time.monotonic() - started

# The asyncio variant: push, coroutines throughout, and a second event loop.
import asyncio
from secrets_broker.aio import AsyncAWSSecretsManager
am = AsyncAWSSecretsManager()
async def pushed():
    before = (await am.get_secret("production/jwt")).as_dict()["jwt_issuer"]
    await asyncio.sleep(0.5)              # the watch stream is open
    print(json.dumps({"async_ready": before}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    started = time.monotonic()
    while time.monotonic() - started < 10:
        now = (await am.get_secret("production/jwt")).as_dict()["jwt_issuer"]
        if now != before:
            break
        await asyncio.sleep(0.02)
    stats = await am.get_cache_stats()
    await am.clear_cache()
    return [now, time.monotonic() - started, stats["total_entries"]]
out["async_push"] = asyncio.run(pushed())
out["second_loop"] = asyncio.run(am.get_secret("mistral-api-key")).as_string()
print(json.dumps(out), flush=True)
"""


def test_the_client_at_its_edges(venv, seeded_broker, moto, tmp_path):
    """A returned value is the caller's own; clear_cache under load leaves
    no watch stream behind; a binary value that is not text is refused as
    text with the package's error; typed configs are guarded by
    SECRET_PREFIX, cached, and kept fresh by push."""
    broker, _ = seeded_broker
    moto.create_secret("insurecove/binary-blob", b"\xff\xfe\x00binary")
    calls_before = broker.log().count('rpc="GetJwtConfig"')
    proc = start_probe(venv, tmp_path, package_env(broker, SECRET_CACHE_TTL="3600"), CLIENT_EDGES_PROBE)
    try:
        first = json.loads(proc.stdout.readline() or "null")
        assert first, proc.stderr.read() if proc.poll() is not None else "no first line"
        calls = broker.log().count('rpc="GetJwtConfig"') - calls_before
        time.sleep(0.5)                   # the config's watch stream is open
        rotated = json.loads(JWT_VALUE)
        rotated["jwt_issuer"] = "rotated-issuer"
        moto.put_secret_value(JWT, json.dumps(rotated))
        go_on(proc)
        ready = json.loads(proc.stdout.readline() or "null")
        assert ready and ready["async_ready"] == "rotated-issuer", proc.stderr.read() if proc.poll() is not None else ready
        rotated["jwt_issuer"] = "rotated-again"
        moto.put_secret_value(JWT, json.dumps(rotated))
        go_on(proc)
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        out = json.loads(line)
    finally:
        proc.kill()
        proc.wait(10)
    print(out, f"{calls} GetJwtConfig calls for 21 reads")
    assert out["value_is_the_callers"] == "HS256", out
    assert out["max_stale"] == [120, 30, "refused"], out
    assert out["ttl_5m"] == 300 and out["ttl_negative"] == "refused", out
    assert out["ttl_half_minute"] == 30 and out["ttl_5M"] == out["ttl_2w"] == "refused", out
    assert out["prefix_region"] == ["insurecove", "ap-east-1"] and out["empty_prefix"] == ["insurecove", False], out
    assert out["debug_lines"] and not any(line.startswith("LOG forged") for line in out["debug_lines"]), out
    assert out["watch_threads_left"] == 0, out
    assert out["binary"] == "refused: binary", out
    assert out["config_prefix_other"] == "refused", out
    # 21 reads: one for the refused SECRET_PREFIX probe, one for the first read.
    assert calls <= 2, f"21 typed config reads made {calls} broker calls"
    assert out["rotated_issuer"] == "rotated-issuer" and out["took"] < 2.0, out
    issuer, took, entries = out["async_push"]
    assert issuer == "rotated-again" and took < 2.0 and entries == 1, out
    assert out["second_loop"] == MISTRAL_VALUE, out


def test_access_denied_under_mtls(venv, start_tls_broker, tls_files, pki, tmp_path):
    tls_files.write_policy(policy_toml({"identity": AUTH, "secrets": ["insurecove/production/jwt"]}))
    broker = start_tls_broker()
    env = support.broker_env({
        "BROKER_ENDPOINT": broker.addr,
        "BROKER_CA_FILE": str(pki.ca1.cert_path),
        "BROKER_CERT_FILE": str(pki.auth.cert_path),
        "BROKER_KEY_FILE": str(pki.auth.key_path),
        "BROKER_TLS_DOMAIN": "localhost",
    })
    proc = run(venv, GUIDE / "error_handling.py", env, "mistral-api-key", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "ERROR Access denied - check IAM permissions" in proc.stdout, proc.stdout
    allowed = "from secrets_broker.aws_secrets import AWSSecretsManager as M; print(M().get_jwt_config()['jwt_algorithm'])"
    ok = subprocess.run([str(venv), "-c", allowed], env=env, capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert ok.stdout.strip() == "HS256", ok.stdout + ok.stderr

    # The transport's failures say what to check: plaintext to a TLS broker,
    # a CA that did not sign the broker's certificate, a closed port.
    probe = (
        "from secrets_broker.aws_secrets import AWSSecretsManager as M, BrokerUnavailableError as E\n"
        "try:\n    M().get_secret('mistral-api-key')\nexcept E as error:\n    print(error)\n"
    )
    cases = {
        "plaintext": ({"BROKER_CA_FILE": "", "BROKER_CERT_FILE": "", "BROKER_KEY_FILE": ""}, "a TLS broker (set BROKER_CA_FILE"),
        "wrong CA": ({"BROKER_CA_FILE": str(pki.auth.cert_path)}, "not signed by the CA of BROKER_CA_FILE"),
        "closed": ({"BROKER_ENDPOINT": f"127.0.0.1:{support.free_port()}"}, "nothing answers at BROKER_ENDPOINT"),
        "another name": ({"BROKER_TLS_DOMAIN": "other.invalid"}, "set BROKER_TLS_DOMAIN to the name"),
        "untrusted client": (
            {"BROKER_CERT_FILE": str(pki.foreign.cert_path), "BROKER_KEY_FILE": str(pki.foreign.key_path)},
            "refused this client's certificate",
        ),
    }
    for case, (changes, told) in cases.items():
        told_env = {**env, **changes}
        shown = subprocess.run([str(venv), "-c", probe], env=told_env, capture_output=True, text=True, timeout=30,
                               cwd=tmp_path)
        assert told in shown.stdout, (case, shown.stdout, shown.stderr[-500:])


def test_the_fastapi_example_under_uvicorn(venv, seeded_broker, tmp_path):
    broker, _ = seeded_broker
    port = support.free_port()
    uvicorn = venv.parent / "uvicorn"
    log = tmp_path / "uvicorn.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [str(uvicorn), "app:app", "--host", "127.0.0.1", "--port", str(port)],
            cwd=FASTAPI, env=package_env(broker), stdout=out, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 30
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            while True:
                try:
                    with opener.open(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
                        health = json.loads(answer.read())
                    break
                except OSError:
                    assert server.poll() is None, log.read_text()
                    assert time.monotonic() < deadline, log.read_text()
                    time.sleep(0.2)
        finally:
            server.terminate()
            server.wait(10)
    assert health == {"status": "healthy", "aws_secrets": "connected"}, health
    assert "Secrets loaded successfully" in log.read_text()


def test_the_package_is_typed_strictly(venv):
    mypy = venv.parent / "mypy"
    proc = subprocess.run(
        [str(mypy), "--strict", str(PACKAGE / "src" / "secrets_broker")],
        capture_output=True, text=True, timeout=300, cwd=PACKAGE,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_shipped_stubs_match_the_contract(tmp_path, proto_dir):
    out = tmp_path / "generated"
    gen = subprocess.run(
        ["bash", str(PACKAGE / "gen.sh"), str(out)],
        env=support.broker_env({"PYTHON": sys.executable, "PROTO_DIR": str(proto_dir)}),
        capture_output=True, text=True, timeout=120,
    )
    assert gen.returncode == 0, gen.stdout + gen.stderr
    for generated in sorted((out / "secretsbroker" / "v1").glob("*")):
        shipped = PACKAGE / "src" / "secretsbroker" / "v1" / generated.name
        assert shipped.read_bytes() == generated.read_bytes(), f"{shipped} is stale: run clients/python/gen.sh"


THROWAWAY_PROBE = """
import asyncio, json, threading, time
from secrets_broker.aws_secrets import AWSSecretsManager
from secrets_broker.aio import AsyncAWSSecretsManager

# More instances than the broker's calls per connection (64 here), which
# every channel of the process shares: each used once and dropped.
for _ in range(100):
    AWSSecretsManager().get_secret("mistral-api-key")
    AWSSecretsManager().get_jwt_config()
def watch_threads():
    return sum(1 for t in threading.enumerate() if t.name.startswith("watch-"))
deadline = time.monotonic() + 10
while watch_threads() > 0 and time.monotonic() < deadline:
    time.sleep(0.05)
threads = watch_threads()

async def main():
    for _ in range(200):
        await AsyncAWSSecretsManager().get_secret("mistral-api-key")
    await asyncio.sleep(0.5)
    return sum(1 for t in asyncio.all_tasks() if t.get_name().startswith("watch-"))
tasks = asyncio.run(main())

kept = AWSSecretsManager()
kept.get_secret("mistral-api-key")
time.sleep(0.3)
print(json.dumps({"threads": threads, "tasks": tasks, "kept_follows": watch_threads()}))
"""


def test_instances_used_once_and_dropped_leave_nothing_behind(venv, start_broker, tmp_path):
    """The guide's services make an instance per call (its health check
    does): each dropped instance stops its watch threads (tasks) and its
    streams, so the 65th is served like the first (the broker allows 64
    streams a connection here, 1,024 by default)."""
    broker = start_broker(["--max-concurrent-calls-per-connection", "64"])
    probe = tmp_path / "throwaway.py"
    probe.write_text(THROWAWAY_PROBE)
    proc = subprocess.run(
        [str(venv), str(probe)], env=package_env(broker), cwd=tmp_path,
        capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout)
    assert seen["threads"] == 0, f"watch threads of dropped instances still running: {seen}"
    assert seen["tasks"] == 0, seen
    assert seen["kept_follows"] == 1, f"an instance still held follows its secret by push: {seen}"


EDGES_OF_THE_ERRORS = """
import json, grpc
from secrets_broker.aws_secrets import (
    AWSSecretsConfig, AWSSecretsManager, BrokerUnavailableError, SecretValue, _older_news, _read_at, _refuse_stale_bypass,
    _transport_hint, get_mistral_api_key,
)
from secretsbroker.v1 import secret_pb2
import time

# A value held since a push (learned 5 s ago) against a broker's answer of
# the version before: older news when that broker read it from AWS before.
def _answer(version, hit, age):
    secret = secret_pb2.Secret(name="insurecove/k", version_id=version, string_value="x")
    secret.cache.hit = hit
    secret.cache.age.seconds = age
    return secret

held = SecretValue.from_proto(_answer("v2", True, 0))
older = {
    case: _older_news(held, time.monotonic() - 5, SecretValue.from_proto(answer), _read_at(answer, time.monotonic()))
    for case, answer in {
        "cached before the push": _answer("v1", True, 60),
        "cached after the push": _answer("v1", True, 1),
        "read from AWS now": _answer("v1", False, 0),
        "the version held": _answer("v2", True, 60),
    }.items()
}

stale = secret_pb2.Secret(name="insurecove/mistral-api-key")
stale.cache.stale = True
stale.cache.age.seconds = 420
_refuse_stale_bypass(stale, use_cache=True)            # the stale value is what the cache gives
try:
    _refuse_stale_bypass(stale, use_cache=False)
    refused = None
except BrokerUnavailableError as error:
    refused = [str(error), error.code.name, error.reason]
_refuse_stale_bypass(secret_pb2.Secret(name="x"), use_cache=False)   # fresh: fine

TLS = dict(broker_ca_file="ca.pem", broker_cert_file="client.pem", broker_key_file="client-key.pem")
plain = AWSSecretsConfig(broker_endpoint="broker.internal:50051", **TLS)
proxied = AWSSecretsConfig(broker_endpoint="broker.internal:50051", https_proxy="http://u:p@proxy:3128", **TLS)
tls = AWSSecretsConfig(broker_endpoint="127.0.0.1:50051", **TLS)
print(json.dumps({
    "refused": refused,
    "refused_message": _transport_hint("failed to connect to all addresses; Connection refused", plain),
    "through_proxy": _transport_hint("failed to connect to all addresses; Connection refused", proxied),
    "name_mismatch": _transport_hint("failed to connect to all addresses; last error: UNKNOWN: "
                                     "ipv4:127.0.0.1:50051: Peer name 127.0.0.1 is not in peer certificate", tls),
    "mistral": get_mistral_api_key(),
    "stats_after_a_config": (lambda m: (m.get_jwt_config(), m.get_cache_stats()["total_entries"])[1])(AWSSecretsManager()),
    "configs_shown": (lambda m: (m.get_jwt_config(), repr(list(m._configs.values())))[1])(AWSSecretsManager()),
    "older": older,
    "settings_shown": [f(AWSSecretsConfig(aws_secret_access_key="KEY-NOT-TO-SHOW", https_proxy="http://u:pw@p:3128",
                                          http_proxy="http://u:pw@p:3128"))
                       for f in (repr, str)],
}))
"""


def test_the_errors_say_what_to_change(venv, start_broker, tmp_path):
    broker = start_broker()
    seen = probe_answer(venv, tmp_path, "edges.py", EDGES_OF_THE_ERRORS, package_env(broker))
    message, code, reason = seen["refused"]
    assert (code, reason) == ("UNAVAILABLE", "UPSTREAM_UNAVAILABLE"), seen
    assert "use_cache=False" in message and "420 s ago" in message, message
    assert "nothing answers at BROKER_ENDPOINT=broker.internal:50051" in seen["refused_message"]
    assert "through the proxy http://proxy:3128 (HTTPS_PROXY)" in seen["through_proxy"], seen
    assert "NO_PROXY" in seen["through_proxy"] and "u:p" not in seen["through_proxy"], seen
    assert "BROKER_TLS_DOMAIN" in seen["name_mismatch"], seen
    assert seen["mistral"] == support.dev_seed()[MISTRAL]
    assert seen["stats_after_a_config"] == 1, "a typed config counts in the local cache's stats"
    # A broker behind a rotation pushed from another replica does not
    # take the value back at a TTL's end; one that read it since does.
    assert seen["older"] == {
        "cached before the push": True, "cached after the push": False,
        "read from AWS now": False, "the version held": False,
    }, seen
    # A service that logs its settings or the package's state shows no
    # secret: not the AWS key, a proxy's password, or a typed config.
    jwt_secret = support.seed_json("production/jwt")["jwt_secret_key"]
    assert "_ConfigEntry(" in seen["configs_shown"] and jwt_secret not in seen["configs_shown"], seen
    for shown in seen["settings_shown"]:
        assert "KEY-NOT-TO-SHOW" not in shown and "u:pw" not in shown, shown
        assert "secret_prefix='insurecove'" in shown, shown


MALFORMED_PROBE = """
import asyncio, json
from secrets_broker.aws_secrets import AWSSecretsManager, MalformedSecretError
from secrets_broker.aio import AsyncAWSSecretsManager

def seen(error):
    return [type(error).__name__, error.code.name, error.reason, error.metadata, str(error)]

try:
    AWSSecretsManager().get_jwt_config()
    sync = "no error"
except MalformedSecretError as error:
    sync = seen(error)

async def main():
    try:
        await AsyncAWSSecretsManager().get_jwt_config()
        return "no error"
    except MalformedSecretError as error:
        return seen(error)
print(json.dumps({"sync": sync, "async": asyncio.run(main())}))
"""


def test_a_malformed_config_says_its_field_in_the_errors_metadata(venv, start_broker, tmp_path):
    """The package's errors carry the broker's ErrorInfo metadata, so a
    service can branch on the field at fault, never seeing the value."""
    jwt = json.loads(JWT_VALUE)
    del jwt["jwt_issuer"]
    jwt["jwt_secret_key"] = "SENTINEL-malformed-7d21"
    data = {"secrets": [{"name": "production/jwt", "versions": [{"value": json.dumps(jwt)}]}]}
    support.register_secrets_file(data)                 # for the leak scan
    path = tmp_path / "secrets.json"
    path.write_text(json.dumps(data))
    broker = start_broker(["--secrets-file", str(path)])
    seen = probe_answer(venv, tmp_path, "malformed.py", MALFORMED_PROBE, package_env(broker))
    for client in ("sync", "async"):
        kind, code, reason, metadata, text = seen[client]
        assert (kind, code, reason) == ("MalformedSecretError", "FAILED_PRECONDITION", "MALFORMED_SECRET"), seen
        assert metadata.get("field") == "jwt_issuer", seen
        assert metadata.get("secret_name") == JWT, seen
        assert "SENTINEL" not in text and "SENTINEL" not in json.dumps(metadata), seen


MANY_NAMES_PROBE = """
import asyncio, json, time
from secrets_broker.aws_secrets import AWSSecretsManager
from secrets_broker.aio import AsyncAWSSecretsManager

def names(first, last):
    return [f"many-{i}" for i in range(first, last)]

m = AWSSecretsManager()
for name in names(0, 600):
    m.get_secret(name)
time.sleep(1.2)                         # SECRET_CACHE_TTL=1: all expired
for name in names(600, 1100):
    m.get_secret(name)
sync = m.get_cache_stats()
m.close()

# Typed configs count as entries, and are swept as secrets are.
m = AWSSecretsManager()
for i in range(600):
    m.get_database_config(f"config-{i}")
time.sleep(1.2)
for name in names(600, 1100):
    m.get_secret(name)
configs = m.get_cache_stats()
m.close()

async def main():
    async with AsyncAWSSecretsManager() as a:
        for name in names(0, 600):
            await a.get_secret(name)
        await asyncio.sleep(1.2)
        for name in names(600, 1100):
            await a.get_secret(name)
        return await a.get_cache_stats()
print(json.dumps({"sync": sync, "configs": configs, "async": asyncio.run(main())}))
"""


def test_a_process_reading_many_names_once_does_not_keep_them_all(venv, start_broker, tmp_path):
    """1,100 distinct names read once each with SECRET_CACHE_TTL=1: what
    expired and is not followed is dropped as the cache grows (the 256
    followed names stay, kept current by their watch), rather than every
    value read ever staying in the process."""
    data = {"secrets": [
        *({"name": f"many-{i}", "versions": [{"value": f"many-value-{i}"}]} for i in range(1100)),
        *({"name": f"config-{i}", "versions": [{"value": DATABASE_VALUE}]} for i in range(600)),
    ]}
    support.register_secrets_file(data)                 # for the leak scan
    path = tmp_path / "secrets.json"
    path.write_text(json.dumps(data))
    broker = start_broker(["--secrets-file", str(path)])
    seen = probe_answer(venv, tmp_path, "many_names.py", MANY_NAMES_PROBE,
                        package_env(broker, SECRET_CACHE_TTL="1"))
    for client in ("sync", "configs", "async"):
        stats = seen[client]
        # Swept at 1,024 entries: the 600 first, expired, less the 256 followed.
        assert stats["total_entries"] <= 1100 - (600 - 256), seen
        assert stats["valid_entries"] >= 500, seen


NO_LOCAL_CACHE_PROBE = """
import asyncio, json, threading, time
from secrets_broker.aws_secrets import AWSSecretsManager
from secrets_broker.aio import AsyncAWSSecretsManager
m = AWSSecretsManager()
values = [m.get_secret("mistral-api-key").as_string() for _ in range(3)]
time.sleep(0.3)

async def main():
    a = AsyncAWSSecretsManager()
    await a.get_secret("mistral-api-key")
    await asyncio.sleep(0.3)
    return sum(1 for t in asyncio.all_tasks() if t.get_name().startswith("watch-"))
print(json.dumps({"same": len(set(values)) == 1, "threads": threading.active_count(),
                  "entries": m.get_cache_stats()["total_entries"], "tasks": asyncio.run(main())}))
"""


def test_with_the_local_cache_off_every_read_asks_the_broker_and_nothing_is_followed(venv, start_broker, tmp_path):
    broker = start_broker()
    seen = probe_answer(venv, tmp_path, "no_cache.py", NO_LOCAL_CACHE_PROBE, package_env(broker, SECRET_CACHE_TTL="0"))
    assert seen == {"same": True, "threads": 1, "entries": 0, "tasks": 0}, seen
    assert broker.log().count('rpc="GetSecret"') == 4, "each read went to the broker"


AIO_CONTEXT_PROBE = """
import asyncio, json
from secrets_broker.aio import AsyncAWSSecretsManager

def following():
    return sum(1 for t in asyncio.all_tasks() if t.get_name().startswith("watch-") and not t.done())

async def main():
    async with AsyncAWSSecretsManager() as secrets:
        value = (await secrets.get_secret("mistral-api-key")).as_string()
        await asyncio.sleep(0.3)
        inside = following()
    await asyncio.sleep(0.1)
    return {"value": value, "inside": inside, "after": following(), "channel": secrets._channel is None}
print(json.dumps(asyncio.run(main())))
"""


def test_the_asyncio_client_is_an_async_context_manager(venv, start_broker, tmp_path):
    """`async with`, as the sync client's `with`: leaving it stops the
    watch tasks and closes the connection."""
    broker = start_broker()
    seen = probe_answer(venv, tmp_path, "aio_context.py", AIO_CONTEXT_PROBE, package_env(broker))
    assert seen == {"value": support.dev_seed()[MISTRAL], "inside": 1, "after": 0, "channel": True}, seen


AIO_DELETED_PROBE = """
import asyncio, sys
from secrets_broker.aio import AsyncAWSSecretsManager
am = AsyncAWSSecretsManager()
async def main():
    for name in sys.argv[1:]:
        await am.get_secret(name)
    print("read", flush=True)
    # The loop (and the manager) stay alive until the test is done.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
asyncio.run(main())
"""


def test_an_asyncio_follower_of_a_deleted_secret_ends_its_stream_on_the_broker(venv, seeded_broker, moto, stubs, tmp_path):
    """DELETED ends the local following, sync or asyncio: the broker must
    not be left holding one stream per deleted name for the life of the
    process."""
    broker, _ = seeded_broker
    names = [f"insurecove/aio-deleted-{i}" for i in range(3)]
    for name in names:
        moto.create_secret(name, "aio-deleted-value-77c1")
    watchers = lambda: broker.admin().GetCacheStats(stubs.admin_service_pb2.GetCacheStatsRequest(), timeout=10).watchers
    proc = start_probe(venv, tmp_path, package_env(broker, SECRET_CACHE_TTL="3600"), AIO_DELETED_PROBE, *names)
    try:
        assert proc.stdout.readline().strip() == "read", proc.stderr.read()
        deadline = time.monotonic() + 10
        while watchers() < len(names):
            assert time.monotonic() < deadline, f"{watchers()} streams open"
            time.sleep(0.1)
        for name in names:
            moto.client.delete_secret(SecretId=name, ForceDeleteWithoutRecovery=True)
        deadline = time.monotonic() + 15
        while watchers() > 0:
            assert time.monotonic() < deadline, f"{watchers()} streams still open on the broker"
            time.sleep(0.2)
        assert proc.poll() is None, "the probe is still running: its manager is alive"
    finally:
        proc.kill()
        proc.wait(10)


DEBUG_LOG_PROBE = """
import io, json, logging
stream = io.StringIO()
logging.basicConfig(level=logging.DEBUG, stream=stream)
from secrets_broker.aws_secrets import AWSSecretsManager, SecretNotFoundError
m = AWSSecretsManager()
value = m.get_secret("mistral-api-key").as_string()
m.get_secret("mistral-api-key")
try:
    m.get_secret("no-such-secret")
except SecretNotFoundError:
    pass
lines = [line for line in stream.getvalue().splitlines() if "get_secret" in line]
print(json.dumps({"lines": lines, "value_logged": value in stream.getvalue()}))
"""


def test_at_debug_each_read_says_where_it_was_answered_from(venv, dev_broker, tmp_path):
    """As the guide's class logged its AWS calls at DEBUG: a read from the
    local cache, one from the broker (its cache or AWS) and a refusal each
    make a line; the value never does."""
    out = probe_answer(venv, tmp_path, "debug_log.py", DEBUG_LOG_PROBE, package_env(dev_broker))
    lines = out["lines"]
    assert any("get_secret mistral-api-key: version" in line for line in lines), lines
    assert any("get_secret mistral-api-key: from the local cache" in line for line in lines), lines
    assert any("get_secret no-such-secret: the broker answered StatusCode.NOT_FOUND" in line for line in lines), lines
    assert not out["value_logged"], lines


CLOSE_IN_FLIGHT_PROBE = """
import asyncio, json, sys
from secrets_broker.aio import AsyncAWSSecretsManager
from secrets_broker.aws_secrets import AWSSecretsManagerError

async def main():
    m = AsyncAWSSecretsManager()
    await m.get_secret("mistral-api-key")
    print("read", flush=True)
    sys.stdin.readline()
    # AWS hangs (the test stopped moto): a bypass read waits on it.
    read = asyncio.ensure_future(m.get_secret("mistral-api-key", use_cache=False))
    await asyncio.sleep(0.5)
    await m.close()
    try:
        await read
        return {"outcome": "answered"}
    except AWSSecretsManagerError as error:
        return {"outcome": type(error).__name__, "code": error.code.name, "message": str(error)}
    except BaseException as error:
        return {"outcome": type(error).__name__}

print(json.dumps(asyncio.run(main())))
"""


def run_while_aws_hangs(venv, broker, moto, tmp_path, probe_text: str) -> tuple[dict, str]:
    """Runs a probe that prints "read" once it has read, then waits on its
    stdin; moto is stopped (SIGSTOP: AWS hangs) while the probe goes on.
    The JSON the probe prints last, and its stderr."""
    probe = tmp_path / "hanging_aws_probe.py"
    probe.write_text(probe_text)
    proc = subprocess.Popen(
        [str(venv), str(probe)], env=package_env(broker), cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.PIPE,
    )
    try:
        assert proc.stdout.readline() == "read\n", proc.stderr.read() if proc.poll() is not None else ""
        moto.proc.send_signal(signal.SIGSTOP)
        out, err = proc.communicate("go\n", timeout=60)
    finally:
        moto.proc.send_signal(signal.SIGCONT)
        proc.kill()
    return json.loads(out or "{}"), err


def test_an_asyncio_read_cut_by_close_raises_the_packages_error(venv, seeded_broker, moto, tmp_path):
    """close() with a read under way: the read fails as the sync client's
    does (AWSSecretsManagerError, CANCELLED), not with an
    asyncio.CancelledError in a task nobody cancelled."""
    broker, _ = seeded_broker
    seen, err = run_while_aws_hangs(venv, broker, moto, tmp_path, CLOSE_IN_FLIGHT_PROBE)
    assert seen.get("outcome") == "AWSSecretsManagerError" and seen.get("code") == "CANCELLED", (seen, err[-2000:])
    assert "close()" in seen["message"], seen


REFRESH_WHILE_AWS_HANGS_PROBE = """
import asyncio, json, sys, time
from secrets_broker.aws_secrets import AWSSecretsManager
from secrets_broker.aio import AsyncAWSSecretsManager
m, am = AWSSecretsManager(), AsyncAWSSecretsManager()
m.get_secret("mistral-api-key"), m.get_jwt_config()
asyncio.run(am.get_secret("mistral-api-key"))
print("read", flush=True)
sys.stdin.readline()                      # AWS hangs now
def timed(read):
    started = time.monotonic()
    value = read()
    return [value, round(time.monotonic() - started, 2)]
m.clear_cache()
out = {"sync": timed(lambda: m.get_secret("mistral-api-key").as_string()),
       "typed": timed(lambda: m.get_jwt_config()["jwt_issuer"])}
async def aio_read():
    await am.clear_cache()
    started = time.monotonic()
    value = (await am.get_secret("mistral-api-key")).as_string()
    return [value, round(time.monotonic() - started, 2)]
out["aio"] = asyncio.run(aio_read())
print(json.dumps(out), flush=True)
"""


def test_the_first_read_after_clear_cache_does_not_stall_while_aws_hangs(venv, seeded_broker, moto, tmp_path):
    """After clear_cache() a read asks AWS through the broker; with AWS
    hanging it takes the broker's copy after REFRESH_WAIT (2 s), not at
    the call timeout (10 s): sync, typed and asyncio reads."""
    broker, _ = seeded_broker
    seen, err = run_while_aws_hangs(venv, broker, moto, tmp_path, REFRESH_WHILE_AWS_HANGS_PROBE)
    assert seen, err[-2000:]
    assert seen["sync"][0] == MISTRAL_VALUE and seen["aio"][0] == MISTRAL_VALUE, seen
    assert seen["typed"][0] == "insurecove-package", seen
    # REFRESH_WAIT, and a busy machine's slack; the call timeout is 10 s.
    assert all(took < 5.0 for _, took in seen.values()), seen


# Reads through a broker restart: the broker stops, the local TTL passes,
# the broker comes back. Sync or asyncio (argv[1]).
OUTAGE_PROBE = """
import asyncio, json, sys, time
from secrets_broker.aio import AsyncAWSSecretsManager
from secrets_broker.aws_secrets import AWSSecretsManager, AWSSecretsManagerError

def outcome(read):
    try:
        return read()
    except AWSSecretsManagerError as error:
        return f"{type(error).__name__} {error.code.name if error.code else ''} {error.reason}".strip()

def steps(read):
    # Each: the test acted (stopped or started the broker), then says go.
    first = read("mistral-api-key")
    read("jwt")
    time.sleep(0.5)                           # the watch streams are open
    print(json.dumps(first), flush=True)
    for _ in range(2):
        sys.stdin.readline()
        time.sleep(1.2)                       # past SECRET_CACHE_TTL
        print(json.dumps({"held": read("mistral-api-key"), "never_read": read("production/database"),
                          "config": read("jwt")}), flush=True)
    sys.stdin.readline()
    started = time.monotonic()
    while time.monotonic() - started < 20:
        back = read("mistral-api-key")
        if not back.startswith(("Broker", "AWS")):
            break
        time.sleep(0.2)
    print(json.dumps({"back": back, "took": time.monotonic() - started}), flush=True)

if sys.argv[1] == "sync":
    m = AWSSecretsManager()
    def read(name):
        if name == "jwt":
            return outcome(lambda: m.get_jwt_config()["jwt_issuer"])
        return outcome(lambda: m.get_secret(name).as_string())
    steps(read)
else:
    async def main():
        m = AsyncAWSSecretsManager()
        loop = asyncio.get_running_loop()
        def read(name):
            if name == "jwt":
                return "not held: the asyncio client does not keep typed configs"
            return outcome(lambda: asyncio.run_coroutine_threadsafe(m.get_secret(name), loop).result().as_string())
        await loop.run_in_executor(None, steps, read)
    asyncio.run(main())
"""


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_a_broker_restart_is_ridden_out_on_what_the_watch_vouched_for(venv, start_broker, tmp_path, flavour):
    """A value whose TTL passes while the broker restarts is still served,
    for BROKER_MAX_STALE after its watch stream broke: that stream would
    have told of a rotation until then, and a rotation missed meanwhile
    comes first when it is back. A name never read, and any name once
    BROKER_MAX_STALE has passed, fail as the broker's absence. Before, a
    read whose TTL passed during a rolling restart failed."""
    listen = f"127.0.0.1:{support.free_port()}"
    broker = start_broker(listen=listen)
    env = package_env(broker, SECRET_CACHE_TTL="1", BROKER_MAX_STALE="4")
    proc = start_probe(venv, tmp_path, env, OUTAGE_PROBE, flavour)
    try:
        first = json.loads(proc.stdout.readline())
        assert first.startswith("dev-mistral-key"), first
        broker.stop()
        go_on(proc)
        down = json.loads(proc.stdout.readline())
        time.sleep(4)                         # past BROKER_MAX_STALE since the stream broke
        go_on(proc)
        later = json.loads(proc.stdout.readline())
        start_broker(listen=listen)
        go_on(proc)
        back = json.loads(proc.stdout.readline())
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=10)
    unavailable = "BrokerUnavailableError UNAVAILABLE"
    assert down["held"] == first, (down, err[-2000:])
    assert down["never_read"] == unavailable, down
    assert later["held"] == unavailable and later["never_read"] == unavailable, later
    if flavour == "sync":
        assert down["config"] == "insurecove-dev", down
        assert later["config"] == unavailable, later
    assert back["back"] == first, back
    # Said once, at WARNING, naming the variable; never the value.
    warnings = [line for line in err.splitlines() if "the value held is served" in line]
    assert len(warnings) == (2 if flavour == "sync" else 1), err[-2000:]
    assert "BROKER_MAX_STALE" in warnings[0] and first not in err, err[-2000:]


FROZEN_PROBE = """
import asyncio, json, sys, time
from secrets_broker.aio import AsyncAWSSecretsManager
from secrets_broker.aws_secrets import AWSSecretsManager, AWSSecretsManagerError

def steps(get):
    def timed():
        started = time.monotonic()
        try:
            got = get("mistral-api-key")
        except AWSSecretsManagerError as error:
            got = f"{type(error).__name__} {error.code.name if error.code else ''} {error.reason}".strip()
        return {"got": got, "took": time.monotonic() - started}
    first = timed()
    time.sleep(0.5)                           # its watch stream is open
    print(json.dumps(first), flush=True)
    for _ in range(2):
        sys.stdin.readline()
        time.sleep(1.2)                       # past SECRET_CACHE_TTL
        print(json.dumps([timed(), timed()]), flush=True)

if sys.argv[1] == "sync":
    m = AWSSecretsManager()
    steps(lambda name: m.get_secret(name).as_string())
else:
    async def main():
        m = AsyncAWSSecretsManager()
        loop = asyncio.get_running_loop()
        def get(name):
            return asyncio.run_coroutine_threadsafe(m.get_secret(name), loop).result().as_string()
        await loop.run_in_executor(None, steps, get)
    asyncio.run(main())
"""


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_a_frozen_broker_or_one_back_without_aws_still_leaves_reads_answered(
        venv, moto, start_broker, tmp_path, stubs, flavour):
    """The other outages a watch rides out: a broker frozen (SIGSTOP: it
    takes connections, answers nothing) holds a read past its TTL for 2 s,
    not the 10 s call timeout, then the value held answers, and the reads
    right after it are answered from memory at once, not 2 s each; a
    broker back from a restart while AWS is out of reach has no copy of
    its own (UPSTREAM_UNAVAILABLE), and the value held answers too."""
    moto.seed({MISTRAL: MISTRAL_VALUE})
    listen = f"127.0.0.1:{support.free_port()}"
    broker = start_broker(env=moto.broker_env(), dev=False, listen=listen)
    env = package_env(broker, SECRET_CACHE_TTL="1", BROKER_MAX_STALE="20")
    proc = start_probe(venv, tmp_path, env, FROZEN_PROBE, flavour)
    try:
        first = json.loads(proc.stdout.readline())
        assert first["got"] == MISTRAL_VALUE, (first, proc.stderr.read() if proc.poll() is not None else "")
        broker.proc.send_signal(signal.SIGSTOP)
        try:
            go_on(proc)
            frozen = json.loads(proc.stdout.readline())
        finally:
            broker.proc.send_signal(signal.SIGCONT)
        broker.stop()
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            nowhere = f"http://127.0.0.1:{closed.getsockname()[1]}"
        start_broker(env=moto.broker_env() | {"AWS_ENDPOINT_URL": nowhere}, dev=False, listen=listen)
        go_on(proc)
        without_aws = json.loads(proc.stdout.readline())
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=10)
    print(f"frozen: {frozen}; back without AWS: {without_aws}")
    assert [read["got"] for read in frozen] == [MISTRAL_VALUE] * 2, (frozen, err[-2000:])
    # The first waits REFRESH_WAIT (2 s), not CALL_TIMEOUT (10 s); the next
    # does not ask the silent broker again so soon.
    assert 1.5 < frozen[0]["took"] < 4, frozen
    assert frozen[1]["took"] < 0.5, frozen
    assert [read["got"] for read in without_aws] == [MISTRAL_VALUE] * 2, (without_aws, err[-2000:])
    assert MISTRAL_VALUE not in err, "a value in the client's log"


FORK_IN_OUTAGE_PROBE = """
import json, os, sys, time
from secrets_broker.aws_secrets import AWSSecretsManager, AWSSecretsManagerError
m = AWSSecretsManager()
def read(what):
    try:
        return what()
    except AWSSecretsManagerError as error:
        return f"{type(error).__name__} {error.code.name if error.code else ''}".strip()
m.get_secret("mistral-api-key")
m.get_jwt_config()
time.sleep(0.5)                               # the watch streams are open
print(json.dumps("ready"), flush=True)
sys.stdin.readline()                          # the broker is gone
pid = os.fork()                               # a worker respawned, a pool started
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
time.sleep(1.5)                               # past SECRET_CACHE_TTL
print(json.dumps([read(lambda: m.get_secret("mistral-api-key").as_string()),
                  read(lambda: m.get_jwt_config()["jwt_issuer"])]), flush=True)
"""


def test_a_fork_while_the_broker_is_away_keeps_what_the_watch_vouched_for(venv, start_broker, tmp_path):
    """The parent's followers stop for the fork and start again after it:
    the new ones take over their streams' state, so a fork during a broker
    restart does not end what those streams vouched for."""
    broker = start_broker()
    proc = start_probe(venv, tmp_path, package_env(broker, SECRET_CACHE_TTL="1"), FORK_IN_OUTAGE_PROBE)
    try:
        assert json.loads(proc.stdout.readline() or "null") == "ready", proc.stderr.read()
        broker.stop()
        go_on(proc)
        after = json.loads(proc.stdout.readline() or "null")
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=10)
    assert after == ["dev-mistral-key-NOT-A-REAL-KEY-0000", "insurecove-dev"], (after, err[-2000:])


def rotated_while_ready(venv, tmp_path, env, probe, flavour, rotate) -> tuple[Any, str]:
    """Runs `probe` (with `flavour` as its argument) until it says "ready",
    calls `rotate`, lets it go on, and returns what it printed next, and
    its stderr."""
    proc = start_probe(venv, tmp_path, env, probe, flavour)
    try:
        ready = json.loads(proc.stdout.readline() or "null")
        assert ready == "ready", proc.stderr.read() if proc.poll() is not None else ready
        rotate()
        go_on(proc)
        out = json.loads(proc.stdout.readline() or "null")
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=10)
    return out, err


# MAX_FOLLOWED names are followed; past that, the one read least recently
# (and not within the TTL) gives its place up to a name read again. 2 here
# instead of 256, so that three names show it.
WORKING_SET_PROBE = """
import asyncio, json, sys, time
import secrets_broker.aio as aio
import secrets_broker.aws_secrets as sync
sync.MAX_FOLLOWED = aio.MAX_FOLLOWED = 2
A, B, C = "mistral-api-key", "production/jwt", "production/database"

def steps(read):
    read(A)
    first = {B: read(B)}
    read(C)                                   # read once: no place for it yet
    started = time.monotonic()
    while time.monotonic() - started < 4.5:   # past SECRET_CACHE_TTL: A goes cold, B is read
        read(B)
        time.sleep(0.2)
    first[C] = read(C)                        # read again: takes A's place
    time.sleep(0.5)                           # its watch stream is open
    print(json.dumps("ready"), flush=True)
    sys.stdin.readline()                      # the test rotates B and C
    started = time.monotonic()
    took = {}
    while time.monotonic() - started < 3 and len(took) < 2:
        for name in (B, C):
            if name not in took and read(name) != first[name]:
                took[name] = time.monotonic() - started
        time.sleep(0.02)
    print(json.dumps(took), flush=True)

if sys.argv[1] == "sync":
    m = sync.AWSSecretsManager()
    steps(lambda name: m.get_secret(name).as_string())
else:
    async def main():
        m = aio.AsyncAWSSecretsManager()
        loop = asyncio.get_running_loop()
        def read(name):
            return asyncio.run_coroutine_threadsafe(m.get_secret(name), loop).result().as_string()
        await loop.run_in_executor(None, steps, read)
    asyncio.run(main())
"""


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_the_names_followed_are_those_read_now_not_the_first_ever(venv, seeded_broker, moto, tmp_path, flavour):
    """Once MAX_FOLLOWED names are followed, a name read again takes the
    place of the one read least recently, if that one was not read within
    the TTL: a long-lived process whose names change keeps hearing rotations of
    those it reads. Before, the first names read kept their places for
    the process's life, and later ones were read by TTL alone."""
    broker, _ = seeded_broker
    env = package_env(broker, SECRET_CACHE_TTL="4")

    def rotate():
        moto.put_secret_value(JWT, json.dumps(json.loads(JWT_VALUE) | {"jwt_issuer": "rotated-working-set"}))
        moto.put_secret_value(DATABASE, json.dumps(json.loads(DATABASE_VALUE) | {"database_password": "rotated-ws"}))

    took, err = rotated_while_ready(venv, tmp_path, env, WORKING_SET_PROBE, flavour, rotate)
    print(f"rotations heard after: {took}")
    # Both by push, well before the 4 s TTL of C's read would have passed.
    assert took is not None and set(took) == {"production/jwt", "production/database"}, (took, err[-2000:])
    assert max(took.values()) < 2.0, took


# A name read only by stage keeps its place: its stage reads rely on its
# current value being followed (a rotation drops them).
STAGE_WORKING_SET_PROBE = """
import asyncio, json, sys, time
import secrets_broker.aio as aio
import secrets_broker.aws_secrets as sync
sync.MAX_FOLLOWED = aio.MAX_FOLLOWED = 2
P, A, C = "production/database", "mistral-api-key", "production/jwt"

def steps(read):
    first = read(P, "AWSPREVIOUS")            # follows P's current value
    read(A, None)
    read(C, None)                             # read once: no place for it yet
    started = time.monotonic()
    while time.monotonic() - started < 6.5:   # past SECRET_CACHE_TTL: A goes cold, P is read
        read(P, "AWSPREVIOUS")
        time.sleep(0.2)
    read(C, None)                             # read again: takes A's place, not P's
    time.sleep(0.5)
    print(json.dumps("ready"), flush=True)
    sys.stdin.readline()                      # the test rotates P
    started = time.monotonic()
    while time.monotonic() - started < 5 and read(P, "AWSPREVIOUS") == first:
        time.sleep(0.02)
    print(json.dumps(time.monotonic() - started), flush=True)

if sys.argv[1] == "sync":
    m = sync.AWSSecretsManager()
    steps(lambda name, stage: m.get_secret(name, version_stage=stage).version_id)
else:
    async def main():
        m = aio.AsyncAWSSecretsManager()
        loop = asyncio.get_running_loop()
        def read(name, stage):
            return asyncio.run_coroutine_threadsafe(m.get_secret(name, version_stage=stage), loop).result().version_id
        await loop.run_in_executor(None, steps, read)
    asyncio.run(main())
"""


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_a_name_read_only_by_stage_keeps_its_place(venv, seeded_broker, moto, tmp_path, flavour):
    """Reads by stage are reads of the name: its followed current value,
    whose rotation moves the stage, keeps its place while they go on."""
    broker, _ = seeded_broker
    # Two versions, so that AWSPREVIOUS exists.
    moto.put_secret_value(DATABASE, json.dumps(json.loads(DATABASE_VALUE) | {"database_password": "second"}))
    env = package_env(broker, SECRET_CACHE_TTL="6")
    took, err = rotated_while_ready(
        venv, tmp_path, env, STAGE_WORKING_SET_PROBE, flavour,
        lambda: moto.put_secret_value(DATABASE, json.dumps(json.loads(DATABASE_VALUE) | {"database_password": "third"})),
    )
    print(f"AWSPREVIOUS moved {took} s after the rotation")
    assert took is not None and took < 2.5, (took, err[-2000:])
