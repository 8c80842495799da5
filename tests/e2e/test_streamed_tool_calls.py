"""Streamed tool-call approval end to end in the real Envoy, through the
official OpenAI (chat and Responses) and Anthropic SDKs, and Gemini's
`alt=sse` stream read with httpx (no SDK here): a `review` rule with `streams: hold`
(the default) lets a streamed answer's text out as it comes and holds the
rest from its first tool-call event until a reviewer decided. The demo
model streams the events the `x-demo-answer` header scripts
(examples/demo-backend/README.md)."""
import json
import threading
import time

import httpx
import pytest

from conftest import emptied, module_stack
from stack import answer_records, wait_until
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


@pytest.fixture(scope="module")
def agents_gw(tmp_path_factory, request):
    """One stack per configuration for the module's tests that share it:
    each decides every review it holds and reads only its own requests, and
    starting Envoy, which compiles the filter, is most of a stack's start."""
    with module_stack(tmp_path_factory, request, "streamed_tool_calls", config()) as s:
        yield s


@pytest.fixture
def agents(agents_gw):
    return emptied(agents_gw)


@pytest.fixture(scope="module")
def erroring(tmp_path_factory, request):
    """The same with `on_reject: error`."""
    with module_stack(tmp_path_factory, request, "streamed_tool_calls_error", config(on_reject="error")) as s:
        yield s


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


def test_a_rejection_can_end_the_stream_with_the_apis_error_event(erroring, background):
    import openai
    stack = erroring
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


def test_a_stream_without_a_named_tool_passes_and_block_still_refuses(make_stack):
    # Its own stack: it checks that no review at all was filed.
    agents = make_stack(filter_config=config())
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


# ---- the OpenAI Responses API (through the SDK) and Gemini (raw SSE)

RESPONSES_TOOLS = [{"type": "function", "name": "delete_file", "description": "Deletes a file",
                    "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}]
GEMINI_TOOLS = [{"functionDeclarations": [{"name": "delete_file", "description": "Deletes a file",
                                           "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}]}]
GEMINI_PATH = "/v1beta/models/demo-echo:streamGenerateContent?alt=sse"


def responses_events():
    text = {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": "Sure, deleting.", "annotations": []}]}

    def call(args, status):
        return {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "delete_file",
                "arguments": args, "status": status}

    def response(status, output):
        return {"id": "resp_1", "object": "response", "created_at": 1, "model": "demo-echo", "status": status,
                "output": output}
    done = '{"path": "/srv/data"}'
    return [
        {"type": "response.created", "sequence_number": 0, "response": response("in_progress", [])},
        {"type": "response.output_item.added", "sequence_number": 1, "output_index": 0,
         "item": {**text, "status": "in_progress", "content": []}},
        {"type": "response.output_text.delta", "sequence_number": 2, "item_id": "msg_1", "output_index": 0,
         "content_index": 0, "delta": "Sure, deleting."},
        {"type": "response.output_item.done", "sequence_number": 3, "output_index": 0, "item": text},
        {"type": "response.output_item.added", "sequence_number": 4, "output_index": 1,
         "item": call("", "in_progress")},
        {"type": "response.function_call_arguments.delta", "sequence_number": 5, "item_id": "fc_1",
         "output_index": 1, "delta": '{"path": '},
        {"type": "response.function_call_arguments.delta", "sequence_number": 6, "item_id": "fc_1",
         "output_index": 1, "delta": '"/srv/data"}'},
        {"type": "response.function_call_arguments.done", "sequence_number": 7, "item_id": "fc_1",
         "output_index": 1, "arguments": done},
        {"type": "response.output_item.done", "sequence_number": 8, "output_index": 1,
         "item": call(done, "completed")},
        {"type": "response.completed", "sequence_number": 9,
         "response": response("completed", [text, call(done, "completed")])},
    ]


def gemini_events():
    return [
        {"candidates": [{"index": 0, "content": {"role": "model", "parts": [{"text": "Sure, deleting."}]}}]},
        {"candidates": [{"index": 0, "content": {"role": "model", "parts": [
            {"functionCall": {"name": "delete_file", "args": {"path": "/srv/data"}}}]}, "finishReason": "STOP"}],
         "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 7, "totalTokenCount": 12}},
    ]


def responses_stream(stack):
    """The OpenAI SDK's Responses stream, read to its end: (text, tool
    calls, status) as an agent assembles them: the text from its deltas
    (which must agree with the final response's), the calls from the final
    response."""
    import openai
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    stream = client.responses.create(model="demo-echo", input=ASK, tools=RESPONSES_TOOLS, stream=True,
                                     extra_headers=script(responses_events()))
    text, final = "", None
    for event in stream:
        if event.type == "response.output_text.delta":
            text += event.delta
        elif event.type == "response.completed":
            final = event.response
    assert final is not None, "the stream ends with response.completed"
    texts = "".join(c.text for item in final.output if item.type == "message"
                    for c in item.content if c.type == "output_text")
    assert texts == text, (texts, text)
    calls = [(i.name, json.loads(i.arguments)) for i in final.output if i.type == "function_call"]
    return text, calls, final.status


def gemini_stream(stack):
    """Gemini's SSE stream read with httpx (no SDK here): (text, calls,
    finish reason); an error chunk raises."""
    body = {"contents": [{"role": "user", "parts": [{"text": ASK}]}], "tools": GEMINI_TOOLS}
    text, calls, finish = "", [], None
    with httpx.stream("POST", stack.url + GEMINI_PATH, json=body, timeout=60,
                      headers=script(gemini_events())) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            chunk = json.loads(line[5:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            for cand in chunk.get("candidates", []):
                for part in cand.get("content", {}).get("parts", []):
                    text += part.get("text", "")
                    if "functionCall" in part:
                        calls.append((part["functionCall"]["name"], part["functionCall"]["args"]))
                finish = cand.get("finishReason") or finish
    return text, calls, finish


STREAMS = {"responses": responses_stream, "gemini": gemini_stream}
APPROVED = {"responses": "completed", "gemini": "STOP"}


def counted(stack, api):
    """A raw streamed request of `api` whose bytes are noted as they arrive
    at the client: (thread, arrived [(bytes, time)])."""
    if api == "chat":
        path, events = "/v1/chat/completions", chat_events()
        body = {"model": "demo-echo", "messages": [{"role": "user", "content": ASK}], "tools": OPENAI_TOOLS,
                "stream": True}
    elif api == "responses":
        path, events = "/v1/responses", responses_events()
        body = {"model": "demo-echo", "input": ASK, "tools": RESPONSES_TOOLS, "stream": True}
    else:
        path, events = GEMINI_PATH, gemini_events()
        body = {"contents": [{"role": "user", "parts": [{"text": ASK}]}], "tools": GEMINI_TOOLS}
    arrived = []

    def call():
        with httpx.stream("POST", stack.url + path, json=body, timeout=60, headers=script(events)) as r:
            assert r.status_code == 200
            for chunk in r.iter_raw():
                arrived.append((chunk, time.monotonic()))
    return threading.Thread(target=call), arrived


@pytest.mark.parametrize("api", ["chat", "responses", "gemini"])
def test_text_leaves_at_once_and_no_tool_call_byte_before_approval(agents, api):
    """Bytes counted at the client: the head and the text before the tool
    call arrive while the review is pending; nothing of the tool call does
    until the approval, then the rest of the stream as the model sent it."""
    caller, arrived = counted(agents, api)
    caller.start()
    try:
        [review] = agents.approval.wait_pending()
        wait_until(lambda: b"deleting." in b"".join(c for c, _ in arrived), what="the text before the tool call")
        time.sleep(0.5)
        before = b"".join(c for c, _ in arrived)
        assert b"delete_file" not in before and b"/srv/data" not in before, before
        assert b"[DONE]" not in before and b"response.completed" not in before
        detail = agents.approval.review(review["id"])
        assert (detail["kind"], detail["stream"]) == ("tool_call", True)
        assert [(c["name"], json.loads(c["arguments"])) for c in detail["tool_calls"]] == [
            ("delete_file", {"path": "/srv/data"})]
        approved_at = time.monotonic()
        assert agents.approval.decide(review["id"], "approve").status_code == 200
    finally:
        caller.join(30)
    received = b"".join(c for c, _ in arrived)
    after = b"".join(c for c, at in arrived if at >= approved_at)
    assert b"delete_file" in after and b"/srv/data" in after
    assert api != "chat" or received.endswith(b"data: [DONE]\n\n")
    rec = answer_records(agents, review["id"])[0]
    assert rec["response"]["answer_decision"] == "approved"
    assert rec["response"]["answer_review_id"] == review["id"]


@pytest.mark.parametrize("api", ["responses", "gemini"])
def test_approved_and_edited_calls_reach_responses_and_gemini_clients(agents, background, api):
    fut = background.submit(STREAMS[api], agents)
    [review] = agents.approval.wait_pending()
    assert agents.approval.decide(review["id"], "approve").status_code == 200
    assert fut.result(30) == ("Sure, deleting.", [("delete_file", {"path": "/srv/data"})], APPROVED[api])

    fut = background.submit(STREAMS[api], agents)
    [review] = agents.approval.wait_pending()
    edited = json.loads(agents.approval.review(review["id"])["body"])
    if api == "responses":
        [call] = [i for i in edited["output"] if i["type"] == "function_call"]
        call["arguments"] = '{"path": "/tmp/scratch"}'
    else:
        edited["candidates"][0]["content"]["parts"][-1]["functionCall"]["args"] = {"path": "/tmp/scratch"}
    assert agents.approval.decide(review["id"], "edit", body=edited).status_code == 200
    assert fut.result(30) == ("Sure, deleting.", [("delete_file", {"path": "/tmp/scratch"})], APPROVED[api])


@pytest.mark.parametrize("api", ["responses", "gemini"])
def test_a_rejection_reaches_responses_and_gemini_clients_as_a_stream_that_says_why(agents, background, api):
    fut = background.submit(STREAMS[api], agents)
    [review] = agents.approval.wait_pending()
    assert agents.approval.decide(review["id"], "reject", reason="not on the data volume").status_code == 200
    text, calls, finish = fut.result(30)
    assert calls == []
    assert text.startswith("Sure, deleting.") and "not on the data volume" in text and "alice" in text
    assert finish == APPROVED[api]


@pytest.mark.parametrize("api", ["responses", "gemini"])
def test_an_expired_review_lets_no_tool_call_out_to_responses_and_gemini_clients(make_stack, api):
    stack = make_stack(filter_config=config(hold_timeout_ms=1000))
    text, calls, finish = STREAMS[api](stack)
    assert calls == []
    assert text.startswith("Sure, deleting.") and "in time" in text
    assert finish == APPROVED[api]


@pytest.mark.parametrize("api", ["responses", "gemini"])
def test_on_reject_error_ends_responses_and_gemini_streams_with_the_error_event(erroring, background, api):
    import openai
    stack = erroring
    fut = background.submit(STREAMS[api], stack)
    [review] = stack.approval.wait_pending()
    stack.approval.decide(review["id"], "reject", reason="no")
    with pytest.raises((openai.APIError, RuntimeError)) as err:
        fut.result(30)
    assert "rejected by alice" in str(err.value)


def test_a_held_stream_beyond_hold_limits_ends_with_the_error_event(make_stack):
    """Held streams count in `hold_limits` as held prompts do. One HTTP/2
    connection: every stream lands on the same Envoy worker, whose holds
    the limit counts."""
    import asyncio
    stack = make_stack(filter_config={**config(), "hold_limits": {"per_caller": 1, "total": 5, "retry_after_s": 9}})
    url = stack.url + "/v1/chat/completions"
    body = {"model": "demo-echo", "messages": [{"role": "user", "content": ASK}], "tools": OPENAI_TOOLS,
            "stream": True}

    async def read(c):
        async with c.stream("POST", url, json=body, headers=script(chat_events())) as r:
            assert r.status_code == 200
            return b"".join([chunk async for chunk in r.aiter_raw()])

    async def scenario():
        async with httpx.AsyncClient(http1=False, http2=True, timeout=30) as c:
            first = asyncio.create_task(read(c))
            [review] = await asyncio.to_thread(stack.approval.wait_pending)
            second = await read(c)
            # Its text went out; its tool call never does: the stream ends
            # with the API's error event, and no second review exists.
            assert b"deleting." in second
            assert b"delete_file" not in second and b"/srv/data" not in second, second
            assert b"too_many_held_requests" in second, second
            assert len(await asyncio.to_thread(stack.approval.pending)) == 1
            await asyncio.to_thread(stack.approval.decide, review["id"], "approve")
            assert b"delete_file" in await first

    asyncio.run(scenario())


def test_gemini_arguments_streamed_in_pieces_end_the_stream_instead_of_a_review(agents):
    """A backend streaming a call's arguments in pieces unasked
    (`functionCall.partialArgs`): the calls held for review had none, so a
    reviewer approved `delete_file` without seeing its path and the client
    put the path together from the released pieces. Now the stream ends
    with the error event naming the field, before any piece leaves, and
    nobody is asked to approve a call they cannot see."""
    call = lambda **c: {"candidates": [{"index": 0, "content": {"role": "model", "parts": [{"functionCall": c}]}}]}  # noqa: E731
    events = [
        {"candidates": [{"index": 0, "content": {"role": "model", "parts": [{"text": "Sure, deleting."}]}}]},
        call(name="delete_file", partialArgs=[{"jsonPath": "$.path", "stringValue": "/srv/da", "willContinue": True}],
             willContinue=True),
        call(partialArgs=[{"jsonPath": "$.path", "stringValue": "ta"}], willContinue=False),
        {"candidates": [{"index": 0, "content": {"role": "model", "parts": []}, "finishReason": "STOP"}]},
    ]
    body = {"contents": [{"role": "user", "parts": [{"text": ASK}]}], "tools": GEMINI_TOOLS}
    r = httpx.post(agents.url + GEMINI_PATH, json=body, timeout=60, headers=script(events))
    assert r.status_code == 200, r.text[:300]
    assert b"/srv/da" not in r.content and b"delete_file" not in r.content, r.content[:600]
    last = json.loads([line for line in r.text.splitlines() if line.startswith("data:")][-1][5:])
    assert "`functionCall.partialArgs`" in last["error"]["message"], last
    assert agents.approval.pending() == []


def test_clean_text_in_the_chunk_that_ends_the_stream_still_leaves(agents):
    """Before: when one chunk carried clean text and then the event that
    ends the stream (here a call's arguments in pieces), the clean text of
    that chunk was dropped with it. Now it leaves, then the error event."""
    call = {"candidates": [{"index": 0, "content": {"role": "model", "parts": [{"functionCall": {
        "name": "delete_file", "partialArgs": [{"jsonPath": "$.path", "stringValue": "/srv/da"}],
        "willContinue": True}}]}}]}
    clean = {"candidates": [{"index": 0, "content": {"role": "model", "parts": [{"text": "Sure, deleting."}]}}]}
    # One scripted item is one body chunk: both events in it.
    events = [json.dumps(clean) + "\n\ndata: " + json.dumps(call)]
    body = {"contents": [{"role": "user", "parts": [{"text": ASK}]}], "tools": GEMINI_TOOLS}
    r = httpx.post(agents.url + GEMINI_PATH, json=body, timeout=60, headers=script(events))
    assert r.status_code == 200, r.text[:300]
    assert b"/srv/da" not in r.content and b"delete_file" not in r.content, r.content[:600]
    data = [json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data:")]
    assert data[0] == clean and len(data) == 2, r.text[:600]
    assert "`functionCall.partialArgs`" in data[1]["error"]["message"], data
    assert agents.approval.pending() == []
