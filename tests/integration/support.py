"""Helpers shared by the integration tests (fixtures live in conftest.py)."""

from __future__ import annotations

import json
import os
import re
import socket
import signal
import subprocess
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

REPO_ROOT = Path(__file__).resolve().parents[2]
DEV_SECRETS_FILE = REPO_ROOT / "src" / "backend" / "dev_secrets.json"
LOG_DIR = REPO_ROOT / "target" / "test-logs"

PREFIX = "insurecove"
ENVIRONMENT = "production"
ERROR_DOMAIN = "secretsbroker"

# Environment variables the broker reads; removed from the environment a test
# broker inherits so that the machine's settings cannot change what is tested.
BROKER_ENV_PREFIXES = ("BROKER_", "SECRET_", "AWS_")
# Proxy variables (compared case-insensitively), removed likewise: a test
# that wants a proxy sets them itself.
PROXY_ENV_NAMES = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY")

# grpcio honours http_proxy; the broker is always on loopback.
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]


def full_name(name: str) -> str:
    """The full name a request name resolves to (see the contract)."""
    if name.startswith(PREFIX + "/") or name.startswith("arn:"):
        return name
    return f"{PREFIX}/{name}"


def dev_seed() -> dict[str, str]:
    """Full name -> current (last) value of the embedded dev backend's seed."""
    data = json.loads(DEV_SECRETS_FILE.read_text())
    seed = {}
    for secret in data["secrets"]:
        versions = secret["versions"]
        assert versions, f"seed secret {secret['name']} has no versions"
        seed[full_name(secret["name"])] = versions[-1]["value"]
    register_secrets_file(data)     # every seed value, for the leak scan
    return seed


def seed_json(short_name: str) -> dict:
    """The seed's JSON value of a typed-config secret, e.g. "production/jwt"."""
    return json.loads(dev_seed()[full_name(short_name)])


def as_list(value) -> list[str]:
    """allowed_hosts / cors_origins: a JSON list or a comma-separated string."""
    if isinstance(value, list):
        items = value
    else:
        items = str(value).split(",")
    return [item.strip() for item in items if item.strip()]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def safe_file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "test"


def broker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(BROKER_ENV_PREFIXES)
        and key.upper() not in PROXY_ENV_NAMES
    }
    env["LOG_LEVEL"] = "debug"
    env.update(extra or {})
    return env


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as error:
        return f"<cannot read {path}: {error}>"
    return "\n".join(text.splitlines()[-lines:])


def error_info(err: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    """The single google.rpc.ErrorInfo carried in grpc-status-details-bin."""
    status = rpc_status.from_call(err)
    assert status is not None, (
        f"no grpc-status-details-bin on {err.code()}: {err.details()!r}"
    )
    infos = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
    assert len(infos) == 1, (
        f"expected exactly one ErrorInfo detail, got {len(infos)}: "
        f"{[d.type_url for d in status.details]}"
    )
    return infos[0]


def expect_error(
    call,
    code: grpc.StatusCode,
    reason: str,
    *,
    field: str | None = None,
    forbidden: tuple[str, ...] = (),
):
    """Runs call(), which must fail with code and an ErrorInfo of reason.

    field: the ErrorInfo metadata "field" it must carry.
    forbidden: strings (secret values) that must appear nowhere in the error.
    Returns (err, info).
    """
    try:
        result = call()
    except grpc.RpcError as err:
        caught = err
    else:
        raise AssertionError(f"expected {code.name}/{reason}, got a response: {result}")
    err = caught
    assert err.code() == code, (
        f"expected {code.name}, got {err.code().name}: {err.details()!r}"
    )
    info = error_info(err)
    assert info.domain == ERROR_DOMAIN, f"ErrorInfo.domain = {info.domain!r}"
    assert info.reason == reason, (
        f"ErrorInfo.reason = {info.reason!r} (expected {reason!r}); "
        f"message {err.details()!r}"
    )
    if field is not None:
        assert info.metadata.get("field") == field, (
            f"ErrorInfo.metadata = {dict(info.metadata)!r} (expected field={field!r}); "
            f"message {err.details()!r}"
        )
    assert_no_secret(err, info, forbidden)
    return err, info


def assert_no_secret(err: grpc.RpcError, info, forbidden) -> None:
    texts = {
        "message": err.details() or "",
        "ErrorInfo.metadata": repr(dict(info.metadata)),
        "ErrorInfo.reason": info.reason,
    }
    status = rpc_status.from_call(err)
    raw = status.SerializeToString() if status is not None else b""
    for value in forbidden:
        if not value:
            continue
        for where, text in texts.items():
            assert value not in text, f"the error's {where} contains the secret value {value!r}: {text!r}"
        assert value.encode() not in raw, f"grpc-status-details-bin contains the secret value {value!r}"


# --------------------------------------------------------------------------
# Registry of the secret values the suite uses, for the leak scan of
# test_zz_log_scan.py (no log under target/test-logs/ may contain one).
# dev_seed(), moto_support's seeding and the tests that write secrets files
# register their values here; a test that builds values inline registers
# them itself (register_secret / register_secrets_file).

# Values shorter than this are too common to scan for (e.g. "old", "new").
MIN_SCANNED_LENGTH = 8
SECRET_VALUES: set[str] = set()
# Values too short to scan, kept to be listed by the scan.
SHORT_SECRET_VALUES: set[str] = set()
# Keys of a JSON secret whose string values are secrets on their own (the
# rest, e.g. regions, algorithms, URLs and host lists, are not).
SECRET_JSON_KEYS = frozenset({
    "jwt_secret_key", "supabase_anon_key", "supabase_service_key",
    "database_password", "encryption_key", "encryption_salt",
})


def register_secret(value: str | bytes) -> None:
    """Adds a secret value to SECRET_VALUES. A JSON object's secret fields
    (SECRET_JSON_KEYS) are added too; bytes are added as base64 and hex."""
    import base64 as _base64

    if isinstance(value, (bytes, bytearray)):
        value = bytes(value)
        try:
            register_secret(value.decode("utf-8"))
        except UnicodeDecodeError:
            pass
        if len(value) >= MIN_SCANNED_LENGTH:
            SECRET_VALUES.add(_base64.b64encode(value).decode())
            SECRET_VALUES.add(value.hex())
        return
    if not isinstance(value, str) or not value:
        return
    if len(value) < MIN_SCANNED_LENGTH:
        SHORT_SECRET_VALUES.add(value)
    else:
        SECRET_VALUES.add(value)
    try:
        parsed = json.loads(value)
    except ValueError:
        return
    if isinstance(parsed, dict):
        for key, inner in parsed.items():
            if key in SECRET_JSON_KEYS and isinstance(inner, str):
                register_secret(inner)


def register_secrets_file(data: dict) -> None:
    """Registers every value of a secrets file's structure (JSON/TOML backend)."""
    import base64 as _base64

    for secret in data.get("secrets", []):
        for version in secret.get("versions", []):
            if "value" in version:
                register_secret(version["value"])
            if "binary_base64" in version:
                register_secret(_base64.b64decode(version["binary_base64"]))


def stop_process(proc, grace: float) -> None:
    """SIGTERM, then SIGKILL if the process is still there after `grace` s."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
