"""deploy/: the deployment files are valid and agree with each other, offline.

(a) Every Kubernetes manifest is validated against the Kubernetes JSON
    schemas that PyPI `kubernetes-validate` bundles (no network), in strict
    mode (unknown fields are errors), for a fixed Kubernetes version. Kinds
    outside the core schemas FAIL, except cert-manager's (validated against
    the small JSON schemas below, written for the fields we use) and the
    Kustomization (its own schema plus: every listed file exists, every
    manifest is listed). The validator is shown to reject broken copies.
    Then the manifests are checked against each other (selectors, ports,
    probes, volumes, the TLS Secret, grace periods), the NetworkPolicy's
    egress is evaluated for the addresses the broker must and must not reach,
    and the ConfigMap's broker.toml + policy.toml, with the Deployment's
    environment, are given to the real binary's `check` (against moto).
    The approver-policy rules (certificate-request-policy.yaml) are
    evaluated, with a model of approver-policy's decision, against the
    shipped Certificates (approved) and against requests for names of other
    namespaces, the admin identity above all (denied).
(b) deploy/iam-policy.json allows exactly the three actions the broker uses;
    deploy/iam-policy-events-queue.json exactly what --events-queue-url needs
    on one queue.
(e) deploy/cloudformation/secret-events.yaml (the event path for
    --events-topic-arn) passes cfn-lint without a warning, and its IAM
    grants stay scoped: the broker's queues (secrets-broker-*) and the one
    topic, never "*", and they are exactly the SQS and SNS calls the
    broker's source makes. Widened copies are shown to fail.
(c) `systemd-analyze verify` accepts deploy/systemd/secrets-broker.service
    without warnings; its example env file passes `secrets-broker check`.
(d) deploy/Dockerfile, read with a small parser: stages, non-root USER,
    EXPOSE, the (documented) HEALTHCHECK choice, the files it copies exist.
"""

from __future__ import annotations

import datetime as dt
import importlib.resources
import ipaddress
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
CFN_TEMPLATE = DEPLOY / "cloudformation" / "secret-events.yaml"

# The Kubernetes version the manifests are validated against: one that
# kubernetes-validate (pinned in tests/requirements.txt) ships schemas for.
# 1.33: every field used here (e.g. the preStop `sleep` action, 1.30+) exists.
KUBERNETES_VERSION = "1.33.0"

NAMESPACE = "secrets-broker"
APP_LABELS = {"app.kubernetes.io/name": "secrets-broker"}
# Not applied with the rest: the example belongs to a client's namespace;
# the approval policies need approver-policy's CRDs, applied beforehand.
NOT_IN_KUSTOMIZATION = {"example-client-certificate.yaml", "certificate-request-policy.yaml"}
APPROVAL_POLICY_FILE = "certificate-request-policy.yaml"

# The settings a config file may hold: the broker's flags with underscores.
CONFIG_KEYS = {
    "listen", "tls_cert", "tls_key", "tls_client_ca", "policy", "metrics_listen",
    "metrics_secret_names", "environment", "secret_prefix", "cache_ttl",
    "cache_max_entries", "cache_max_stale", "watch_interval", "region",
    "secrets_file", "log_level", "max_connections",
    "max_concurrent_calls_per_connection", "max_concurrent_calls", "max_message_size", "max_request_memory",
    "call_timeout",
    "keepalive_interval", "shutdown_grace", "events_queue_url", "events_topic_arn",
}
# The guide's variables, with the production values the Deployment must set.
GUIDE_ENV = {
    "AWS_DEFAULT_REGION": "ap-east-1",
    "SECRET_PREFIX": "insurecove",
    "SECRET_CACHE_TTL": "300",
    "SECRET_ENVIRONMENT": "production",
    "LOG_LEVEL": "INFO",
    "LOG_FORMAT": "json",
}
# Config keys that those variables would shadow (env beats file): dead weight
# in broker.toml.
SHADOWED_BY_DEPLOYMENT_ENV = {"region", "secret_prefix", "cache_ttl", "environment", "log_level"}
# What SIGTERM must leave time for after the drain (shutdown_grace) when the
# broker consumes secret events: Unsubscribe and DeleteQueue of the
# replica's own queue, which the broker gives up on after this long
# (EVENTS_CLEANUP in src/app.rs; checked against it below).
EVENT_QUEUE_CLEANUP_SECONDS = 25


# ==========================================================================
# schemas for what the core Kubernetes schemas do not cover

_DURATION = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(h|m|s|ms))+$"}
_STRINGS = {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1}


def _object(properties: dict, required: tuple = ()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required),
            "additionalProperties": False}


_METADATA_FIELDS = {
    "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253},
    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
}
_NAMESPACED_METADATA = _object(
    _METADATA_FIELDS | {"namespace": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}},
    ("name", "namespace"),
)
_CLUSTER_METADATA = _object(_METADATA_FIELDS, ("name",))

# cert-manager.io/v1, the subset of its CRDs' fields these manifests use
# (names and enums as in cert-manager's CRDs).
_KEY_USAGES = [
    "signing", "digital signature", "content commitment", "key encipherment",
    "key agreement", "data encipherment", "cert sign", "crl sign",
    "encipher only", "decipher only", "any", "server auth", "client auth",
    "code signing", "email protection", "s/mime", "ipsec end system",
    "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing",
    "microsoft sgc", "netscape sgc",
]
CERTIFICATE_SCHEMA = _object({
    "apiVersion": {"const": "cert-manager.io/v1"},
    "kind": {"const": "Certificate"},
    "metadata": _NAMESPACED_METADATA,
    "spec": {
        **_object({
            "secretName": {"type": "string", "minLength": 1},
            "commonName": {"type": "string", "maxLength": 64},
            "dnsNames": _STRINGS,
            "uris": {**_STRINGS, "items": {"type": "string", "pattern": r"^[a-z][a-z0-9+.-]*://"}},
            "ipAddresses": _STRINGS,
            "emailAddresses": _STRINGS,
            "duration": _DURATION,
            "renewBefore": _DURATION,
            "isCA": {"type": "boolean"},
            "usages": {"type": "array", "items": {"enum": _KEY_USAGES}, "uniqueItems": True},
            "privateKey": _object({
                "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                "size": {"type": "integer"},
                "encoding": {"enum": ["PKCS1", "PKCS8"]},
                "rotationPolicy": {"enum": ["Never", "Always"]},
            }),
            "issuerRef": _object({
                "name": {"type": "string", "minLength": 1},
                "kind": {"enum": ["Issuer", "ClusterIssuer"]},
                "group": {"const": "cert-manager.io"},
            }, ("name",)),
        }, ("secretName", "issuerRef")),
        # something to put in the certificate
        "anyOf": [{"required": [field]} for field in ("commonName", "dnsNames", "uris", "ipAddresses")],
    },
}, ("apiVersion", "kind", "metadata", "spec"))

_ISSUER_SPEC = {
    "type": "object",
    "oneOf": [
        _object({"selfSigned": _object({})}, ("selfSigned",)),
        _object({"ca": _object({"secretName": {"type": "string", "minLength": 1}}, ("secretName",))}, ("ca",)),
    ],
}
CLUSTER_ISSUER_SCHEMA = _object({
    "apiVersion": {"const": "cert-manager.io/v1"},
    "kind": {"const": "ClusterIssuer"},
    "metadata": _CLUSTER_METADATA,
    "spec": _ISSUER_SPEC,
}, ("apiVersion", "kind", "metadata", "spec"))
ISSUER_SCHEMA = _object({
    "apiVersion": {"const": "cert-manager.io/v1"},
    "kind": {"const": "Issuer"},
    "metadata": _NAMESPACED_METADATA,
    "spec": _ISSUER_SPEC,
}, ("apiVersion", "kind", "metadata", "spec"))

# policy.cert-manager.io/v1alpha1 (approver-policy), the subset used.
_VALIDATIONS = {"type": "array", "minItems": 1, "items": _object({
    "rule": {"type": "string", "minLength": 1},
    "message": {"type": "string", "pattern": r"^[^\n]*$"},    # no line breaks
}, ("rule",))}
_ALLOWED_STRING = _object({
    "value": {"type": "string"}, "required": {"type": "boolean"}, "validations": _VALIDATIONS,
})
_ALLOWED_STRINGS = _object({
    "values": {"type": "array", "items": {"type": "string"}}, "required": {"type": "boolean"},
    "validations": _VALIDATIONS,
})
_WILDCARD = {"type": "string", "minLength": 1}
CERTIFICATE_REQUEST_POLICY_SCHEMA = _object({
    "apiVersion": {"const": "policy.cert-manager.io/v1alpha1"},
    "kind": {"const": "CertificateRequestPolicy"},
    "metadata": _CLUSTER_METADATA,
    "spec": _object({
        "allowed": _object({
            "commonName": _ALLOWED_STRING,
            **{field: _ALLOWED_STRINGS for field in ("dnsNames", "uris", "ipAddresses", "emailAddresses")},
            "isCA": {"type": "boolean"},
            "usages": {"type": "array", "items": {"enum": _KEY_USAGES}, "uniqueItems": True},
        }),
        "constraints": _object({"minDuration": _DURATION, "maxDuration": _DURATION}),
        "selector": {
            **_object({
                "issuerRef": _object({"name": _WILDCARD, "kind": _WILDCARD, "group": _WILDCARD}),
                "namespace": _object({
                    "matchNames": _STRINGS,
                    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                }),
            }),
            "anyOf": [{"required": ["issuerRef"]}, {"required": ["namespace"]}],
        },
    }, ("selector",)),
}, ("apiVersion", "kind", "metadata", "spec"))

KUSTOMIZATION_SCHEMA = _object({
    "apiVersion": {"const": "kustomize.config.k8s.io/v1beta1"},
    "kind": {"const": "Kustomization"},
    "resources": {**_STRINGS, "uniqueItems": True},
    "images": {"type": "array", "items": _object({
        "name": {"type": "string", "minLength": 1},
        "newName": {"type": "string", "minLength": 1},
        "newTag": {"type": "string", "minLength": 1},
        "digest": {"type": "string", "pattern": r"^sha256:[0-9a-f]{64}$"},
    }, ("name",))},
}, ("apiVersion", "kind", "resources"))

CUSTOM_SCHEMAS = {
    ("cert-manager.io/v1", "Certificate"): CERTIFICATE_SCHEMA,
    ("cert-manager.io/v1", "ClusterIssuer"): CLUSTER_ISSUER_SCHEMA,
    ("cert-manager.io/v1", "Issuer"): ISSUER_SCHEMA,
    ("policy.cert-manager.io/v1alpha1", "CertificateRequestPolicy"): CERTIFICATE_REQUEST_POLICY_SCHEMA,
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"): KUSTOMIZATION_SCHEMA,
}


# ==========================================================================
# the validator


def document_errors(doc, where: str) -> list[str]:
    """Every problem of one YAML document; [] when it is valid."""
    if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
        return [f"{where}: not a Kubernetes object (apiVersion and kind required)"]
    key = (doc["apiVersion"], doc["kind"])
    if key in CUSTOM_SCHEMAS:
        validator = jsonschema.Draft202012Validator(CUSTOM_SCHEMAS[key])
        return [
            f"{where}: {doc['kind']} {'.'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
            for error in validator.iter_errors(doc)
        ]
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(map(str, error.path)) or "<root>"
        return [f"{where}: {doc['kind']} {path}: {error.message}"]
    except kubernetes_validate.SchemaNotFoundError as error:
        # An unknown kind or apiVersion is an error, never a silent pass.
        return [f"{where}: {error.message}"]
    return []


def load_documents(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def file_errors(path: Path) -> list[str]:
    try:
        docs = load_documents(path)
    except yaml.YAMLError as error:
        return [f"{path.name}: not YAML: {error}"]
    if not docs:
        return [f"{path.name}: no documents"]
    errors: list[str] = []
    for index, doc in enumerate(docs):
        errors += document_errors(doc, f"{path.name}[{index}]")
    return errors


def manifest_files() -> list[Path]:
    return sorted(K8S.glob("*.yaml"))


def all_objects() -> list[dict]:
    return [doc for path in manifest_files() for doc in load_documents(path)]


def find(kind: str, name: str | None = None) -> dict:
    matches = [doc for doc in all_objects()
               if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def deployment() -> dict:
    return find("Deployment", "secrets-broker")


def container() -> dict:
    containers = deployment()["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, containers
    return containers[0]


def configmap_files() -> tuple[dict, dict]:
    data = find("ConfigMap", "secrets-broker-config")["data"]
    return tomllib.loads(data["broker.toml"]), tomllib.loads(data["policy.toml"])


# ==========================================================================
# (a) Kubernetes manifests


def test_bundled_schemas_cover_the_pinned_version():
    """The schemas are in the wheel (offline) and the pinned version is one of them."""
    # (validate() silently falls back to an older version when asked for one
    # it lacks: make sure the pinned one is really there, strict flavour too.)
    schemas = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    strict = schemas / f"v{KUBERNETES_VERSION}-local-strict"
    assert (strict / "deployment-apps-v1.json").is_file(), sorted(p.name for p in schemas.iterdir())
    assert (strict / "_definitions.json").is_file()


def test_manifest_files_are_the_expected_set():
    names = {path.name for path in manifest_files()}
    expected = {
        "namespace.yaml", "serviceaccount.yaml", "configmap.yaml", "deployment.yaml",
        "service.yaml", "poddisruptionbudget.yaml", "hpa.yaml", "networkpolicy.yaml",
        "certificates.yaml", "example-client-certificate.yaml", "kustomization.yaml",
        APPROVAL_POLICY_FILE,
    }
    assert names == expected


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_manifest_is_valid(path):
    errors = file_errors(path)
    assert not errors, "\n".join(errors)


def test_kustomization_lists_every_manifest():
    kustomization = load_documents(K8S / "kustomization.yaml")[0]
    listed = kustomization["resources"]
    for name in listed:
        assert (K8S / name).is_file(), f"kustomization.yaml lists a missing file: {name}"
    expected = {p.name for p in manifest_files()} - {"kustomization.yaml"} - NOT_IN_KUSTOMIZATION
    assert set(listed) == expected
    # No two objects with the same identity in what `apply -k` would send.
    seen = set()
    for name in listed:
        for doc in load_documents(K8S / name):
            key = (doc["apiVersion"].split("/")[0], doc["kind"],
                   doc["metadata"].get("namespace"), doc["metadata"]["name"])
            assert key not in seen, f"duplicate object {key}"
            seen.add(key)
    images = {image["name"] for image in kustomization.get("images", [])}
    assert container()["image"].split(":")[0] in images


# -- the validator rejects broken copies (it must never pass everything) ----

BROKEN_COPIES = [
    # (file, text to replace, replacement, expected in the error)
    ("deployment.yaml", "imagePullPolicy: IfNotPresent", "imagePulPolicy: IfNotPresent", "imagePulPolicy"),
    ("deployment.yaml", "replicas: 3", "replicas: three", "three"),
    ("deployment.yaml", "kind: Deployment", "kind: Deploymnet", "Deploymnet"),
    ("service.yaml", "      port: 9090\n", "", "port"),
    ("hpa.yaml", "averageUtilization: 70", "averageUtilization: seventy", "seventy"),
    ("networkpolicy.yaml", "policyTypes:", "policyType:", "policyType"),
    ("certificates.yaml", "  dnsNames:", "  dnsName:", "dnsName"),
    ("certificates.yaml", "algorithm: ECDSA", "algorithm: DSA", "DSA"),
    ("certificates.yaml", "rotationPolicy: Always", "rotationPolicy: Sometimes", "Sometimes"),
    ("kustomization.yaml", "resources:", "resource:", "resource"),
    (APPROVAL_POLICY_FILE, "    maxDuration: 2160h # 90 days", "    maxDuration: 90d", "90d"),
    (APPROVAL_POLICY_FILE, "    uris:\n      validations:", "    uris:\n      validation:", "validation"),
    (APPROVAL_POLICY_FILE, "    isCA: true", "    isCA: yes-please", "yes-please"),
]


@pytest.mark.parametrize("name,old,new,expected", BROKEN_COPIES,
                         ids=[f"{b[0]}:{b[3]}" for b in BROKEN_COPIES])
def test_validator_rejects_a_broken_copy(tmp_path, name, old, new, expected):
    text = (K8S / name).read_text()
    assert old in text, f"{name} no longer contains {old!r}: update this test"
    broken = tmp_path / name
    broken.write_text(text.replace(old, new, 1))
    errors = file_errors(broken)
    assert errors, f"a broken copy of {name} ({old!r} -> {new!r}) passed validation"
    assert any(expected in error for error in errors), errors
    # and the pristine file passes, so the failure is the edit's
    assert not file_errors(K8S / name)


# -- the manifests agree with each other -----------------------------------


CLUSTER_SCOPED_KINDS = {"Namespace", "ClusterIssuer", "CertificateRequestPolicy", "ClusterRole",
                        "ClusterRoleBinding"}


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def test_everything_selects_the_broker_pods():
    spec = deployment()["spec"]
    pod_labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"] == APP_LABELS
    assert _matches(spec["selector"]["matchLabels"], pod_labels)
    for service in [d for d in all_objects() if d["kind"] == "Service"]:
        assert _matches(service["spec"]["selector"], pod_labels), service["metadata"]["name"]
    assert _matches(find("PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)
    assert _matches(find("NetworkPolicy")["spec"]["podSelector"]["matchLabels"], pod_labels)
    for constraint in spec["template"]["spec"]["topologySpreadConstraints"]:
        assert _matches(constraint["labelSelector"]["matchLabels"], pod_labels)
    target = find("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "secrets-broker")
    # Everything namespaced is in the broker's namespace, except the CA and
    # its bootstrap Issuer (cert-manager's namespace, where the ClusterIssuer
    # reads its CA Secret) and the example client's certificate.
    elsewhere = {("Certificate", "secrets-broker-ca"): "cert-manager",
                 ("Issuer", "secrets-broker-selfsigned"): "cert-manager",
                 ("Certificate", "auth-service-secrets-broker-client"): "auth-service"}
    for doc in all_objects():
        if doc["kind"] == "Kustomization":
            continue
        key = (doc["kind"], doc["metadata"]["name"])
        if doc["kind"] in CLUSTER_SCOPED_KINDS:
            assert "namespace" not in doc["metadata"], key
        else:
            assert doc["metadata"].get("namespace") == elsewhere.get(key, NAMESPACE), key


def test_deployment_shape():
    spec = deployment()["spec"]
    pod = spec["template"]["spec"]
    assert spec["replicas"] == 3
    hpa = find("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["minReplicas"] == spec["replicas"] <= hpa["spec"]["maxReplicas"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    keys = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
    assert "topology.kubernetes.io/zone" in keys
    assert pod["affinity"]["podAntiAffinity"]
    assert find("PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    assert pod["serviceAccountName"] == find("ServiceAccount")["metadata"]["name"]
    role = find("ServiceAccount")["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::(<ACCOUNT_ID>|\d{12}):role/[\w+=,.@/-]+", role), role


def test_pod_security():
    pod = deployment()["spec"]["template"]["spec"]
    c = container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in sc["capabilities"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    # the image's numeric USER is the one the pod runs as
    assert dockerfile_user() == f"{sc['runAsUser']}:{sc['runAsGroup']}"
    for key in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][key]), key


def test_ports_probes_and_service():
    broker_toml, _ = configmap_files()
    c = container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": 50051, "metrics": 9090}
    assert broker_toml["listen"].rsplit(":", 1)[1] == str(ports["grpc"])
    assert broker_toml["metrics_listen"].rsplit(":", 1)[1] == str(ports["metrics"])
    expected = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    for probe, path in expected.items():
        get = c[probe]["httpGet"]
        assert (get["path"], get["port"]) == (path, "metrics"), probe
    services = {d["metadata"]["name"]: d["spec"] for d in all_objects() if d["kind"] == "Service"}
    assert {p["targetPort"] for p in services["secrets-broker"]["ports"]} == {"grpc", "metrics"}
    headless = services["secrets-broker-headless"]
    assert headless["clusterIP"] == "None"
    assert [p["targetPort"] for p in headless["ports"]] == ["grpc"]
    for spec in services.values():
        for port in spec["ports"]:
            assert port["targetPort"] in ports


def test_network_policy():
    spec = find("NetworkPolicy")["spec"]
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    ingress_ports = sorted(p["port"] for rule in spec["ingress"] for p in rule["ports"])
    assert ingress_ports == [9090, 50051]
    grpc_rule = next(r for r in spec["ingress"] if r["ports"][0]["port"] == 50051)
    assert all(peer.get("namespaceSelector", {}).get("matchLabels") or peer.get("podSelector")
               for peer in grpc_rule["from"]), "gRPC ingress must be limited to labelled clients"
    egress_ports = sorted((p["protocol"], p["port"]) for rule in spec["egress"] for p in rule["ports"])
    assert egress_ports == [("TCP", 53), ("TCP", 80), ("TCP", 443), ("UDP", 53)]


def egress_allows(spec: dict, address: str, port: int, protocol: str = "TCP") -> bool:
    """Whether the NetworkPolicy lets the selected pods connect to an IP
    address (Kubernetes' semantics for ipBlock peers; peers given by pod or
    namespace selectors reach pods, never these addresses)."""
    assert "Egress" in spec["policyTypes"]
    ip = ipaddress.ip_address(address)

    def in_block(block: dict) -> bool:
        def contains(cidr: str) -> bool:
            network = ipaddress.ip_network(cidr)
            return network.version == ip.version and ip in network
        return contains(block["cidr"]) and not any(contains(c) for c in block.get("except", []))

    for rule in spec.get("egress", []):
        ports = rule.get("ports")
        if ports and not any(p.get("protocol", "TCP") == protocol
                             and p["port"] <= port <= p.get("endPort", p["port"]) for p in ports):
            continue
        peers = rule.get("to")
        if not peers:       # no `to`: every destination
            return True
        if any("ipBlock" in peer and in_block(peer["ipBlock"]) for peer in peers):
            return True
    return False


# The EKS Pod Identity agent: a hostNetwork DaemonSet on every node, serving
# the pods' credentials over plain HTTP on a link-local address.
POD_IDENTITY_AGENT = {"169.254.170.23", "fd00:ec2::23"}
IMDS = {"169.254.169.254", "fd00:ec2::254"}


def test_network_policy_egress_reaches_the_credentials_and_aws_only():
    """Credentials (STS on 443 for IRSA; the Pod Identity agent on 80) and
    the AWS APIs are reachable; IMDS is not, and port 80 is open to nothing
    but the agent."""
    spec = find("NetworkPolicy")["spec"]
    assert egress_allows(spec, "52.119.160.10", 443)        # an AWS endpoint
    for agent in POD_IDENTITY_AGENT:
        assert egress_allows(spec, agent, 80), f"EKS Pod Identity agent {agent}:80 is blocked"
        assert not egress_allows(spec, agent, 80, "UDP")
    for other in ("169.254.170.22", "169.254.170.24", "52.119.160.10", "10.0.0.1", "0.0.0.0",
                  "fd00:ec2::24", "2600:1f18::1"):
        assert not egress_allows(spec, other, 80), f"port 80 open to {other}"
    for address in IMDS:
        for port in (53, 80, 443, 8080):
            assert not egress_allows(spec, address, port), f"IMDS reachable: {address}:{port}"
    text = (K8S / "networkpolicy.yaml").read_text()
    assert "Pod Identity" in text, "say next to the rule why port 80 of the agent is open"


def test_network_policy_lets_dns_reach_node_local_dns_cache():
    """Clusters with NodeLocal DNSCache resolve through 169.254.20.10 on
    every node (hostNetwork, not a kube-dns pod): DNS to it is open, on 53
    only."""
    spec = find("NetworkPolicy")["spec"]
    for protocol in ("UDP", "TCP"):
        assert egress_allows(spec, "169.254.20.10", 53, protocol), f"NodeLocal DNSCache {protocol}/53"
    assert not egress_allows(spec, "169.254.20.10", 80)
    assert not egress_allows(spec, "169.254.20.11", 53, "UDP")


def test_network_policy_evaluation_sees_a_widened_copy():
    """egress_allows is not vacuous: opening 80 to the world, or IMDS on 443,
    is seen."""
    spec = find("NetworkPolicy")["spec"]
    widened = json.loads(json.dumps(spec))
    widened["egress"].append({"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"protocol": "TCP", "port": 80}]})
    assert egress_allows(widened, "52.119.160.10", 80) and egress_allows(widened, "169.254.169.254", 80)
    widened = json.loads(json.dumps(spec))
    for rule in widened["egress"]:
        for peer in rule.get("to", []):
            peer.get("ipBlock", {}).pop("except", None)
    assert egress_allows(widened, "169.254.169.254", 443)


def test_volumes_config_and_tls_wiring():
    broker_toml, _ = configmap_files()
    pod = deployment()["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container()["volumeMounts"]}
    assert set(mounts) <= set(volumes)
    for mount in mounts.values():
        assert "subPath" not in mount, "subPath mounts never see ConfigMap/Secret updates"
    config_dir = mounts["config"]["mountPath"]
    tls_dir = mounts["tls"]["mountPath"]
    assert volumes["config"]["configMap"]["name"] == "secrets-broker-config"
    env = {e["name"]: e.get("value") for e in container()["env"]}
    assert env["BROKER_CONFIG"] == f"{config_dir}/broker.toml"
    assert broker_toml["policy"] == f"{config_dir}/policy.toml"
    server = find("Certificate", "secrets-broker-server")
    assert volumes["tls"]["secret"]["secretName"] == server["spec"]["secretName"]
    assert broker_toml["tls_cert"] == f"{tls_dir}/tls.crt"
    assert broker_toml["tls_key"] == f"{tls_dir}/tls.key"
    assert broker_toml["tls_client_ca"] == f"{tls_dir}/ca.crt"
    # the server certificate names both Services, in every form a client
    # may dial (short, with the namespace, .svc, fully qualified)
    names = set(server["spec"]["dnsNames"])
    for service in (d for d in all_objects() if d["kind"] == "Service"):
        name = service["metadata"]["name"]
        for form in (name, f"{name}.{NAMESPACE}", f"{name}.{NAMESPACE}.svc", f"{name}.{NAMESPACE}.svc.cluster.local"):
            assert form in names, form
    assert "server auth" in server["spec"]["usages"]
    client = find("Certificate", "auth-service-secrets-broker-client")
    assert "client auth" in client["spec"]["usages"]
    assert client["spec"]["issuerRef"] == server["spec"]["issuerRef"]


def test_env_and_grace_period():
    broker_toml, _ = configmap_files()
    env = {e["name"]: e.get("value") for e in container()["env"]}
    for name, value in GUIDE_ENV.items():
        assert env.get(name) == value, name
    shadowed = SHADOWED_BY_DEPLOYMENT_ENV & set(broker_toml)
    assert not shadowed, f"broker.toml keys overridden by the Deployment's env: {shadowed}"
    pod = deployment()["spec"]["template"]["spec"]
    grace = parse_seconds(broker_toml.get("shutdown_grace", "10"))
    pre_stop = container()["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + grace + EVENT_QUEUE_CLEANUP_SECONDS


def test_the_queue_cleanup_time_the_deploy_files_leave_is_the_brokers():
    """The 25 s left past the grace is what the broker gives its queue's
    removal (EVENTS_CLEANUP): a shorter bound in the code would abandon the
    queue with time left, a longer one would meet SIGKILL."""
    app = (ROOT / "src" / "app.rs").read_text()
    match = re.search(r"const EVENTS_CLEANUP: [\w:]+ = [\w:]+::from_secs\((\d+)\);", app)
    assert match, "EVENTS_CLEANUP not found in src/app.rs"
    assert int(match.group(1)) == EVENT_QUEUE_CLEANUP_SECONDS


def test_hostname_is_the_pod_name():
    """The topic mode names each replica's queue after HOSTNAME, which
    Kubernetes sets to the pod name unless the manifest overrides it."""
    pod = deployment()["spec"]["template"]["spec"]
    assert "hostname" not in pod and "setHostnameAsFQDN" not in pod
    assert "HOSTNAME" not in {e["name"] for e in container()["env"]}
    text = (K8S / "deployment.yaml").read_text()
    assert "HOSTNAME" in text, "say next to the env that the event queue name derives from HOSTNAME"


def test_commented_events_topic_setting_is_valid():
    """broker.toml's commented-out events_topic_arn, once uncommented, is a
    key the broker knows and names the template's default topic."""
    text = find("ConfigMap", "secrets-broker-config")["data"]["broker.toml"]
    lines = [line for line in text.splitlines() if line.startswith("# events_topic_arn")]
    assert len(lines) == 1, "broker.toml: one commented-out events_topic_arn line"
    setting = tomllib.loads(lines[0].removeprefix("# "))
    assert set(setting) <= CONFIG_KEYS
    topic = cfn_template()["Parameters"]["TopicName"]["Default"]
    assert setting["events_topic_arn"] == f"arn:aws:sns:ap-east-1:<ACCOUNT_ID>:{topic}"


def test_configmap_toml():
    broker_toml, policy = configmap_files()
    unknown = set(broker_toml) - CONFIG_KEYS
    assert not unknown, f"broker.toml: keys the broker does not know: {unknown}"
    # Every address, IPv6 and IPv4: an IPv6 cluster's probes and Service
    # reach the pod's IPv6 address.
    assert broker_toml["listen"].startswith("[::]:")
    assert broker_toml["metrics_listen"].startswith("[::]:")
    assert {"tls_cert", "tls_key", "tls_client_ca", "policy"} <= set(broker_toml), \
        "off loopback the broker needs mTLS and a policy"
    assert set(policy) == {"grant"}
    for grant in policy["grant"]:
        assert set(grant) <= {"identity", "secrets", "admin"}, grant
        assert isinstance(grant["identity"], str) and grant["identity"]
        assert all(isinstance(s, str) and s.startswith("insurecove/") for s in grant["secrets"]), grant
        assert isinstance(grant.get("admin", False), bool)
    identities = [g["identity"] for g in policy["grant"]]
    assert any(i.startswith("spiffe://") for i in identities)
    assert any(not i.startswith("spiffe://") for i in identities), "a DNS-name identity example"
    # the example client's identity is granted something
    client_uri = find("Certificate", "auth-service-secrets-broker-client")["spec"]["uris"][0]
    assert client_uri in identities


def test_broker_check_accepts_the_kubernetes_config(run_cli, moto, tmp_path):
    """The real binary's `check` takes the ConfigMap's broker.toml and
    policy.toml with the Deployment's environment (paths moved under tmp;
    certificates like cert-manager's; AWS = moto)."""
    data = find("ConfigMap", "secrets-broker-config")["data"]
    broker_toml, _ = configmap_files()
    mounts = {m["name"]: m["mountPath"] for m in container()["volumeMounts"]}
    config_dir = relocate(tmp_path, mounts["config"])
    tls_dir = relocate(tmp_path, mounts["tls"])
    write_tls_files(tls_dir)
    text = data["broker.toml"]
    for mount in (mounts["config"], mounts["tls"]):
        text = text.replace(f'"{mount}/', f'"{relocate(tmp_path, mount, create=False)}/')
    (config_dir / "broker.toml").write_text(text)
    (config_dir / "policy.toml").write_text(data["policy.toml"])
    for value in tomllib.loads(text).values():
        assert not str(value).startswith("/etc/"), value
    env = {e["name"]: e["value"] for e in container()["env"]}
    env["BROKER_CONFIG"] = str(relocate(tmp_path, env["BROKER_CONFIG"], create=False))
    env |= moto.broker_env()     # AWS = moto (same region)
    proc = run_cli("check", env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "mutual TLS" in out, out
    assert broker_toml["listen"] in out, out


# -- who can mint an identity: the approval policies -----------------------
#
# The broker grants secrets to the names in a client certificate, so what
# the CA signs for whom is the boundary. The CA is a ClusterIssuer (clients
# request certificates in their own namespaces); certificate-request-policy.yaml
# binds each name to the namespace that asks. These tests run approver-policy's
# decision, modelled below for the fields the manifests use, on requests.

# Who creates the CertificateRequest of every Certificate: cert-manager's
# controller, whatever user wrote the Certificate.
CERT_MANAGER_USER = "system:serviceaccount:cert-manager:cert-manager"
# The Certificate fields the model knows; any other would go unjudged here.
MODELLED_CERTIFICATE_FIELDS = {
    "secretName", "commonName", "dnsNames", "uris", "ipAddresses", "emailAddresses", "duration",
    "renewBefore", "isCA", "usages", "privateKey", "issuerRef",
}
MODELLED_ALLOWED = {"commonName", "dnsNames", "uris", "ipAddresses", "emailAddresses", "isCA", "usages"}


class _CelString(str):
    """`self` in a rule: a string with CEL's string methods (CEL's names)."""

    def matches(self, pattern: str) -> bool:       # RE2 search, as CEL's matches()
        return re.search(pattern, self) is not None

    def startsWith(self, prefix: str) -> bool:
        return self.startswith(prefix)

    def endsWith(self, suffix: str) -> bool:
        return self.endswith(suffix)

    def contains(self, part: str) -> bool:
        return part in self

    def size(self) -> int:
        return len(self)


_CEL_TOKEN = re.compile(r"\s*(?:('[^'\\]*')|(\|\||&&|==|!=|!|[+().,])|([A-Za-z_]\w*))")
_CEL_NAMES = {"self", "cr", "namespace", "name", "matches", "startsWith", "endsWith", "contains", "size"}


def cel_rule(rule: str, value: str, namespace: str, name: str = "request") -> bool:
    """A CEL rule of the subset these policies use (string literals without
    escapes, + == != ! && ||, `self` with its string methods, `cr.namespace`
    and `cr.name`), evaluated as approver-policy would. Anything outside the
    subset fails the test rather than being guessed at."""
    python, position = [], 0
    while position < len(rule):
        token = _CEL_TOKEN.match(rule, position)
        assert token and token.end() > position, f"rule outside the modelled CEL subset: {rule!r} at {position}"
        literal, operator, word = token.groups()
        if literal:
            python.append(literal)
        elif operator:
            python.append({"||": " or ", "&&": " and ", "!": " not "}.get(operator, operator))
        else:
            assert word in _CEL_NAMES | {"true", "false"}, f"rule uses {word!r}, not modelled: {rule!r}"
            python.append({"true": "True", "false": "False"}.get(word, word))
        position = token.end()
    request = type("CertificateRequest", (), {"namespace": namespace, "name": name})
    # Only whitelisted tokens reach eval, and it sees no builtins.
    result = eval("".join(python), {"__builtins__": {}}, {"self": _CelString(value), "cr": request})
    assert isinstance(result, bool), rule
    return result


def _wildcard(pattern: str, value: str) -> bool:
    """approver-policy's wildcard match: `*` is any run of characters."""
    return re.fullmatch(".*".join(map(re.escape, pattern.split("*"))), value, re.DOTALL) is not None


def certificate_request(spec: dict, namespace: str, user: str = CERT_MANAGER_USER) -> dict:
    """What approver-policy sees of the request cert-manager makes for a
    Certificate with this spec: its usages as written, or, without any, the
    issuer's defaults (and `cert sign` for a CA), which the policies must
    then allow."""
    unknown = set(spec) - MODELLED_CERTIFICATE_FIELDS
    assert not unknown, f"Certificate fields the approval model does not judge: {unknown}"
    usages = set(spec.get("usages", []))
    if not usages:
        usages = {"digital signature", "key encipherment"} | ({"cert sign"} if spec.get("isCA") else set())
    return {
        "namespace": namespace, "user": user, "issuerRef": spec["issuerRef"],
        "commonName": spec.get("commonName", ""),
        **{field: list(spec.get(field, [])) for field in ("dnsNames", "uris", "ipAddresses", "emailAddresses")},
        "isCA": bool(spec.get("isCA")), "usages": usages, "duration": spec.get("duration"),
    }


def policies_usable_by(documents: list[dict], user: str) -> list[dict]:
    """The CertificateRequestPolicies the file's RBAC lets `user` use:
    approver-policy ignores every other policy for that user's requests."""
    roles = {d["metadata"]["name"]: d for d in documents if d["kind"] == "ClusterRole"}
    names: set[str] | None = set()
    for binding in (d for d in documents if d["kind"] == "ClusterRoleBinding"):
        subjects = {f"system:serviceaccount:{s['namespace']}:{s['name']}" if s["kind"] == "ServiceAccount"
                    else s["name"] for s in binding["subjects"]}
        if user not in subjects:
            continue
        assert binding["roleRef"]["kind"] == "ClusterRole"
        for rule in roles[binding["roleRef"]["name"]]["rules"]:
            if ("policy.cert-manager.io" in rule["apiGroups"] and "certificaterequestpolicies" in rule["resources"]
                    and "use" in rule["verbs"]):
                if "resourceNames" not in rule:
                    names = None            # every policy
                elif names is not None:
                    names |= set(rule["resourceNames"])
    return [d for d in documents if d["kind"] == "CertificateRequestPolicy"
            and (names is None or d["metadata"]["name"] in names)]


def policy_selects(policy: dict, request: dict) -> bool:
    selector = policy["spec"]["selector"]
    wanted = selector.get("issuerRef")
    if wanted is not None:
        ref = request["issuerRef"]
        # cert-manager's defaults for a reference that leaves them out
        have = {"name": ref["name"], "kind": ref.get("kind") or "Issuer",
                "group": ref.get("group") or "cert-manager.io"}
        if any(key in wanted and not _wildcard(wanted[key], have[key]) for key in have):
            return False
    namespaces = selector.get("namespace")
    if namespaces is not None:
        assert "matchLabels" not in namespaces, "namespace labels are not modelled"
        names = namespaces.get("matchNames", [])
        if names and not any(_wildcard(n, request["namespace"]) for n in names):
            return False
    return True


def policy_violations(policy: dict, request: dict) -> list[str]:
    """Why the policy does not permit the request ([] = it does)."""
    allowed = policy["spec"].get("allowed", {})
    constraints = policy["spec"].get("constraints", {})
    assert set(allowed) <= MODELLED_ALLOWED and set(constraints) <= {"minDuration", "maxDuration"}, policy
    problems: list[str] = []

    def judge(field: str, values: list[str], rules: dict | None, key: str) -> None:
        if not values:
            if rules and rules.get("required"):
                problems.append(f"{field}: required")
            return
        if not rules or (key not in rules and not rules.get("validations")):
            problems.append(f"{field}: none allowed, {values} asked")
            return
        for value in values:
            patterns = _as_list(rules.get(key, "*"))
            if not any(_wildcard(pattern, value) for pattern in patterns):
                problems.append(f"{field}: {value!r} not in {patterns}")
            for validation in rules.get("validations", []):
                if not cel_rule(validation["rule"], value, request["namespace"]):
                    problems.append(f"{field}: {value!r}: {validation.get('message', validation['rule'])}")

    judge("commonName", [request["commonName"]] if request["commonName"] else [], allowed.get("commonName"), "value")
    for field in ("dnsNames", "uris", "ipAddresses", "emailAddresses"):
        judge(field, request[field], allowed.get(field), "values")
    if request["isCA"] and not allowed.get("isCA"):
        problems.append("isCA: not allowed")
    if not request["usages"] <= set(allowed.get("usages", [])):
        problems.append(f"usages: {sorted(request['usages'] - set(allowed.get('usages', [])))} not allowed")
    if constraints and request["duration"] is None:
        problems.append("a duration bound is set and the request names no duration")
    elif constraints:
        seconds = parse_seconds(request["duration"])
        if "maxDuration" in constraints and seconds > parse_seconds(constraints["maxDuration"]):
            problems.append(f"duration {request['duration']} over {constraints['maxDuration']}")
        if "minDuration" in constraints and seconds < parse_seconds(constraints["minDuration"]):
            problems.append(f"duration {request['duration']} under {constraints['minDuration']}")
    return problems


def approval(documents: list[dict], request: dict) -> str:
    """approver-policy's answer: "approved" when a selected policy permits
    the request, "denied" when policies select it and none permits,
    "pending" when none selects it (never signed)."""
    selected = [p for p in policies_usable_by(documents, request["user"]) if policy_selects(p, request)]
    if not selected:
        return "pending"
    return "approved" if any(not policy_violations(p, request) for p in selected) else "denied"


def approval_documents() -> list[dict]:
    return load_documents(K8S / APPROVAL_POLICY_FILE)


def shipped_certificates() -> list[dict]:
    return [d for d in all_objects() if d["kind"] == "Certificate"]


def admin_identities() -> list[str]:
    _, policy = configmap_files()
    return [g["identity"] for g in policy["grant"] if g.get("admin")]


def _client_spec(**names) -> dict:
    """The example client's Certificate spec with other names in it."""
    spec = dict(find("Certificate", "auth-service-secrets-broker-client")["spec"])
    for field in ("commonName", "dnsNames", "uris"):
        spec.pop(field, None)
    return spec | names


def minting_problems(documents: list[dict]) -> list[str]:
    """Every way the approval policies in `documents` fail: a shipped
    Certificate not approved, or a name approved for a namespace it does
    not belong to ([] = none)."""
    problems = []

    def expect(outcome: str, spec: dict, namespace: str, why: str, user: str = CERT_MANAGER_USER) -> None:
        got = approval(documents, certificate_request(spec, namespace, user))
        if got != outcome:
            problems.append(f"{why}: {got}, want {outcome} (namespace {namespace}, {spec})")

    for cert in shipped_certificates():
        expect("approved", cert["spec"], cert["metadata"]["namespace"], f"shipped {cert['metadata']['name']}")
    (admin,) = admin_identities()
    example = find("Certificate", "auth-service-secrets-broker-client")
    server = find("Certificate", "secrets-broker-server")["spec"]
    ca = find("Certificate", "secrets-broker-ca")["spec"]
    own = example["metadata"]["namespace"]
    # The admin identity: from the broker's namespace only.
    expect("approved", _client_spec(uris=[admin]), NAMESPACE, "admin from the broker's namespace")
    for namespace in (own, "attacker", "ops", "default", "cert-manager", "kube-system"):
        expect("denied", _client_spec(uris=[admin]), namespace, "admin minted elsewhere")
    expect("denied", _client_spec(commonName=own, uris=[admin]), own, "admin next to an own CN")
    # The example client's name from any other namespace, or one like it.
    expect("denied", example["spec"], "attacker", "another namespace's identity")
    expect("denied", _client_spec(uris=[f"spiffe://insurecove/{own}"]), "auth", "a namespace that prefixes it")
    for uri in (f"spiffe://insurecove/{own}/../{NAMESPACE}/admin", f"spiffe://insurecove/{own}/%2e%2e/x",
                f"spiffe://insurecove/{own}/./x", f"spiffe://insurecove/{own}evil", f"spiffe://insurecove/{own}?x",
                f"spiffe://other/{own}", f"https://insurecove/{own}", f"spiffe://insurecove/{own}//x"):
        expect("denied", _client_spec(uris=[uri]), own, f"URI trick {uri}")
    expect("approved", _client_spec(uris=[f"spiffe://insurecove/{own}/worker-1"]), own, "own sub-identity")
    # DNS and CN identities: the namespace's Services only.
    expect("approved", _client_spec(dnsNames=["reporting.analytics.svc.cluster.local"]), "analytics", "own DNS name")
    for namespace in ("reporting", "attacker", "svc"):
        expect("denied", _client_spec(dnsNames=["reporting.analytics.svc.cluster.local"]), namespace,
               "another namespace's DNS name")
    expect("denied", _client_spec(dnsNames=["analytics.svc.cluster.local"]), "analytics", "DNS name without a Service")
    expect("denied", _client_spec(dnsNames=["*.analytics.svc.cluster.local"]), "analytics", "wildcard DNS name")
    expect("approved", _client_spec(commonName="analytics"), "analytics", "CN of the own namespace")
    expect("denied", _client_spec(commonName="auth-service"), "attacker", "CN of another namespace")
    # The server's names (clients would trust a certificate with them) and a CA.
    for namespace in ("attacker", own):
        expect("denied", server, namespace, "the server certificate outside the broker's namespace")
        expect("denied", _client_spec(uris=[f"spiffe://insurecove/{namespace}"], isCA=True), namespace, "a CA")
        expect("denied", _client_spec(uris=[f"spiffe://insurecove/{namespace}"], usages=["server auth"]),
               namespace, "server auth for a client")
    expect("denied", ca | {"issuerRef": example["spec"]["issuerRef"]}, "cert-manager", "a CA from the client CA")
    # Other fields: no IP or e-mail SANs, a bounded lifetime.
    base = {"uris": [f"spiffe://insurecove/{own}"]}
    expect("denied", _client_spec(**base, ipAddresses=["10.0.0.1"]), own, "an IP SAN")
    expect("denied", _client_spec(**base, emailAddresses=["a@insurecove"]), own, "an e-mail SAN")
    expect("denied", {k: v for k, v in _client_spec(**base).items() if k != "duration"}, own, "no duration")
    expect("denied", _client_spec(**base, duration="8760h"), own, "a year")
    # A request with no group in its issuerRef is judged the same.
    ref = {k: v for k, v in example["spec"]["issuerRef"].items() if k != "group"}
    expect("denied", _client_spec(uris=[admin], issuerRef=ref), "attacker", "admin, issuerRef without group")
    # A CertificateRequest a person writes by hand uses no policy: never approved.
    expect("pending", _client_spec(uris=[admin]), NAMESPACE, "a hand-made request", user="alice")
    return problems


def test_approval_policies_bind_every_name_to_its_namespace():
    problems = minting_problems(approval_documents())
    assert not problems, "\n".join(problems)


def test_approval_policies_are_all_bound_to_cert_manager():
    """Each policy is usable by cert-manager's controller (the requester of
    every Certificate) and by nobody else."""
    documents = approval_documents()
    names = {d["metadata"]["name"] for d in documents if d["kind"] == "CertificateRequestPolicy"}
    assert {p["metadata"]["name"] for p in policies_usable_by(documents, CERT_MANAGER_USER)} == names
    assert not policies_usable_by(documents, "alice")
    bindings = [d for d in documents if d["kind"] == "ClusterRoleBinding"]
    assert [s for b in bindings for s in b["subjects"]] == [
        {"kind": "ServiceAccount", "name": "cert-manager", "namespace": "cert-manager"}]
    # the policies select the issuers certificates.yaml defines
    issuers = {(d["kind"], d["metadata"]["name"]) for d in all_objects() if d["kind"] in ("Issuer", "ClusterIssuer")}
    for policy in (d for d in documents if d["kind"] == "CertificateRequestPolicy"):
        ref = policy["spec"]["selector"]["issuerRef"]
        assert (ref["kind"], ref["name"]) in issuers, policy["metadata"]["name"]


def test_every_granted_identity_is_mintable_from_one_namespace():
    """Each identity policy.toml grants can be issued to exactly one
    namespace (so its client can get it, and nobody else); the admin's is
    the broker's own."""
    _, policy = configmap_files()
    documents = approval_documents()
    for grant in policy["grant"]:
        identity = grant["identity"].replace("**", "x").replace("*", "x")
        kind, _, name = identity.partition(":")
        if "://" in identity:
            spec, home = _client_spec(uris=[identity]), identity.split("/")[3]
        elif kind == "dns":
            spec, home = _client_spec(dnsNames=[name]), name.split(".svc")[0].rsplit(".", 1)[-1]
        else:
            assert kind == "cn", identity
            spec, home = _client_spec(commonName=name), name
        candidates = {home, NAMESPACE, "cert-manager", "kube-system", "default", "attacker", "auth-service", "ops"}
        minting = {ns for ns in candidates
                   if approval(documents, certificate_request(spec, ns)) == "approved"}
        assert minting == {home}, f"{grant['identity']}: issued to {sorted(minting)}, want only {home}"
        if grant.get("admin"):
            assert home == NAMESPACE, f"admin identity {grant['identity']} belongs to namespace {home}"


def _widened(mutate) -> list[dict]:
    documents = json.loads(json.dumps(approval_documents()))
    policies = {d["metadata"]["name"]: d for d in documents if d["kind"] == "CertificateRequestPolicy"}
    mutate(policies, documents)
    return documents


def _allow_all(policies: dict, documents: list) -> None:
    """A companion of disableAutoApproval in many clusters: a policy for
    every issuer, bound to cert-manager."""
    documents.append({
        "apiVersion": "policy.cert-manager.io/v1alpha1", "kind": "CertificateRequestPolicy",
        "metadata": {"name": "allow-all"},
        "spec": {"selector": {"issuerRef": {}}, "allowed": {
            "commonName": {"value": "*"}, "uris": {"values": ["*"]}, "dnsNames": {"values": ["*"]},
            "usages": ["client auth", "digital signature", "key encipherment"]}},
    })
    next(d for d in documents if d["kind"] == "ClusterRole")["rules"][0]["resourceNames"].append("allow-all")


def _clients_rule(field: str, rule: str):
    def mutate(policies: dict, documents: list) -> None:
        policies["secrets-broker-clients"]["spec"]["allowed"][field]["validations"][0]["rule"] = rule
    return mutate


@pytest.mark.parametrize("mutate", [
    _clients_rule("uris", "true"),
    _clients_rule("dnsNames", "self.endsWith('.svc.cluster.local')"),
    _clients_rule("commonName", "true"),
    lambda p, d: p["secrets-broker-clients"]["spec"]["allowed"].__setitem__("isCA", True),
    lambda p, d: p["secrets-broker-clients"]["spec"]["allowed"]["usages"].append("server auth"),
    lambda p, d: p["secrets-broker-clients"]["spec"]["allowed"].__setitem__("ipAddresses", {"values": ["*"]}),
    lambda p, d: p["secrets-broker-clients"]["spec"].pop("constraints"),
    lambda p, d: p["secrets-broker-server"]["spec"]["selector"].pop("namespace"),
    _allow_all,
], ids=["any-uri", "any-service-dns-name", "any-cn", "client-ca", "client-server-auth", "ip-sans",
        "no-max-duration", "server-any-namespace", "allow-all-policy"])
def test_minting_check_catches_a_widened_policy(mutate):
    """minting_problems is not vacuous: each widening is seen."""
    assert minting_problems(_widened(mutate))


def test_only_the_client_ca_is_cluster_wide():
    """The CA is a ClusterIssuer only because clients' Certificates live in
    their namespaces; its bootstrap self-signed issuer is namespaced, next
    to the one Certificate that uses it."""
    cluster_issuers = [d["metadata"]["name"] for d in all_objects() if d["kind"] == "ClusterIssuer"]
    assert cluster_issuers == ["secrets-broker-ca"]
    issuers = {d["metadata"]["name"]: d for d in all_objects() if d["kind"] == "Issuer"}
    for cert in shipped_certificates():
        ref = cert["spec"]["issuerRef"]
        if ref["kind"] == "Issuer":
            assert issuers[ref["name"]]["metadata"]["namespace"] == cert["metadata"]["namespace"], ref
        else:
            assert ref["name"] == "secrets-broker-ca", ref


def test_identity_minting_is_documented():
    """Whoever applies the manifests is told, where they look, that the CA
    mints any name for anyone until approval is restricted."""
    for path in (K8S / "certificates.yaml", K8S / "kustomization.yaml", DEPLOY / "README.md", ROOT / "SECURITY.md"):
        text = path.read_text()
        assert APPROVAL_POLICY_FILE in text, f"{path.name} does not point at {APPROVAL_POLICY_FILE}"
        assert "approver-policy" in text, path.name
    readme = (DEPLOY / "README.md").read_text()
    assert "### 1c. Who can mint an identity" in readme and "disableAutoApproval" in readme
    assert "### Who can obtain an identity" in (ROOT / "SECURITY.md").read_text()


# ==========================================================================
# (b) IAM policy

READ_ACTIONS = {"secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"}
UNSCOPED_ACTIONS = {"secretsmanager:ListSecrets"}
SECRET_ARN = "arn:aws:secretsmanager:ap-east-1:<ACCOUNT_ID>:secret:insurecove/*"
EVENTS_QUEUE_ACTIONS = {"sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"}
EVENTS_QUEUE_ARN = "arn:aws:sqs:ap-east-1:<ACCOUNT_ID>:<QUEUE_NAME>"


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def identity_policy_grants(policy: dict) -> dict[str, set[str]]:
    """action -> resources of an identity policy's Allow statements."""
    assert policy["Version"] == "2012-10-17"
    allowed: dict[str, set[str]] = {}
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow", statement
        assert "NotAction" not in statement and "NotResource" not in statement, statement
        assert "Principal" not in statement, "an identity policy names no principal"
        for action in _as_list(statement["Action"]):
            assert "*" not in action and "?" not in action, f"wildcard action {action}"
            allowed.setdefault(action, set()).update(_as_list(statement["Resource"]))
    return allowed


def test_iam_policy_is_least_privilege():
    allowed = identity_policy_grants(json.loads((DEPLOY / "iam-policy.json").read_text()))
    assert set(allowed) == READ_ACTIONS | UNSCOPED_ACTIONS, sorted(allowed)
    for action in READ_ACTIONS:
        assert allowed[action] == {SECRET_ARN}, (action, allowed[action])
    # ListSecrets takes no resource ARN: "*" is the only valid Resource.
    for action in UNSCOPED_ACTIONS:
        assert allowed[action] == {"*"}, (action, allowed[action])


def test_events_queue_policy_is_one_queue():
    """--events-queue-url: read and delete messages of that one queue."""
    allowed = identity_policy_grants(json.loads((DEPLOY / "iam-policy-events-queue.json").read_text()))
    assert set(allowed) == EVENTS_QUEUE_ACTIONS, sorted(allowed)
    for action in EVENTS_QUEUE_ACTIONS:
        assert allowed[action] == {EVENTS_QUEUE_ARN}, (action, allowed[action])


# ==========================================================================
# (e) CloudFormation: the event path of --events-topic-arn


class _CfnLoader(yaml.SafeLoader):
    """PyYAML's safe loader plus CloudFormation's short intrinsic tags
    (!Ref, !Sub, !GetAtt, ...), read as their long JSON forms."""


def _intrinsic(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict:
    name = "Ref" if suffix == "Ref" else f"Fn::{suffix}"
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
        if suffix == "GetAtt":
            value = value.split(".", 1)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    return {name: value}


_CfnLoader.add_multi_constructor("!", _intrinsic)


def cfn_template(text: str | None = None) -> dict:
    return yaml.load(CFN_TEMPLATE.read_text() if text is None else text, Loader=_CfnLoader)


def cfn_lint(path: Path) -> subprocess.CompletedProcess:
    """cfn-lint from this interpreter's environment (.tools/venv/bin, pinned
    in tests/requirements.txt)."""
    tool = Path(sys.executable).parent / "cfn-lint"
    assert tool.is_file(), f"{tool} is missing: install tests/requirements.txt (./scripts/test.sh does)"
    return subprocess.run([str(tool), str(path)], capture_output=True, text=True, timeout=120, cwd=ROOT)


# What the broker needs in topic mode, and on what. (GetQueueUrl: a broker
# stopped before its queue was subscribed finds that queue by name to delete
# it.) test_event_template_grants_are_the_calls_of_the_source derives the
# same set from src/.
TOPIC_MODE_SQS_ACTIONS = {
    "sqs:CreateQueue", "sqs:DeleteQueue", "sqs:GetQueueAttributes", "sqs:GetQueueUrl",
    "sqs:SetQueueAttributes", "sqs:TagQueue", "sqs:ReceiveMessage", "sqs:DeleteMessage",
}
TOPIC_MODE_SNS_ACTIONS = {"sns:Subscribe", "sns:Unsubscribe", "sns:GetTopicAttributes", "sns:ListSubscriptionsByTopic"}
BROKER_QUEUES_ARN = {"Fn::Sub": "arn:${AWS::Partition}:sqs:${AWS::Region}:${AWS::AccountId}:secrets-broker-*"}
TOPIC_REF = {"Ref": "EventsTopic"}


def _resource_key(resource) -> str:
    return json.dumps(resource, sort_keys=True)


def iam_scope_problems(template: dict) -> list[str]:
    """Everything the template's IAM policies grant beyond the broker's
    queues and the one topic ([] = scoped)."""
    problems: list[str] = []
    documents = []
    for name, resource in template["Resources"].items():
        properties = resource.get("Properties", {})
        if resource["Type"] in ("AWS::IAM::ManagedPolicy", "AWS::IAM::Policy"):
            documents.append((name, properties["PolicyDocument"]))
        elif resource["Type"] in ("AWS::IAM::Role", "AWS::IAM::User", "AWS::IAM::Group"):
            documents += [(name, p["PolicyDocument"]) for p in properties.get("Policies", [])]
    if len(documents) != 1:
        problems.append(f"expected one IAM policy document, found {[n for n, _ in documents]}")
    allowed: dict[str, set[str]] = {}
    for name, document in documents:
        for statement in _as_list(document["Statement"]):
            where = f"{name}/{statement.get('Sid', '?')}"
            if statement.get("Effect") != "Allow" or "NotAction" in statement or "NotResource" in statement:
                problems.append(f"{where}: only plain Allow statements expected")
                continue
            resources = _as_list(statement.get("Resource", []))
            for resource in resources:
                if isinstance(resource, str) and ("*" == resource or resource.endswith(":*")):
                    problems.append(f"{where}: resource {resource!r} is not scoped")
            for action in _as_list(statement["Action"]):
                if "*" in action or "?" in action:
                    problems.append(f"{where}: wildcard action {action}")
                allowed.setdefault(action, set()).update(_resource_key(r) for r in resources)
    expected = TOPIC_MODE_SQS_ACTIONS | TOPIC_MODE_SNS_ACTIONS
    if set(allowed) != expected:
        problems.append(f"actions: extra {sorted(set(allowed) - expected)}, "
                        f"missing {sorted(expected - set(allowed))}")
    for action, resources in allowed.items():
        want = BROKER_QUEUES_ARN if action.startswith("sqs:") else TOPIC_REF
        if resources != {_resource_key(want)}:
            problems.append(f"{action}: resources {sorted(resources)}, want only {want}")
    return problems


def test_cfn_lint_accepts_the_event_template():
    proc = cfn_lint(CFN_TEMPLATE)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert out.strip() == "", out


@pytest.mark.parametrize("old,new", [
    ("Type: AWS::SNS::Topic\n", "Type: AWS::SNS::Topik\n"),                 # unknown type
    ("      State: ENABLED\n", "      State: ON\n"),                         # bad enum value
    ("!GetAtt LabelUpdatedRule.Arn", "!GetAtt LabelUpdatedRule.Nope"),      # bad attribute
], ids=["unknown-type", "bad-value", "bad-attribute"])
def test_cfn_lint_rejects_a_broken_copy(tmp_path, old, new):
    text = CFN_TEMPLATE.read_text()
    assert old in text
    broken = tmp_path / "secret-events.yaml"
    broken.write_text(text.replace(old, new, 1))
    assert cfn_lint(broken).returncode != 0


def test_event_template_grants_are_scoped():
    problems = iam_scope_problems(cfn_template())
    assert not problems, "\n".join(problems)
    policy = next(r for r in cfn_template()["Resources"].values() if r["Type"] == "AWS::IAM::ManagedPolicy")
    assert policy["Properties"]["Roles"] == [{"Ref": "BrokerRoleName"}]


@pytest.mark.parametrize("widen", [
    lambda s: s.__setitem__("Resource", "*") if "sqs:CreateQueue" in s["Action"] else None,
    lambda s: s.__setitem__("Resource", {"Fn::Sub": "arn:${AWS::Partition}:sqs:${AWS::Region}:${AWS::AccountId}:*"})
    if "sqs:CreateQueue" in s["Action"] else None,
    lambda s: s.__setitem__("Resource", "*") if "sns:Subscribe" in s["Action"] else None,
    lambda s: s.__setitem__("Resource", ["*", TOPIC_REF]) if "sns:Subscribe" in s["Action"] else None,
    lambda s: s["Action"].append("sqs:SendMessage") if "sqs:CreateQueue" in s["Action"] else None,
    lambda s: s.__setitem__("Action", ["sqs:*"]) if "sqs:CreateQueue" in s["Action"] else None,
    lambda s: s["Action"].append("sns:Publish") if "sns:Subscribe" in s["Action"] else None,
], ids=["sqs-star", "sqs-any-queue", "sns-star", "sns-star-too", "sqs-extra-action",
        "sqs-wildcard-action", "sns-extra-action"])
def test_event_template_scope_check_catches_widening(widen):
    template = cfn_template()
    policy = next(r for r in template["Resources"].values() if r["Type"] == "AWS::IAM::ManagedPolicy")
    for statement in policy["Properties"]["PolicyDocument"]["Statement"]:
        widen(statement)
    assert iam_scope_problems(template)


# The IAM actions that authorize each aws-sdk-sqs / aws-sdk-sns call (the
# Rust SDK's snake_case operation names). A batch call is authorized by its
# single-message action; CreateQueue with tags also needs TagQueue. An
# operation missing here fails the test below: add it, with its action.
SDK_CALL_ACTIONS = {
    ("sqs", "create_queue"): {"sqs:CreateQueue", "sqs:TagQueue"},
    ("sqs", "delete_queue"): {"sqs:DeleteQueue"},
    ("sqs", "get_queue_url"): {"sqs:GetQueueUrl"},
    ("sqs", "get_queue_attributes"): {"sqs:GetQueueAttributes"},
    ("sqs", "set_queue_attributes"): {"sqs:SetQueueAttributes"},
    ("sqs", "tag_queue"): {"sqs:TagQueue"},
    ("sqs", "receive_message"): {"sqs:ReceiveMessage"},
    ("sqs", "delete_message"): {"sqs:DeleteMessage"},
    ("sqs", "delete_message_batch"): {"sqs:DeleteMessage"},
    ("sqs", "change_message_visibility"): {"sqs:ChangeMessageVisibility"},
    ("sqs", "change_message_visibility_batch"): {"sqs:ChangeMessageVisibility"},
    ("sqs", "list_queues"): {"sqs:ListQueues"},
    ("sqs", "list_queue_tags"): {"sqs:ListQueueTags"},
    ("sqs", "purge_queue"): {"sqs:PurgeQueue"},
    ("sns", "subscribe"): {"sns:Subscribe"},
    ("sns", "unsubscribe"): {"sns:Unsubscribe"},
    ("sns", "get_topic_attributes"): {"sns:GetTopicAttributes"},
    ("sns", "get_subscription_attributes"): {"sns:GetSubscriptionAttributes"},
    ("sns", "set_subscription_attributes"): {"sns:SetSubscriptionAttributes"},
    ("sns", "list_subscriptions_by_topic"): {"sns:ListSubscriptionsByTopic"},
}
# Methods of the client handles that are not AWS calls.
SDK_CLIENT_METHODS = {"clone", "config"}


def source_sdk_calls() -> list[tuple[str, str, str]]:
    """(file, client, operation) of every SQS and SNS call in src/: the
    client handles are named `sqs` and `sns` (`sqs.get_queue_url()`,
    `self.sqs` with `.receive_message()` on the next line, `owned.sns.unsubscribe()`)."""
    calls = []
    for path in sorted((ROOT / "src").rglob("*.rs")):
        text = path.read_text()
        if "aws_sdk_sqs" not in text and "aws_sdk_sns" not in text:
            continue
        found = [(path.name, client, op) for client, op in re.findall(r"\b(sqs|sns)\s*\.\s*([a-z_]+)\(\)", text)
                 if op not in SDK_CLIENT_METHODS]
        # Every request the file sends must be one of those calls, so that a
        # call through a differently named handle cannot slip past.
        sends = len(re.findall(r"\.\s*send\(\)", text))
        assert sends == len(found), f"{path.name}: {sends} .send() but {len(found)} sqs./sns. calls: {found}"
        calls += found
    assert calls, "no SQS/SNS calls found in src/: has the event path moved?"
    return calls


def test_event_template_grants_are_the_calls_of_the_source():
    """The managed policy grants exactly what the topic mode calls (every
    call in src/ that mentions aws_sdk_sqs or aws_sdk_sns; the queue mode's
    calls are a subset), so a call added to the source without its grant,
    like GetQueueUrl once, fails here rather than in a first deployment."""
    needed: set[str] = set()
    for file, client, op in source_sdk_calls():
        assert (client, op) in SDK_CALL_ACTIONS, f"{file}: {client}.{op}(): add its IAM action to SDK_CALL_ACTIONS"
        needed |= SDK_CALL_ACTIONS[(client, op)]
    assert needed == TOPIC_MODE_SQS_ACTIONS | TOPIC_MODE_SNS_ACTIONS, (
        f"missing {sorted(needed - TOPIC_MODE_SQS_ACTIONS - TOPIC_MODE_SNS_ACTIONS)}, "
        f"unused {sorted(TOPIC_MODE_SQS_ACTIONS | TOPIC_MODE_SNS_ACTIONS - needed)}")
    policy = next(r for r in cfn_template()["Resources"].values() if r["Type"] == "AWS::IAM::ManagedPolicy")
    granted = {a for s in policy["Properties"]["PolicyDocument"]["Statement"] for a in _as_list(s["Action"])}
    assert granted == needed, f"missing {sorted(needed - granted)}, extra {sorted(granted - needed)}"


def test_event_template_grants_are_documented():
    """deploy/README.md (1b) names every action the template grants."""
    text = (DEPLOY / "README.md").read_text()
    section = text[text.index("### 1b."):text.index("### 1c.")]
    for action in TOPIC_MODE_SQS_ACTIONS | TOPIC_MODE_SNS_ACTIONS:
        _, name = action.split(":")
        assert f"`{action}`" in section or f"`{name}`" in section, f"deploy/README.md 1b does not name {action}"


def test_event_template_topic_rules_and_output():
    template = cfn_template()
    assert "CloudTrail trail" in template["Description"] and "management events" in template["Description"]
    resources = template["Resources"]
    topics = [n for n, r in resources.items() if r["Type"] == "AWS::SNS::Topic"]
    assert topics == ["EventsTopic"]
    rules = {n: r["Properties"] for n, r in resources.items() if r["Type"] == "AWS::Events::Rule"}
    # Every rule targets the topic, and only the topic.
    for name, rule in rules.items():
        assert [t["Arn"] for t in rule["Targets"]] == [TOPIC_REF], name
        assert rule["EventPattern"]["source"] == ["aws.secretsmanager"], name
    patterns = {tuple(r["EventPattern"]["detail-type"]): r["EventPattern"] for r in rules.values()}
    assert set(patterns) == {("Secret Label Updated",), ("AWS API Call via CloudTrail",)}
    api = patterns[("AWS API Call via CloudTrail",)]["detail"]
    assert api["eventSource"] == ["secretsmanager.amazonaws.com"]
    assert set(api["eventName"]) == {"PutSecretValue", "UpdateSecret", "UpdateSecretVersionStage",
                                     "RotateSecret", "DeleteSecret", "RestoreSecret"}
    # Only EventBridge publishes, and only for these rules.
    policies = [r["Properties"] for r in resources.values() if r["Type"] == "AWS::SNS::TopicPolicy"]
    assert len(policies) == 1 and policies[0]["Topics"] == [TOPIC_REF]
    statements = policies[0]["PolicyDocument"]["Statement"]
    assert len(statements) == 1
    (statement,) = statements
    assert statement["Effect"] == "Allow"
    assert statement["Principal"] == {"Service": "events.amazonaws.com"}
    assert _as_list(statement["Action"]) == ["sns:Publish"]
    assert statement["Resource"] == TOPIC_REF
    sources = statement["Condition"]["ArnEquals"]["aws:SourceArn"]
    assert sorted(map(_resource_key, sources)) == sorted(_resource_key({"Fn::GetAtt": [n, "Arn"]}) for n in rules)
    assert template["Outputs"]["TopicArn"]["Value"] == TOPIC_REF


# ==========================================================================
# (c) systemd unit


def unit_lines() -> list[tuple[str, str]]:
    pairs = []
    for line in (SYSTEMD / "secrets-broker.service").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            pairs.append((key.strip(), value.strip()))
    return pairs


INSTALLED_EXEC_START = "ExecStart=/usr/local/bin/secrets-broker serve"


def systemd_verify_problems(text: str, broker_bin: Path, tmp_path: Path) -> list[str]:
    """What `systemd-analyze verify` objects to in this unit text ([] = clean).

    verify checks the unit's syntax and directives, and also that ExecStart's
    program exists and is executable. The unit names the installed path,
    /usr/local/bin/secrets-broker, which does not exist on a build machine;
    so a copy is verified whose ExecStart points at the binary built for
    these tests. (Not `--root=DIR`: with a root, verify also looks up
    ExecReload's /bin/kill, the unit's dependencies and so on inside DIR.)"""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: install Debian's `systemd` (./scripts/test.sh does)"
    assert INSTALLED_EXEC_START in text
    unit = tmp_path / "secrets-broker.service"
    unit.write_text(text.replace(INSTALLED_EXEC_START, f"ExecStart={broker_bin} serve"))
    proc = subprocess.run([analyze, "verify", "--man=no", str(unit)],
                          capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    problems = [] if proc.returncode == 0 else [f"exit {proc.returncode}"]
    # Unknown directives ("Unknown key ..."/"Unknown lvalue") and bad values
    # ("Failed to parse ..., ignoring") are only warnings: verify still exits
    # 0. Anything it says about our unit is a problem.
    problems += [line for line in out.splitlines()
                 if "secrets-broker.service" in line
                 or any(word in line for word in ("Unknown", "Failed to parse", "Invalid", "ignoring"))]
    return problems


def test_systemd_unit_verifies(tmp_path, broker_bin):
    text = (SYSTEMD / "secrets-broker.service").read_text()
    problems = systemd_verify_problems(text, broker_bin, tmp_path)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("old,new", [
    ("NoNewPrivileges=yes", "NoNewPrivileges=yes\nProtectKernelFoo=yes"),   # unknown directive
    ("Restart=on-failure", "Restart=sometimes"),                             # bad value
    ("[Service]", "[Servce]"),                                               # unknown section
], ids=["unknown-directive", "bad-value", "bad-section"])
def test_systemd_verify_rejects_a_broken_copy(tmp_path, broker_bin, old, new):
    text = (SYSTEMD / "secrets-broker.service").read_text()
    assert old in text
    assert systemd_verify_problems(text.replace(old, new, 1), broker_bin, tmp_path)


def test_systemd_unit_hardening():
    pairs = unit_lines()
    settings: dict[str, list[str]] = {}
    for key, value in pairs:
        settings.setdefault(key, []).append(value)

    def one(key):
        assert key in settings, f"missing {key}="
        return settings[key][-1]

    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices",
                "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
                "ProtectControlGroups", "MemoryDenyWriteExecute", "LockPersonality",
                "RestrictNamespaces"):
        assert one(key) == "yes", key
    assert one("ProtectSystem") == "strict"
    assert set(one("RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert one("CapabilityBoundingSet") == ""
    assert settings["SystemCallFilter"][0] == "@system-service"
    assert "/etc/secrets-broker" in one("ReadOnlyPaths").split()
    assert one("User") not in ("root", "0") or one("DynamicUser") == "yes"
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("KillSignal") == "SIGTERM"
    assert one("Restart") == "on-failure"
    env_file = one("EnvironmentFile").lstrip("-")
    assert env_file == "/etc/secrets-broker/secrets-broker.env"
    grace = parse_seconds(read_env_file(SYSTEMD / "secrets-broker.env")["BROKER_SHUTDOWN_GRACE"])
    assert parse_seconds(one("TimeoutStopSec")) >= grace + EVENT_QUEUE_CLEANUP_SECONDS


def test_systemd_env_file_passes_check(run_cli, moto, tmp_path):
    """The example EnvironmentFile's settings, as `check` sees them (files
    under /etc/secrets-broker moved to tmp; AWS = moto)."""
    env = read_env_file(SYSTEMD / "secrets-broker.env")
    for name in GUIDE_ENV:
        assert env.get(name) == GUIDE_ENV[name], name
    etc = tmp_path / "etc-secrets-broker"
    write_tls_files(etc / "tls")
    (etc / "policy.toml").write_text(find("ConfigMap", "secrets-broker-config")["data"]["policy.toml"])
    env = {k: v.replace("/etc/secrets-broker", str(etc)) for k, v in env.items()}
    env |= moto.broker_env()
    proc = run_cli("check", env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "mutual TLS" in out, out


# ==========================================================================
# (d) Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    instructions, current = [], ""
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        word, _, args = current.partition(" ")
        instructions.append((word.upper(), args.strip()))
        current = ""
    assert not current, "Dockerfile ends inside a continuation line"
    return instructions


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def dockerfile_user() -> str:
    users = [args for word, args in final_stage() if word == "USER"]
    assert users, "the runtime stage sets no USER (it would run as root)"
    return users[-1]


def test_dockerfile():
    known = {"FROM", "RUN", "COPY", "ADD", "ENV", "ARG", "USER", "WORKDIR", "EXPOSE",
             "HEALTHCHECK", "ENTRYPOINT", "CMD", "LABEL", "STOPSIGNAL", "VOLUME", "SHELL", "ONBUILD"}
    instructions = dockerfile_instructions()
    assert {word for word, _ in instructions} <= known, instructions
    froms = [args for word, args in instructions if word == "FROM"]
    assert len(froms) == 2, froms
    assert froms[0] == "rust:1.95-bookworm AS builder"
    assert froms[1] in ("gcr.io/distroless/cc-debian12:nonroot",) or froms[1].startswith("debian:bookworm-slim")
    builds = [args for word, args in instructions if word == "RUN" and "cargo build" in args]
    assert builds and all("--release --locked --bin secrets-broker" in b for b in builds), builds
    # The final stage: the binary from the builder and nothing else; non-root;
    # both ports; exec-form entrypoint.
    stage = final_stage()
    copies = [args for word, args in stage if word in ("COPY", "ADD")]
    assert copies == ["--from=builder /out/secrets-broker /usr/local/bin/secrets-broker"], copies
    user = dockerfile_user()
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER must be a numeric non-root uid, not {user!r}"
    exposed = {port for word, args in stage if word == "EXPOSE" for port in args.split()}
    assert exposed == {"50051", "9090"}
    entrypoint = json.loads(next(args for word, args in stage if word == "ENTRYPOINT"))
    assert entrypoint == ["/usr/local/bin/secrets-broker"]
    assert json.loads(next(args for word, args in stage if word == "CMD")) == ["serve"]
    # HEALTHCHECK: present, and if it is NONE the choice is explained next to
    # it and in deploy/README.md.
    health = [args for word, args in stage if word == "HEALTHCHECK"]
    assert len(health) == 1, health
    if health[0] == "NONE":
        text = (DEPLOY / "Dockerfile").read_text()
        before = text[: text.index("HEALTHCHECK NONE")].splitlines()[-8:]
        assert sum(line.startswith("#") for line in before) >= 4, "explain HEALTHCHECK NONE"
        assert "HEALTHCHECK" in (DEPLOY / "README.md").read_text()
    else:
        assert health[0].startswith("CMD [") or "CMD [" in health[0], "exec form"


def test_dockerfile_copies_files_that_exist():
    for word, args in dockerfile_instructions():
        if word != "COPY" or args.startswith("--from="):
            continue
        *sources, _dest = args.split()
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for word, args in dockerfile_instructions():
        if word == "COPY" and not args.startswith("--from="):
            for source in args.split()[:-1]:
                source = source.rstrip("/")
                assert any(a == source or a.startswith(source + "/") for a in allowed), \
                    f"{source} is excluded by Dockerfile.dockerignore"


# ==========================================================================
# helpers


def parse_seconds(value) -> float:
    text = str(value).strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    total, units = 0.0, {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text):
        total += float(number) * units[unit]
    assert total, f"not a duration: {value!r}"
    return total


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"{path.name}: bad line {line!r}"
            env[key] = value
    return env


def relocate(tmp_path: Path, absolute: str, create: bool = True) -> Path:
    path = tmp_path / "root" / absolute.lstrip("/")
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def write_tls_files(directory: Path) -> None:
    """tls.crt, tls.key, ca.crt as cert-manager's CA issuer writes them
    (ECDSA P-256, server auth, the in-cluster DNS names)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test secrets-broker CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName(n) for n in find("Certificate", "secrets-broker-server")["spec"]["dnsNames"]]
    names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "secrets-broker.secrets-broker.svc")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=90))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (directory / "tls.crt").write_bytes(cert.public_bytes(pem))
    (directory / "tls.key").write_bytes(key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (directory / "ca.crt").write_bytes(ca.public_bytes(pem))



def test_dockerfile_dependency_stage_stubs_every_declared_target(tmp_path):
    """Stage 1 builds the dependencies over stub sources, and cargo refuses a
    manifest one of whose declared targets (a [[bench]], say) has no file:
    the stubs must cover every target the copied manifests declare. The
    stage's COPY and RUN (without its build) are replayed in a scratch
    directory."""
    import shutil

    instructions = dockerfile_instructions()
    stub_build = next(i for i, (word, args) in enumerate(instructions) if word == "RUN" and "cargo build" in args)
    manifests = []
    for word, args in instructions[:stub_build]:
        if word == "COPY":
            *sources, target = args.split()
            for source in sources:
                destination = tmp_path / (Path(source).name if target == "./" else target)
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(ROOT / source, destination)
                if destination.name == "Cargo.toml":
                    manifests.append(destination)
    script = instructions[stub_build][1].split(" && cargo build")[0]
    proc = subprocess.run(["sh", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    missing = []
    for manifest in manifests:
        declared = tomllib.loads(manifest.read_text())
        crate = manifest.parent
        for kind, folder in (("bin", "src/bin"), ("bench", "benches"), ("example", "examples"), ("test", "tests")):
            for target in declared.get(kind, []):
                path = crate / target.get("path", f"{folder}/{target['name']}.rs")
                if not path.exists():
                    missing.append(str(path.relative_to(tmp_path)))
        lib = declared.get("lib", {}).get("path")
        if lib and not (crate / lib).exists():
            missing.append(str((crate / lib).relative_to(tmp_path)))
    assert not missing, f"deploy/Dockerfile stage 1 does not stub {missing}: cargo would refuse the manifest"
