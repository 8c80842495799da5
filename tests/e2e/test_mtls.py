"""Mutual TLS between the filter and the approval service, with real
certificates made by openssl for each test: the service serves the filter
API on `filter_listen` over TLS and requires a client certificate signed by
its `client_ca_file`; Envoy's approval cluster presents one through an
UpstreamTlsContext and checks the service's certificate (CA and SAN). With
`client_names`, a client certificate the CA signed must also name one of
them.

The approval path works through real Envoy over mTLS; a client without a
certificate, or with one from another CA, is refused by the service; an
Envoy whose cluster presents the wrong certificate (or meets a service
certificate it does not trust) fails closed: 503, nothing forwarded, no
review."""
import ssl

import httpx
import pytest

from conftest import chat, post, send_later
from stack import DEFAULT_FILTER_TOKEN, Approval, ChannelCertificates, stat, wait_until


@pytest.fixture
def certs(tmp_path):
    return ChannelCertificates(tmp_path / "certs")


def tls_client(certs: ChannelCertificates, client: str | None) -> httpx.Client:
    """A client that trusts the channel's CA and presents `client`'s
    certificate (none when `client` is None)."""
    context = ssl.create_default_context(cafile=certs.path("ca.pem"))
    if client:
        context.load_cert_chain(certs.path(client + ".pem"), certs.path(client + ".key"))
    return httpx.Client(verify=context, timeout=5)


def test_held_request_is_approved_over_mutual_tls(make_stack, certs, background):
    stack = make_stack(approval_tls=certs.service_toml(), approval_transport_socket=certs.transport_socket())
    fut = send_later(background, stack.url, chat(text="over mutual TLS"))
    [review] = stack.approval.wait_pending()
    assert "over mutual TLS" in review["preview"]
    assert stack.backend.stats()["started"] == 0
    r = stack.approval.decide(review["id"], "approve")
    assert r.status_code == 200, r.text
    resp = fut.result(timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-countersign-outcome"] == "approved"
    assert resp.json()["choices"][0]["message"]["content"] == "echo: over mutual TLS"
    # The cluster spoke TLS, and the filter API is no longer on `listen`.
    assert stat(stack, "cluster.countersign_approval.ssl.handshake") >= 1
    assert stat(stack, "cluster.countersign_approval.ssl.fail_verify_san") == 0
    r = httpx.post(f"{stack.approval.url}/v1/reviews", json={},
                   headers={"x-countersign-filter-token": DEFAULT_FILTER_TOKEN})
    assert r.status_code == 404


def test_the_service_refuses_clients_without_a_certificate_from_its_ca(tmp_path, certs):
    approval = Approval(tmp_path, filter_token=DEFAULT_FILTER_TOKEN, tls=certs.service_toml()).start()
    try:
        url = f"https://localhost:{approval.filter_port}"
        with tls_client(certs, "client") as c:
            assert c.get(url + "/healthz").status_code == 200
        for client in (None, "other-client"):
            with tls_client(certs, client) as c, pytest.raises(httpx.TransportError):
                c.post(url + "/v1/reviews", json={}, headers={"x-countersign-filter-token": DEFAULT_FILTER_TOKEN})
        # Plain HTTP on the TLS port gets nothing either.
        with pytest.raises(httpx.TransportError):
            httpx.post(f"http://127.0.0.1:{approval.filter_port}/v1/reviews", json={}, timeout=5)
        # The service logs each refusal once its handshake task has ended,
        # which may be a moment after the client gave up.
        wait_until(lambda: approval.proc.log_text().count("TLS handshake refused") >= 3, timeout=10,
                   what="the service logging three refused handshakes")
        assert approval.pending() == []
    finally:
        approval.proc.stop()


@pytest.mark.parametrize("wrong", ["client certificate from another CA", "service certificate from another CA"])
def test_envoy_with_the_wrong_certificates_fails_closed(make_stack, certs, wrong):
    if wrong.startswith("client"):
        stack = make_stack(approval_tls=certs.service_toml(),
                           approval_transport_socket=certs.transport_socket(client="other-client"))
    else:
        stack = make_stack(approval_tls=certs.service_toml(server="other-server"),
                           approval_transport_socket=certs.transport_socket())
    resp = post(stack.url, json=chat(text="must not pass"), timeout=30)
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"]["code"] == "approval_unavailable"
    assert stack.backend.stats()["started"] == 0
    assert stack.approval.pending() == []
    if wrong.startswith("client"):
        assert "TLS handshake refused" in stack.approval.proc.log_text()
    else:
        wait_until(lambda: stat(stack, "cluster.countersign_approval.ssl.fail_verify_error") >= 1,
                   what="Envoy refusing the service's certificate")


GATEWAY = "spiffe://countersign.test/ns/gateways/sa/inference-gateway"


@pytest.mark.parametrize("presented", ["the gateway's certificate", "another workload's certificate from the same CA"])
def test_client_names_admit_only_the_filters_certificates(make_stack, certs, background, presented):
    """Where the CA signs certificates for other workloads too (a mesh's or a
    company's CA), `client_names` keeps them off the filter API: Envoy with
    the gateway's certificate holds and releases the request; with another
    certificate from the same CA the service refuses the handshake and the
    filter fails closed."""
    gateway = certs.named_client("gateway-client", f"URI:{GATEWAY}")
    client = gateway if presented.startswith("the gateway") else \
        certs.named_client("workload-client", f"URI:{GATEWAY}-canary,DNS:localhost")
    stack = make_stack(approval_tls=certs.service_toml(client_names=[GATEWAY]),
                       approval_transport_socket=certs.transport_socket(client=client))
    if client == gateway:
        fut = send_later(background, stack.url, chat(text="from the named gateway"))
        [review] = stack.approval.wait_pending()
        assert stack.approval.decide(review["id"], "approve").status_code == 200
        resp = fut.result(timeout=10)
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"] == "echo: from the named gateway"
        assert "TLS handshake refused" not in stack.approval.proc.log_text()
        return
    resp = post(stack.url, json=chat(text="must not pass"), timeout=30)
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"]["code"] == "approval_unavailable"
    assert stack.backend.stats()["started"] == 0
    assert stack.approval.pending() == []
    wait_until(lambda: "tls.client_names lists none of them" in stack.approval.proc.log_text(),
               what="the service logging why it refused the certificate")
    assert f"URI:{GATEWAY}-canary, DNS:localhost" in stack.approval.proc.log_text()
