"""Every text-bearing field of every API shape, end to end in the real Envoy
(issue #15's acceptance suite).

Requests: each row of `REQUEST_FIELDS` puts a sensitive value (an e-mail and
an AWS access key, both detectors on `redact`) into one field the model
reads, in every form the model still reads (`FORMS`, all in one text: one
request per field, and a leak names the form it found), and checks in the
demo model's request log that no form of it arrived; or, for a field that
cannot be rewritten, that the request was refused naming the field (and not
repeating the value). Text parts of one message get the value split over
two of them (`SPLIT_FIELDS`).

Answers: each row of `ANSWER_FIELDS` makes the demo model answer (the
`x-demo-answer` script, see examples/demo-backend/README.md) with the value
or a blocked phrase in one answer field, plain or streamed, in every form
and split over two streamed events at several places (for the rows that
stream each piece as a block or part of its own, over two adjacent text
blocks or parts); no form of either reaches the caller. A new field is one
row."""
import html
import json
import re
import unicodedata
import uuid
import zlib
from urllib.parse import unquote

import httpx
import pytest

from conftest import module_stack

pytestmark = pytest.mark.timeout(300)

EMAIL = "dana.scully@fbi.example.org"
AWS = "AKIAIOSFODNN7EXAMPLE"
PHRASE = "launch codes"
# Cores that no placeholder or harmless text contains: found in any view of
# what left, they are a leak.
EMAIL_CORE = "scully@fbi"
AWS_CORE = "iosfodnn7"
MODEL = "demo-allow-fields"
CONFIG = {
    "hold_timeout_ms": 5000,
    # Documents are fields too: read under the `allow` rule, not held.
    "attachments": "allow",
    # What reaches the model and the caller is checked here; records of
    # masked requests are test_masking's (and off, they keep the run short).
    "records": "off",
    "masking": {
        "salt": "salt-for-tests-0123456789",
        "profiles": {"default": {"detectors": {"email": "redact", "aws_access_key": "redact"}}},
    },
    "content_policy": {"response_rules": [{"name": "no-launch-codes", "phrases": [PHRASE], "action": "deny"}]},
    "rules": [{"name": "fields", "model": f"{MODEL}*", "action": "allow"}],
}

# ------------------------------------------------------------------ forms

# One character of each value stands for a JSON `\u` escape of itself: the
# renderers below write it as `\u0040` / `\u0041` at whatever depth of JSON
# inside JSON it sits.
ESC_AT, ESC_A, ESC_a = "\ue000", "\ue001", "\ue002"
ESCAPES = {ESC_AT: "\\u0040", ESC_A: "\\u0041", ESC_a: "\\u0061"}


def fullwidth(s: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in s)


# form -> (e-mail as written, AWS key as written)
FORMS = {
    "plain": (EMAIL, AWS),
    "json-escape": (EMAIL.replace("@", ESC_AT), ESC_A + AWS[1:]),
    "full-width": (fullwidth(EMAIL), fullwidth(AWS)),
    "zero-width": ("dana.scu\u200blly@fbi.exa\u00admple.org", "AKIAIOS\u200bFODNN7\u00adEXAMPLE"),
    "percent": (EMAIL.replace("@", "%40"), "%41KIAIOSFODNN7EXAMPLE"),
    "html-entity": (EMAIL.replace("@", "&#64;"), "&#65;KIAIOSFODNN7EXAMPLE"),
}


def sensitive() -> str:
    """Every form of both values, in one text (one request per field; a
    leak names the form it found)."""
    return "; ".join(f"{form}: mail {email} with key {key}" for form, (email, key) in FORMS.items())


def blocked_phrase(form: str) -> str:
    return {"plain": PHRASE, "json-escape": "l" + ESC_a + "unch codes", "full-width": fullwidth(PHRASE),
            "zero-width": "lau\u200bnch co\u00addes", "percent": "launch%20codes", "html-entity": "launch&#32;codes"}[form]


def blocked(form: str) -> str:
    return f"the {blocked_phrase(form)} are 7391"


def args(obj) -> str:
    """JSON text inside a JSON string (tool-call arguments): an escape
    sentinel becomes a `\\u` escape of this inner JSON."""
    text = json.dumps(obj, ensure_ascii=False)
    for sentinel, escape in ESCAPES.items():
        text = text.replace(sentinel, escape)
    return text


def render(obj, ascii_only=False) -> str:
    """`obj` as JSON text with the escape sentinels written as escapes."""
    text = json.dumps(obj, ensure_ascii=ascii_only)
    for sentinel, escape in ESCAPES.items():
        text = text.replace(sentinel, escape)
        text = text.replace(json.dumps(sentinel)[1:-1], escape)  # escaped by ensure_ascii
    return text


# ------------------------------------------------------------------ what a reader reads

INVISIBLE = re.compile("[\u00ad\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
U_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})")


def readings(text: str) -> list[str]:
    """`text` as a reader may read it: \\u escapes decoded, compatibility
    forms folded, invisible characters dropped, %XX and HTML entities
    unquoted (twice over, for escapes of escapes), case folded."""
    out = [text]
    t = text
    for _ in range(2):
        t = U_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), t)
        t = INVISIBLE.sub("", unicodedata.normalize("NFKC", t))
        t = html.unescape(unquote(t))
        t = INVISIBLE.sub("", unicodedata.normalize("NFKC", t))
        out.append(t)
    return [o.casefold() for o in out]


def strings(v, path=""):
    """(path without list indices, string) of every string and key in `v`,
    nested JSON text decoded too."""
    if isinstance(v, dict):
        for k, x in v.items():
            yield f"{path}.{k}#key", k
            yield from strings(x, f"{path}.{k}")
    elif isinstance(v, list):
        for x in v:
            yield from strings(x, f"{path}[]")
    elif isinstance(v, str):
        yield path, v
        if v[:1] in "{[":
            try:
                yield from strings(json.loads(v), path + "<json>")
            except ValueError:
                pass


def documents(raw: bytes) -> list:
    """The JSON documents in a body: one JSON value, SSE `data:` events,
    JSON lines, or AWS event-stream payloads (with base64 `bytes` decoded)."""
    if raw[:2] == b"\x1f\x8b":
        raw = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(raw)
    text = raw.decode("utf-8", "replace")
    try:
        return [json.loads(text)]
    except ValueError:
        pass
    docs = []
    for line in text.splitlines():
        line = line.removeprefix("data:").strip()
        if line.startswith(("{", "[")):
            try:
                docs.append(json.loads(line))
            except ValueError:
                pass
    return docs


def leaks(raw: bytes, *needles: str) -> list[str]:
    """Where any of `needles` can be read in `raw`: in the raw text, in any
    string, or in the strings of one field joined over every event (a value
    split over events is read joined)."""
    if raw[:2] == b"\x1f\x8b":
        raw = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(raw)
    texts = {"raw": raw.decode("utf-8", "replace")}
    joined: dict[str, str] = {}
    for doc in documents(raw):
        for path, s in strings(doc):
            texts[f"{path}: {s[:40]!r}"] = s
            joined[path] = joined.get(path, "") + s
    for path, s in joined.items():
        texts[f"joined {path}"] = s
        if s[:1] in "{[":
            try:
                for p, x in strings(json.loads(s), path + "<json>"):
                    texts[f"joined {p}"] = x
            except ValueError:
                pass
    found = []
    for where, s in texts.items():
        for reading in readings(s):
            found += [f"{n!r} in {where}" for n in needles if n.casefold() in reading]
    return sorted(set(found))


# ------------------------------------------------------------------ the stack

@pytest.fixture(scope="module")
def gw(tmp_path_factory, request):
    with module_stack(tmp_path_factory, request, "every_field", CONFIG) as s:
        yield s


@pytest.fixture(scope="module")
def client():
    """One keep-alive client for the module's many requests."""
    with httpx.Client(timeout=30) as c:
        yield c


def send(gw, client, path: str, body: str, headers: dict | None = None) -> tuple[httpx.Response, bytes, list[dict]]:
    """POSTs `body`; the answer's status, raw bytes and the requests the
    model received for it (the model's log is emptied first)."""
    client.post(gw.backend.url + "/_demo/reset").raise_for_status()
    rid = f"fields-{uuid.uuid4()}"
    hs = {"x-request-id": rid, "content-type": "application/json", "accept-encoding": "identity", **(headers or {})}
    with client.stream("POST", gw.url + path, content=body.encode(), headers=hs) as r:
        raw = b"".join(r.iter_raw())
    log = client.get(gw.backend.url + "/_demo/requests").json()
    return r, raw, [x for x in log if x["headers"].get("x-request-id") == rid]


# ------------------------------------------------------------------ request fields

CHAT = "/v1/chat/completions"
ANTHROPIC = "/v1/messages"
RESPONSES = "/v1/responses"
GEMINI = f"/v1beta/models/{MODEL}:generateContent"
CONVERSE = f"/model/{MODEL}/converse"
INVOKE = f"/model/{MODEL}/invoke"
AZURE = "/openai/deployments/" + MODEL + "/{op}?api-version=2024-10-21"


def chat(*messages, **extra):
    return {"model": MODEL, "messages": [*messages, {"role": "user", "content": "go on"}], **extra}


def tool(description="send mail", name="send", props=None):
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": props or {"to": {"type": "string"}}}}}


def call(arguments: str, name="send"):
    return {"role": "assistant", "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": name, "arguments": arguments}}]}


def anthropic(*content_messages, **extra):
    msgs = list(content_messages) or [{"role": "user", "content": "go on"}]
    if msgs[-1]["role"] != "user":
        msgs.append({"role": "user", "content": "go on"})
    return {"model": MODEL, "max_tokens": 50, "messages": msgs, **extra}


def tool_use(input_):
    return [{"role": "user", "content": "mail her"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "send", "input": input_}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "sent"}]}]


def gemini(*contents, **extra):
    cs = list(contents) or [{"role": "user", "parts": [{"text": "go on"}]}]
    if cs[-1].get("role") != "user":
        cs.append({"role": "user", "parts": [{"text": "go on"}]})
    return {"contents": cs, **extra}


def converse(*messages, **extra):
    ms = list(messages) or [{"role": "user", "content": [{"text": "go on"}]}]
    if ms[-1]["role"] != "user":
        ms.append({"role": "user", "content": [{"text": "go on"}]})
    return {"messages": ms, **extra}


def ollama(*messages, **extra):
    return {"model": MODEL, "stream": False, "messages": [*messages, {"role": "user", "content": "go on"}], **extra}


MASKED = None  # the value is masked in place


def refused(field: str):
    """The request is refused with 400 naming `field` and the detector."""
    return ("detected", field)


def unsupported(field: str):
    """The request is refused with 400 naming `field`: the gateway does not
    read what is there, so nothing of it reaches the model."""
    return ("unsupported", field)


# (id, path, body with the text t in the field, expectation). `t` is text.
REQUEST_FIELDS = [
    # OpenAI chat
    ("chat.user.content", CHAT, lambda t: chat({"role": "user", "content": t}), MASKED),
    ("chat.user.text-part", CHAT, lambda t: chat({"role": "user", "content": [{"type": "text", "text": t}]}), MASKED),
    ("chat.system", CHAT, lambda t: chat({"role": "system", "content": t}), MASKED),
    ("chat.developer.text-part", CHAT, lambda t: chat({"role": "developer", "content": [{"type": "text", "text": t}]}), MASKED),
    ("chat.assistant.content", CHAT, lambda t: chat({"role": "assistant", "content": t}), MASKED),
    ("chat.assistant.refusal", CHAT, lambda t: chat({"role": "assistant", "content": None, "refusal": t}), MASKED),
    ("chat.assistant.reasoning_content", CHAT,
     lambda t: chat({"role": "assistant", "content": "ok", "reasoning_content": t}), MASKED),
    ("chat.tool_calls.arguments", CHAT, lambda t: chat(call(args({"to": t})),
                                                        {"role": "tool", "tool_call_id": "c1", "content": "sent"}), MASKED),
    ("chat.tool_calls.arguments-key", CHAT, lambda t: chat(call(args({t: 1})),
                                                            {"role": "tool", "tool_call_id": "c1", "content": "sent"}),
     refused("messages[0].tool_calls[0].function.arguments.{key}")),
    ("chat.tool_calls.id", CHAT, lambda t: chat({"role": "assistant", "content": None, "tool_calls": [
        {"id": t, "type": "function", "function": {"name": "send", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sent"}), refused("messages[0].tool_calls[0].id")),
    ("chat.tool.tool_call_id", CHAT, lambda t: chat(call("{}"), {"role": "tool", "tool_call_id": t, "content": "sent"}),
     refused("messages[1].tool_call_id")),
    ("chat.function_call.arguments", CHAT, lambda t: chat(
        {"role": "assistant", "content": None, "function_call": {"name": "send", "arguments": args({"to": t})}},
        {"role": "function", "name": "send", "content": "sent"}), MASKED),
    ("chat.tool.content", CHAT, lambda t: chat(call("{}"), {"role": "tool", "tool_call_id": "c1", "content": t}), MASKED),
    ("chat.tool.text-part", CHAT, lambda t: chat(call("{}"), {"role": "tool", "tool_call_id": "c1",
                                                              "content": [{"type": "text", "text": t}]}), MASKED),
    ("chat.tools.description", CHAT, lambda t: chat(tools=[tool(description=t)]), MASKED),
    ("chat.tools.parameter-description", CHAT,
     lambda t: chat(tools=[tool(props={"to": {"type": "string", "description": t}})]), MASKED),
    ("chat.tools.enum", CHAT, lambda t: chat(tools=[tool(props={"to": {"type": "string", "enum": [t]}})]),
     refused("tools[0].function.parameters.properties.to.enum[0]")),
    ("chat.tools.property-name", CHAT, lambda t: chat(tools=[tool(props={t: {"type": "string"}})]),
     refused("tools[0].function.parameters.properties.{key}")),
    ("chat.tools.name", CHAT, lambda t: chat(tools=[tool(name=t)]), refused("tools[0].function.name")),
    ("chat.tool_calls.name", CHAT, lambda t: chat(call("{}", name=t)), refused("messages[0].tool_calls[0].function.name")),
    ("chat.message.name", CHAT, lambda t: chat({"role": "user", "name": t, "content": "hi"}), refused("messages[0].name")),
    ("chat.tool_choice", CHAT, lambda t: chat(tools=[tool()], tool_choice={"type": "function", "function": {"name": t}}),
     refused("tool_choice.function.name")),
    ("chat.function_call-choice", CHAT, lambda t: chat(functions=[tool()["function"]], function_call={"name": t}),
     refused("function_call.name")),
    ("chat.response_format.description", CHAT, lambda t: chat(response_format={
        "type": "json_schema", "json_schema": {"name": "r", "description": t, "schema": {"type": "object"}}}), MASKED),
    ("chat.response_format.property-description", CHAT, lambda t: chat(response_format={
        "type": "json_schema", "json_schema": {"name": "r", "schema": {
            "type": "object", "properties": {"a": {"type": "string", "description": t}}}}}), MASKED),
    ("chat.response_format.enum", CHAT, lambda t: chat(response_format={
        "type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "string", "enum": [t]}}}),
     refused("response_format.json_schema.schema.enum[0]")),
    ("chat.prediction", CHAT, lambda t: chat(prediction={"type": "content", "content": t}), MASKED),
    ("chat.user", CHAT, lambda t: chat(user=t), MASKED),
    ("chat.safety_identifier", CHAT, lambda t: chat(safety_identifier=t), MASKED),
    ("chat.prompt_cache_key", CHAT, lambda t: chat(prompt_cache_key=t), MASKED),
    ("chat.metadata", CHAT, lambda t: chat(metadata={"owner": t}), MASKED),
    ("chat.stop", CHAT, lambda t: chat(stop=["END", t]), refused("stop[1]")),
    # OpenAI completions and embeddings
    ("completions.prompt", "/v1/completions", lambda t: {"model": MODEL, "prompt": t}, MASKED),
    ("completions.prompt-list", "/v1/completions", lambda t: {"model": MODEL, "prompt": ["a", t]}, MASKED),
    ("completions.suffix", "/v1/completions", lambda t: {"model": MODEL, "prompt": "a", "suffix": t}, MASKED),
    ("completions.user", "/v1/completions", lambda t: {"model": MODEL, "prompt": "a", "user": t}, MASKED),
    ("completions.stop", "/v1/completions", lambda t: {"model": MODEL, "prompt": "a", "stop": t}, refused("stop")),
    ("embeddings.input", "/v1/embeddings", lambda t: {"model": MODEL, "input": t}, MASKED),
    ("embeddings.input-list", "/v1/embeddings", lambda t: {"model": MODEL, "input": ["a", t]}, MASKED),
    ("embeddings.user", "/v1/embeddings", lambda t: {"model": MODEL, "input": "a", "user": t}, MASKED),
    # OpenAI Responses
    ("responses.input", RESPONSES, lambda t: {"model": MODEL, "input": t}, MASKED),
    ("responses.instructions", RESPONSES, lambda t: {"model": MODEL, "input": "hi", "instructions": t}, MASKED),
    ("responses.input_text", RESPONSES, lambda t: {"model": MODEL, "input": [
        {"role": "user", "content": [{"type": "input_text", "text": t}]}]}, MASKED),
    ("responses.output_text", RESPONSES, lambda t: {"model": MODEL, "input": [
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": t, "annotations": []}]},
        {"role": "user", "content": "go on"}]}, MASKED),
    ("responses.output_text.annotations", RESPONSES, lambda t: {"model": MODEL, "input": [
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "see", "annotations": [
            {"type": "url_citation", "title": t, "url": "https://example.org/a", "start_index": 0, "end_index": 3}]}]},
        {"role": "user", "content": "go on"}]}, MASKED),
    ("responses.function_call.arguments", RESPONSES, lambda t: {"model": MODEL, "input": [
        {"type": "function_call", "call_id": "c1", "name": "send", "arguments": args({"to": t})},
        {"type": "function_call_output", "call_id": "c1", "output": "sent"}]}, MASKED),
    ("responses.function_call.arguments-key", RESPONSES, lambda t: {"model": MODEL, "input": [
        {"type": "function_call", "call_id": "c1", "name": "send", "arguments": args({t: True})},
        {"type": "function_call_output", "call_id": "c1", "output": "sent"}]}, refused("input[0].arguments.{key}")),
    ("responses.function_call_output", RESPONSES, lambda t: {"model": MODEL, "input": [
        {"type": "function_call", "call_id": "c1", "name": "send", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": t}]}, MASKED),
    ("responses.function_call.call_id", RESPONSES, lambda t: {"model": MODEL, "input": [
        {"type": "function_call", "call_id": t, "name": "send", "arguments": "{}"},
        {"type": "function_call_output", "call_id": t, "output": "sent"}]}, refused("input[0].call_id")),
    ("responses.custom_tool_call.input", RESPONSES, lambda t: {"model": MODEL, "input": [
        {"type": "custom_tool_call", "call_id": "c1", "name": "grep", "input": t},
        {"type": "custom_tool_call_output", "call_id": "c1", "output": "found"}]}, MASKED),
    ("responses.reasoning.summary", RESPONSES, lambda t: {"model": MODEL, "input": [
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": t}]},
        {"role": "user", "content": "go on"}]}, unsupported("input[0].type")),
    ("responses.tool_choice", RESPONSES, lambda t: {"model": MODEL, "input": "hi", "tools": [
        {"type": "function", "name": "send", "parameters": {"type": "object"}}], "tool_choice": {"type": "function", "name": t}},
     refused("tool_choice.name")),
    ("responses.tools.description", RESPONSES, lambda t: {"model": MODEL, "input": "hi", "tools": [
        {"type": "function", "name": "send", "description": t, "parameters": {"type": "object"}}]}, MASKED),
    ("responses.tools.name", RESPONSES, lambda t: {"model": MODEL, "input": "hi", "tools": [
        {"type": "function", "name": t, "parameters": {"type": "object"}}]}, refused("tools[0].name")),
    ("responses.mcp.headers", RESPONSES, lambda t: {"model": MODEL, "input": "hi", "tools": [
        {"type": "mcp", "server_label": "s", "server_url": "https://mcp.example", "headers": {"Authorization": t}}]},
     refused("tools[0].headers.Authorization")),
    ("responses.text.format.description", RESPONSES, lambda t: {"model": MODEL, "input": "hi", "text": {"format": {
        "type": "json_schema", "name": "r", "description": t, "schema": {"type": "object"}}}}, MASKED),
    ("responses.metadata", RESPONSES, lambda t: {"model": MODEL, "input": "hi", "metadata": {"k": t}}, MASKED),
    ("responses.user", RESPONSES, lambda t: {"model": MODEL, "input": "hi", "user": t}, MASKED),
    # Anthropic messages
    ("anthropic.content", ANTHROPIC, lambda t: anthropic({"role": "user", "content": t}), MASKED),
    ("anthropic.text-block", ANTHROPIC, lambda t: anthropic({"role": "user", "content": [{"type": "text", "text": t}]}), MASKED),
    ("anthropic.system", ANTHROPIC, lambda t: anthropic(system=t), MASKED),
    ("anthropic.system-block", ANTHROPIC, lambda t: anthropic(system=[{"type": "text", "text": t}]), MASKED),
    ("anthropic.assistant-text", ANTHROPIC, lambda t: anthropic({"role": "user", "content": "hi"},
                                                                  {"role": "assistant", "content": t}), MASKED),
    ("anthropic.tool_use.input", ANTHROPIC, lambda t: anthropic(*tool_use({"to": t})), MASKED),
    ("anthropic.tool_use.input-key", ANTHROPIC, lambda t: anthropic(*tool_use({t: 1})),
     refused("messages[1].content[0].input.{key}")),
    ("anthropic.tool_use.id", ANTHROPIC, lambda t: anthropic({"role": "user", "content": "hi"}, {"role": "assistant", "content": [
        {"type": "tool_use", "id": t, "name": "send", "input": {}}]}), refused("messages[1].content[0].id")),
    ("anthropic.tool_result.tool_use_id", ANTHROPIC, lambda t: anthropic(*tool_use({})[:2], {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": t, "content": "sent"}]}), refused("messages[2].content[0].tool_use_id")),
    ("anthropic.tool_result", ANTHROPIC, lambda t: anthropic(*tool_use({})[:2], {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t1", "content": t}]}), MASKED),
    ("anthropic.tool_result-block", ANTHROPIC, lambda t: anthropic(*tool_use({})[:2], {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": t}]}]}), MASKED),
    ("anthropic.thinking", ANTHROPIC, lambda t: anthropic({"role": "user", "content": "hi"}, {"role": "assistant", "content": [
        {"type": "thinking", "thinking": t, "signature": "sig"}, {"type": "text", "text": "ok"}]}),
     refused("messages[1].content[0].thinking")),
    ("anthropic.document-text", ANTHROPIC, lambda t: anthropic({"role": "user", "content": [
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": t}},
        {"type": "text", "text": "summarise"}]}), MASKED),
    ("anthropic.tools.description", ANTHROPIC, lambda t: anthropic(tools=[
        {"name": "send", "description": t, "input_schema": {"type": "object"}}]), MASKED),
    ("anthropic.tools.property-description", ANTHROPIC, lambda t: anthropic(tools=[
        {"name": "send", "input_schema": {"type": "object", "properties": {"to": {"type": "string", "description": t}}}}]),
     MASKED),
    ("anthropic.tools.name", ANTHROPIC, lambda t: anthropic(tools=[{"name": t, "input_schema": {"type": "object"}}]),
     refused("tools[0].name")),
    ("anthropic.tool_choice", ANTHROPIC, lambda t: anthropic(tools=[{"name": "send", "input_schema": {"type": "object"}}],
                                                             tool_choice={"type": "tool", "name": t}), refused("tool_choice.name")),
    ("anthropic.metadata", ANTHROPIC, lambda t: anthropic(metadata={"user_id": t}), MASKED),
    ("anthropic.stop_sequences", ANTHROPIC, lambda t: anthropic(stop_sequences=[t]), refused("stop_sequences[0]")),
    # Gemini
    ("gemini.text", GEMINI, lambda t: gemini({"role": "user", "parts": [{"text": t}]}), MASKED),
    ("gemini.model-text", GEMINI, lambda t: gemini({"role": "user", "parts": [{"text": "hi"}]},
                                                   {"role": "model", "parts": [{"text": t}]}), MASKED),
    ("gemini.systemInstruction", GEMINI, lambda t: gemini(systemInstruction={"parts": [{"text": t}]}), MASKED),
    ("gemini.functionCall.args", GEMINI, lambda t: gemini({"role": "user", "parts": [{"text": "hi"}]},
                                                          {"role": "model", "parts": [{"functionCall": {"name": "send", "args": {"to": t}}}]}), MASKED),
    ("gemini.functionCall.args-key", GEMINI, lambda t: gemini({"role": "user", "parts": [{"text": "hi"}]},
                                                              {"role": "model", "parts": [{"functionCall": {"name": "send", "args": {t: 1}}}]}),
     refused("contents[1].parts[0].functionCall.args.{key}")),
    ("gemini.functionResponse", GEMINI, lambda t: gemini({"role": "user", "parts": [{"text": "hi"}]},
                                                         {"role": "model", "parts": [{"functionCall": {"name": "send", "args": {}}}]},
                                                         {"role": "user", "parts": [{"functionResponse": {"name": "send", "response": {"r": t}}}]}), MASKED),
    ("gemini.tools.description", GEMINI, lambda t: gemini(tools=[{"functionDeclarations": [{"name": "send", "description": t}]}]), MASKED),
    ("gemini.tools.name", GEMINI, lambda t: gemini(tools=[{"functionDeclarations": [{"name": t}]}]),
     refused("tools[0].functionDeclarations[0].name")),
    ("gemini.toolConfig.allowedFunctionNames", GEMINI, lambda t: gemini(
        tools=[{"functionDeclarations": [{"name": "send"}]}],
        toolConfig={"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [t]}}),
     refused("toolConfig.functionCallingConfig.allowedFunctionNames[0]")),
    ("gemini.responseSchema.description", GEMINI, lambda t: gemini(generationConfig={
        "responseMimeType": "application/json", "responseSchema": {"type": "OBJECT", "description": t}}), MASKED),
    ("gemini.stopSequences", GEMINI, lambda t: gemini(generationConfig={"stopSequences": [t]}),
     refused("generationConfig.stopSequences[0]")),
    ("gemini.labels", GEMINI, lambda t: gemini(labels={"owner": t}), MASKED),
    # Ollama
    ("ollama.chat.content", "/api/chat", lambda t: ollama({"role": "user", "content": t}), MASKED),
    ("ollama.chat.system", "/api/chat", lambda t: ollama({"role": "system", "content": t}), MASKED),
    ("ollama.chat.thinking", "/api/chat", lambda t: ollama({"role": "assistant", "content": "ok", "thinking": t}), MASKED),
    ("ollama.chat.tool_calls.arguments", "/api/chat", lambda t: ollama(
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "send", "arguments": {"to": t}}}]},
        {"role": "tool", "tool_name": "send", "content": "sent"}), MASKED),
    ("ollama.chat.tool.content", "/api/chat", lambda t: ollama({"role": "tool", "tool_name": "send", "content": t}), MASKED),
    ("ollama.chat.tools.description", "/api/chat", lambda t: ollama(tools=[tool(description=t)]), MASKED),
    ("ollama.chat.format.description", "/api/chat", lambda t: ollama(format={"type": "object", "description": t}), MASKED),
    ("ollama.chat.options.stop", "/api/chat", lambda t: ollama(options={"stop": [t]}), refused("options.stop[0]")),
    ("ollama.generate.prompt", "/api/generate", lambda t: {"model": MODEL, "stream": False, "prompt": t}, MASKED),
    ("ollama.generate.system", "/api/generate", lambda t: {"model": MODEL, "stream": False, "prompt": "a", "system": t}, MASKED),
    ("ollama.generate.suffix", "/api/generate", lambda t: {"model": MODEL, "stream": False, "prompt": "a", "suffix": t}, MASKED),
    # Bedrock
    ("bedrock.converse.text", CONVERSE, lambda t: converse({"role": "user", "content": [{"text": t}]}), MASKED),
    ("bedrock.converse.system", CONVERSE, lambda t: converse(system=[{"text": t}]), MASKED),
    ("bedrock.converse.toolUse.input", CONVERSE, lambda t: converse(
        {"role": "user", "content": [{"text": "hi"}]},
        {"role": "assistant", "content": [{"toolUse": {"toolUseId": "t1", "name": "send", "input": {"to": t}}}]},
        {"role": "user", "content": [{"toolResult": {"toolUseId": "t1", "content": [{"text": "sent"}]}}]}), MASKED),
    ("bedrock.converse.toolResult.text", CONVERSE, lambda t: converse(
        {"role": "user", "content": [{"text": "hi"}]},
        {"role": "assistant", "content": [{"toolUse": {"toolUseId": "t1", "name": "send", "input": {}}}]},
        {"role": "user", "content": [{"toolResult": {"toolUseId": "t1", "content": [{"text": t}]}}]}), MASKED),
    ("bedrock.converse.toolResult.json", CONVERSE, lambda t: converse(
        {"role": "user", "content": [{"text": "hi"}]},
        {"role": "assistant", "content": [{"toolUse": {"toolUseId": "t1", "name": "send", "input": {}}}]},
        {"role": "user", "content": [{"toolResult": {"toolUseId": "t1", "content": [{"json": {"r": t}}]}}]}), MASKED),
    ("bedrock.converse.toolUseId", CONVERSE, lambda t: converse(
        {"role": "user", "content": [{"text": "hi"}]},
        {"role": "assistant", "content": [{"toolUse": {"toolUseId": t, "name": "send", "input": {}}}]}),
     refused("messages[1].content[0].toolUse.toolUseId")),
    ("bedrock.converse.toolChoice", CONVERSE, lambda t: converse(toolConfig={
        "tools": [{"toolSpec": {"name": "send", "inputSchema": {"json": {"type": "object"}}}}],
        "toolChoice": {"tool": {"name": t}}}), refused("toolConfig.toolChoice.tool.name")),
    ("bedrock.converse.reasoningContent", CONVERSE, lambda t: converse(
        {"role": "user", "content": [{"text": "hi"}]},
        {"role": "assistant", "content": [{"reasoningContent": {"reasoningText": {"text": t, "signature": "s"}}},
                                          {"text": "ok"}]}), refused("messages[1].content[0].reasoningContent.reasoningText.text")),
    ("bedrock.converse.tools.description", CONVERSE, lambda t: converse(toolConfig={"tools": [
        {"toolSpec": {"name": "send", "description": t, "inputSchema": {"json": {"type": "object"}}}}]}), MASKED),
    ("bedrock.converse.requestMetadata", CONVERSE, lambda t: converse(requestMetadata={"who": t}), MASKED),
    ("bedrock.converse.stopSequences", CONVERSE, lambda t: converse(inferenceConfig={"stopSequences": [t]}),
     refused("inferenceConfig.stopSequences[0]")),
    ("bedrock.invoke.content", INVOKE, lambda t: {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 50,
                                                  "messages": [{"role": "user", "content": t}]}, MASKED),
    ("bedrock.invoke.system", INVOKE, lambda t: {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 50, "system": t,
                                                 "messages": [{"role": "user", "content": "hi"}]}, MASKED),
    # Azure OpenAI: OpenAI's bodies under a deployment
    ("azure.chat.content", AZURE.format(op="chat/completions"), lambda t: chat({"role": "user", "content": t}), MASKED),
    ("azure.chat.tools.description", AZURE.format(op="chat/completions"), lambda t: chat(tools=[tool(description=t)]), MASKED),
    ("azure.completions.prompt", AZURE.format(op="completions"), lambda t: {"prompt": t}, MASKED),
    ("azure.embeddings.input", AZURE.format(op="embeddings"), lambda t: {"input": t}, MASKED),
]

# Fields whose text comes in parts: the same text split over two adjacent
# parts of one message (path, body with the two pieces).
SPLIT_FIELDS = [
    ("chat.text-parts", CHAT, lambda a, b: chat({"role": "user", "content": [
        {"type": "text", "text": a}, {"type": "text", "text": b}]})),
    ("responses.input_text-parts", RESPONSES, lambda a, b: {"model": MODEL, "input": [{"role": "user", "content": [
        {"type": "input_text", "text": a}, {"type": "input_text", "text": b}]}]}),
    ("anthropic.text-blocks", ANTHROPIC, lambda a, b: anthropic({"role": "user", "content": [
        {"type": "text", "text": a}, {"type": "text", "text": b}]})),
    ("anthropic.system-blocks", ANTHROPIC, lambda a, b: anthropic(system=[
        {"type": "text", "text": a}, {"type": "text", "text": b}])),
    ("gemini.parts", GEMINI, lambda a, b: gemini({"role": "user", "parts": [{"text": a}, {"text": b}]})),
    ("bedrock.converse.text-blocks", CONVERSE, lambda a, b: converse({"role": "user", "content": [{"text": a}, {"text": b}]})),
    ("bedrock.converse.toolResult-text-blocks", CONVERSE, lambda a, b: converse({"role": "user", "content": [
        {"toolResult": {"toolUseId": "t1", "content": [{"text": a}, {"text": b}]}}]})),
    ("bedrock.converse.guardContent-beside-text", CONVERSE, lambda a, b: converse({"role": "user", "content": [
        {"text": a}, {"guardContent": {"text": {"text": b}}}]})),
]

# Fields the filter does not walk yet, by row id: the gap each names.
REQUEST_GAPS: dict[str, str] = {}


def request_cases():
    for fid, path, build, expect in REQUEST_FIELDS:
        marks = [pytest.mark.xfail(strict=True, reason=REQUEST_GAPS[fid])] if fid in REQUEST_GAPS else []
        yield pytest.param(path, build, expect, id=fid, marks=marks)


def assert_never_reached_the_model(r, raw, seen, expect):
    for s in seen:
        found = leaks(s["body"].encode(), EMAIL_CORE, AWS_CORE)
        assert not found, (found, s["body"][:800])
    if expect is MASKED:
        assert r.status_code == 200, raw[:400]
        assert len(seen) == 1
        assert "[EMAIL]" in seen[0]["body"] and "[AWS_ACCESS_KEY]" in seen[0]["body"], seen[0]["body"][:800]
        return
    kind, field = expect
    assert r.status_code == 400, (r.status_code, raw[:400])
    assert not seen
    message = json.loads(raw)
    message = message.get("error", message)
    message = message.get("message", message) if isinstance(message, dict) else message
    assert f"`{field}`" in message, message
    if kind == "detected":
        assert "`email`" in message or "`aws_access_key`" in message, message
    # The refusal does not repeat the value to the caller (or the records).
    assert not leaks(raw, EMAIL_CORE, AWS_CORE), raw[:400]


@pytest.mark.parametrize(("path", "build", "expect"), list(request_cases()))
def test_no_form_of_a_value_reaches_the_model(gw, client, path, build, expect):
    assert_never_reached_the_model(*send(gw, client, path, render(build(sensitive()))), expect)


SPLITS = ["dana.scully@fbi", "dana.scully@fbi.examp"]


@pytest.mark.parametrize("cut", SPLITS)
@pytest.mark.parametrize(("path", "build"), [pytest.param(p, b, id=i) for i, p, b in SPLIT_FIELDS])
def test_a_value_split_over_two_parts_never_reaches_the_model(gw, client, path, build, cut):
    text = f"mail {EMAIL} now"
    at = text.index(cut) + len(cut)
    r, raw, seen = send(gw, client, path, render(build(text[:at], text[at:])))
    for s in seen:
        assert not leaks(s["body"].encode(), EMAIL_CORE), s["body"][:800]
    # Refused ("split over two of its parts"), or masked joined.
    if r.status_code == 400:
        assert "split over two" in raw.decode() and not seen, raw[:400]
    else:
        assert r.status_code == 200 and len(seen) == 1, raw[:400]


# ------------------------------------------------------------------ answer fields

# How each API is asked, plain or streamed: (path, request body).
def ask(api: str, stream: bool) -> tuple[str, dict]:
    if api in ("chat", "azure"):
        path = CHAT if api == "chat" else AZURE.format(op="chat/completions")
        return path, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    if api == "completions":
        return "/v1/completions", {"model": MODEL, "prompt": "hi", "stream": stream}
    if api == "responses":
        return RESPONSES, {"model": MODEL, "input": "hi", "stream": stream}
    if api == "anthropic":
        return ANTHROPIC, {"model": MODEL, "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    if api in ("gemini", "gemini-array"):
        method = "generateContent" if not stream else (
            "streamGenerateContent?alt=sse" if api == "gemini" else "streamGenerateContent")
        return f"/v1beta/models/{MODEL}:{method}", {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    if api == "ollama-chat":
        return "/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    if api == "ollama-generate":
        return "/api/generate", {"model": MODEL, "prompt": "hi", "stream": stream}
    if api == "bedrock-converse":
        return CONVERSE if not stream else CONVERSE + "-stream", {"messages": [{"role": "user", "content": [{"text": "hi"}]}]}
    if api == "bedrock-invoke":
        return INVOKE, {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 50,
                        "messages": [{"role": "user", "content": "hi"}]}
    raise ValueError(api)


def chat_answer(message: dict) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": MODEL, "choices": [
        {"index": 0, "message": {"role": "assistant", "content": None, **message}, "finish_reason": "stop"}]}


def chat_stream(deltas: list[dict]) -> list:
    chunk = lambda d, fin=None: {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
                                 "choices": [{"index": 0, "delta": d, "finish_reason": fin}]}
    return [chunk({"role": "assistant", "content": ""}), *map(chunk, deltas), chunk({}, "stop"), "[DONE]"]


def tool_call_delta(i: int, piece: str) -> dict:
    head = {"id": "call_1", "type": "function", "function": {"name": "send", "arguments": piece}}
    return {"tool_calls": [{"index": 0, **head}] if i == 0 else [{"index": 0, "function": {"arguments": piece}}]}


def responses_answer(*output) -> dict:
    return {"id": "resp_1", "object": "response", "status": "completed", "model": MODEL, "output": list(output)}


def responses_stream(kind: str, pieces: list[str], **ids) -> list:
    events = [{"type": "response.created", "response": {"id": "resp_1", "status": "in_progress", "output": []}}]
    events += [{"type": kind, "item_id": "it_1", "output_index": 0, "delta": p, **ids} for p in pieces]
    return events + [{"type": "response.completed", "response": {"id": "resp_1", "status": "completed", "output": []}}]


def anthropic_answer(*content) -> dict:
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": MODEL, "content": list(content),
            "stop_reason": "end_turn", "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 1}}


def anthropic_stream(block: dict, delta_kind: str, key: str, pieces: list[str]) -> list:
    return [{"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "model": MODEL,
                                                   "content": [], "usage": {"input_tokens": 1, "output_tokens": 1}}},
            {"type": "content_block_start", "index": 0, "content_block": block},
            *({"type": "content_block_delta", "index": 0, "delta": {"type": delta_kind, key: p}} for p in pieces),
            {"type": "content_block_stop", "index": 0},
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 2}},
            {"type": "message_stop"}]


def anthropic_blocks(pieces: list[str]) -> list:
    """Each piece in a text block of its own: adjacent blocks, as Anthropic
    cuts an answer where its citations change."""
    events = anthropic_stream({"type": "text", "text": ""}, "text_delta", "text", pieces[:1])
    for i, p in enumerate(pieces[1:], 1):
        events[-2:-2] = [{"type": "content_block_start", "index": i, "content_block": {"type": "text", "text": ""}},
                         {"type": "content_block_delta", "index": i, "delta": {"type": "text_delta", "text": p}},
                         {"type": "content_block_stop", "index": i}]
    return events


def responses_parts(pieces: list[str], echoes=False) -> list:
    """Each piece in a content part of its own of one message, streamed
    part after part; the final response repeats the parts (`echoes`: so do
    each part's `output_text.done` and `content_part.done`, as OpenAI
    streams them, and the item's `output_item.done`)."""
    ids = {"item_id": "msg_1", "output_index": 0}
    events = [{"type": "response.created", "response": {"id": "resp_1", "status": "in_progress", "output": []}}]
    for i, p in enumerate(pieces):
        part = {"type": "output_text", "annotations": []}
        events += [{"type": "response.content_part.added", **ids, "content_index": i,
                    "part": {"type": "output_text", "text": "", "annotations": []}},
                   {"type": "response.output_text.delta", **ids, "content_index": i, "delta": p}]
        if echoes:
            part["text"] = p
            events.append({"type": "response.output_text.done", **ids, "content_index": i, "text": p, "logprobs": []})
        events.append({"type": "response.content_part.done", **ids, "content_index": i, "part": part})
    message = {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
               "content": [{"type": "output_text", "text": p, "annotations": []} for p in pieces]}
    if echoes:
        events.append({"type": "response.output_item.done", "output_index": 0, "item": message})
    return events + [{"type": "response.completed", "response": {"id": "resp_1", "status": "completed",
                                                                 "output": [message]}}]


def in_three(pieces: list[str]) -> list[str]:
    """Two pieces as three: a short middle piece cut from the front of the
    second, so a value across the cut spans three blocks or parts."""
    if len(pieces) != 2 or len(pieces[1]) < 3:
        return pieces
    return [pieces[0], pieces[1][:3], pieces[1][3:]]


def gemini_chunk(part: dict, last=False) -> dict:
    c = {"candidates": [{"content": {"role": "model", "parts": [part]}, "index": 0}], "modelVersion": MODEL}
    if last:
        c["candidates"][0]["finishReason"] = "STOP"
    return c


def ollama_chat_line(message: dict, done=False) -> dict:
    line = {"model": MODEL, "created_at": "2026-01-01T00:00:00Z", "message": {"role": "assistant", "content": "", **message},
            "done": done}
    return {**line, "done_reason": "stop"} if done else line


def ollama_generate_line(fields: dict, done=False) -> dict:
    line = {"model": MODEL, "created_at": "2026-01-01T00:00:00Z", "response": "", **fields, "done": done}
    return {**line, "done_reason": "stop"} if done else line


def converse_answer(*content) -> dict:
    return {"output": {"message": {"role": "assistant", "content": list(content)}}, "stopReason": "end_turn",
            "usage": {"inputTokens": 1, "outputTokens": 1, "totalTokens": 2}}


ARGS = "args"  # the field holds JSON text: the value goes into {"to": value}
ARGS_KEY = "args-key"  # the field holds JSON text: the value is a key
OBJECT = "object"  # the field holds a JSON object: the value goes into {"to": value}
TEXT = "text"

# (id, api, what the field holds, plain answer from the field's text or None,
#  stream events from the field's pieces or None)
ANSWER_FIELDS = [
    ("chat.content", "chat", TEXT, lambda t: chat_answer({"content": t}),
     lambda ps: chat_stream([{"content": p} for p in ps])),
    ("chat.content-parts", "chat", TEXT, None,
     lambda ps: chat_stream([{"content": [{"type": "text", "text": p}]} for p in ps])),
    # Both pieces as two parts of one delta.
    ("chat.content-parts-one-delta", "chat", TEXT, None,
     lambda ps: chat_stream([{"content": [{"type": "text", "text": p} for p in ps]}])),
    ("chat.refusal", "chat", TEXT, lambda t: chat_answer({"refusal": t}),
     lambda ps: chat_stream([{"refusal": p} for p in ps])),
    ("chat.reasoning_content", "chat", TEXT, lambda t: chat_answer({"content": "ok", "reasoning_content": t}),
     lambda ps: chat_stream([{"reasoning_content": p} for p in ps])),
    ("chat.tool_calls.arguments", "chat", ARGS, lambda t: chat_answer({"tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "send", "arguments": t}}]}),
     lambda ps: chat_stream([tool_call_delta(i, p) for i, p in enumerate(ps)])),
    ("chat.tool_calls.arguments-key", "chat", ARGS_KEY, lambda t: chat_answer({"tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "send", "arguments": t}}]}),
     lambda ps: chat_stream([tool_call_delta(i, p) for i, p in enumerate(ps)])),
    ("chat.function_call.arguments", "chat", ARGS, lambda t: chat_answer({"function_call": {"name": "send", "arguments": t}}),
     lambda ps: chat_stream([{"function_call": {"name": "send", "arguments": p} if i == 0 else {"arguments": p}}
                             for i, p in enumerate(ps)])),
    ("chat.audio.transcript", "chat", TEXT, lambda t: chat_answer({"audio": {"id": "a1", "data": "", "expires_at": 1,
                                                                            "transcript": t}}),
     lambda ps: chat_stream([{"audio": {"id": "a1", "transcript": p}} for p in ps])),
    ("completions.text", "completions", TEXT, lambda t: {"id": "cmpl-1", "object": "text_completion", "model": MODEL,
                                                         "choices": [{"text": t, "index": 0, "finish_reason": "stop"}]},
     lambda ps: [*({"id": "cmpl-1", "object": "text_completion", "model": MODEL,
                    "choices": [{"text": p, "index": 0, "finish_reason": None}]} for p in ps), "[DONE]"]),
    ("responses.output_text", "responses", TEXT, lambda t: responses_answer(
        {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": t, "annotations": []}]}),
     lambda ps: responses_stream("response.output_text.delta", ps, content_index=0)),
    # Split over two content parts of one message (each piece a part).
    ("responses.output_text-parts", "responses", TEXT, None, responses_parts),
    # The same with every echo of each part's text.
    ("responses.output_text-parts-echoed", "responses", TEXT, None, lambda ps: responses_parts(ps, echoes=True)),
    # Over three content parts, with the echoes.
    ("responses.output_text-three-parts", "responses", TEXT, None,
     lambda ps: responses_parts(in_three(ps), echoes=True)),
    ("responses.refusal", "responses", TEXT, lambda t: responses_answer(
        {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
         "content": [{"type": "refusal", "refusal": t}]}),
     lambda ps: responses_stream("response.refusal.delta", ps, content_index=0)),
    ("responses.function_call.arguments", "responses", ARGS, lambda t: responses_answer(
        {"type": "function_call", "id": "fc_1", "call_id": "c1", "name": "send", "arguments": t, "status": "completed"}),
     lambda ps: responses_stream("response.function_call_arguments.delta", ps)),
    ("responses.reasoning.summary", "responses", TEXT, lambda t: responses_answer(
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": t}]}),
     lambda ps: responses_stream("response.reasoning_summary_text.delta", ps, summary_index=0)),
    ("responses.audio.transcript", "responses", TEXT, None,
     lambda ps: responses_stream("response.audio.transcript.delta", ps)),
    ("anthropic.text", "anthropic", TEXT, lambda t: anthropic_answer({"type": "text", "text": t}),
     lambda ps: anthropic_stream({"type": "text", "text": ""}, "text_delta", "text", ps)),
    # Split over two adjacent text blocks (each piece a block): read joined.
    ("anthropic.text-blocks", "anthropic", TEXT, None, anthropic_blocks),
    # Over three adjacent text blocks.
    ("anthropic.text-three-blocks", "anthropic", TEXT, None, lambda ps: anthropic_blocks(in_three(ps))),
    ("anthropic.thinking", "anthropic", TEXT, lambda t: anthropic_answer(
        {"type": "thinking", "thinking": t, "signature": "sig"}, {"type": "text", "text": "ok"}),
     lambda ps: anthropic_stream({"type": "thinking", "thinking": ""}, "thinking_delta", "thinking", ps)),
    ("anthropic.tool_use.input", "anthropic", OBJECT, lambda t: anthropic_answer(
        {"type": "tool_use", "id": "t1", "name": "send", "input": t}), None),
    ("anthropic.tool_use.input-key", "anthropic", "object-key", lambda t: anthropic_answer(
        {"type": "tool_use", "id": "t1", "name": "send", "input": t}), None),
    ("anthropic.input_json_delta", "anthropic", ARGS, None, lambda ps: anthropic_stream(
        {"type": "tool_use", "id": "t1", "name": "send", "input": {}}, "input_json_delta", "partial_json", ps)),
    ("gemini.text", "gemini", TEXT, lambda t: gemini_chunk({"text": t}, last=True),
     lambda ps: [gemini_chunk({"text": p}, last=i == len(ps) - 1) for i, p in enumerate(ps)]),
    # Both pieces as two parts of one chunk.
    ("gemini.text-parts-one-chunk", "gemini", TEXT, None, lambda ps: [
        {**gemini_chunk({"text": ps[0]}, last=True), "candidates": [
            {"content": {"role": "model", "parts": [{"text": p} for p in ps]}, "index": 0, "finishReason": "STOP"}]}]),
    ("gemini.thought", "gemini", TEXT, lambda t: gemini_chunk({"text": t, "thought": True}, last=True),
     lambda ps: [gemini_chunk({"text": p, "thought": True}, last=i == len(ps) - 1) for i, p in enumerate(ps)]),
    ("gemini.functionCall.args", "gemini", OBJECT, lambda t: gemini_chunk({"functionCall": {"name": "send", "args": t}}, True),
     "whole"),
    ("gemini.functionCall.args-key", "gemini", "object-key",
     lambda t: gemini_chunk({"functionCall": {"name": "send", "args": t}}, True), None),
    ("gemini-array.text", "gemini-array", TEXT, None,
     lambda ps: [gemini_chunk({"text": p}, last=i == len(ps) - 1) for i, p in enumerate(ps)]),
    ("gemini-array.thought", "gemini-array", TEXT, None,
     lambda ps: [gemini_chunk({"text": p, "thought": True}, last=i == len(ps) - 1) for i, p in enumerate(ps)]),
    ("gemini-array.functionCall.args", "gemini-array", OBJECT, None, "whole"),
    ("ollama.chat.content", "ollama-chat", TEXT, lambda t: ollama_chat_line({"content": t}, done=True),
     lambda ps: [*(ollama_chat_line({"content": p}) for p in ps), ollama_chat_line({}, done=True)]),
    ("ollama.chat.thinking", "ollama-chat", TEXT, lambda t: ollama_chat_line({"thinking": t}, done=True),
     lambda ps: [*(ollama_chat_line({"thinking": p}) for p in ps), ollama_chat_line({}, done=True)]),
    ("ollama.chat.tool_calls.arguments", "ollama-chat", OBJECT, lambda t: ollama_chat_line(
        {"tool_calls": [{"function": {"name": "send", "arguments": t}}]}, done=True), "whole"),
    ("ollama.chat.tool_calls.arguments-key", "ollama-chat", "object-key", lambda t: ollama_chat_line(
        {"tool_calls": [{"function": {"name": "send", "arguments": t}}]}, done=True), None),
    ("ollama.generate.response", "ollama-generate", TEXT, lambda t: ollama_generate_line({"response": t}, done=True),
     lambda ps: [*(ollama_generate_line({"response": p}) for p in ps), ollama_generate_line({}, done=True)]),
    ("ollama.generate.thinking", "ollama-generate", TEXT, lambda t: ollama_generate_line({"thinking": t}, done=True),
     lambda ps: [*(ollama_generate_line({"thinking": p}) for p in ps), ollama_generate_line({}, done=True)]),
    ("bedrock.converse.text", "bedrock-converse", TEXT, lambda t: converse_answer({"text": t}), None),
    ("bedrock.converse.toolUse.input", "bedrock-converse", OBJECT, lambda t: converse_answer(
        {"toolUse": {"toolUseId": "t1", "name": "send", "input": t}}), None),
    ("bedrock.converse.toolUse.input-key", "bedrock-converse", "object-key", lambda t: converse_answer(
        {"toolUse": {"toolUseId": "t1", "name": "send", "input": t}}), None),
    ("bedrock.converse.reasoningContent", "bedrock-converse", TEXT, lambda t: converse_answer(
        {"reasoningContent": {"reasoningText": {"text": t, "signature": "s"}}}, {"text": "ok"}), None),
    ("bedrock.invoke.text", "bedrock-invoke", TEXT, lambda t: anthropic_answer({"type": "text", "text": t}), None),
    ("bedrock.invoke.tool_use.input", "bedrock-invoke", OBJECT, lambda t: anthropic_answer(
        {"type": "tool_use", "id": "t1", "name": "send", "input": t}), None),
    ("azure.chat.content", "azure", TEXT, lambda t: chat_answer({"content": t}),
     lambda ps: chat_stream([{"content": p} for p in ps])),
]
# A "whole" stream sends the field whole in one event (an object field has
# no deltas): the plain builder's answer as the only streamed chunk.
STREAM_WHOLE = {
    "gemini": lambda answer: [answer],
    "gemini-array": lambda answer: [answer],
    "ollama-chat": lambda answer: [answer],
}
PLAIN_FOR_WHOLE = {"gemini-array.functionCall.args": "gemini.functionCall.args"}

# Answer fields the filter does not mask yet, by (row id, streamed, value or
# phrase): the gap. None today: keep the table, so a gap found later is
# named here with its reason rather than skipped.
ANSWER_GAPS: dict[tuple[str, bool, str], str] = {}


def field_text(holds: str, text: str):
    """What the field holds for `text`: the text, JSON text with it as a
    value or a key, or an object."""
    if holds == ARGS:
        return args({"to": text})
    if holds == ARGS_KEY:
        return args({text: 1})
    if holds == OBJECT:
        return {"to": text}
    if holds == "object-key":
        return {text: 1}
    return text


# Where a streamed field is cut in two events: fractions of its text (the
# value text holds every form, so each cut falls inside another form).
VALUE_CUTS = [0.1, 0.3, 0.5, 0.7, 0.9]
PHRASE_CUT_FORMS = ("plain", "percent", "json-escape")


def answer_cases():
    for fid, api, holds, plain, streamed in ANSWER_FIELDS:
        for stream in (False, True):
            if (plain if not stream else streamed) is None:
                continue
            splittable = stream and holds in (TEXT, ARGS, ARGS_KEY) and streamed != "whole"
            mode = "stream" if stream else "plain"
            cases = [("value", None, None)] + [("value", None, c) for c in VALUE_CUTS if splittable]
            for form in FORMS:
                cases.append(("phrase", form, None))
                if splittable and form in PHRASE_CUT_FORMS:
                    cases.append(("phrase", form, 0.5))
            for what, form, cut in cases:
                gap = ANSWER_GAPS.get((fid, stream, what))
                marks = [pytest.mark.xfail(strict=True, reason=gap)] if gap else []
                name = "-".join(x for x in (fid, mode, what, form, cut and f"cut{int(cut * 100)}") if x)
                yield pytest.param(fid, api, holds, plain, streamed, stream, what, form, cut, marks=marks, id=name)


def script(api, holds, plain, streamed, stream, text, fid, cut=None):
    """The `x-demo-answer` header value answering with `text` in the field
    (streamed: cut in two events at the fraction `cut` of the field's text)."""
    if not stream:
        return render(plain(field_text(holds, text)), ascii_only=True)
    if streamed == "whole":
        base = dict((f[0], f[3]) for f in ANSWER_FIELDS)[PLAIN_FOR_WHOLE.get(fid, fid)]
        events = STREAM_WHOLE[api](base(field_text(holds, text)))
    else:
        whole = field_text(holds, text)
        if cut is None:
            pieces = [whole]
        else:
            at = max(1, min(len(whole) - 1, round(len(whole) * cut)))
            pieces = [whole[:at], whole[at:]]
        events = streamed(pieces)
    return json.dumps([e if isinstance(e, str) else render(e, ascii_only=True) for e in events])


@pytest.mark.parametrize(("fid", "api", "holds", "plain", "streamed", "stream", "what", "form", "cut"),
                         list(answer_cases()))
def test_no_form_of_a_value_or_blocked_phrase_reaches_the_caller(gw, client, fid, api, holds, plain, streamed, stream,
                                                                 what, form, cut):
    text = sensitive() if what == "value" else blocked(form)
    if what == "phrase" and cut is not None:
        # Cut in the middle of the phrase as the field writes it.
        whole, phrase = field_text(holds, text), blocked_phrase(form)
        written = args(phrase)[1:-1] if holds in (ARGS, ARGS_KEY) else phrase
        cut = (whole.index(written) + len(written) // 2) / len(whole)
    path, body = ask(api, stream)
    answer = script(api, holds, plain, streamed, stream, text, fid, cut)
    r, raw, _ = send(gw, client, path, render(body), {"x-demo-answer": answer})
    if what == "value":
        found = leaks(raw, EMAIL_CORE, AWS_CORE)
        assert not found, (found, raw[:800])
        if holds == "object-key" and not stream:
            # A key of a tool's input cannot be rewritten (the tool reads
            # it as it is): the answer is replaced by the API's error,
            # naming the detector, with its status (the head waited).
            assert b"response blocked by masking policy" in raw and b"detected as `email`" in raw, raw[:400]
            assert r.status_code == 403, (r.status_code, raw[:400])
        else:
            assert r.status_code == 200, raw[:400]
            assert b"[EMAIL]" in raw, raw[:800]
    else:
        found = leaks(raw, PHRASE, "7391")
        assert not found, (found, raw[:800])


# One answer per API and mode, compressed by a model that ignores
# `accept-encoding: identity`: refused whole (502), nothing of it passes.
COMPRESSED = [(fid, api, holds, plain, streamed, stream)
              for fid, api, holds, plain, streamed in ANSWER_FIELDS
              for stream in (False, True)
              if (plain if not stream else streamed) not in (None, "whole")]


@pytest.mark.parametrize(("fid", "api", "holds", "plain", "streamed", "stream"),
                         [pytest.param(*c, id=f"{c[0]}-{'stream' if c[5] else 'plain'}") for c in COMPRESSED])
def test_a_compressed_answer_in_any_field_is_refused(gw, client, fid, api, holds, plain, streamed, stream):
    text = sensitive()
    path, body = ask(api, stream)
    r, raw, _ = send(gw, client, path, render(body), {"x-demo-content-encoding": "gzip",
                                              "x-demo-answer": script(api, holds, plain, streamed, stream, text, fid)})
    assert r.status_code == 502, (r.status_code, raw[:300])
    assert "content-encoding" not in r.headers
    assert raw[:2] != b"\x1f\x8b"
    assert not leaks(raw, EMAIL_CORE, AWS_CORE)


def test_bedrock_streams_are_refused_where_the_answer_is_read(gw, client):
    # AWS event-stream answers are not read by the gateway: refused up front.
    for path in (CONVERSE + "-stream", INVOKE + "-with-response-stream"):
        body = ask("bedrock-converse", False)[1] if "converse" in path else ask("bedrock-invoke", False)[1]
        r, raw, seen = send(gw, client, path, render(body))
        assert r.status_code == 400, (path, raw[:300])
        assert not seen
