"""Streamed tool-call approval end to end in the real Envoy, through the
official OpenAI and Anthropic SDKs: a `review` rule with `streams: hold`
(the default) lets a streamed answer's text out as it comes and holds the
rest from its first tool-call event until a reviewer decided. The demo
model streams the events the `x-demo-answer` header scripts
(examples/demo-backend/README.md)."""
import json
import threading
import time

import httpx
import pytest

from stack import records, wait_until
from test_tool_calls import ANTHROPIC_TOOLS, OPENAI_TOOLS

pytestmark = pytest.mark.timeout(120)

RULE = {"name": "dangerous-tools", "action": "review", "tools": ["delete_*"]}
ASK = "clean up the data volume"


def config(**rule):
    return {"default_action": "allow", "content_policy": {"response_rules": [{**RULE, **rule}]}}


def chat_events():
    def chunk(delta, finish=None):
        return {"id": "chatcmpl-s1", "object": "chat.completion.chunk", "created": 1, "model": "demo-echo",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    return [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Sure, "}),
        chunk({"content": "deleting."}),
        chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                               "function": {"name": "delete_file", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"path": '}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"/srv/data"}'}}]}),
        chunk({}, "tool_calls"),
        "[DONE]",
    ]


def anthropic_events():
    return [
        {"type": "message_start", "message": {
            "id": "msg_s1", "type": "message", "role": "assistant", "content": [], "model": "demo-echo",
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 5, "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Sure, deleting."}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1,
         "content_block": {"type": "tool_use", "id": "toolu_1", "name": "delete_file", "input": {}}},
        {"type": "content_block_delta", "index": 1,
         "delta": {"type": "input_json_delta", "partial_json": '{"path": '}},
        {"type": "content_block_delta", "index": 1,
         "delta": {"type": "input_json_delta", "partial_json": '"/srv/data"}'}},
        {"type": "content_block_stop", "index": 1},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
         "usage": {"output_tokens": 12}},
        {"type": "message_stop"},
    ]


def script(events):
    return {"x-demo-answer": json.dumps(events)}


@pytest.fixture
def agents(make_stack):
    return make_stack(filter_config=config())


def openai_stream(stack, events=None):
    """The OpenAI SDK's stream, read to its end: (text, tool calls, finish
    reason) as an agent assembles them."""
    import openai
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    stream = client.chat.completions.create(
        model="demo-echo", messages=[{"role": "user", "content": ASK}], tools=OPENAI_TOOLS, stream=True,
        extra_headers=script(events or chat_events()))
    text, calls, finish = "", {}, None
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            for call in choice.delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"name": "", "arguments": ""})
                entry["name"] += (call.function.name or "") if call.function else ""
                entry["arguments"] += (call.function.arguments or "") if call.function else ""
            finish = choice.finish_reason or finish
    return text, list(calls.values()), finish


def anthropic_stream(stack):
    import anthropic
    client = anthropic.Anthropic(base_url=stack.url, api_key="unused", max_retries=0, timeout=60)
    with client.messages.stream(model="demo-echo", max_tokens=100, messages=[{"role": "user", "content": ASK}],
                                tools=ANTHROPIC_TOOLS, extra_headers=script(anthropic_events())) as stream:
        return stream.get_final_message()


def test_text_leaves_at_once_and_no_tool_call_byte_before_approval(agents):
    """Bytes counted at the client: the head and the text before the tool
    call arrive while the review is pending; nothing of the tool call does
    until the approval, then the rest of the stream as the model sent it."""
    arrived = []  # (bytes, time)
    body = {"model": "demo-echo", "messages": [{"role": "user", "content": ASK}], "tools": OPENAI_TOOLS,
            "stream": True}

    def call():
        with httpx.stream("POST", agents.url + "/v1/chat/completions", json=body, timeout=60,
                          headers=script(chat_events())) as r:
            assert r.status_code == 200
            for chunk in r.iter_raw():
                arrived.append((chunk, time.monotonic()))

    caller = threading.Thread(target=call)
    caller.start()
    try:
        [review] = agents.approval.wait_pending()
        wait_until(lambda: b"deleting." in b"".join(c for c, _ in arrived), what="the text before the tool call")
        time.sleep(0.5)
        before = b"".join(c for c, _ in arrived)
        assert b"delete_file" not in before and b"/srv/data" not in before, before
        assert b"[DONE]" not in before
        detail = agents.approval.review(review["id"])
        assert detail["kind"] == "tool_call"
        assert detail["stream"] is True
        assert [(c["name"], json.loads(c["arguments"])) for c in detail["tool_calls"]] == [
            ("delete_file", {"path": "/srv/data"})]
        approved_at = time.monotonic()
        assert agents.approval.decide(review["id"], "approve").status_code == 200
    finally:
        caller.join(30)
    received = b"".join(c for c, _ in arrived)
    after = b"".join(c for c, at in arrived if at >= approved_at)
    assert b"delete_file" in after and received.endswith(b"data: [DONE]\n\n")
    rec = wait_until(lambda: [r for r in records(agents) if (r.get("response") or {}).get("answer_decision")],
                     what="response record with the answer's review")[0]
    assert rec["response"]["answer_decision"] == "approved"
    assert rec["response"]["answer_review_id"] == review["id"]


def test_an_edit_reaches_the_openai_sdk_as_streamed_arguments(agents, background):
    fut = background.submit(openai_stream, agents)
    [review] = agents.approval.wait_pending()
    edited = json.loads(agents.approval.review(review["id"])["body"])
    edited["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] = '{"path": "/tmp/scratch"}'
    assert agents.approval.decide(review["id"], "edit", body=edited).status_code == 200
    text, calls, finish = fut.result(30)
    assert text == "Sure, deleting."
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("delete_file", {"path": "/tmp/scratch"})]
    assert finish == "tool_calls"


def test_the_anthropic_sdk_gets_an_approved_tool_use(agents, background):
    fut = background.submit(anthropic_stream, agents)
    [review] = agents.approval.wait_pending()
    assert agents.approval.review(review["id"])["tool_calls"][0]["name"] == "delete_file"
    assert agents.approval.decide(review["id"], "approve").status_code == 200
    message = fut.result(30)
    assert [b.type for b in message.content] == ["text", "tool_use"]
    assert message.content[1].input == {"path": "/srv/data"}
    assert message.stop_reason == "tool_use"


def test_a_rejection_reaches_the_anthropic_sdk_as_a_stream_that_says_why(agents, background):
    fut = background.submit(anthropic_stream, agents)
    [review] = agents.approval.wait_pending()
    assert agents.approval.decide(review["id"], "reject", reason="not on the data volume").status_code == 200
    message = fut.result(30)
    assert message.stop_reason == "end_turn"
    assert [b.type for b in message.content] == ["text", "text"]
    assert message.content[0].text == "Sure, deleting."
    assert "not on the data volume" in message.content[1].text and "alice" in message.content[1].text


def test_a_rejection_can_end_the_stream_with_the_apis_error_event(make_stack, background):
    import openai
    stack = make_stack(filter_config=config(on_reject="error"))
    fut = background.submit(openai_stream, stack)
    [review] = stack.approval.wait_pending()
    stack.approval.decide(review["id"], "reject", reason="no")
    with pytest.raises(openai.APIError) as err:
        fut.result(30)
    assert "rejected by alice" in str(err.value)


def test_an_expired_review_lets_no_tool_call_out(make_stack):
    stack = make_stack(filter_config=config(hold_timeout_ms=1000))
    text, calls, finish = openai_stream(stack)
    assert calls == []
    assert text.startswith("Sure, deleting.") and "in time" in text
    assert finish == "stop"
    [review] = wait_until(lambda: stack.approval.client().get(
        "/api/reviews", params={"kind": "tool_call"}).json()["reviews"], what="the expired review")
    assert review["status"] == "expired"


def test_a_stream_without_a_named_tool_passes_and_block_still_refuses(agents, make_stack):
    events = [e if isinstance(e, str) else json.loads(json.dumps(e).replace("delete_file", "get_weather"))
              for e in chat_events()]
    text, calls, _ = openai_stream(agents, events)
    assert text == "Sure, deleting." and calls[0]["name"] == "get_weather"
    with agents.approval.client() as c:
        assert c.get("/api/reviews").json()["reviews"] == []

    import openai
    blocking = make_stack(filter_config=config(streams="block"))
    with pytest.raises(openai.PermissionDeniedError):
        openai_stream(blocking)
    assert blocking.backend.requests() == []
