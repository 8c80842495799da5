"""Caller identity and credential injection in the real Envoy: per-caller API
keys (only their hashes configured), 401s in the API's own format, the
caller's key stripped and the model's key injected from Envoy's environment."""
import httpx
import pytest

from conftest import chat, send_later
from stack import rec_field, records, sha256_hex, wait_until

pytestmark = pytest.mark.timeout(120)

CALLERS = {"ci-nightly": "ck-ci-0123456789abcdef", "dana": "ck-dana-0123456789abcdef"}
MODEL_KEY = "sk-model-key-that-only-the-gateway-knows"


def identity_config(**extra):
    return {
        "identity": {
            "source": "api_key",
            "api_keys": [
                {"sha256": sha256_hex(CALLERS["ci-nightly"]), "caller": "ci-nightly", "groups": ["bots"]},
                {"sha256": sha256_hex(CALLERS["dana"]), "caller": "dana", "groups": ["eng"]},
            ],
        },
        "upstream_credential": {"header": "authorization", "prefix": "Bearer ", "value_env": "COUNTERSIGN_UPSTREAM_KEY"},
        "rules": [{"name": "bots-skip-review", "group": "bots", "action": "allow"}],
        **extra,
    }


@pytest.fixture
def keyed(make_stack):
    return make_stack(filter_config=identity_config(), envoy_env={"COUNTERSIGN_UPSTREAM_KEY": MODEL_KEY})


def as_caller(name):
    return {"authorization": f"Bearer {CALLERS[name]}"}


def test_missing_or_wrong_key_is_401_in_the_api_format(keyed):
    r = httpx.post(keyed.url + "/v1/chat/completions", json=chat())
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"] == "Bearer"
    r = httpx.post(keyed.url + "/v1/chat/completions", json=chat(), headers={"authorization": "Bearer ck-guess"})
    assert r.status_code == 401 and "invalid API key" in r.json()["error"]["message"]
    r = httpx.post(keyed.url + "/v1/messages", headers={"x-api-key": "nope"},
                   json={"model": "claude", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    # Passthrough paths need an identity too.
    assert httpx.get(keyed.url + "/v1/models").status_code == 401
    assert keyed.backend.stats()["started"] == 0


def test_the_model_sees_only_the_injected_key(keyed):
    r = httpx.post(keyed.url + "/v1/chat/completions", json=chat(model="demo-echo"), headers=as_caller("ci-nightly"))
    assert r.status_code == 200, r.text
    assert r.headers["x-countersign-outcome"] == "allowed"
    r = httpx.get(keyed.url + "/v1/models", headers={"x-api-key": CALLERS["ci-nightly"]})
    assert r.status_code == 200
    seen = keyed.backend.requests()
    assert [s["headers"].get("authorization") for s in seen] == [f"Bearer {MODEL_KEY}"] * 2
    for s in seen:
        assert "x-api-key" not in s["headers"]
        assert CALLERS["ci-nightly"] not in str(s)
    # The model key is nowhere in Envoy's log or the service's.
    assert MODEL_KEY not in keyed.envoy.proc.log_text()
    assert MODEL_KEY not in keyed.approval.proc.log_text()


def test_policy_per_caller_group_and_caller_recorded(keyed, background):
    fut = send_later(background, keyed.url, chat(text="dana asks"), headers=as_caller("dana"))
    [review] = keyed.approval.wait_pending()
    assert review["caller"] == "dana"
    assert keyed.approval.decide(review["id"], "approve").status_code == 200
    r = fut.result(10)
    assert r.status_code == 200
    [seen] = keyed.backend.requests()
    assert seen["headers"]["authorization"] == f"Bearer {MODEL_KEY}"
    # The record names the caller and its groups as the key mapped them,
    # for the reviewed request and for the bot's allowed one.
    assert httpx.post(keyed.url + "/v1/chat/completions", json=chat(text="bot asks"),
                      headers=as_caller("ci-nightly"), timeout=10).status_code == 200
    recs = wait_until(lambda: (rs := records(keyed)) and len(rs) >= 2 and rs, what="both records")
    by_caller = {rec_field(x, "caller"): x for x in recs}
    assert set(by_caller) == {"dana", "ci-nightly"}, recs
    assert rec_field(by_caller["dana"], "caller_groups") == ["eng"]
    assert rec_field(by_caller["dana"], "decision") == "approved"
    assert rec_field(by_caller["ci-nightly"], "caller_groups") == ["bots"]
    assert rec_field(by_caller["ci-nightly"], "decision") == "allowed"
    # The caller's key is not in the record.
    assert CALLERS["dana"] not in str(recs) and CALLERS["ci-nightly"] not in str(recs)


def test_filter_token_from_the_environment_guards_the_approval_channel(make_stack, background):
    token = "filter-token-from-env-0123456789"
    # The filter reads the token from Envoy's environment; the service
    # knows its hash (the stack passes the token to the service only).
    config = {"approval_token_env": "COUNTERSIGN_FILTER_TOKEN"}
    stack = make_stack(filter_config=config, filter_token=token, envoy_env={"COUNTERSIGN_FILTER_TOKEN": token})
    # Not in the plugin configuration Envoy shows on its admin port...
    dump = httpx.get(f"http://127.0.0.1:{stack.envoy.admin_port}/config_dump").text
    assert token not in dump
    # ...and the service, which requires it, takes the filter's calls.
    fut = send_later(background, stack.url, chat(text="via env token"))
    [review] = stack.approval.wait_pending()
    assert stack.approval.decide(review["id"], "approve").status_code == 200
    assert fut.result(10).status_code == 200
    # Anyone else calling the filter API without the token is refused.
    assert httpx.post(stack.approval.url + "/v1/reviews", json={}).status_code == 401


def test_an_identity_header_sent_twice_is_refused(make_stack):
    """`identity.source: header`: an authentication filter in front that
    appends its header (ext_authz's `headers_to_append`, a Lua `add`)
    instead of replacing it leaves the caller's forged copy first, and the
    filter read the first. A header the identity is read from that comes
    more than once is refused (401, naming it); so is a key header
    (`identity.rs::an_identity_header_sent_twice_is_refused`)."""
    config = {"identity": {"source": "header", "header": "x-caller", "groups_header": "x-caller-groups"},
              "rules": [{"name": "release-bot-skips-review", "caller": "release-bot", "action": "allow"},
                        {"name": "admins", "group": "admins", "action": "allow"}]}
    stack = make_stack(filter_config=config)
    body = chat(text="ship it")
    for headers in ([("x-caller", "release-bot"), ("x-caller", "mallory")],
                    [("x-caller", "mallory"), ("x-caller-groups", "admins"), ("x-caller-groups", "eng")]):
        r = httpx.post(stack.url + "/v1/chat/completions", json=body, headers=headers, timeout=20)
        assert r.status_code == 401, (headers, r.status_code, r.text)
        assert "came more than once" in r.json()["error"]["message"], r.text
    assert stack.backend.stats()["started"] == 0
    # The same duplicate merged into one entry, as ext_authz's
    # `headers_to_append` leaves it (`release-bot,alice`): refused too,
    # rather than a caller `release-bot,alice` (`identity.rs`, the same test).
    r = httpx.post(stack.url + "/v1/chat/completions", json=body,
                   headers={"x-caller": "release-bot,alice"}, timeout=20)
    assert r.status_code == 401, (r.status_code, r.text)
    assert "came more than once" in r.json()["error"]["message"], r.text
    assert stack.backend.stats()["started"] == 0
    # Once each, as the authentication filter set them: as before.
    r = httpx.post(stack.url + "/v1/chat/completions", json=body, headers={"x-caller": "release-bot"}, timeout=20)
    assert r.status_code == 200, r.text


def test_the_model_key_goes_only_where_policy_looked(make_stack):
    """Under `other_requests: pass` a path nobody listed (the provider's
    other APIs: usage, deleting a fine-tuned model) passed with the model's
    key injected: the gateway's credential did whatever the caller asked.
    It now goes only to inspected requests and `passthrough` entries; the
    caller's own key is stripped either way."""
    stack = make_stack(filter_config=identity_config(other_requests="pass"),
                       envoy_env={"COUNTERSIGN_UPSTREAM_KEY": MODEL_KEY})
    httpx.post(stack.backend.url + "/_demo/reset").raise_for_status()
    for method, path in (("DELETE", "/v1/models/ft:gpt-4o:acme:1/x"), ("GET", "/v1/organization/usage")):
        httpx.request(method, stack.url + path, headers=as_caller("ci-nightly"), timeout=20)
    listed = httpx.get(stack.url + "/v1/models", headers=as_caller("ci-nightly"), timeout=20)
    assert listed.status_code == 200, listed.text
    seen = {s["path"]: s["headers"].get("authorization") for s in stack.backend.requests()}
    assert seen == {"/v1/models/ft:gpt-4o:acme:1/x": None, "/v1/organization/usage": None,
                    "/v1/models": f"Bearer {MODEL_KEY}"}, seen
    assert CALLERS["ci-nightly"] not in str(stack.backend.requests())
