"""Asynchronous callers and approval tokens, separation of duties and the
two-person rule, end to end: a real HTTP client, the real Envoy filter and
the real approval service (which mints tokens with the same code the filter
verifies them with)."""
import base64
import json
import time

import httpx
import pytest

from conftest import chat, emptied, module_stack, send_later
from stack import records, sha256_hex, wait_until, with_route

pytestmark = pytest.mark.timeout(120)

CALLERS = {"ci-batch": "ck-batch-0123456789abcdef", "alice": "ck-alice-0123456789abcdef"}
K1 = base64.b64encode(b"k1" * 16).decode()
K2 = base64.b64encode(b"k2" * 16).decode()


def filter_config(filter_keys, **extra):
    return {
        "identity": {"source": "api_key", "api_keys": [
            {"sha256": sha256_hex(k), "caller": name, "groups": ["batch" if name == "ci-batch" else "eng"]}
            for name, k in CALLERS.items()]},
        "approval_tokens": {"keys": [{"id": kid, "secret": secret} for kid, secret in filter_keys]},
        "rules": [
            {"name": "batch-async", "caller": "ci-batch", "action": "review", "async": True},
            {"name": "two-person", "model": "prod-*", "action": "review", "approvals": 2},
        ],
        **extra,
    }


def service_extra(keys, ttl_ms=3_600_000, max_uses=1):
    lines = [f"token_ttl_ms = {ttl_ms}", f"token_max_uses = {max_uses}"]
    for kid, secret in keys:
        lines += ["", "[[token_keys]]", f'id = "{kid}"', f'secret = "{secret}"']
    return "\n".join(lines)


@pytest.fixture(scope="module")
def tokens_gw(tmp_path_factory, request):
    """One stack for the module's tests that share its keys: each decides
    every review it files and reads only its own requests, and starting
    Envoy, which compiles the filter, is most of a stack's start."""
    with module_stack(tmp_path_factory, request, "async_tokens", filter_config([("k1", K1)]),
                      approval_extra=service_extra([("k1", K1)])) as s:
        yield s


@pytest.fixture
def tokens(tokens_gw):
    return emptied(tokens_gw)


def as_caller(name):
    return {"authorization": f"Bearer {CALLERS[name]}"}


def submit_async(stack, body):
    r = httpx.post(stack.url + "/v1/chat/completions", json=body, headers=as_caller("ci-batch"), timeout=20)
    assert r.status_code == 202, r.text
    assert r.headers["preference-applied"] == "respond-async"
    return r.json()


def status(stack, review_id, caller="ci-batch"):
    return httpx.get(stack.url + f"/countersign/reviews/{review_id}", headers=as_caller(caller), timeout=20)


def approved_status(stack, body):
    accepted = submit_async(stack, body)
    assert status(stack, accepted["id"]).json()["status"] == "pending"
    assert stack.approval.decide(accepted["id"], "approve").status_code == 200
    st = status(stack, accepted["id"]).json()
    assert st["status"] == "approved" and st["approval_token"], st
    return accepted, st


def retry(stack, st, token=None, body=None, caller="ci-batch", path="/v1/chat/completions"):
    headers = {**as_caller(caller), "content-type": "application/json",
               "x-countersign-approval": token or st["approval_token"]}
    return httpx.post(stack.url + path, content=body or st["approved_body"].encode(),
                      headers=headers, timeout=20)


def test_async_flow_202_approve_retry_then_replay_refused(tokens):
    body = chat(text="nightly batch summary")
    accepted, st = approved_status(tokens, body)
    assert accepted["status_url"] == f"/countersign/reviews/{accepted['id']}"
    assert tokens.backend.stats()["started"] == 0
    ok = retry(tokens, st)
    assert ok.status_code == 200, ok.text
    assert ok.json()["choices"][0]["message"]["content"] == "echo: nightly batch summary"
    [seen] = tokens.backend.requests()
    assert "x-countersign-approval" not in seen["headers"]  # the token never reaches the model
    replay = retry(tokens, st)
    assert replay.status_code == 403 and replay.json()["error"]["code"] == "approval_token_used"
    assert tokens.backend.stats()["completed"] == 1


def test_token_is_bound_to_prompt_caller_and_signature(tokens):
    _, st = approved_status(tokens, chat(text="prompt A"))
    other = json.dumps(chat(text="prompt B")).encode()
    r = retry(tokens, st, body=other)
    assert r.status_code == 403 and "different request body" in r.json()["error"]["message"]
    r = retry(tokens, st, caller="alice")
    assert r.status_code == 403 and "another caller" in r.json()["error"]["message"]
    # The same body to another API (Ollama's chat reads it too): the path,
    # which names the model or the API, is bound as well.
    r = retry(tokens, st, path="/api/chat")
    assert r.status_code == 403 and "another path" in r.json()["error"], r.text  # Ollama's error format
    # Another caller cannot even see the review.
    assert status(tokens, st["id"], caller="alice").status_code == 404
    tok = st["approval_token"]
    head, kid, payload, sig = tok.split(".")
    tampered = ".".join([head, kid, payload, ("A" if sig[0] != "A" else "B") + sig[1:]])
    assert retry(tokens, st, token=tampered).status_code == 403
    assert retry(tokens, st, token=tok[: len(tok) - 5]).status_code == 403
    assert retry(tokens, st, token="cs1.k9." + payload + "." + sig).json()["error"]["message"].endswith("unknown key")
    assert retry(tokens, st, token="forged").status_code == 403
    # The legitimate retry still works after all those attempts.
    assert retry(tokens, st).status_code == 200
    assert tokens.backend.stats()["completed"] == 1


def test_a_token_spends_only_on_the_route_and_host_it_was_approved_for(make_stack):
    """A token approved on a lenient route is not a pass for a strict one:
    `prod-*` asks for two approvals, the caller's own rule for one. The
    same caller, path and body sent with the header that picks the prod
    route (or to another virtual host, another cluster) used to be
    forwarded on the one approval of the lenient route."""
    config = filter_config([("k1", K1)])
    config["rules"].insert(0, {"name": "prod-two-person", "route": "prod-*", "action": "review",
                               "approvals": 2, "async": True})
    stack = make_stack(filter_config=config, approval_extra=service_extra([("k1", K1)], max_uses=3),
                       envoy_mutate=lambda c: with_route(c, "prod-model", "x-env", "prod"))
    _, st = approved_status(stack, chat(text="ship the release notes"))
    review = stack.approval.review(st["id"])
    assert (review["route"], review["required_approvals"]) == ("model", 1), review
    for extra in ({"x-env": "prod"}, {"host": "prod.gw.example"}):
        headers = {**as_caller("ci-batch"), "content-type": "application/json",
                   "x-countersign-approval": st["approval_token"], **extra}
        r = httpx.post(stack.url + "/v1/chat/completions", content=st["approved_body"].encode(),
                       headers=headers, timeout=20)
        assert r.status_code == 403, (extra, r.status_code, r.text)
        assert "another route or host" in r.json()["error"]["message"], r.text
    assert stack.backend.stats()["started"] == 0
    # On the route and host it was approved for, it spends.
    assert retry(stack, st).status_code == 200


def test_an_async_request_approved_at_creation_is_forwarded_once_by_its_token(make_stack):
    """A standing approval (one use) approves the next asynchronous request
    when it is created. The caller is answered 202 all the same and its
    token forwards it, once: released at once, it used to be forwarded
    then and again with the token its status handed out."""
    stack = make_stack(filter_config=filter_config([("k1", K1)]), approval_extra=service_extra([("k1", K1)]))
    # A system prompt stays fixed: a standing approval must keep some text.
    nightly = lambda n: {"model": "demo-echo", "messages": [  # noqa: E731
        {"role": "system", "content": "You summarise builds."},
        {"role": "user", "content": f"nightly summary of build {n}"}]}
    first = submit_async(stack, nightly(1))
    r = stack.approval.decide(first["id"], "approve", standing={"valid_days": 1, "max_uses": 1, "vary": ["user"]})
    assert r.status_code == 200, r.text
    assert retry(stack, status(stack, first["id"]).json()).status_code == 200
    assert stack.backend.stats()["completed"] == 1

    second = submit_async(stack, nightly(2))
    assert second["status"] == "approved", second
    assert stack.approval.review(second["id"])["reviewer"].startswith("standing:")
    assert stack.backend.stats()["started"] == 1, "forwarded without its token"
    st = status(stack, second["id"]).json()
    assert st["status"] == "approved" and st["approval_token"], st
    ok = retry(stack, st)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "echo: nightly summary of build 2"
    assert retry(stack, st).status_code == 403
    assert stack.backend.stats()["completed"] == 2


def test_an_async_request_leaves_a_record_even_when_it_is_never_forwarded(tokens):
    """Every inference request leaves a record: one answered 202 and then
    rejected used to leave none (only the mutable review)."""
    accepted = submit_async(tokens, chat(text="summarise the incident for the board"))
    assert tokens.approval.decide(accepted["id"], "reject", reason="not for CI").status_code == 200
    [record] = wait_until(lambda: records(tokens, review_id=accepted["id"]) or None,
                          what="the 202's record")
    request = record["request"]
    assert (request["decision"], request["caller"], request["rule"]) == ("pending", "ci-batch", "batch-async"), record
    assert "summarise the incident for the board" in request["body"]
    assert tokens.backend.stats()["started"] == 0


def test_edited_prompt_token_covers_the_edited_body(tokens):
    accepted = submit_async(tokens, chat(text="summarise with customer emails"))
    edited = chat(text="summarise without customer data")
    assert tokens.approval.decide(accepted["id"], "edit", body=edited).status_code == 200
    st = status(tokens, accepted["id"]).json()
    assert json.loads(st["approved_body"]) == edited
    original = json.dumps(chat(text="summarise with customer emails")).encode()
    assert retry(tokens, st, body=original).status_code == 403
    r = retry(tokens, st)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "echo: summarise without customer data"


def test_an_edit_under_another_review_rule_does_not_spend(make_stack):
    # A reviewer of the caller's asynchronous rule edits the model to one a
    # stricter rule covers (two approvals) and approves: the token for the
    # edited body must not spend where that rule's reviewers never looked.
    config = filter_config([("k1", K1)])
    config["rules"] = list(reversed(config["rules"]))  # two-person first
    stack = make_stack(filter_config=config, approval_extra=service_extra([("k1", K1)]))
    accepted = submit_async(stack, chat(text="small job"))
    edited = chat(model="prod-large", text="small job")
    assert stack.approval.decide(accepted["id"], "edit", body=edited).status_code == 200
    st = status(stack, accepted["id"]).json()
    assert st["status"] == "approved" and json.loads(st["approved_body"]) == edited, st
    r = retry(stack, st)
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "invalid_approval_token" and "`two-person`" in r.json()["error"]["message"], r.text
    assert stack.backend.stats()["started"] == 0
    # The body as held, approved without an edit, still spends.
    _, st = approved_status(stack, chat(text="another small job"))
    assert retry(stack, st).status_code == 200


def test_expired_token_is_refused(make_stack):
    stack = make_stack(filter_config=filter_config([("k1", K1)]),
                       approval_extra=service_extra([("k1", K1)], ttl_ms=1500))
    _, st = approved_status(stack, chat(text="quick"))
    time.sleep(2)
    r = retry(stack, st)
    assert r.status_code == 403 and "expired" in r.json()["error"]["message"]


def test_token_from_a_key_the_filter_does_not_know(make_stack):
    # The service signs with k2; the filter only trusts k1.
    stack = make_stack(filter_config=filter_config([("k1", K1)]),
                       approval_extra=service_extra([("k1", K1), ("k2", K2)]))
    _, st = approved_status(stack, chat(text="rotated"))
    assert st["approval_token"].startswith("cs1.k2.")
    r = retry(stack, st)
    assert r.status_code == 403 and "unknown key" in r.json()["error"]["message"]


def test_self_approval_is_refused_and_two_person_rule(tokens, background):
    # alice sends a request; reviewer alice may not approve it.
    fut = send_later(background, tokens.url, chat(model="prod-large", text="alice asks"), headers=as_caller("alice"))
    [review] = tokens.approval.wait_pending()
    assert review["caller"] == "alice"
    r = tokens.approval.decide(review["id"], "approve", reviewer="alice")
    assert r.status_code == 403 and r.json()["error"]["code"] == "self_approval"
    # Two distinct approvals are needed for prod-* models. A partial
    # approval is not announced to the filter (its long poll waits for a
    # final status), so there is no event to await: a bounded wait is the
    # only proof that nothing was released.
    assert tokens.approval.decide(review["id"], "approve", reviewer="bob").status_code == 200
    time.sleep(0.5)
    assert not fut.done(), "released after one approval"
    assert tokens.approval.decide(review["id"], "approve", reviewer="bob").status_code == 409
    assert tokens.approval.decide(review["id"], "approve", reviewer="carol").status_code == 200
    resp = fut.result(10)
    assert resp.status_code == 200
    detail = tokens.approval.review(review["id"])
    assert sorted(a["reviewer"] for a in detail["approvals"]) == ["bob", "carol"]


def test_status_of_unknown_review_is_404(tokens):
    assert status(tokens, "rev_doesnotexist").status_code == 404
    assert httpx.post(tokens.url + "/countersign/reviews/rev_x", headers=as_caller("ci-batch")).status_code == 400
