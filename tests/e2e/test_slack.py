"""Approving from Slack, end to end: a request held by the filter in a real
Envoy is posted by the approval service to Slack's Web API (a stand-in
started here, read back with slack_sdk's WebClient), and decided by
interactivity requests signed exactly as Slack signs them (slack_sdk's
SignatureVerifier). Also the signed webhooks, verified with the
standardwebhooks package."""
import json
import time
import uuid
from urllib.parse import parse_qsl, urlencode

import httpx
import pytest
from slack_sdk import WebClient
from slack_sdk.signature import SignatureVerifier
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from conftest import chat, module_stack, send_later
from outbound import WebhookReceiver
from slack_api import SlackApiStandIn
from stack import wait_until

pytestmark = pytest.mark.timeout(120)

BOT_TOKEN = "xoxb-countersign-test"
SIGNING_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
CHANNEL = "C0REVIEWS"
TEAM = "T0COUNTER"
SLACK_IDS = {"alice": "U0ALICE", "bob": "U0BOB", "carol": "U0CAROL"}

FILTER = {
    "approval_cluster": "countersign_approval",
    "hold_timeout_ms": 60000,
    "long_poll_ms": 1000,
    "rules": [
        {"name": "two-person", "model": "demo-quorum", "action": "review", "approvals": 2,
         "approver_group": "security"},
        {"name": "quick", "model": "demo-quick", "action": "review", "hold_timeout_ms": 2000},
        {"name": "not-for-slack", "model": "demo-quiet", "action": "review"},
        {"name": "chat", "action": "review", "approver_group": "security"},
    ],
}


@pytest.fixture(scope="module")
def env(tmp_path_factory, request):
    slack = SlackApiStandIn(BOT_TOKEN).start()
    hooks = WebhookReceiver().start()
    extra = f"""
[slack]
channel = "{CHANNEL}"
rules = ["chat", "two-person", "quick"]
api_url = "{slack.url}"
team_id = "{TEAM}"

[[webhooks]]
url = "{hooks.url}"
secret_env = "CS_TEST_WEBHOOK_SECRET"
include_preview = false
"""
    try:
        with module_stack(tmp_path_factory, request, "slack", FILTER, approval_extra=extra,
                          approval_env={"SLACK_BOT_TOKEN": BOT_TOKEN, "SLACK_SIGNING_SECRET": SIGNING_SECRET,
                                        "CS_TEST_WEBHOOK_SECRET": WEBHOOK_SECRET,
                                        "NO_PROXY": "127.0.0.1,localhost"},
                          reviewer_fields={name: f'slack_user_id = "{uid}"'
                                           for name, uid in SLACK_IDS.items()}) as stack:
            yield stack, slack, hooks
    finally:
        hooks.stop()
        slack.stop()


# ------------------------------------------------------------------ helpers

def hold(stack, background, model="demo-echo", system=None):
    """Sends a request that is held (with a `system` prompt, if given);
    returns (future answer, review)."""
    marker = f"slack-{uuid.uuid4().hex[:10]}"
    body = chat(model=model, text=f"please review {marker}")
    if system is not None:
        body["messages"].insert(0, {"role": "system", "content": system})
    fut = send_later(background, stack.url, body)
    review = wait_until(lambda: next((r for r in stack.approval.pending() if marker in r["preview"]), None),
                        what=f"the review of {marker}")
    return fut, review


def posted(slack, review_id) -> dict:
    """The chat.postMessage call of this review's message."""
    return slack.wait_call("chat.postMessage", lambda a: review_id in json.dumps(a))


def channel_message(slack, review_id) -> dict | None:
    """The review's message as the channel shows it now, read with
    slack_sdk's client; None before it is posted."""
    client = WebClient(token=BOT_TOKEN, base_url=slack.url + "/")
    history = client.conversations_history(channel=CHANNEL)
    assert history["ok"]
    found = [m for m in history["messages"] if review_id in json.dumps(m["blocks"])]
    assert len(found) <= 1, found
    return found[0] if found else None


def head_text(message) -> str:
    """The message's first line, "" while there is no message."""
    return message["blocks"][0]["text"]["text"] if message else ""


def shown_prompt(message) -> list[tuple[str, str]]:
    """(role, text) of each prompt message the Slack message shows: a bold
    role heading, then its text in plain_text sections."""
    shown = []
    for block in message["blocks"][1:]:
        if block["type"] == "context" and block["elements"][0]["text"].startswith("*"):
            shown.append((block["elements"][0]["text"].strip("*"), ""))
        elif block["type"] == "section" and block["text"]["type"] == "plain_text" and shown:
            shown[-1] = (shown[-1][0], shown[-1][1] + block["text"]["text"])
    return shown


def buttons(message) -> list[str]:
    return [e["action_id"] for b in message["blocks"] if b["type"] == "actions" for e in b["elements"]]


def sign(body: str, timestamp: int | None = None, secret: str = SIGNING_SECRET) -> dict:
    """The headers Slack sends with `body`."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    return {"content-type": "application/x-www-form-urlencoded",
            "x-slack-request-timestamp": ts,
            "x-slack-signature": SignatureVerifier(secret).generate_signature(timestamp=ts, body=body)}


def click_body(review_id: str, action: str, user: str, message_ts: str = "1.000001") -> str:
    payload = {
        "type": "block_actions", "api_app_id": "A0COUNTER", "token": "unused-verification-token",
        "user": {"id": user, "username": user.lower(), "team_id": TEAM},
        "team": {"id": TEAM, "domain": "countersign-test"},
        "container": {"type": "message", "message_ts": message_ts, "channel_id": CHANNEL, "is_ephemeral": False},
        "channel": {"id": CHANNEL, "name": "reviews"},
        "trigger_id": f"{int(time.time())}.98765.{uuid.uuid4().hex}",
        "response_url": "https://hooks.slack.invalid/actions/T0/1/x",
        "actions": [{"type": "button", "action_id": action, "block_id": "countersign_actions",
                     "value": review_id, "action_ts": f"{time.time():.6f}"}],
    }
    return urlencode({"payload": json.dumps(payload)})


def submission_body(view: dict, user: str, reason: str | None) -> str:
    values = {"reason": {"reason": {"type": "plain_text_input", "value": reason}}}
    payload = {
        "type": "view_submission", "team": {"id": TEAM, "domain": "countersign-test"},
        "user": {"id": user, "username": user.lower(), "team_id": TEAM}, "api_app_id": "A0COUNTER",
        "trigger_id": f"{int(time.time())}.98765.{uuid.uuid4().hex}",
        "view": {**view, "state": {"values": values}},
    }
    return urlencode({"payload": json.dumps(payload)})


def interact(stack, body: str, headers: dict) -> httpx.Response:
    return httpx.post(stack.approval.url + "/slack/interactivity", content=body, headers=headers, timeout=10)


# ------------------------------------------------------------------ tests

def test_a_signed_click_approves_a_held_request(env, background):
    stack, slack, hooks = env
    fut, review = hold(stack, background, system="Answer in French, and never mention the weather.")
    call = posted(slack, review["id"])
    assert call["channel"] == CHANNEL
    message = channel_message(slack, review["id"])
    facts = head_text(message)
    assert "Review pending" in facts and "demo-echo" in facts and "*Rule:* chat" in facts, facts
    # Every message of the prompt, whole, as the filter read it: the
    # approver sees the system prompt too, not just the last user turn.
    prompt = stack.approval.review(review["id"])["prompt"]
    assert [m["role"] for m in prompt] == ["system", "user"], prompt
    assert shown_prompt(message) == [(m["role"], m["text"]) for m in prompt]
    assert buttons(message) == ["countersign_approve_shown", "countersign_reject", "countersign_open"]
    open_url = message["blocks"][-1]["elements"][2]["url"]
    assert open_url.endswith(f"/reviews/{review['id']}")
    assert not fut.done()

    body = click_body(review["id"], "countersign_approve_shown", SLACK_IDS["alice"], message["ts"])
    r = interact(stack, body, sign(body))
    assert r.status_code == 200, r.text
    answer = fut.result(timeout=15)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-countersign-outcome"] == "approved"
    assert stack.approval.review(review["id"])["reviewer"] == "alice"

    wait_until(lambda: "Approved by alice" in head_text(channel_message(slack, review["id"])),
               what="the message updated with the approval")
    assert buttons(channel_message(slack, review["id"])) == ["countersign_open"]


def test_a_prompt_too_long_to_show_whole_is_not_approved_in_slack(env, background):
    """The message cannot show a prompt longer than Slack takes: it shows
    the start and no Approve, and a click on Approve (an old message, a
    forged payload) is refused with the reason; the web UI approves it."""
    stack, slack, hooks = env
    fut, review = hold(stack, background, system="Be careful. " * 1200)
    posted(slack, review["id"])
    message = channel_message(slack, review["id"])
    assert buttons(message) == ["countersign_reject", "countersign_open"], message
    assert "too long for Slack" in head_text(message)
    body = click_body(review["id"], "countersign_approve_shown", SLACK_IDS["alice"], message["ts"])
    assert interact(stack, body, sign(body)).status_code == 200
    told = slack.wait_call("chat.postEphemeral", lambda a: a.get("user") == SLACK_IDS["alice"]
                           and "whole prompt" in a.get("text", ""))
    assert told["channel"] == CHANNEL, told
    stored = stack.approval.review(review["id"])
    assert (stored["status"], stored["approvals"]) == ("pending", [])
    assert not fut.done()
    assert stack.approval.decide(review["id"], "approve", reviewer="alice").status_code == 200
    assert fut.result(timeout=15).status_code == 200


def test_reject_opens_a_modal_and_its_submission_needs_a_reason(env, background):
    stack, slack, hooks = env
    fut, review = hold(stack, background)
    posted(slack, review["id"])
    body = click_body(review["id"], "countersign_reject", SLACK_IDS["bob"])
    trigger = json.loads(dict(parse_qsl(body))["payload"])["trigger_id"]
    assert interact(stack, body, sign(body)).status_code == 200
    opened = slack.wait_call("views.open", lambda a: a.get("trigger_id") == trigger)
    view = opened["view"]
    assert view["callback_id"] == "countersign_reject" and view["private_metadata"] == review["id"]

    # Slack marks the field required; a blank reason is refused here too,
    # shown under the field, and decides nothing.
    body = submission_body(view, SLACK_IDS["bob"], "   ")
    r = interact(stack, body, sign(body))
    assert r.status_code == 200 and r.json()["response_action"] == "errors", r.text
    assert stack.approval.review(review["id"])["status"] == "pending"

    body = submission_body(view, SLACK_IDS["bob"], "no customer data to this model")
    r = interact(stack, body, sign(body))
    assert r.status_code == 200 and not r.content, r.text
    answer = fut.result(timeout=15)
    assert answer.status_code == 403, answer.text
    assert "no customer data to this model" in answer.text
    stored = stack.approval.review(review["id"])
    assert (stored["status"], stored["reviewer"]) == ("rejected", "bob")
    wait_until(lambda: "Rejected by bob: no customer data" in head_text(channel_message(slack, review["id"])),
               what="the message updated with the rejection")


def test_forged_stale_and_replayed_requests_are_refused_and_decide_nothing(env, background):
    stack, slack, hooks = env
    fut, review = hold(stack, background)
    posted(slack, review["id"])
    body = click_body(review["id"], "countersign_approve_shown", SLACK_IDS["alice"])

    forged = interact(stack, body, sign(body, secret="not-the-signing-secret"))
    tampered_body = body.replace("U0ALICE", "U0BOB")
    tampered = interact(stack, tampered_body, sign(body))
    stale = interact(stack, body, sign(body, timestamp=int(time.time()) - 301))
    unsigned = interact(stack, body, {"content-type": "application/x-www-form-urlencoded"})
    for r in (forged, tampered, stale, unsigned):
        assert r.status_code == 401, r.text
    assert "5 minutes" in stale.text
    time.sleep(0.5)
    stored = stack.approval.review(review["id"])
    assert (stored["status"], stored["approvals"]) == ("pending", [])
    assert not fut.done()

    # The two-person rule shows a replay at the signature layer: a valid
    # click counts once, and the same request again is refused as a replay
    # (401), not answered "already approved".
    fut2, quorum = hold(stack, background, model="demo-quorum")
    posted(slack, quorum["id"])
    body = click_body(quorum["id"], "countersign_approve_shown", SLACK_IDS["alice"])
    headers = sign(body)
    assert interact(stack, body, headers).status_code == 200
    replayed = interact(stack, body, headers)
    assert replayed.status_code == 401 and "replayed" in replayed.text, replayed.text
    stored = stack.approval.review(quorum["id"])
    assert stored["status"] == "pending" and [a["reviewer"] for a in stored["approvals"]] == ["alice"]
    wait_until(lambda: "1 of 2" in head_text(channel_message(slack, quorum["id"])),
               what="the message showing one approval of two")

    for held, r in ((fut, review), (fut2, quorum)):
        assert stack.approval.decide(r["id"], "reject", reviewer="bob", reason="test over").status_code == 200
        assert held.result(timeout=15).status_code == 403


def test_slack_users_that_may_not_approve_cannot(env, background):
    stack, slack, hooks = env
    fut, review = hold(stack, background)
    posted(slack, review["id"])
    # Not mapped to any reviewer; and carol, a reviewer outside the
    # approver group ("security") of the rule.
    for user, why in (("U0STRANGER", "not a countersign reviewer"), (SLACK_IDS["carol"], '"security" group')):
        body = click_body(review["id"], "countersign_approve_shown", user)
        assert interact(stack, body, sign(body)).status_code == 200
        told = slack.wait_call("chat.postEphemeral", lambda a, user=user: a.get("user") == user)
        assert why in told["text"] and told["channel"] == CHANNEL, told
    # Nor can carol reject through the modal.
    view = {"type": "modal", "callback_id": "countersign_reject", "private_metadata": review["id"]}
    body = submission_body(view, SLACK_IDS["carol"], "veto")
    r = interact(stack, body, sign(body))
    assert r.json()["response_action"] == "errors" and "security" in json.dumps(r.json()), r.text
    stored = stack.approval.review(review["id"])
    assert (stored["status"], stored["approvals"]) == ("pending", [])
    assert not fut.done()
    assert stack.approval.decide(review["id"], "approve", reviewer="bob").status_code == 200
    assert fut.result(timeout=15).status_code == 200


def test_one_winner_when_slack_and_the_api_decide_at_once(env, background):
    stack, slack, hooks = env
    for _ in range(3):
        fut, review = hold(stack, background)
        posted(slack, review["id"])
        told_before = len(slack.calls_of("chat.postEphemeral"))
        body = click_body(review["id"], "countersign_approve_shown", SLACK_IDS["alice"])
        headers = sign(body)
        click = background.submit(interact, stack, body, headers)
        api = background.submit(stack.approval.decide, review["id"], "reject", "bob", reason="race")
        assert click.result(timeout=10).status_code == 200
        api_status = api.result(timeout=10).status_code
        stored = stack.approval.review(review["id"])
        answer = fut.result(timeout=15)
        if stored["status"] == "approved":
            # The API lost: 409; the caller was answered.
            assert (stored["reviewer"], api_status, answer.status_code) == ("alice", 409, 200)
        else:
            # Slack lost: alice is told, in a message only she sees.
            assert (stored["status"], stored["reviewer"], api_status) == ("rejected", "bob", 200)
            assert answer.status_code == 403
            # (Told now: not what this module's earlier tests told her.)
            wait_until(lambda: len(slack.calls_of("chat.postEphemeral")) > told_before,
                       what="alice told why her click did nothing")
            told = [a for a in slack.calls_of("chat.postEphemeral")[told_before:]
                    if a.get("user") == SLACK_IDS["alice"]]
            assert told and "Not approved" in told[0]["text"] and "rejected" in told[0]["text"], told
        outcome = "Approved by alice" if stored["status"] == "approved" else "Rejected by bob"
        wait_until(lambda: outcome in head_text(channel_message(slack, review["id"])),
                   what="the message showing the one outcome")


def test_a_slow_slack_delays_neither_holds_nor_decisions(env, background):
    stack, slack, hooks = env
    slack.delays["chat.postMessage"] = 6
    try:
        started = time.monotonic()
        fut, review = hold(stack, background)
        assert stack.approval.decide(review["id"], "approve", reviewer="bob").status_code == 200
        assert fut.result(timeout=5).status_code == 200
        assert time.monotonic() - started < 6, "the caller waited for Slack"
        assert not [a for a in slack.calls_of("chat.postMessage") if review["id"] in json.dumps(a)]
        # The post lands late, and the message is brought up to the outcome
        # decided meanwhile.
        wait_until(lambda: "Approved by bob" in head_text(channel_message(slack, review["id"])),
                   timeout=15, what="the late message updated with the outcome")
    finally:
        slack.delays.clear()


def test_decisions_elsewhere_and_expiry_update_the_message(env, background):
    stack, slack, hooks = env
    fut, review = hold(stack, background)
    posted(slack, review["id"])
    assert stack.approval.decide(review["id"], "approve", reviewer="bob", reason="via the API").status_code == 200
    assert fut.result(timeout=15).status_code == 200
    wait_until(lambda: "Approved by bob: via the API" in head_text(channel_message(slack, review["id"])),
               what="the message updated after an API decision")

    fut, quick = hold(stack, background, model="demo-quick")
    posted(slack, quick["id"])
    assert fut.result(timeout=20).status_code != 200
    wait_until(lambda: "Expired" in head_text(channel_message(slack, quick["id"])),
               what="the message updated at expiry")
    assert buttons(channel_message(slack, quick["id"])) == ["countersign_open"]

    # A rule that is not routed to Slack posts nothing.
    fut, quiet = hold(stack, background, model="demo-quiet")
    time.sleep(1)
    assert not [a for a in slack.calls_of("chat.postMessage") if quiet["id"] in json.dumps(a)]
    assert stack.approval.decide(quiet["id"], "approve", reviewer="bob").status_code == 200
    assert fut.result(timeout=15).status_code == 200


def test_webhooks_are_signed_as_standard_webhooks_say(env, background):
    stack, slack, hooks = env
    fut, review = hold(stack, background)
    assert stack.approval.decide(review["id"], "approve", reviewer="alice").status_code == 200
    assert fut.result(timeout=15).status_code == 200
    calls = wait_until(lambda: len(got := hooks.events_for(review["id"])) >= 2 and got,
                       what="review.created and review.decided")
    verifier = Webhook(WEBHOOK_SECRET)
    kinds = []
    for headers, body in calls:
        payload = verifier.verify(body, headers)
        kinds.append(payload["type"])
        assert payload["data"]["id"] == review["id"]
        assert "preview" not in payload["data"], "include_preview = false"
        with pytest.raises(WebhookVerificationError):
            verifier.verify(body.replace(b"demo-echo", b"demo-evil"), headers)
    assert sorted(kinds) == ["review.created", "review.decided"]
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB").verify(calls[0][1], calls[0][0])
