"""Tool-call approval end to end in the real Envoy, through the official
OpenAI and Anthropic SDKs: the demo model answers with a tool call when the
request has `tools` and the user says `call NAME {arguments}`; a `review`
response rule holds answers that call `delete_*` until a reviewer decides."""
import json
import time

import pytest

from conftest import emptied, module_stack
from stack import HeldCaller, answer_records, wait_until

pytestmark = pytest.mark.timeout(120)

RULE = {"name": "dangerous-tools", "action": "review", "tools": ["delete_*"], "streams": "block"}
OPENAI_TOOLS = [{"type": "function", "function": {
    "name": "delete_file", "description": "Deletes a file",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}}]
ANTHROPIC_TOOLS = [{"name": "delete_file", "description": "Deletes a file",
                    "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}}]
ASK = 'call delete_file {"path": "/srv/data"}'


def config(**rule):
    return {"default_action": "allow", "content_policy": {"response_rules": [{**RULE, **rule}]}}


@pytest.fixture(scope="module")
def agents_gw(tmp_path_factory, request):
    """One stack for the module's tests that share it: each decides every
    review it holds and reads only its own requests, and starting Envoy,
    which compiles the filter, is most of a stack's start."""
    with module_stack(tmp_path_factory, request, "tool_calls", config()) as s:
        yield s


@pytest.fixture
def agents(agents_gw):
    return emptied(agents_gw)


def openai_client(stack):
    import openai
    return openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def ask_openai(stack, text=ASK):
    return openai_client(stack).chat.completions.create(
        model="demo-echo", messages=[{"role": "user", "content": text}], tools=OPENAI_TOOLS)


def test_nothing_of_a_held_tool_call_reaches_the_caller_before_approval(agents):
    """Bytes counted at the client: neither the head nor the body arrives
    while the review is pending; after approval the answer arrives whole."""
    body = {"model": "demo-echo", "messages": [{"role": "user", "content": ASK}], "tools": OPENAI_TOOLS}
    with HeldCaller(agents.url + "/v1/chat/completions", body) as caller:
        [review] = agents.approval.wait_pending()
        # The model has answered (the review holds its answer) ...
        assert len(agents.backend.requests()) == 1
        time.sleep(0.5)
        # ... and the caller has received nothing of it.
        assert caller.arrived == []
        detail = agents.approval.review(review["id"])
        assert detail["kind"] == "tool_call"
        assert detail["rule"] == "dangerous-tools"
        assert [(c["name"], json.loads(c["arguments"])) for c in detail["tool_calls"]] == [
            ("delete_file", {"path": "/srv/data"})]
        assert detail["prompt"][0]["text"] == ASK
        approved_at = time.monotonic()
        assert agents.approval.decide(review["id"], "approve").status_code == 200
    assert caller.arrived and caller.arrived[0][:2] == ("head", 200)
    assert all(at >= approved_at for _, _, at in caller.arrived)
    answer = caller.answer()
    [call_] = answer["choices"][0]["message"]["tool_calls"]
    assert call_["function"] == {"name": "delete_file", "arguments": '{"path":"/srv/data"}'}


def test_an_approved_edit_changes_the_arguments_the_openai_sdk_gets(agents, background):
    fut = background.submit(ask_openai, agents)
    [review] = agents.approval.wait_pending()
    edited = json.loads(agents.approval.review(review["id"])["body"])
    edited["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] = '{"path": "/tmp/scratch"}'
    assert agents.approval.decide(review["id"], "edit", body=edited).status_code == 200
    completion = fut.result(30)
    [call_] = completion.choices[0].message.tool_calls
    assert call_.function.name == "delete_file"
    assert json.loads(call_.function.arguments) == {"path": "/tmp/scratch"}
    assert completion.choices[0].finish_reason == "tool_calls"
    rec = answer_records(agents, review["id"])[0]
    assert rec["response"]["answer_decision"] == "edited"
    assert rec["response"]["answer_review_id"] == review["id"]


def test_a_rejection_reaches_the_anthropic_sdk_as_an_answer_that_says_why(agents, background):
    import anthropic
    client = anthropic.Anthropic(base_url=agents.url, api_key="unused", max_retries=0, timeout=60)
    fut = background.submit(client.messages.create, model="demo-echo", max_tokens=100,
                            messages=[{"role": "user", "content": ASK}], tools=ANTHROPIC_TOOLS)
    [review] = agents.approval.wait_pending()
    assert agents.approval.review(review["id"])["tool_calls"][0]["name"] == "delete_file"
    assert agents.approval.decide(review["id"], "reject", reason="not on the data volume").status_code == 200
    message = fut.result(30)
    assert message.stop_reason == "end_turn"
    assert [b.type for b in message.content] == ["text"]
    assert "not on the data volume" in message.content[0].text
    assert "alice" in message.content[0].text


def test_a_rejection_can_be_an_error(make_stack, background):
    import openai
    stack = make_stack(filter_config=config(on_reject="error"))
    fut = background.submit(ask_openai, stack)
    [review] = stack.approval.wait_pending()
    stack.approval.decide(review["id"], "reject", reason="no")
    with pytest.raises(openai.PermissionDeniedError) as err:
        fut.result(30)
    assert err.value.body["code"] == "review_rejected"


def test_an_expired_review_lets_no_tool_call_out(make_stack, background):
    stack = make_stack(filter_config=config(hold_timeout_ms=1000))
    completion = ask_openai(stack)
    message = completion.choices[0].message
    assert not message.tool_calls
    assert "in time" in message.content
    [review] = wait_until(lambda: stack.approval.client().get(
        "/api/reviews", params={"kind": "tool_call"}).json()["reviews"], what="the expired review")
    assert review["status"] == "expired"


def test_other_answers_pass_and_the_api_filters_by_kind(make_stack):
    # Its own stack: it checks that no review at all was filed.
    agents = make_stack(filter_config=config())
    plain = ask_openai(agents, "just say hello")
    assert plain.choices[0].message.content == "echo: just say hello"
    weather = ask_openai(agents, "call get_weather {}")
    assert weather.choices[0].message.tool_calls[0].function.name == "get_weather"
    with agents.approval.client() as c:
        assert c.get("/api/reviews").json()["reviews"] == []
        assert c.get("/api/reviews", params={"kind": "bogus"}).status_code == 400


def test_streamed_requests_in_scope_are_refused(agents):
    import openai
    with pytest.raises(openai.PermissionDeniedError) as err:
        openai_client(agents).chat.completions.create(
            model="demo-echo", messages=[{"role": "user", "content": ASK}], tools=OPENAI_TOOLS, stream=True)
    assert "dangerous-tools" in err.value.message
    assert agents.backend.requests() == []
