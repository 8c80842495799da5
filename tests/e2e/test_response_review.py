"""Reviews of an answer's text end to end in the real Envoy: a `review`
response rule on a phrase holds the demo model's plain answer (which echoes
the prompt) until a reviewer approves, edits or rejects it, or nobody decides
in time. Emails are masked in prompts and answers, so the reviewer sees the
answer masked and an edit is masked again."""
import json
import time

import httpx
import pytest

from conftest import emptied, module_stack
from stack import HeldCaller, answer_records, wait_until
from test_tool_calls import openai_client

pytestmark = pytest.mark.timeout(120)

RULE = {"name": "internal-answers", "action": "review", "phrases": ["internal only"], "streams": "block"}
MASKING = {"profiles": {"default": {"detectors": {"email": "redact"}}}}
ASK = "internal only: write to bob@example.com"


def config(**rule):
    return {"default_action": "allow", "masking": MASKING,
            "content_policy": {"response_rules": [{**RULE, **rule}]}}


@pytest.fixture(scope="module")
def answers_gw(tmp_path_factory, request):
    """One stack for the module's tests that share it: each decides every
    review it holds and reads only its own requests and records, and
    starting Envoy, which compiles the filter, is most of a stack's start."""
    with module_stack(tmp_path_factory, request, "response_review", config()) as s:
        yield s


@pytest.fixture
def answers(answers_gw):
    return emptied(answers_gw)


def ask_openai(stack, text=ASK, **extra):
    return openai_client(stack).chat.completions.create(
        model="demo-echo", messages=[{"role": "user", "content": text}], **extra)


def test_nothing_of_a_held_answer_reaches_the_caller_before_approval(answers):
    """Bytes counted at the client: neither the head nor the body arrives
    while the review is pending; after approval the answer arrives whole,
    masked."""
    body = {"model": "demo-echo", "messages": [{"role": "user", "content": ASK}]}
    with HeldCaller(answers.url + "/v1/chat/completions", body) as caller:
        [review] = answers.approval.wait_pending()
        # The model has answered (the review holds its answer) ...
        assert len(answers.backend.requests()) == 1
        time.sleep(0.5)
        # ... and the caller has received nothing of it.
        assert caller.arrived == []
        detail = answers.approval.review(review["id"])
        assert detail["kind"] == "response"
        assert detail["rule"] == "internal-answers"
        assert detail["prompt"][0]["text"] == "internal only: write to [EMAIL]"
        held = json.loads(detail["body"])
        assert held["choices"][0]["message"]["content"] == "echo: internal only: write to [EMAIL]"
        assert "bob@example.com" not in detail["body"]
        approved_at = time.monotonic()
        assert answers.approval.decide(review["id"], "approve").status_code == 200
    assert caller.arrived and caller.arrived[0][:2] == ("head", 200)
    assert all(at >= approved_at for _, _, at in caller.arrived)
    assert caller.answer()["choices"][0]["message"]["content"] == "echo: internal only: write to [EMAIL]"
    assert caller.headers["x-countersign-answer-outcome"] == "approved"
    assert caller.headers["x-countersign-answer-review-id"] == review["id"]
    [rec] = answer_records(answers, review["id"])
    assert rec["response"]["answer_decision"] == "approved"
    assert rec["response"]["answer_review_id"] == review["id"]


def test_an_edit_is_masked_again_and_reaches_the_openai_sdk(answers, background):
    fut = background.submit(ask_openai, answers)
    [review] = answers.approval.wait_pending()
    edited = json.loads(answers.approval.review(review["id"])["body"])
    edited["choices"][0]["message"]["content"] = "Please ask the help desk, carol@example.com"
    assert answers.approval.decide(review["id"], "edit", body=edited).status_code == 200
    completion = fut.result(30)
    assert completion.choices[0].message.content == "Please ask the help desk, [EMAIL]"
    assert completion.choices[0].finish_reason == "stop"
    [rec] = answer_records(answers, review["id"])
    assert rec["response"]["answer_decision"] == "edited"
    assert "carol@example.com" not in json.dumps(rec)


def test_an_invalid_edit_is_refused_when_submitted_and_a_valid_one_reaches_the_caller(answers, background):
    """An edit that changes more than the answer's text (its finish reason)
    is refused by the approval service when the reviewer submits it, before
    the filter sees it: the caller keeps waiting and gets the valid edit
    that follows, instead of losing the answer to an error at release."""
    fut = background.submit(ask_openai, answers)
    [review] = answers.approval.wait_pending()
    held = json.loads(answers.approval.review(review["id"])["body"])
    edited = json.loads(json.dumps(held))
    edited["choices"][0]["message"]["content"] = "Please ask the help desk."
    invalid = json.loads(json.dumps(edited))
    invalid["choices"][0]["finish_reason"] = "length"
    r = answers.approval.decide(review["id"], "edit", body=invalid)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_edit"
    assert "only the answer's text may change" in r.json()["error"]["message"]
    assert answers.approval.review(review["id"])["status"] == "pending"
    assert not fut.done()
    r = answers.approval.decide(review["id"], "edit", body=edited)
    assert r.status_code == 200, r.text
    completion = fut.result(30)
    assert completion.choices[0].message.content == "Please ask the help desk."
    assert completion.choices[0].finish_reason == "stop"
    [rec] = answer_records(answers, review["id"])
    assert rec["response"]["answer_decision"] == "edited"


def test_a_rejection_reaches_the_anthropic_sdk_as_an_error(answers, background):
    import anthropic
    client = anthropic.Anthropic(base_url=answers.url, api_key="unused", max_retries=0, timeout=60)
    fut = background.submit(client.messages.create, model="demo-echo", max_tokens=100,
                            messages=[{"role": "user", "content": ASK}])
    [review] = answers.approval.wait_pending()
    assert answers.approval.review(review["id"])["kind"] == "response"
    assert answers.approval.decide(review["id"], "reject", reason="not for this caller").status_code == 200
    with pytest.raises(anthropic.PermissionDeniedError) as err:
        fut.result(30)
    assert err.value.status_code == 403
    assert "not for this caller" in err.value.message
    assert "internal only" not in err.value.response.text
    [rec] = answer_records(answers, review["id"])
    assert rec["response"]["answer_decision"] == "rejected"


def test_an_expired_review_lets_nothing_of_the_answer_out(make_stack):
    stack = make_stack(filter_config=config(hold_timeout_ms=1000))
    r = httpx.post(stack.url + "/v1/chat/completions", timeout=30,
                   json={"model": "demo-echo", "messages": [{"role": "user", "content": ASK}]})
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "review_timeout"
    assert "internal only" not in r.text
    assert r.headers["x-countersign-answer-outcome"] == "expired"
    [review] = wait_until(lambda: stack.approval.client().get(
        "/api/reviews", params={"kind": "response"}).json()["reviews"], what="the expired review")
    assert review["status"] == "expired"


def test_other_answers_pass_and_streams_in_scope_are_refused(make_stack):
    import openai
    # Its own stack: it checks that no review at all was filed.
    answers = make_stack(filter_config=config())
    plain = ask_openai(answers, "just say hello")
    assert plain.choices[0].message.content == "echo: just say hello"
    with answers.approval.client() as c:
        assert c.get("/api/reviews", params={"kind": "response"}).json()["reviews"] == []
    with pytest.raises(openai.PermissionDeniedError) as err:
        ask_openai(answers, stream=True)
    assert "internal-answers" in err.value.message
    assert len(answers.backend.requests()) == 1
