"""Mutual TLS for the integration tests: a test PKI made with `cryptography`
in the test itself, a launcher that waits for health over mTLS, TLS-aware
broker handles, a raw TLS handshake probe (Python's ssl module), and policy
files.

The fixtures (`pki`, `tls_files`, `start_tls_broker`) are imported by the
test modules that use them (`from tls_support import ...`).

The PKI:
- CA-1 signs the server certificate (SAN IP 127.0.0.1, DNS localhost) and the
  good client certificates: spiffe://insurecove/auth-service,
  spiffe://insurecove/billing, spiffe://insurecove/ops (admin in the tests'
  policies) and spiffe://insurecove/health-probe (the launcher's readiness
  check: the health service is not policy-checked);
- an expired client certificate from CA-1 (URI spiffe://insurecove/auth-service);
- CA-2, another CA, and a client certificate from it (same URI);
- a client certificate from CA-1 with no SAN and an empty subject (no CN).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import signal
import socket
import ssl
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import support
from conftest import Broker, launch_broker

AUTH = "spiffe://insurecove/auth-service"
BILLING = "spiffe://insurecove/billing"
OPS = "spiffe://insurecove/ops"
PROBE = "spiffe://insurecove/health-probe"

# grpcio: no proxy; a subchannel pool per channel, so that a channel with
# other credentials (or after a refused handshake) never reuses a connection.
TLS_CHANNEL_OPTIONS = support.CHANNEL_OPTIONS + [("grpc.use_local_subchannel_pool", 1)]

# The HTTP/2 client preface and an empty SETTINGS frame.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


# --------------------------------------------------------------------------
# the PKI


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _der(tag: int, content: bytes) -> bytes:
    """A DER element: tag, length, content."""
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def _der_size(element: bytes) -> int:
    """The whole size of the DER element `element` starts with."""
    first = element[1]
    if first < 0x80:
        return 2 + first
    count = first & 0x7F
    return 2 + count + int.from_bytes(element[2:2 + count], "big")


def _der_content(element: bytes) -> bytes:
    """The content of the DER element `element` is."""
    first = element[1]
    start = 2 if first < 0x80 else 2 + (first & 0x7F)
    return element[start:_der_size(element)]


@dataclass
class Issued:
    """A certificate and its key, written as PEM files."""

    label: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_path: Path
    key_path: Path

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def serial(self) -> int:
        return self.cert.serial_number


class PKI:
    """Certificates of one test, under `directory`."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca1 = self.make_ca("ca1", "InsureCove Test CA-1")
        self.ca2 = self.make_ca("ca2", "InsureCove Test CA-2 (not trusted)")
        self.server = self.make_server("server")
        self.auth = self.make_client("auth", uri=AUTH)
        self.billing = self.make_client("billing", uri=BILLING)
        self.ops = self.make_client("ops", uri=OPS)
        self.probe = self.make_client("probe", uri=PROBE)
        self.expired = self.make_client(
            "expired", uri=AUTH,
            not_before=_now() - dt.timedelta(days=30), not_after=_now() - dt.timedelta(days=1),
        )
        self.foreign = self.make_client("foreign", uri=AUTH, ca=self.ca2)
        self.unnamed = self.make_client("unnamed", uri=None)

    def _write(self, label: str, cert: x509.Certificate, key) -> Issued:
        issued = Issued(label, cert, key, self.dir / f"{label}.pem", self.dir / f"{label}-key.pem")
        issued.cert_path.write_bytes(issued.cert_pem)
        issued.key_path.write_bytes(issued.key_pem)
        # The key is key material: never in a log (see test_zz_log_scan).
        support.register_secret(_pem_body(issued.key_pem))
        return issued

    def make_ca(self, label: str, common_name: str) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(days=1))
            .not_valid_after(_now() + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        return self._write(label, cert, key)

    def issue(
        self,
        label: str,
        *,
        ca: Issued,
        subject: x509.Name,
        sans: list[x509.GeneralName],
        usage,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        key=None,
    ) -> Issued:
        key = key or ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(ca.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or _now() - dt.timedelta(hours=1))
            .not_valid_after(not_after or _now() + dt.timedelta(days=90))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return self._write(label, builder.sign(ca.key, hashes.SHA256()), key)

    def make_v1_client(self, label: str, common_name: str) -> Issued:
        """A CA-1 certificate in X.509 version 1 (no version field, no
        extensions), as `openssl x509 -req` without an extension file makes
        one: cryptography writes only v3, so its TBS is re-encoded without
        the version and signed again."""
        key = ec.generate_private_key(ec.SECP256R1())
        v3 = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.ca1.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(hours=1))
            .not_valid_after(_now() + dt.timedelta(days=90))
            .sign(self.ca1.key, hashes.SHA256())
        )
        tbs = _der_content(v3.tbs_certificate_bytes)
        version = b"\xa0\x03\x02\x01\x02"            # [0] EXPLICIT INTEGER 2 (v3)
        assert tbs.startswith(version), tbs[:8]
        tbs_v1 = _der(0x30, tbs[len(version):])
        outer = _der_content(v3.public_bytes(serialization.Encoding.DER))
        algorithm = outer[len(v3.tbs_certificate_bytes):][: _der_size(outer[len(v3.tbs_certificate_bytes):])]
        signature = self.ca1.key.sign(tbs_v1, ec.ECDSA(hashes.SHA256()))
        der = _der(0x30, tbs_v1 + algorithm + _der(0x03, b"\x00" + signature))
        return self._write(label, x509.load_der_x509_certificate(der), key)

    def make_server(self, label: str, *, not_before=None, not_after=None, key=None) -> Issued:
        return self.issue(
            label, ca=self.ca1,
            subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "secrets-broker test server")]),
            sans=[x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")],
            usage=ExtendedKeyUsageOID.SERVER_AUTH,
            not_before=not_before, not_after=not_after, key=key,
        )

    def make_client(self, label: str, *, uri: str | None, ca: Issued | None = None, not_before=None, not_after=None) -> Issued:
        # The subject has no CN: the identity must come from the URI SAN
        # (and the unnamed certificate has neither).
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "InsureCove tests")]) if uri else x509.Name([])
        return self.issue(
            label, ca=ca or self.ca1, subject=subject,
            sans=[x509.UniformResourceIdentifier(uri)] if uri else [],
            usage=ExtendedKeyUsageOID.CLIENT_AUTH,
            not_before=not_before, not_after=not_after,
        )


def _pem_body(pem: bytes) -> str:
    """The base64 body of a PEM block, on one line (what a leak would show)."""
    return "".join(line for line in pem.decode().splitlines() if line and not line.startswith("-----"))


def replace_file(path: Path, data: bytes | str) -> None:
    """Replaces path atomically (write a sibling, rename over), like a secret mount."""
    if isinstance(data, str):
        data = data.encode()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --------------------------------------------------------------------------
# the broker's TLS files and policy


@dataclass
class TlsFiles:
    """The files a TLS broker is started with; replaceable while it runs."""

    pki: PKI
    tls_dir: Path
    policy_dir: Path

    @property
    def cert(self) -> Path:
        return self.tls_dir / "server.pem"

    @property
    def key(self) -> Path:
        return self.tls_dir / "server-key.pem"

    @property
    def client_ca(self) -> Path:
        return self.tls_dir / "client-ca.pem"

    @property
    def policy(self) -> Path:
        return self.policy_dir / "policy.toml"

    def args(self, *, policy: bool = True) -> list[str]:
        args = ["--tls-cert", str(self.cert), "--tls-key", str(self.key), "--tls-client-ca", str(self.client_ca)]
        if policy:
            args += ["--policy", str(self.policy)]
        return args

    def install_server(self, issued: Issued) -> None:
        """Puts a server certificate and its key in place (cert, then key)."""
        replace_file(self.cert, issued.cert_pem)
        replace_file(self.key, issued.key_pem)

    def install_client_ca(self, *cas: Issued) -> None:
        replace_file(self.client_ca, b"".join(ca.cert_pem for ca in cas))

    def write_policy(self, text: str) -> None:
        replace_file(self.policy, text)


def policy_toml(*grants: dict) -> str:
    """[[grant]] tables from dicts {identity, secrets, admin}."""
    out = []
    for grant in grants:
        out.append("[[grant]]")
        out.append(f'identity = "{grant["identity"]}"')
        secrets = ", ".join(f'"{s}"' for s in grant.get("secrets", []))
        out.append(f"secrets = [{secrets}]")
        out.append(f"admin = {'true' if grant.get('admin') else 'false'}")
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------
# TLS channels and brokers


def credentials(pki: PKI, client: Issued | None, *, root: Issued | None = None) -> grpc.ChannelCredentials:
    """grpcio mTLS credentials: trust CA-1 (or root), present client (None: no certificate)."""
    root_pem = (root or pki.ca1).cert_pem
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=root_pem)
    return grpc.ssl_channel_credentials(
        root_certificates=root_pem, private_key=client.key_pem, certificate_chain=client.cert_pem
    )


@dataclass
class TlsBroker(Broker):
    """A broker serving mutual TLS; channels present a client certificate."""

    pki: PKI | None = None
    files: TlsFiles | None = None

    def channel(self, client: Issued | None = None) -> grpc.Channel:  # type: ignore[override]
        """A channel presenting `client` (default: the probe identity)."""
        ch = grpc.secure_channel(
            self.addr, credentials(self.pki, client or self.pki.probe), options=TLS_CHANNEL_OPTIONS
        )
        self._channels.append(ch)
        return ch

    def bare_channel(self) -> grpc.Channel:
        """A TLS channel that presents no client certificate."""
        ch = grpc.secure_channel(self.addr, credentials(self.pki, None), options=TLS_CHANNEL_OPTIONS)
        self._channels.append(ch)
        return ch

    def secrets(self, client: Issued | None = None):  # type: ignore[override]
        return self.stubs.secrets_service_pb2_grpc.SecretsServiceStub(self.channel(client))

    def admin(self, client: Issued | None = None):  # type: ignore[override]
        return self.stubs.admin_service_pb2_grpc.AdminServiceStub(self.channel(client))

    def health(self, service: str = "", timeout: float = 5.0, client: Issued | None = None) -> str:  # type: ignore[override]
        h = self.stubs.health_pb2
        with grpc.secure_channel(
            self.addr, credentials(self.pki, client or self.pki.probe), options=TLS_CHANNEL_OPTIONS
        ) as ch:
            stub = self.stubs.health_pb2_grpc.HealthStub(ch)
            resp = stub.Check(h.HealthCheckRequest(service=service), timeout=timeout)
        return h.HealthCheckResponse.ServingStatus.Name(resp.status)

    def hangup(self) -> None:
        """SIGHUP: reload certificates and policy."""
        self.proc.send_signal(signal.SIGHUP)

    def handshake(self, client: Issued | None, **kw) -> "Handshake":
        return raw_handshake(self.addr, self.pki.ca1.cert_path, client, **kw)


def launch_tls_broker(
    broker_bin: Path,
    stubs,
    log_path: Path,
    *,
    pki: PKI,
    files: TlsFiles,
    listen: str,
    extra_args=(),
    env: dict[str, str] | None = None,
    cwd: Path,
    dev: bool = True,
) -> TlsBroker:
    """Starts `serve [--dev] --listen ADDR EXTRA` (EXTRA holds the TLS flags)
    and waits until grpc.health answers SERVING over mTLS (probe identity).
    Output goes to log_path, as with conftest.launch_broker, which does the
    work: TlsBroker.health() makes its readiness probe an mTLS one."""
    broker = launch_broker(
        broker_bin, stubs, log_path,
        listen=listen, extra_args=extra_args, env=env, cwd=cwd, dev=dev,
        broker_class=TlsBroker, broker_fields={"pki": pki, "files": files},
    )
    assert isinstance(broker, TlsBroker)
    return broker


# --------------------------------------------------------------------------
# the raw handshake (Python's ssl module)


@dataclass
class Handshake:
    """What a raw TLS connection to the broker got."""

    accepted: bool            # handshake done AND the server spoke HTTP/2 back
    error: str = ""           # why not, when refused
    peer_der: bytes = b""     # the server's certificate (DER)
    alpn: str | None = None
    version: str | None = None

    def describe(self) -> str:
        if self.accepted:
            return f"accepted ({self.version}, ALPN {self.alpn})"
        return f"refused: {self.error}"


def raw_handshake(
    addr: str,
    ca_path: Path,
    client: Issued | None,
    *,
    max_version: ssl.TLSVersion | None = None,
    timeout: float = 5.0,
) -> Handshake:
    """Connects with ssl (CA-1 trusted, hostname = the IP checked against the
    server's SAN), presents `client`, sends the HTTP/2 preface and reads the
    server's first frame. With TLS 1.3 the server judges the client
    certificate after the client's side of the handshake is done, so a
    refusal may surface at the first read, as an alert."""
    host, port = addr.rsplit(":", 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(ca_path))
    ctx.check_hostname = True
    ctx.set_alpn_protocols(["h2"])
    if max_version is not None:
        ctx.maximum_version = max_version
    if client is not None:
        ctx.load_cert_chain(str(client.cert_path), str(client.key_path))
    result = Handshake(accepted=False)
    with socket.create_connection((host, int(port)), timeout=timeout) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=host) as tls:
                result.peer_der = tls.getpeercert(binary_form=True) or b""
                result.alpn = tls.selected_alpn_protocol()
                result.version = tls.version()
                tls.sendall(H2_PREFACE)
                header = b""
                while len(header) < 9:
                    chunk = tls.recv(9 - len(header))
                    if not chunk:
                        result.error = f"connection closed after {len(header)} bytes, no HTTP/2 frame"
                        return result
                    header += chunk
                # the server's preface is a SETTINGS frame (type 4)
                if header[3] != 0x04:
                    result.error = f"first frame is of type {header[3]}, not SETTINGS"
                    return result
                result.accepted = True
                return result
        except ssl.SSLError as error:
            result.error = f"{type(error).__name__}: {error}"
        except (ConnectionResetError, BrokenPipeError, socket.timeout) as error:
            result.error = f"{type(error).__name__}: {error}"
    return result


def wait_for(predicate, timeout: float, step: float = 0.05, what: str = "condition"):
    """Polls predicate() until truthy; returns (value, seconds). Fails after timeout."""
    started = time.monotonic()
    last = None
    while True:
        last = predicate()
        if last:
            return last, time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what} not reached within {timeout} s (last: {last!r})")
        time.sleep(step)


# --------------------------------------------------------------------------
# fixtures (import them into the test module)


@pytest.fixture
def pki(tmp_path) -> PKI:
    return PKI(tmp_path / "pki")


@pytest.fixture
def tls_files(pki, tmp_path) -> TlsFiles:
    """server cert/key and the client CA (CA-1) in tls/, an empty policy in policy/."""
    files = TlsFiles(pki=pki, tls_dir=tmp_path / "tls", policy_dir=tmp_path / "policy")
    files.tls_dir.mkdir()
    files.policy_dir.mkdir()
    files.install_server(pki.server)
    files.install_client_ca(pki.ca1)
    files.write_policy("")
    return files


@pytest.fixture
def start_tls_broker(broker_bin, stubs, log_path, tmp_path, pki, tls_files):
    """Factory: start_tls_broker(extra_args=(), env=None, dev=True, policy=True) -> TlsBroker.

    Serves mutual TLS on a free 127.0.0.1 port with tls_files (and
    --policy tls_files.policy unless policy=False). dev=False: the AWS backend
    (pass moto.broker_env() in env). Stopped at teardown."""
    brokers: list[TlsBroker] = []
    workdir = tmp_path / "tls-broker-cwd"
    workdir.mkdir()

    def start(extra_args=(), env=None, dev=True, policy=True) -> TlsBroker:
        broker = launch_tls_broker(
            broker_bin, stubs, log_path(), pki=pki, files=tls_files,
            listen=f"127.0.0.1:{support.free_port()}",
            extra_args=[*tls_files.args(policy=policy), *extra_args], env=env, cwd=workdir, dev=dev,
        )
        brokers.append(broker)
        return broker

    yield start
    for broker in brokers:
        broker.stop()
