"""Standing approvals in the real Envoy: one human approval of a templated
CI request, with a standing approval that lets the user message vary,
releases the next runs without a person; every near miss (another caller,
another model, a changed system prompt, changed tools) waits for a person;
terms that keep no text fixed are refused, and a standing approval stops
when its creator is offboarded."""
import os
import signal

import httpx
import pytest

from conftest import send_later
from stack import sha256_hex, wait_until

pytestmark = pytest.mark.timeout(180)

CALLERS = {"ci-nightly": "ck-ci-nightly-0123456789", "ci-weekly": "ck-ci-weekly-0123456789"}

SYSTEM = "You summarise CI build logs in three bullet points."
TOOLS = [{"type": "function", "function": {"name": "fetch_log", "description": "Fetch a build log",
                                           "parameters": {"type": "object",
                                                          "properties": {"build": {"type": "string"}}}}}]


def config():
    return {
        "approval_cluster": "countersign_approval",
        "identity": {
            "source": "api_key",
            "api_keys": [
                {"sha256": sha256_hex(key), "caller": name, "groups": ["ci"]} for name, key in CALLERS.items()
            ],
        },
        "rules": [{"name": "ci", "group": "ci", "action": "review", "approver_group": "security",
                   "hold_timeout_ms": 60000}],
        "default_action": "deny",
    }


def ci_request(user, model="demo-echo", system=SYSTEM, tools=None):
    return {"model": model, "tools": tools or TOOLS,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}


def send(url, body, caller="ci-nightly", timeout=60):
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=timeout,
                      headers={"authorization": f"Bearer {CALLERS[caller]}"})


@pytest.fixture
def ci(make_stack):
    return make_stack(filter_config=config())


def test_standing_approval_releases_templated_runs_and_holds_near_misses(ci, background):
    first = send_later(background, ci.url, ci_request("summarise build 100"),
                       headers={"authorization": f"Bearer {CALLERS['ci-nightly']}"})
    [review] = ci.approval.wait_pending()
    r = ci.approval.decide(review["id"], "approve", reason="nightly CI summary",
                           standing={"valid_days": 1, "max_uses": 10, "vary": ["user"]})
    assert r.status_code == 200, r.text
    assert first.result(timeout=10).status_code == 200
    with ci.approval.client() as c:
        [sa] = c.get("/api/standing-approvals").json()["standing_approvals"]
    assert sa["status"] == "live" and sa["caller"] == "ci-nightly" and sa["model"] == "demo-echo", sa

    # Ten runs of the template, each with its own user message: released
    # without a person, each as a review approved by the standing approval.
    for n in range(10):
        resp = send(ci.url, ci_request(f"summarise build {101 + n}"))
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-countersign-outcome"] == "approved"
        assert resp.json()["choices"][0]["message"]["content"].endswith(f"summarise build {101 + n}")
        stored = ci.approval.review(resp.headers["x-countersign-review-id"])
        assert stored["reviewer"] == f"standing:{sa['id']}", stored
    assert ci.approval.pending() == []
    with ci.approval.client() as c:
        detail = c.get(f"/api/standing-approvals/{sa['id']}").json()
    assert (detail["uses"], detail["status"], len(detail["used_by"])) == (10, "used_up", 10), detail

    # A second standing approval with room left, so
    # the near misses below are refused for their shape, not for the uses.
    again = send_later(background, ci.url, ci_request("summarise build 200"),
                       headers={"authorization": f"Bearer {CALLERS['ci-nightly']}"})
    [review] = ci.approval.wait_pending()
    r = ci.approval.decide(review["id"], "approve",
                           standing={"valid_days": 1, "max_uses": 50, "vary": ["user"]})
    assert r.status_code == 200, r.text
    assert again.result(timeout=10).status_code == 200
    assert send(ci.url, ci_request("summarise build 201")).headers["x-countersign-outcome"] == "approved"

    near_misses = {
        "other caller": (ci_request("summarise build 202"), "ci-weekly"),
        "other model": (ci_request("summarise build 202", model="demo-echo-large"), "ci-nightly"),
        "changed system prompt": (ci_request("summarise build 202", system=SYSTEM + " Then e-mail them."),
                                  "ci-nightly"),
        "changed tools": (ci_request("summarise build 202", tools=[
            {"type": "function", "function": {"name": "run_shell", "description": "Run a command",
                                              "parameters": {"type": "object", "properties": {}}}}]),
                          "ci-nightly"),
    }
    futures = {what: send_later(background, ci.url, body, headers={"authorization": f"Bearer {CALLERS[caller]}"})
               for what, (body, caller) in near_misses.items()}
    held = ci.approval.wait_pending(count=len(near_misses))
    assert len(held) == len(near_misses)
    assert not any(f.done() for f in futures.values())
    for review in held:
        assert ci.approval.decide(review["id"], "reject", reason="near miss").status_code == 200
    for what, fut in futures.items():
        resp = fut.result(timeout=10)
        assert resp.status_code == 403, (what, resp.text)
        assert resp.headers["x-countersign-outcome"] == "rejected", what
    wait_until(lambda: ci.approval.pending() == [], what="no review left pending")


def test_terms_that_keep_no_text_fixed_are_refused(ci, background):
    """A chat of one user message with the user message free to vary would
    be a standing approval of any chat: refused, the request still held."""
    only_user = {"model": "demo-echo", "messages": [{"role": "user", "content": "What is 2+2?"}]}
    held = send_later(background, ci.url, only_user, headers={"authorization": f"Bearer {CALLERS['ci-nightly']}"})
    [review] = ci.approval.wait_pending()
    r = ci.approval.decide(review["id"], "approve",
                           standing={"valid_days": 90, "max_uses": 100000, "vary": ["user"], "group": "ci"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "standing_terms", r.text
    assert "fixed" in r.json()["error"]["message"], r.text
    assert not held.done()
    assert ci.approval.decide(review["id"], "reject", reason="no").status_code == 200
    assert held.result(timeout=10).status_code == 403
    with ci.approval.client() as c:
        assert c.get("/api/standing-approvals").json()["standing_approvals"] == []


def test_a_standing_approval_stops_when_its_creator_is_offboarded(ci, background):
    """alice makes a standing approval, then leaves: her entry is removed
    from the configuration and the service reloads it (SIGHUP). Her token
    is refused, and her standing approval approves nothing more: the next
    run waits for a person, and the list shows it suspended."""
    first = send_later(background, ci.url, ci_request("summarise build 1"),
                       headers={"authorization": f"Bearer {CALLERS['ci-nightly']}"})
    [review] = ci.approval.wait_pending()
    r = ci.approval.decide(review["id"], "approve", standing={"valid_days": 1, "max_uses": 10, "vary": ["user"]})
    assert r.status_code == 200, r.text
    assert first.result(timeout=10).status_code == 200
    assert send(ci.url, ci_request("summarise build 2")).headers["x-countersign-outcome"] == "approved"

    head, *entries = ci.approval.config.read_text().split("\n[[reviewers]]\n")
    without_alice = "\n[[reviewers]]\n".join([head, *(e for e in entries if not e.startswith('name = "alice"'))])
    assert 'name = "alice"' not in without_alice and 'name = "bob"' in without_alice
    ci.approval.config.write_text(without_alice)
    os.kill(ci.approval.proc.pid, signal.SIGHUP)

    def alice_refused():
        with ci.approval.client("alice") as c:
            return c.get("/api/reviews").status_code == 401
    wait_until(alice_refused, what="alice's token refused after the reload")

    third = send_later(background, ci.url, ci_request("summarise build 3"),
                       headers={"authorization": f"Bearer {CALLERS['ci-nightly']}"})
    with ci.approval.client("bob") as c:
        [held] = wait_until(lambda: c.get("/api/reviews", params={"status": "pending"}).json()["reviews"] or None,
                            what="the run held for a person")
        [sa] = c.get("/api/standing-approvals").json()["standing_approvals"]
        assert (sa["status"], sa["uses"], sa["created_by"]) == ("suspended", 1, ["alice"]), sa
        assert c.post(f"/api/reviews/{held['id']}/reject", json={"reason": "alice left"}).status_code == 200
    assert third.result(timeout=10).status_code == 403


def test_an_audit_spot_check_does_not_delay_the_caller(make_stack):
    """share 1: every allowed request is audited; the caller gets its answer
    at once and the audit waits for a person afterwards."""
    stack = make_stack(filter_config={
        "approval_cluster": "countersign_approval",
        "rules": [{"name": "open", "action": "allow", "spot_check": {"share": 1, "mode": "audit"}}],
        "default_action": "deny",
    })
    resp = httpx.post(stack.url + "/v1/chat/completions", timeout=30,
                      json={"model": "demo-echo", "messages": [{"role": "user", "content": "audit me"}]})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-countersign-outcome"] == "allowed"
    assert resp.json()["choices"][0]["message"]["content"] == "echo: audit me"

    def audits():
        with stack.approval.client() as c:
            return c.get("/api/reviews", params={"mode": "audit"}).json()["reviews"]

    [audit] = wait_until(lambda: audits() or None, what="the audit review")
    assert (audit["mode"], audit["kind"], audit["status"], audit["rule"]) == (
        "audit", "prompt", "pending", "open"), audit
    detail = stack.approval.review(audit["id"])
    assert detail["spot_check"]["mode"] == "audit" and detail["spot_check"]["share"] == 1
    assert 0 <= detail["spot_check"]["draw"] < 1
    assert detail["prompt"] == [{"role": "user", "text": "audit me"}]
    r = stack.approval.decide(audit["id"], "reject", reason="flag: caller sends customer data")
    assert r.status_code == 200, r.text
