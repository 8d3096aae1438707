"""The polyglot callers of examples/ (Python, Node, Go) against a broker on moto
over mutual TLS.

Each example is run as a user would run it: the Python one after its
gen.sh (grpc_tools.protoc into a generated/ folder, here the test's temporary
directory), the Node one with @grpc/grpc-js and @grpc/proto-loader from
.tools/node (installed by ./scripts/test.sh from tests/tools). The broker is
started with the test PKI of tls_support (CA-1; the callers present the
auth-service certificate) and a policy granting that identity the Mistral
key and the JWT config. Their stdout must hold the seeded value, the
jwt_issuer and the watch stream's first event.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import support
from tls_support import (  # noqa: F401  (fixtures)
    AUTH,
    pki,
    policy_toml,
    start_tls_broker,
    tls_files,
)

EXAMPLES = support.REPO_ROOT / "examples"
NODE_MODULES = Path(
    os.environ.get("EXAMPLES_NODE_MODULES") or support.REPO_ROOT / ".tools" / "node" / "node_modules"
)

MISTRAL = "insurecove/mistral-api-key"
JWT = "insurecove/production/jwt"
DATABASE = "insurecove/production/database"
MISTRAL_VALUE = "examples-mistral-key-0b7e41"
JWT_ISSUER = "insurecove-examples-issuer"
JWT_VALUE = json.dumps({
    "jwt_secret_key": "examples-jwt-signing-key-5d02c9",
    "jwt_algorithm": "HS256",
    "jwt_issuer": JWT_ISSUER,
    "jwt_audience": "insurecove-examples",
    "jwt_access_token_expire_minutes": 20,
})
DATABASE_VALUE = json.dumps({
    "supabase_url": "https://examples.supabase.invalid",
    "supabase_anon_key": "examples-anon-key-77aa",
    "supabase_service_key": "examples-service-key-88bb",
    "database_password": "examples-db-password-99cc",
})
RUN_TIMEOUT = 60


@pytest.fixture
def mtls_broker(moto, start_tls_broker, tls_files):
    """A broker on moto over mTLS; auth-service may read the key and the JWT."""
    versions = moto.seed({MISTRAL: MISTRAL_VALUE, JWT: JWT_VALUE, DATABASE: DATABASE_VALUE})
    tls_files.write_policy(policy_toml({"identity": AUTH, "secrets": [MISTRAL, JWT]}))
    broker = start_tls_broker(env=moto.broker_env(), dev=False)
    return broker, versions


def caller_env(broker, pki, **extra) -> dict[str, str]:
    """What a caller is given: the endpoint, the CA and its certificate."""
    return support.broker_env({
        "BROKER_ENDPOINT": broker.addr,
        "BROKER_CA_FILE": str(pki.ca1.cert_path),
        "BROKER_CERT_FILE": str(pki.auth.cert_path),
        "BROKER_KEY_FILE": str(pki.auth.key_path),
        "BROKER_TLS_DOMAIN": "localhost",
        **extra,
    })


def run(cmd, env, cwd) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            [str(c) for c in cmd], env=env, cwd=cwd, stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=RUN_TIMEOUT,
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{' '.join(map(str, cmd))} did not finish within {RUN_TIMEOUT} s: {error}", pytrace=False)


def describe(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}"


def check_output(proc: subprocess.CompletedProcess, broker, versions) -> None:
    assert proc.returncode == 0, describe(proc) + f"\n--- broker log\n{broker.tail()}"
    lines = proc.stdout.splitlines()
    assert len(lines) == 3, describe(proc)
    get, jwt, watch = lines
    assert get.startswith(f"GetSecret {MISTRAL} "), describe(proc)
    assert f"version={versions[MISTRAL]}" in get, describe(proc)
    assert f"value={MISTRAL_VALUE}" in get, describe(proc)
    assert jwt.startswith("GetJwtConfig "), describe(proc)
    assert f"jwt_issuer={JWT_ISSUER}" in jwt, describe(proc)
    assert f"version={versions[JWT]}" in jwt, describe(proc)
    assert watch.startswith(f"WatchSecret {MISTRAL} WATCH_EVENT_TYPE_CURRENT "), describe(proc)
    assert f"version={versions[MISTRAL]}" in watch, describe(proc)
    # the JWT signing key is never printed
    assert "examples-jwt-signing-key" not in proc.stdout + proc.stderr, describe(proc)


def check_denied(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode != 0, describe(proc)
    # The code, and the broker's ErrorInfo reason a caller branches on.
    assert "PERMISSION_DENIED POLICY_DENIED" in proc.stderr, describe(proc)
    assert "examples-db-password" not in proc.stdout + proc.stderr, describe(proc)


def check_unreachable(proc: subprocess.CompletedProcess) -> None:
    """A caller whose broker is not there says why, not only that time ran out."""
    assert proc.returncode != 0, describe(proc)
    assert "UNAVAILABLE" in proc.stderr, describe(proc)
    assert "refused" in proc.stderr.lower(), describe(proc)


# --------------------------------------------------------------------------
# Python: gen.sh (grpcio-tools) then caller.py


def generate_python_stubs(tmp_path, proto_dir) -> Path:
    out = tmp_path / "generated"
    gen = run(
        ["bash", EXAMPLES / "python" / "gen.sh"],
        env=support.broker_env({"PYTHON": sys.executable, "GENERATED_DIR": str(out), "PROTO_DIR": str(proto_dir)}),
        cwd=tmp_path,
    )
    assert gen.returncode == 0, "examples/python/gen.sh failed: " + describe(gen)
    stubs = sorted(p.name for p in (out / "secretsbroker" / "v1").glob("*.py"))
    assert "secrets_service_pb2_grpc.py" in stubs and "secret_pb2.py" in stubs, stubs
    return out


def test_python_example_over_mtls(mtls_broker, pki, tmp_path, proto_dir):
    broker, versions = mtls_broker
    generated = generate_python_stubs(tmp_path, proto_dir)
    caller = EXAMPLES / "python" / "caller.py"
    proc = run([sys.executable, caller], caller_env(broker, pki, GENERATED_DIR=str(generated)), tmp_path)
    check_output(proc, broker, versions)

    denied = run(
        [sys.executable, caller],
        caller_env(broker, pki, GENERATED_DIR=str(generated), SECRET_NAME="production/database"),
        tmp_path,
    )
    check_denied(denied)


# --------------------------------------------------------------------------
# Node: @grpc/grpc-js + @grpc/proto-loader loading proto/ at run time


def node_binary() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: the Node example needs it", pytrace=False)
    for package in ("@grpc/grpc-js", "@grpc/proto-loader"):
        if not (NODE_MODULES / package / "package.json").is_file():
            pytest.fail(
                f"{package} is missing from {NODE_MODULES}: run ./scripts/test.sh without "
                f"SKIP_INSTALL=1 (it installs tests/tools/package-lock.json into .tools/node)",
                pytrace=False,
            )
    return node


def test_node_example_over_mtls(mtls_broker, pki, tmp_path, proto_dir):
    broker, versions = mtls_broker
    node = node_binary()
    caller = EXAMPLES / "node" / "caller.js"
    env = caller_env(broker, pki, NODE_PATH=str(NODE_MODULES), PROTO_DIR=str(proto_dir))
    proc = run([node, caller], env, tmp_path)
    check_output(proc, broker, versions)

    denied = run([node, caller], env | {"SECRET_NAME": "production/database"}, tmp_path)
    check_denied(denied)

    unreachable = run([node, caller], env | {"BROKER_ENDPOINT": f"127.0.0.1:{support.free_port()}"}, tmp_path)
    check_unreachable(unreachable)


# --------------------------------------------------------------------------
# Go: examples/go/build.sh (Debian's protoc plugins and grpc-go, GOPATH mode)


@pytest.fixture(scope="module")
def go_caller(tmp_path_factory, proto_dir) -> Path:
    work = tmp_path_factory.mktemp("go")
    binary = work / "caller"
    # Relative paths, as the README has it: the binary lands where the
    # caller stands, not inside the build's GOPATH.
    build = subprocess.run(
        ["bash", str(EXAMPLES / "go" / "build.sh"), "./caller"],
        env=support.broker_env({"PROTO_DIR": str(proto_dir), "GO_WORK_DIR": "build"}),
        cwd=work, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, "examples/go/build.sh failed: " + describe(build)
    return binary


def test_go_example_over_mtls(mtls_broker, pki, tmp_path, go_caller):
    broker, versions = mtls_broker
    proc = run([go_caller], caller_env(broker, pki), tmp_path)
    check_output(proc, broker, versions)

    denied = run([go_caller], caller_env(broker, pki, SECRET_NAME="production/database"), tmp_path)
    check_denied(denied)

    unreachable = run([go_caller], caller_env(broker, pki, BROKER_ENDPOINT=f"127.0.0.1:{support.free_port()}"), tmp_path)
    check_unreachable(unreachable)
