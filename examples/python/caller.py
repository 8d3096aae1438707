#!/usr/bin/env python3
"""A Python caller of secrets-broker over mutual TLS.

It reads a secret (GetSecret), the JWT config (GetJwtConfig), then opens
WatchSecret, prints the first event and exits. Stubs come from ./gen.sh.

Environment:
  BROKER_ENDPOINT    host:port of the broker (default 127.0.0.1:50051)
  BROKER_CA_FILE     CA that signed the broker's certificate (PEM)
  BROKER_CERT_FILE   this caller's certificate (PEM)
  BROKER_KEY_FILE    this caller's private key (PEM)
  BROKER_TLS_DOMAIN  name to expect in the broker's certificate (optional)
  SECRET_NAME        secret to read and watch (default mistral-api-key)
  GENERATED_DIR      where ./gen.sh wrote the stubs (default ./generated)
Without the three TLS files it connects in plaintext (loopback only, e.g.
`secrets-broker serve --dev`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import grpc

HERE = Path(__file__).resolve().parent
sys.path.insert(0, os.environ.get("GENERATED_DIR") or str(HERE / "generated"))
try:
    from secretsbroker.v1 import secret_pb2, secrets_service_pb2, secrets_service_pb2_grpc
except ImportError as error:
    sys.exit(f"stubs not found ({error}): run ./gen.sh first")


def env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name) or default


def channel() -> grpc.Channel:
    endpoint = env("BROKER_ENDPOINT", "127.0.0.1:50051")
    files = [env(n) for n in ("BROKER_CA_FILE", "BROKER_CERT_FILE", "BROKER_KEY_FILE")]
    # The broker is reached directly, never through an HTTP proxy.
    options = [("grpc.enable_http_proxy", 0)]
    if not any(files):
        return grpc.insecure_channel(endpoint, options=options)
    if not all(files):
        sys.exit("mutual TLS needs BROKER_CA_FILE, BROKER_CERT_FILE and BROKER_KEY_FILE together")
    ca, cert, key = (Path(f).read_bytes() for f in files)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )
    domain = env("BROKER_TLS_DOMAIN")
    if domain:
        options.append(("grpc.ssl_target_name_override", domain))
    return grpc.secure_channel(endpoint, credentials, options=options)


def reason(error: grpc.RpcError) -> str:
    """The broker's google.rpc.ErrorInfo reason, when grpcio-status is installed."""
    try:
        from google.rpc import error_details_pb2
        from grpc_status import rpc_status
    except ImportError:
        return ""
    status = rpc_status.from_call(error)
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


def main() -> int:
    name = env("SECRET_NAME", "mistral-api-key")
    pb = secrets_service_pb2
    with channel() as ch:
        stub = secrets_service_pb2_grpc.SecretsServiceStub(ch)
        try:
            secret = stub.GetSecret(pb.GetSecretRequest(name=name), timeout=10).secret
            # An example prints the value to show it arrived; a service would not.
            value = secret.string_value if secret.WhichOneof("value") == "string_value" else "<binary>"
            print(f"GetSecret {secret.name} version={secret.version_id} value={value}")

            jwt = stub.GetJwtConfig(pb.GetJwtConfigRequest(), timeout=10)
            print(
                f"GetJwtConfig version={jwt.version_id} jwt_issuer={jwt.config.jwt_issuer} "
                f"jwt_algorithm={jwt.config.jwt_algorithm} "
                f"expire_minutes={jwt.config.jwt_access_token_expire_minutes}"
            )

            events = stub.WatchSecret(pb.WatchSecretRequest(name=name))
            for event in events:
                kind = secret_pb2.WatchEventType.Name(event.type)
                print(f"WatchSecret {event.secret.name} {kind} version={event.secret.version_id}")
                break
            events.cancel()
        except grpc.RpcError as error:
            print(f"error: {error.code().name} {reason(error)}: {error.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
