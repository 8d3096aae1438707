"""The AWS backend's HTTP client honours HTTP_PROXY / HTTPS_PROXY / NO_PROXY:
a loopback forward proxy (forward_proxy.py) sits between the broker and
moto and counts what it forwards."""

from __future__ import annotations

import pytest

VALUE = "proxied-value-c4d7"


def read(broker, stubs):
    pb = stubs.secrets_service_pb2
    return broker.secrets().GetSecret(pb.GetSecretRequest(name="proxied"), timeout=30).secret


def test_requests_go_through_the_proxy(moto, aws_broker, forward_proxy, stubs):
    moto.create_secret("insurecove/proxied", VALUE)
    broker = aws_broker(env={"HTTP_PROXY": forward_proxy.url, "HTTPS_PROXY": forward_proxy.url})
    assert read(broker, stubs).string_value == VALUE
    forwarded = forward_proxy.forwarded()
    assert forward_proxy.count(moto.address) >= 1, (
        f"the broker reached moto ({moto.address}) without the proxy set in HTTP_PROXY/HTTPS_PROXY "
        f"({forward_proxy.url}); the proxy forwarded {forwarded}"
    )
    assert any(f.amz_target == "secretsmanager.GetSecretValue" for f in forwarded), forwarded
    assert all(f.target == moto.address for f in forwarded), forwarded


@pytest.mark.parametrize("no_proxy", ["127.0.0.1", "127.0.0.1,localhost"])
def test_no_proxy_bypasses_the_proxy(moto, aws_broker, forward_proxy, stubs, no_proxy):
    moto.create_secret("insurecove/proxied", VALUE)
    broker = aws_broker(env={
        "HTTP_PROXY": forward_proxy.url, "HTTPS_PROXY": forward_proxy.url, "NO_PROXY": no_proxy,
    })
    assert read(broker, stubs).string_value == VALUE
    assert forward_proxy.count() == 0, (
        f"NO_PROXY={no_proxy} but the proxy forwarded {forward_proxy.forwarded()}"
    )
