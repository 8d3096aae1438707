"""A real moto_server for the AWS backend's tests: start, stop, restart on
the same port, seed with boto3, and count the broker's upstream calls.

Upstream calls are counted from moto's own request recorder
(/moto-api/recorder/*): every request moto receives is appended to a JSON
lines file with its headers and body. `start_recording()` empties the file
and switches recording on; `get_secret_value_calls(name)` counts the recorded
requests whose X-Amz-Target is secretsmanager.GetSecretValue and whose body's
SecretId is `name`, leaving out boto3's own (the seeding client's) requests.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import boto3
from botocore.config import Config

import support

# The guide's default region; moto accepts it.
REGION = "ap-east-1"
ACCESS_KEY = "testing"
SECRET_KEY = "testing"
GET_SECRET_VALUE = "secretsmanager.GetSecretValue"

STARTUP_TIMEOUT = 20.0
STOP_GRACE = 5.0

# Talks to moto directly, whatever the machine's proxy settings are.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class RecordedRequest:
    target: str       # X-Amz-Target, e.g. "secretsmanager.GetSecretValue"
    secret_id: str    # the body's SecretId ("" when none)
    user_agent: str
    filtered: bool = False  # the body has Filters (the sweep's ListSecrets pages)
    access_key: str = ""    # the signing key id: tells brokers with their own keys apart
    params: dict = field(default_factory=dict)  # the JSON body (AWS's JSON protocol)

    @property
    def is_health_check(self) -> bool:
        """The broker's upstream health check: a one-item ListSecrets
        without filters (the sweep's pages are filtered by the prefix)."""
        return self.target == "secretsmanager.ListSecrets" and not self.filtered

    @property
    def from_boto(self) -> bool:
        ua = self.user_agent.lower()
        return "boto3/" in ua or "botocore/" in ua


def _access_key(authorization: str) -> str:
    """The key id of a SigV4 Authorization header ("" when unsigned)."""
    marker = "Credential="
    if marker not in authorization:
        return ""
    return authorization.split(marker, 1)[1].split("/", 1)[0]


def moto_env() -> dict[str, str]:
    """The environment moto runs in: no AWS_* or proxy settings of the machine."""
    env = support.broker_env()
    env.pop("LOG_LEVEL", None)
    return env | {"PYTHONUNBUFFERED": "1"}


class MotoServer:
    """One moto_server process on 127.0.0.1:port; restartable on that port."""

    def __init__(self, binary: Path, log_path: Path, workdir: Path, port: int | None = None):
        self.binary = binary
        self.log_path = log_path
        self.workdir = workdir
        self.port = port or support.free_port()
        self.recording_file = workdir / "moto-recording.jsonl"
        self.proc: subprocess.Popen | None = None
        self._log_file = None
        self._client = None

    # -- process ----------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "MotoServer":
        assert self.proc is None or self.proc.poll() is not None, "moto is already running"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")
        args = [str(self.binary), "-H", "127.0.0.1", "-p", str(self.port)]
        self._log_file.write(f"\n$ {' '.join(args)}\n".encode())
        self._log_file.flush()
        env = moto_env() | {"MOTO_RECORDER_FILEPATH": str(self.recording_file)}
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
            env=env, cwd=self.workdir,
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        last = "no answer yet"
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"moto_server exited with code {self.proc.returncode} on port {self.port}; "
                    f"log {self.log_path}:\n{support.log_tail(self.log_path)}"
                )
            try:
                with _DIRECT.open(f"{self.url}/moto-api/", timeout=2) as resp:
                    if resp.status == 200:
                        return self
                    last = f"HTTP {resp.status}"
            except (OSError, urllib.error.URLError) as error:
                last = str(error)
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(
                    f"moto_server not answering on {self.url} after {STARTUP_TIMEOUT:.0f} s ({last}); "
                    f"log {self.log_path}:\n{support.log_tail(self.log_path)}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """Stops moto; its state (secrets, recorder switch) is lost."""
        support.stop_process(self.proc, STOP_GRACE)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def restart(self) -> "MotoServer":
        """Stops and starts again on the same port, with empty state."""
        self.stop()
        return self.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def broker_env(self) -> dict[str, str]:
        """The environment that points a broker's AWS backend at this moto."""
        # empty config and credentials files: nothing from the machine's ~/.aws
        empty_config = self.workdir / "aws-config-empty"
        empty_credentials = self.workdir / "aws-credentials-empty"
        for path in (empty_config, empty_credentials):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_CONFIG_FILE": str(empty_config),
            "AWS_SHARED_CREDENTIALS_FILE": str(empty_credentials),
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    # -- seeding (boto3) --------------------------------------------------

    def boto(self, service: str):
        """A boto3 client of `service` (secretsmanager, sqs, sns, events)
        on this moto."""
        return boto3.client(
            service,
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            # proxies={} (not None): never the machine's proxy
            config=Config(proxies={}, retries={"max_attempts": 1}),
        )

    @property
    def client(self):
        if self._client is None:
            self._client = self.boto("secretsmanager")
        return self._client

    @staticmethod
    def _value(value: str | bytes) -> dict:
        if isinstance(value, bytes):
            return {"SecretBinary": value}
        return {"SecretString": value}

    def create_secret(self, name: str, value: str | bytes) -> str:
        """Creates the secret (full name); returns its version id."""
        support.register_secret(value)      # for the leak scan
        return self.client.create_secret(Name=name, **self._value(value))["VersionId"]

    def put_secret_value(self, name: str, value: str | bytes) -> str:
        """A new AWSCURRENT version (the old one becomes AWSPREVIOUS); its id."""
        support.register_secret(value)      # for the leak scan
        return self.client.put_secret_value(SecretId=name, **self._value(value))["VersionId"]

    def delete_secret(self, name: str) -> None:
        """Marks the secret for deletion (default 30-day recovery window)."""
        self.client.delete_secret(SecretId=name)

    def seed(self, secrets: dict[str, str | bytes]) -> dict[str, str]:
        """Creates each full name -> value; returns full name -> version id."""
        return {name: self.create_secret(name, value) for name, value in secrets.items()}

    # -- moto's request recorder ------------------------------------------

    def _moto_api(self, action: str, method: str = "POST") -> str:
        req = urllib.request.Request(f"{self.url}/moto-api/recorder/{action}", method=method, data=b"" if method == "POST" else None)
        with _DIRECT.open(req, timeout=10) as resp:
            assert resp.status == 200, f"moto-api recorder/{action}: HTTP {resp.status}"
            return resp.read().decode()

    def start_recording(self) -> None:
        """Empties the recording and records every request from now on."""
        self._moto_api("reset-recording")
        self._moto_api("start-recording")

    def recorded(self) -> list[RecordedRequest]:
        text = self._moto_api("download-recording", method="GET")
        out = []
        for line in text.splitlines():
            if not line.strip():
                continue
            entry = json.loads(line)
            headers = {k.lower(): v for k, v in entry.get("headers", {}).items()}
            body = entry.get("body") or ""
            if entry.get("body_encoded"):
                body = base64.b64decode(body).decode(errors="replace")
            try:
                parsed = json.loads(body) if body else {}
                secret_id = parsed.get("SecretId", "")
                filtered = bool(parsed.get("Filters"))
            except (ValueError, AttributeError):
                parsed, secret_id, filtered = {}, "", False
            out.append(RecordedRequest(
                target=headers.get("x-amz-target", ""),
                secret_id=secret_id,
                user_agent=headers.get("user-agent", ""),
                filtered=filtered,
                access_key=_access_key(headers.get("authorization", "")),
                params=parsed if isinstance(parsed, dict) else {},
            ))
        return out

    def get_secret_value_calls(self, name: str | None = None) -> int:
        """GetSecretValue requests moto received since start_recording(), not
        counting boto3's (the tests' own), for the SecretId `name` (any when None)."""
        return sum(
            1 for r in self.recorded()
            if r.target == GET_SECRET_VALUE and not r.from_boto and (name is None or r.secret_id == name)
        )
