"""Fixtures of the integration suite: tool paths, generated stubs, brokers.

The tools come from environment variables set by ./scripts/test.sh:
BROKER_BIN, GRPCURL, MOTO_SERVER, AWS_CLI, PROTO_DIR. A missing variable or
tool FAILS the tests that need it; nothing is ever skipped for that reason.
"""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

import support

HEALTH_STARTUP_TIMEOUT = 15.0
TERMINATE_GRACE = 5.0
# The broker writes its log out at least every 20 ms (src/telemetry/writer.rs).
LOG_FLUSH_WAIT = 0.1


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The scan of every test's logs for secret values runs after every other
    test of the run, whatever the order of files or a plugin's reordering."""
    scans = [item for item in items if item.nodeid.endswith("test_zz_log_scan.py::test_no_secret_value_in_any_log")]
    items[:] = [item for item in items if item not in scans] + scans


# grpc.health.v1 and the reflection services, for the Python client side.
# They are written under a package path of our own ("brokertest_support/")
# so that the generated modules cannot clash with the grpcio package.
SUPPORT_PROTOS = {
    "brokertest_support/health.proto": """
syntax = "proto3";
package grpc.health.v1;
message HealthCheckRequest { string service = 1; }
message HealthCheckResponse {
  enum ServingStatus { UNKNOWN = 0; SERVING = 1; NOT_SERVING = 2; SERVICE_UNKNOWN = 3; }
  ServingStatus status = 1;
}
service Health {
  rpc Check(HealthCheckRequest) returns (HealthCheckResponse);
  rpc Watch(HealthCheckRequest) returns (stream HealthCheckResponse);
}
""",
}
for _version in ("v1", "v1alpha"):
    SUPPORT_PROTOS[f"brokertest_support/reflection_{_version}.proto"] = f"""
syntax = "proto3";
package grpc.reflection.{_version};
message ServerReflectionRequest {{
  string host = 1;
  oneof message_request {{
    string file_by_filename = 3;
    string file_containing_symbol = 4;
    string all_extension_numbers_of_type = 6;
    string list_services = 7;
  }}
}}
message ServerReflectionResponse {{
  string valid_host = 1;
  ServerReflectionRequest original_request = 2;
  oneof message_response {{
    FileDescriptorResponse file_descriptor_response = 4;
    ListServiceResponse list_services_response = 6;
    ErrorResponse error_response = 7;
  }}
}}
message FileDescriptorResponse {{ repeated bytes file_descriptor_proto = 1; }}
message ListServiceResponse {{ repeated ServiceResponse service = 1; }}
message ServiceResponse {{ string name = 1; }}
message ErrorResponse {{ int32 error_code = 1; string error_message = 2; }}
service ServerReflection {{
  rpc ServerReflectionInfo(stream ServerReflectionRequest) returns (stream ServerReflectionResponse);
}}
"""


# --------------------------------------------------------------------------
# tools


def _tool_from_env(var: str, *, directory: bool = False) -> Path:
    value = os.environ.get(var)
    if not value:
        pytest.fail(
            f"environment variable {var} is not set: run the suite with ./scripts/test.sh "
            f"(it installs the tools and sets BROKER_BIN, GRPCURL, MOTO_SERVER, AWS_CLI, PROTO_DIR)",
            pytrace=False,
        )
    path = Path(value)
    if directory:
        if not path.is_dir():
            pytest.fail(f"{var}={value} is not a directory", pytrace=False)
    elif not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"{var}={value} is not an executable file", pytrace=False)
    return path


@pytest.fixture(scope="session")
def broker_bin() -> Path:
    return _tool_from_env("BROKER_BIN")


@pytest.fixture(scope="session")
def grpcurl_bin() -> Path:
    return _tool_from_env("GRPCURL")


@pytest.fixture(scope="session")
def moto_server_bin() -> Path:
    return _tool_from_env("MOTO_SERVER")


@pytest.fixture(scope="session")
def aws_cli_bin() -> Path:
    return _tool_from_env("AWS_CLI")


@pytest.fixture(scope="session")
def proto_dir() -> Path:
    return _tool_from_env("PROTO_DIR", directory=True)


@pytest.fixture(scope="session", autouse=True)
def _all_tools(broker_bin, grpcurl_bin, moto_server_bin, aws_cli_bin, proto_dir):
    """Every test needs the whole tool set: a missing one fails, never skips."""


@pytest.fixture(scope="session", autouse=True)
def _fresh_log_dir():
    """Logs of this run only, kept after the run under target/test-logs/."""
    shutil.rmtree(support.LOG_DIR, ignore_errors=True)
    support.LOG_DIR.mkdir(parents=True, exist_ok=True)


@pytest.fixture
def log_path(request):
    """A fresh log file path for this test: target/test-logs/<test><suffix>[-N].log
    (N counts the calls with the same suffix)."""
    counters: dict[str, int] = {}

    def make(suffix: str = "") -> Path:
        n = counters[suffix] = counters.get(suffix, 0) + 1
        base = support.safe_file_name(request.node.name + suffix)
        name = base if n == 1 else f"{base}-{n}"
        return support.LOG_DIR / f"{name}.log"

    return make


# --------------------------------------------------------------------------
# stubs generated from proto/ in this session


@pytest.fixture(scope="session")
def stubs(proto_dir, tmp_path_factory) -> types.SimpleNamespace:
    import grpc_tools

    out = tmp_path_factory.mktemp("stubs")
    support_protos = tmp_path_factory.mktemp("support_protos")
    for rel, text in SUPPORT_PROTOS.items():
        (support_protos / rel).parent.mkdir(parents=True, exist_ok=True)
        (support_protos / rel).write_text(text)
    wkt = Path(grpc_tools.__file__).parent / "_proto"
    contract = sorted(str(p.relative_to(proto_dir)) for p in proto_dir.rglob("*.proto"))
    assert contract, f"no .proto files under {proto_dir}"
    for include, files in ((proto_dir, contract), (support_protos, list(SUPPORT_PROTOS))):
        cmd = [
            sys.executable, "-m", "grpc_tools.protoc",
            f"-I{include}", f"-I{wkt}",
            f"--python_out={out}", f"--grpc_python_out={out}",
            *files,
        ]
        run = subprocess.run(cmd, capture_output=True, text=True)
        assert run.returncode == 0, f"protoc failed ({' '.join(cmd)}):\n{run.stderr}"
    sys.path.insert(0, str(out))
    importlib.invalidate_caches()
    modules = {
        "secret_pb2": "secretsbroker.v1.secret_pb2",
        "secrets_service_pb2": "secretsbroker.v1.secrets_service_pb2",
        "secrets_service_pb2_grpc": "secretsbroker.v1.secrets_service_pb2_grpc",
        "admin_service_pb2": "secretsbroker.v1.admin_service_pb2",
        "admin_service_pb2_grpc": "secretsbroker.v1.admin_service_pb2_grpc",
        "health_pb2": "brokertest_support.health_pb2",
        "health_pb2_grpc": "brokertest_support.health_pb2_grpc",
        "reflection_v1_pb2": "brokertest_support.reflection_v1_pb2",
        "reflection_v1_pb2_grpc": "brokertest_support.reflection_v1_pb2_grpc",
        "reflection_v1alpha_pb2": "brokertest_support.reflection_v1alpha_pb2",
        "reflection_v1alpha_pb2_grpc": "brokertest_support.reflection_v1alpha_pb2_grpc",
    }
    return types.SimpleNamespace(
        **{attr: importlib.import_module(module) for attr, module in modules.items()}
    )


# --------------------------------------------------------------------------
# brokers


@dataclass
class Broker:
    proc: subprocess.Popen
    addr: str
    log_path: Path
    args: list[str]
    stubs: types.SimpleNamespace
    _channels: list[grpc.Channel] = field(default_factory=list)
    _log_file: object = None

    def options(self) -> list:
        # grpc-core sends a unix socket's path as :authority, which h2
        # refuses: the same override the Python client makes.
        if self.addr.startswith("unix:"):
            return [*support.CHANNEL_OPTIONS, ("grpc.default_authority", "localhost")]
        return list(support.CHANNEL_OPTIONS)

    def channel(self) -> grpc.Channel:
        ch = grpc.insecure_channel(self.addr, options=self.options())
        self._channels.append(ch)
        return ch

    def secrets(self):
        return self.stubs.secrets_service_pb2_grpc.SecretsServiceStub(self.channel())

    def admin(self):
        return self.stubs.admin_service_pb2_grpc.AdminServiceStub(self.channel())

    def health(self, service: str = "", timeout: float = 5.0) -> str:
        """The serving status name for service (e.g. "SERVING")."""
        h = self.stubs.health_pb2
        # A channel of its own per check: no reconnect backoff while starting.
        with grpc.insecure_channel(self.addr, options=self.options()) as ch:
            stub = self.stubs.health_pb2_grpc.HealthStub(ch)
            resp = stub.Check(h.HealthCheckRequest(service=service), timeout=timeout)
        return h.HealthCheckResponse.ServingStatus.Name(resp.status)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        """The broker's output so far: read once its log writer has written
        out what it holds (it writes in batches, at least every 20 ms)."""
        time.sleep(LOG_FLUSH_WAIT)
        return self.log_path.read_text(errors="replace")

    def tail(self) -> str:
        return support.log_tail(self.log_path)

    def stop(self) -> None:
        for ch in self._channels:
            ch.close()
        self._channels.clear()
        support.stop_process(self.proc, TERMINATE_GRACE)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def launch_broker(
    broker_bin: Path,
    stubs,
    log_path: Path,
    *,
    listen: str | None,
    extra_args=(),
    env: dict[str, str] | None = None,
    cwd: Path,
    dev: bool = True,
    broker_class: type[Broker] | None = None,
    broker_fields: dict | None = None,
) -> Broker:
    """Starts `serve [--dev] [--listen ADDR] EXTRA` and waits for SERVING.

    dev=False starts the broker on its AWS backend (point it at moto with
    AWS_ENDPOINT_URL in env). broker_class (a Broker subclass, built with
    broker_fields too) decides how readiness is probed: its health() is used.
    """
    args = [str(broker_bin), "serve"]
    if dev:
        args.append("--dev")
    if listen is not None:
        args += ["--listen", listen]
    args += [str(a) for a in extra_args]
    addr = listen or "127.0.0.1:50051"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = open(log_path, "wb")
    env_text = "".join(f"{k}={v} " for k, v in sorted((env or {}).items()))
    log_file.write(f"$ LOG_LEVEL=debug {env_text}{' '.join(args)}\n".encode())
    log_file.flush()
    proc = subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=support.broker_env(env),
        cwd=cwd,
    )
    broker = (broker_class or Broker)(
        proc=proc, addr=addr, log_path=log_path, args=args, stubs=stubs, _log_file=log_file,
        **(broker_fields or {}),
    )
    what = "broker" if broker_class is None else broker_class.__name__
    deadline = time.monotonic() + HEALTH_STARTUP_TIMEOUT
    last = "no answer yet"
    while True:
        if proc.poll() is not None:
            broker.stop()
            pytest.fail(
                f"{what} exited with code {proc.returncode} before serving "
                f"({' '.join(args)}); log {log_path}:\n{support.log_tail(log_path)}",
                pytrace=False,
            )
        try:
            status = broker.health("", timeout=1.0)
            if status == "SERVING":
                return broker
            last = f"health status {status}"
        except grpc.RpcError as err:
            last = f"{err.code().name}: {err.details()}"
        if time.monotonic() > deadline:
            broker.stop()
            pytest.fail(
                f"{what} not SERVING after {HEALTH_STARTUP_TIMEOUT:.0f} s ({last}); "
                f"{' '.join(args)}; log {log_path}:\n{support.log_tail(log_path)}",
                pytrace=False,
            )
        time.sleep(0.1)


@pytest.fixture
def start_broker(broker_bin, stubs, log_path, tmp_path):
    """Factory: start_broker(extra_args=(), env=None, listen="auto", dev=True) -> Broker.

    listen="auto" picks a free loopback port and passes --listen; listen=None
    passes no --listen (the broker's default address is used). The broker runs
    in an empty temporary directory (no stray .env), with LOG_LEVEL=debug and
    the machine's BROKER_*/SECRET_*/AWS_* variables removed; its output goes to
    target/test-logs/<test>.log. Stopped at teardown (SIGTERM, kill after 5 s).
    dev=False leaves out --dev: the AWS backend (see the aws_broker fixture).
    HTTP(S)_PROXY / NO_PROXY / ALL_PROXY (any case) are removed too unless env
    sets them.
    """
    brokers: list[Broker] = []
    workdir = tmp_path / "broker-cwd"
    workdir.mkdir()

    def start(extra_args=(), env=None, listen="auto", dev=True) -> Broker:
        if listen == "auto":
            listen = f"127.0.0.1:{support.free_port()}"
        broker = launch_broker(
            broker_bin, stubs, log_path(), listen=listen,
            extra_args=extra_args, env=env, cwd=workdir, dev=dev,
        )
        brokers.append(broker)
        return broker

    yield start
    for broker in brokers:
        broker.stop()


@pytest.fixture
def dev_broker(start_broker) -> Broker:
    """A broker on the embedded dev backend, on a free loopback port."""
    return start_broker()


@pytest.fixture
def run_cli(broker_bin, log_path, tmp_path):
    """Runs `secrets-broker ARGS` to completion; output also logged to target/test-logs/."""
    workdir = tmp_path / "cli-cwd"
    workdir.mkdir()

    def run(*args, env=None, timeout=60) -> subprocess.CompletedProcess:
        cmd = [str(broker_bin), *map(str, args)]
        proc = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            env=support.broker_env(env), cwd=workdir, timeout=timeout,
        )
        log_path().write_text(
            f"$ {''.join(f'{k}={v} ' for k, v in sorted((env or {}).items()))}{' '.join(cmd)}\n--- exit {proc.returncode}\n--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}"
        )
        return proc

    return run


# --------------------------------------------------------------------------
# AWS Secrets Manager (moto_server) and the broker's AWS backend


@pytest.fixture
def moto(moto_server_bin, log_path, tmp_path):
    """A running moto_server on a free loopback port, fresh for this test.

    moto.stop() / moto.start() / moto.restart() keep the port (state is lost:
    re-seed); moto.create_secret()/put_secret_value()/delete_secret() seed it
    through boto3; moto.start_recording() + moto.get_secret_value_calls(name)
    count the broker's GetSecretValue calls from moto's request recorder.
    Log: target/test-logs/<test>-moto.log. Stopped at teardown.
    """
    from moto_support import MotoServer

    server = MotoServer(moto_server_bin, log_path("-moto"), tmp_path / "moto")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def aws_broker(moto, start_broker):
    """Factory: aws_broker(extra_args=(), env=None) -> Broker on the AWS backend
    (`serve` without --dev) pointed at this test's moto."""

    def start(extra_args=(), env=None) -> Broker:
        return start_broker(extra_args, env=moto.broker_env() | (env or {}), dev=False)

    return start


@pytest.fixture
def forward_proxy(log_path):
    """A loopback HTTP forward proxy counting what it forwards (forward_proxy.py)."""
    from forward_proxy import ForwardProxy

    proxy = ForwardProxy(log_path("-proxy"))
    yield proxy
    proxy.close()
