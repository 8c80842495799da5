"""Webhooks over HTTPS through an HTTPS proxy: the approval service sends
its signed review events through the proxy in HTTPS_PROXY, trusts the CA of
`outbound_ca_file` (a receiver whose certificate another CA signed gets
nothing), and each call verifies with the standardwebhooks package."""
import pytest
from standardwebhooks.webhooks import Webhook

from conftest import chat, send_later
from outbound import ConnectProxy, WebhookReceiver
from stack import make_certificates, wait_until

pytestmark = pytest.mark.timeout(120)

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.fixture
def outside(tmp_path):
    """A proxy, a receiver with a certificate of the trusted CA and one
    with a certificate of another CA."""
    make_certificates(tmp_path, ca="trusted-ca", name="trusted")
    make_certificates(tmp_path, ca="other-ca", name="other")
    proxy = ConnectProxy().start()
    trusted = WebhookReceiver(tmp_path / "trusted.pem", tmp_path / "trusted.key").start()
    other = WebhookReceiver(tmp_path / "other.pem", tmp_path / "other.key").start()
    yield tmp_path, proxy, trusted, other
    for server in (other, trusted, proxy):
        server.stop()


def test_signed_webhooks_go_through_the_proxy_to_a_receiver_of_the_configured_ca(make_stack, background, outside):
    workdir, proxy, trusted, other = outside
    extra = f"""outbound_ca_file = "{workdir / 'trusted-ca.pem'}"
[[webhooks]]
url_env = "CS_TEST_HOOK_URL"
secret_env = "CS_TEST_HOOK_SECRET"
[[webhooks]]
url = "{other.url}"
secret = "{SECRET}"
"""
    stack = make_stack(approval_extra=extra,
                       approval_env={"CS_TEST_HOOK_URL": trusted.url, "CS_TEST_HOOK_SECRET": SECRET,
                                     "HTTPS_PROXY": proxy.url, "NO_PROXY": ""})
    fut = send_later(background, stack.url, chat(text="through the proxy"))
    [review] = stack.approval.wait_pending()
    assert stack.approval.decide(review["id"], "approve").status_code == 200
    assert fut.result(timeout=15).status_code == 200

    calls = wait_until(lambda: len(got := trusted.events_for(review["id"])) >= 2 and got,
                       what="review.created and review.decided over HTTPS")
    kinds = sorted(Webhook(SECRET).verify(body, headers)["type"] for headers, body in calls)
    assert kinds == ["review.created", "review.decided"]
    assert calls[0][1].count(b"through the proxy") == 1, "the preview is sent by default"
    port = trusted.url.split(":")[2].split("/")[0]
    assert f"127.0.0.1:{port}" in proxy.targets, proxy.targets
    # The other receiver's certificate is not from a trusted CA: the
    # service tried (through the proxy) and sent it nothing.
    other_port = other.url.split(":")[2].split("/")[0]
    wait_until(lambda: f"127.0.0.1:{other_port}" in proxy.targets, what="an attempt at the other receiver")
    assert other.calls == []
    wait_until(lambda: "webhook failed; giving up" in stack.approval.proc.log_text(), timeout=20,
               what="the untrusted receiver given up")
    assert other.calls == []
