"""Answers that must not leave the gateway unmasked, end to end in the real
Envoy: compressed answers (the caller's `accept-encoding` never reaches the
model; an answer compressed anyway is refused with a 502, never passed),
token log-probabilities (which spell the answer out: refused in requests
whose answer is guarded, and dropped from answers that carry them unasked),
audio or image output (which says it: refused in such requests),
answers the gateway cannot read as every client does (a plain answer
labelled as an event stream, event data that is not one JSON object, a
duplicate key: blocked or withheld, never passed), and Responses tool
input streamed in deltas (masked across them).

Every check on what the caller got is made on the raw bytes off the socket
(`iter_raw`: httpx would otherwise decode a gzip body for us)."""
import json
import re
import time
import uuid
import zlib
from dataclasses import dataclass

import httpx
import pytest

from conftest import chat, emptied, module_stack
from stack import records, wait_until

pytestmark = pytest.mark.timeout(180)

EMAIL = "dana.scully@fbi.example.org"
CARD = "4111-1111-1111-1111"
SECRET_REPLY = f"write to {EMAIL} and charge {CARD} today"
BLOCKED_REPLY = "sure, the launch codes are 7391-2846 as asked"
BLOCKED_PHRASE = "launch codes"
CODES = "7391-2846"

MASKING = {
    "salt": "salt-for-tests-0123456789",
    "profiles": {
        # Masks prompts and answers, restores pseudonyms for the caller.
        "default": {"detectors": {"email": "pseudonymize", "credit_card": "redact"}, "restore": True},
        # Masks prompts only; answers are touched only to restore pseudonyms.
        "restore_only": {"detectors": {"email": "pseudonymize"}, "restore": True, "responses": False},
        # Reports what it finds, changes nothing.
        "monitor": {"detectors": {"email": "monitor"}},
    },
}
# Models name what guards the answer (all `allow`, so nothing is held):
GUARDED = "demo-allow-guarded"  # masking (default profile) and a response rule
RULES_ONLY = "demo-allow-rules"  # a response rule, no masking
RESTORE_ONLY = "demo-allow-restore"  # restore of pseudonyms, no response masking, no rule
OPEN = "demo-allow-open"  # nothing guards the answer; it is recorded (the default)
MONITORED = "demo-allow-monitored"  # masking that only monitors: nothing changes the answer
BARE = "demo-allow-bare"  # nothing inspects the answer at all: no guard, no record
CONFIG = {
    "hold_timeout_ms": 5000,
    "masking": MASKING,
    "content_policy": {"response_rules": [
        {"name": "no-launch-codes", "phrases": [BLOCKED_PHRASE], "models": [f"{GUARDED}*", f"{RULES_ONLY}*"]},
    ]},
    "rules": [
        {"name": "guarded", "model": f"{GUARDED}*", "action": "allow"},
        {"name": "rules-only", "model": f"{RULES_ONLY}*", "action": "allow", "masking": "none"},
        {"name": "restore-only", "model": f"{RESTORE_ONLY}*", "action": "allow", "masking": "restore_only"},
        {"name": "open", "model": f"{OPEN}*", "action": "allow", "masking": "none"},
        {"name": "monitored", "model": f"{MONITORED}*", "action": "allow", "masking": "monitor"},
        {"name": "bare", "model": f"{BARE}*", "action": "allow", "masking": "none", "record": "off"},
    ],
}

PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "responses": "/v1/responses",
         "messages": "/v1/messages", "gemini": "/v1beta/models/{model}:{method}"}
LOGPROB_KEYS = ("logprobs", "top_logprobs", "logprobsResult", "logprobs_result")


@pytest.fixture(scope="module")
def gw(tmp_path_factory, request):
    """One stack for the whole module (every test tells its requests apart by
    x-request-id, and resets the model's request log first)."""
    with module_stack(tmp_path_factory, request, "answer_leaks", CONFIG) as s:
        yield s


@pytest.fixture
def stack(gw):
    """The module's stack (overrides conftest's), with the model's request log emptied."""
    return emptied(gw)


def req(api: str, model: str, stream: bool = False, prompt: str = "hi", **extra) -> tuple[str, dict]:
    """(path, body) of a request to `api` (Gemini names the model and
    streaming in the path)."""
    path = PATHS[api]
    if api == "chat":
        b = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    elif api == "completions":
        b = {"model": model, "prompt": prompt}
    elif api == "responses":
        b = {"model": model, "input": prompt}
    elif api == "messages":
        b = {"model": model, "max_tokens": 50, "messages": [{"role": "user", "content": prompt}]}
    else:
        path = path.format(model=model, method="streamGenerateContent?alt=sse" if stream else "generateContent")
        return path, {"contents": [{"role": "user", "parts": [{"text": prompt}]}], **extra}
    if stream:
        b["stream"] = True
    return path, {**b, **extra}


@dataclass
class Answer:
    status: int
    headers: httpx.Headers
    raw: bytes  # exactly the bytes received, not decoded
    request_id: str

    def json(self):
        return json.loads(self.raw)


def send(stack, request: tuple[str, dict], headers: dict | None = None) -> Answer:
    """POSTs `request`; the caller accepts only identity unless `headers` say
    otherwise (httpx would send gzip), so the logprobs tests test logprobs."""
    request_id = f"leaks-{uuid.uuid4()}"
    hs = {"x-request-id": request_id, "accept-encoding": "identity", **(headers or {})}
    path, payload = request
    with httpx.Client(timeout=30) as c, c.stream("POST", stack.url + path, json=payload, headers=hs) as r:
        raw = b"".join(r.iter_raw())
    return Answer(r.status_code, r.headers, raw, request_id)


def assert_nowhere(raw: bytes, *secrets: str):
    """None of `secrets` in the bytes received, nor in them decompressed if
    they are gzip (a truncated gzip stream is decoded as far as it goes)."""
    views = [raw]
    if raw[:2] == b"\x1f\x8b":
        views.append(zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(raw))
    for view in views:
        for s in secrets:
            assert s.encode() not in view, f"{s!r} leaked: {view[:600]!r}"


def sse_events(raw: bytes) -> list[dict]:
    out = []
    for line in raw.decode().splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[6:]))
    return out


def answer_text(api: str, raw: bytes, stream: bool) -> str:
    """The answer's text as the caller reads it (streams reassembled)."""
    if not stream:
        v = json.loads(raw)
        return {"chat": lambda: v["choices"][0]["message"]["content"],
                "completions": lambda: v["choices"][0]["text"],
                "responses": lambda: v["output"][0]["content"][0]["text"],
                "messages": lambda: v["content"][0]["text"],
                "gemini": lambda: v["candidates"][0]["content"]["parts"][0]["text"]}[api]()
    text = ""
    for e in sse_events(raw):
        if api == "chat":
            text += "".join((c.get("delta") or {}).get("content") or "" for c in e.get("choices", []))
        elif api == "completions":
            text += "".join(c.get("text") or "" for c in e.get("choices", []))
        elif api == "responses" and e.get("type") == "response.output_text.delta":
            text += e["delta"]
        elif api == "messages" and e.get("type") == "content_block_delta":
            text += e["delta"].get("text", "")
        elif api == "gemini":
            text += "".join(p.get("text", "") for c in e.get("candidates", [])
                            for p in (c.get("content") or {}).get("parts", []))
    return text


def logprob_values(v, path="$"):
    """(path, value) of every logprobs-like field anywhere in `v`."""
    if isinstance(v, dict):
        for k, x in v.items():
            if k in LOGPROB_KEYS:
                yield f"{path}.{k}", x
            yield from logprob_values(x, f"{path}.{k}")
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from logprob_values(x, f"{path}[{i}]")


def assert_no_logprobs(documents: list):
    leaked = [(p, x) for d in documents for p, x in logprob_values(d) if x not in (None, [])]
    assert not leaked, f"logprobs left in the answer: {leaked[:5]}"


def seen_by_model(stack, request_id: str) -> dict:
    [seen] = [r for r in stack.backend.requests() if r["headers"].get("x-request-id") == request_id]
    return seen


def response_record(stack, request_id: str) -> dict:
    """The response part of the request's session record, once written."""
    def find():
        recs = records(stack, request_id=request_id)
        return recs and recs[0].get("response")
    return wait_until(find, timeout=10, what=f"the response part of {request_id}'s record")


def assert_uninspectable_refusal(api: str, a: Answer, *secrets: str):
    assert a.status == 502, (a.status, a.raw[:300])
    assert "content-encoding" not in a.headers, a.headers
    assert a.headers["content-type"].startswith("application/json"), a.headers
    assert a.raw[:2] != b"\x1f\x8b"
    assert_nowhere(a.raw, *secrets)
    err = a.json()
    if api == "messages":
        assert err["type"] == "error" and isinstance(err["error"]["type"], str), err
        assert err["error"]["message"], err
    elif api == "gemini":
        # No Gemini error format is promised; an error with a message.
        assert err["error"]["message"], err
    else:
        assert err["error"]["code"] == "response_uninspectable", err
        assert err["error"]["message"] and err["error"]["type"], err


API_STREAMS = [(api, stream) for api in PATHS for stream in (False, True)]
IDS = [f"{api}-{'stream' if stream else 'plain'}" for api, stream in API_STREAMS]
# The APIs that have logprobs (Anthropic's has none).
LOGPROB_APIS = [x for x in API_STREAMS if x[0] != "messages"]
LOGPROB_IDS = [i for i in IDS if not i.startswith("messages")]


# ------------------------------------------------------------------ compressed answers

@pytest.mark.parametrize(("api", "stream"), API_STREAMS, ids=IDS)
def test_caller_accept_encoding_never_reaches_the_model(stack, api, stream):
    a = send(stack, req(api, GUARDED, stream),
             headers={"accept-encoding": "gzip, deflate", "x-demo-reply": SECRET_REPLY})
    assert a.status == 200, a.raw[:300]
    assert seen_by_model(stack, a.request_id)["headers"].get("accept-encoding") == "identity"
    # Uncompressed, masked.
    assert a.headers.get("content-encoding", "identity") == "identity", a.headers
    assert a.raw[:2] != b"\x1f\x8b"
    assert_nowhere(a.raw, EMAIL, CARD)
    text = answer_text(api, a.raw, stream)
    assert text.startswith("write to <EMAIL_") and "[CREDIT_CARD]" in text and text.endswith(" today"), text


def test_accept_encoding_is_replaced_even_where_nothing_inspects_the_answer(stack):
    for model in (OPEN, BARE):
        a = send(stack, req("chat", model, prompt="plain words"),
                 headers={"accept-encoding": "br, gzip;q=0.9, zstd, deflate"})
        assert a.status == 200, a.raw[:300]
        assert seen_by_model(stack, a.request_id)["headers"].get("accept-encoding") == "identity", model
        assert "content-encoding" not in a.headers
        assert a.json()["choices"][0]["message"]["content"] == "echo: plain words"


@pytest.mark.parametrize(("api", "stream"), API_STREAMS, ids=IDS)
def test_a_compressed_answer_is_refused_not_passed(stack, api, stream):
    a = send(stack, req(api, GUARDED, stream),
             headers={"accept-encoding": "gzip", "x-demo-content-encoding": "gzip", "x-demo-reply": SECRET_REPLY})
    assert_uninspectable_refusal(api, a, EMAIL, CARD, "write to", "charge")
    if stream:
        assert b"data:" not in a.raw  # replaced whole, not a stream with an error at the end
    assert seen_by_model(stack, a.request_id)["headers"].get("accept-encoding") == "identity"
    part = response_record(stack, a.request_id)
    assert part["status"] == 502, part
    assert part["blocked_by"] == "encoded_response", part
    assert EMAIL not in json.dumps(part) and CARD not in json.dumps(part)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_compressed_answer_is_refused_where_it_is_only_recorded(stack, stream):
    a = send(stack, req("chat", OPEN, stream),
             headers={"x-demo-content-encoding": "gzip", "x-demo-reply": SECRET_REPLY})
    assert_uninspectable_refusal("chat", a, EMAIL, CARD)
    part = response_record(stack, a.request_id)
    assert (part["status"], part["blocked_by"]) == (502, "encoded_response"), part


def test_a_compressed_answer_passes_where_nothing_inspects_it(stack):
    # No masking, no response rule and no record: the filter never reads the
    # answer, so it has nothing to refuse.
    a = send(stack, req("chat", BARE, prompt="zip this"),
             headers={"accept-encoding": "gzip", "x-demo-content-encoding": "gzip"})
    assert a.status == 200, a.raw[:300]
    assert a.headers["content-encoding"] == "gzip"
    assert json.loads(zlib.decompress(a.raw, 16 + zlib.MAX_WBITS))["choices"][0]["message"]["content"] \
        == "echo: zip this"


# ------------------------------------------------------------------ logprobs asked for

# (api, request fields asking for logprobs, field the refusal must name)
ASKING = [
    ("chat", {"logprobs": True}, "logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 3}, "logprobs"),
    ("completions", {"logprobs": 2}, "logprobs"),
    ("responses", {"top_logprobs": 2}, "top_logprobs"),
    ("responses", {"include": ["message.output_text.logprobs"]}, "include"),
    ("gemini", {"generationConfig": {"responseLogprobs": True, "logprobs": 2}}, "generationConfig.responseLogprobs"),
]
GUARDS = {
    "masking": (GUARDED, "hi"),
    "response-rule": (RULES_ONLY, "hi"),
    # Restore has something to put back only when the prompt had a value.
    "restore": (RESTORE_ONLY, f"mail {EMAIL} please"),
}


@pytest.mark.parametrize("guard", list(GUARDS))
def test_asking_for_logprobs_is_refused_where_the_answer_is_guarded(stack, guard):
    model, prompt = GUARDS[guard]
    for api, fields, field in ASKING:
        for stream in (False, True):
            httpx.post(stack.backend.url + "/_demo/reset").raise_for_status()
            a = send(stack, req(api, model, stream, prompt=prompt, **fields))
            case = f"{guard} {api} {fields} stream={stream}"
            assert a.status == 400, (case, a.raw[:300])
            err = a.json()["error"]
            assert err["code"] == "invalid_request", (case, err)
            # Names the field and why ("... token log-probabilities, which would spell out the answer").
            assert f"`{field}`" in err["message"] and re.search(r"log-?prob", err["message"]), (case, err)
            assert EMAIL not in err["message"]
            assert stack.backend.stats()["started"] == 0, case


def test_not_asking_for_logprobs_passes_under_a_guard(stack):
    for api, fields in [("chat", {"logprobs": False}),
                        ("responses", {"include": ["reasoning.encrypted_content"]}),
                        ("gemini", {"generationConfig": {"responseLogprobs": False, "temperature": 0.5}})]:
        a = send(stack, req(api, GUARDED, **fields))
        assert a.status == 200, (api, fields, a.raw[:300])
        assert_no_logprobs([a.json()])


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_asking_for_logprobs_passes_where_nothing_guards_the_answer(stack, stream):
    reply = "all is well here"
    for api, fields, _ in ASKING:
        a = send(stack, req(api, OPEN, stream, **fields), headers={"x-demo-reply": reply})
        case = f"{api} {fields}"
        assert a.status == 200, (case, a.raw[:300])
        assert len([r for r in stack.backend.requests() if r["headers"].get("x-request-id") == a.request_id]) == 1
        docs = sse_events(a.raw) if stream else [a.json()]
        assert any(v not in (None, []) for d in docs for _, v in logprob_values(d)), (case, docs)
        assert answer_text(api, a.raw, stream) == reply


# ------------------------------------------------------------------ audio and image output asked for

# (api, request fields asking for audio or image output, field the refusal must name)
MEDIA = [
    ("chat", {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, "modalities"),
    ("chat", {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ("responses", {"tools": [{"type": "image_generation"}]}, "tools[0]"),
    ("gemini", {"generationConfig": {"responseModalities": ["AUDIO"], "speechConfig": {
        "voiceConfig": {"prebuiltVoiceConfig": {"voiceName": "Kore"}}}}}, "generationConfig.responseModalities"),
    ("gemini", {"generationConfig": {"responseModalities": ["TEXT", "IMAGE"]}}, "generationConfig.responseModalities"),
]


@pytest.mark.parametrize("guard", list(GUARDS))
def test_asking_for_audio_output_is_refused_where_the_answer_is_masked(stack, guard):
    # A spoken (or drawn) answer says what masking removes from its
    # transcript: refused like logprobs, naming the field, before the model.
    model, prompt = GUARDS[guard]
    for api, fields, field in MEDIA:
        for stream in (False, True):
            httpx.post(stack.backend.url + "/_demo/reset").raise_for_status()
            a = send(stack, req(api, model, stream, prompt=prompt, **fields))
            case = f"{guard} {api} {fields} stream={stream}"
            assert a.status == 400, (case, a.raw[:300])
            err = a.json()["error"]
            assert err["code"] == "invalid_request", (case, err)
            assert f"`{field}`" in err["message"] and "audio or image" in err["message"], (case, err)
            assert EMAIL not in err["message"]
            assert stack.backend.stats()["started"] == 0, case


def test_asking_for_audio_output_passes_where_nothing_guards_the_answer(stack):
    for api, fields, _ in MEDIA:
        a = send(stack, req(api, OPEN, **fields), headers={"x-demo-reply": "all is well"})
        assert a.status == 200, (api, fields, a.raw[:300])


# ------------------------------------------------------------------ logprobs unasked

@pytest.mark.parametrize("chunking", ["words", "whole"])
@pytest.mark.parametrize(("api", "stream"), LOGPROB_APIS, ids=LOGPROB_IDS)
def test_unasked_logprobs_leave_nothing_a_response_rule_blocks(stack, api, stream, chunking):
    headers = {"x-demo-logprobs": "always", "x-demo-reply": BLOCKED_REPLY}
    if chunking == "whole":
        headers["x-demo-chunk-chars"] = "1000"  # one event, one token: the whole reply
    a = send(stack, req(api, RULES_ONLY, stream), headers=headers)
    assert_nowhere(a.raw, BLOCKED_PHRASE, CODES)
    assert "no-launch-codes" in a.raw.decode()
    docs = sse_events(a.raw) if stream else [a.json()]
    assert_no_logprobs(docs)


@pytest.mark.parametrize(("api", "stream"), LOGPROB_APIS, ids=LOGPROB_IDS)
def test_unasked_logprobs_are_dropped_where_only_a_response_rule_guards(stack, api, stream):
    reply = "nothing to see, all is well 4242"
    a = send(stack, req(api, RULES_ONLY, stream),
             headers={"x-demo-logprobs": "always", "x-demo-reply": reply})
    assert a.status == 200, a.raw[:300]
    assert answer_text(api, a.raw, stream) == reply
    assert_no_logprobs(sse_events(a.raw) if stream else [a.json()])


@pytest.mark.parametrize("chunk_chars", [None, "5"], ids=["words", "5-chars"])
@pytest.mark.parametrize(("api", "stream"), LOGPROB_APIS, ids=LOGPROB_IDS)
def test_unasked_logprobs_leave_no_masked_value(stack, api, stream, chunk_chars):
    headers = {"x-demo-logprobs": "always", "x-demo-reply": SECRET_REPLY}
    if chunk_chars:
        headers["x-demo-chunk-chars"] = chunk_chars
    a = send(stack, req(api, GUARDED, stream), headers=headers)
    assert a.status == 200, a.raw[:300]
    assert_nowhere(a.raw, EMAIL, CARD, "scully", "4111")
    text = answer_text(api, a.raw, stream)
    assert text.startswith("write to <EMAIL_") and "[CREDIT_CARD]" in text, text
    assert_no_logprobs(sse_events(a.raw) if stream else [a.json()])


@pytest.mark.parametrize(("api", "stream"), LOGPROB_APIS, ids=LOGPROB_IDS)
def test_unasked_logprobs_are_dropped_where_pseudonyms_are_restored(stack, api, stream):
    # The model sees, and answers with, the pseudonym; the caller gets the
    # value back in the text and nothing else: logprobs would spell out the
    # pseudonym next to it (linking value and pseudonym).
    a = send(stack, req(api, RESTORE_ONLY, stream, prompt=f"my mail is {EMAIL}"),
             headers={"x-demo-logprobs": "always"})
    assert a.status == 200, a.raw[:300]
    assert EMAIL not in seen_by_model(stack, a.request_id)["body"]
    assert answer_text(api, a.raw, stream) == f"echo: my mail is {EMAIL}"
    assert b"<EMAIL_" not in a.raw, a.raw[:600]
    assert_no_logprobs(sse_events(a.raw) if stream else [a.json()])


# ------------------------------------------------------------------ answers ended by trailers

@pytest.fixture(scope="module")
def h2_gw(tmp_path_factory, request):
    """The same gateway with the model spoken to over HTTP/2, where an answer
    can end with trailers instead of an end-of-stream data frame."""
    with module_stack(tmp_path_factory, request, "answer_leaks_h2", CONFIG, model_http2=True) as s:
        yield s


TRAILER_APIS = [("chat", False), ("chat", True), ("messages", False), ("gemini", False), ("responses", True)]


@pytest.mark.parametrize(("api", "stream"), TRAILER_APIS, ids=[f"{a}-{'stream' if s else 'plain'}" for a, s in TRAILER_APIS])
def test_an_answer_ended_by_trailers_is_masked_and_blocked(h2_gw, api, stream):
    # Before: the body buffered for the guard went out with the trailers,
    # unread (no end-of-stream body callback comes when trailers end it).
    a = send(h2_gw, req(api, GUARDED, stream), headers={"x-demo-trailers": "1", "x-demo-reply": SECRET_REPLY})
    assert a.status == 200, a.raw[:300]
    assert_nowhere(a.raw, EMAIL, CARD, "scully", "4111")
    text = answer_text(api, a.raw, stream)
    assert text.startswith("write to <EMAIL_") and "[CREDIT_CARD]" in text, text
    # The model did answer with trailers, over HTTP/2.
    seen = seen_by_model(h2_gw, a.request_id)
    assert seen["headers"].get("x-demo-trailers") == "1"
    blocked = send(h2_gw, req(api, GUARDED, stream), headers={"x-demo-trailers": "1", "x-demo-reply": BLOCKED_REPLY})
    assert_nowhere(blocked.raw, BLOCKED_PHRASE, CODES)
    assert "no-launch-codes" in blocked.raw.decode()
    # A plain answer judged when its trailers came still had its head held.
    assert blocked.status == (200 if stream else 403), (blocked.status, blocked.raw[:300])
    # The record reads the answer whole and masked.
    recorded = json.dumps(response_record(h2_gw, a.request_id))
    assert EMAIL not in recorded and "complete" in recorded, recorded[:600]


@pytest.mark.parametrize("api", ["chat", "messages", "gemini"])
def test_a_blocked_plain_answer_comes_with_the_errors_status(stack, api):
    # Before: the head of a plain answer went out before the guard read its
    # body, so the caller got the model's 200 with `response_blocked` as its
    # body. The head now waits with the body (read whole anyway).
    a = send(stack, req(api, GUARDED), headers={"x-demo-reply": BLOCKED_REPLY, "x-demo-content-type": "text/plain"})
    assert_nowhere(a.raw, BLOCKED_PHRASE, CODES)
    assert a.status == 403, (a.status, a.raw[:300])
    assert a.headers["content-type"] == "application/json", a.headers
    assert "content-length" not in a.headers or int(a.headers["content-length"]) == len(a.raw), a.headers
    assert "no-launch-codes" in a.raw.decode()
    assert a.headers["x-countersign-outcome"] == "allowed", a.headers
    part = response_record(stack, a.request_id)
    assert (part["status"], part["blocked_by"]) == (403, "no-launch-codes"), part
    # A masked answer keeps the model's status; a stream's head goes out
    # at once and its error comes as its last event, under the model's 200.
    a = send(stack, req(api, GUARDED), headers={"x-demo-reply": SECRET_REPLY})
    assert a.status == 200 and b"<EMAIL_" in a.raw, a.raw[:300]
    a = send(stack, req(api, GUARDED, stream=True), headers={"x-demo-reply": BLOCKED_REPLY})
    assert a.status == 200 and "no-launch-codes" in a.raw.decode(), a.raw[:300]
    assert_nowhere(a.raw, BLOCKED_PHRASE, CODES)


def test_a_held_head_waits_for_a_body_beyond_envoys_buffer_limit(make_stack):
    # Envoy's per-connection buffer limit (16 KiB here) does not cut or
    # stall an answer body buffered behind a held head (measured on Envoy
    # 1.40, HTTP/1.1 and HTTP/2 upstreams): a ~400 KB plain answer arriving
    # in some thousand pieces is judged whole. Here it is an event stream
    # labelled `application/json`, which no client reads as JSON: withheld,
    # with the error's status.
    def small_buffers(config: dict):
        for listener in config["static_resources"]["listeners"]:
            listener["per_connection_buffer_limit_bytes"] = 16384
    s = make_stack(filter_config=CONFIG, envoy_mutate=small_buffers)
    prompt = f"mail {EMAIL} " + "x" * 8000
    started = time.monotonic()
    a = send(s, req("chat", GUARDED, stream=True, prompt=prompt),
             headers={"x-demo-chunk-chars": "4", "x-demo-content-type": "application/json"})
    assert time.monotonic() - started < 20
    assert a.status == 502, (a.status, a.raw[:300])
    assert a.json()["error"]["code"] == "response_uninspectable", a.raw[:300]
    assert_nowhere(a.raw, EMAIL, "scully")
    assert seen_by_model(s, a.request_id) is not None
    assert response_record(s, a.request_id)["status"] == 502


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_compressed_answer_ended_by_trailers_is_still_refused(h2_gw, stream):
    a = send(h2_gw, req("chat", GUARDED, stream), headers={
        "x-demo-trailers": "1", "x-demo-content-encoding": "gzip", "x-demo-reply": SECRET_REPLY})
    assert a.status == 502, a.raw[:300]
    assert_nowhere(a.raw, EMAIL, CARD)
    assert a.json()["error"]["code"] == "response_uninspectable"


# ------------------------------------------------------------------ answers read as every client reads them

def assert_blocked_stream(stack, a: Answer, *secrets: str):
    """The stream ended with the API's error event, nothing of `secrets` out,
    and the record says why."""
    assert a.status == 200, a.raw[:300]
    assert a.headers["content-type"].startswith("text/event-stream"), a.headers
    assert_nowhere(a.raw, *secrets)
    last = sse_events(a.raw)[-1]
    # Ollama's error is a string with the code beside it.
    code = last["code"] if isinstance(last.get("error"), str) else last["error"]["code"]
    assert code == "response_blocked", a.raw[:600]
    part = response_record(stack, a.request_id)
    assert part["blocked_by"] == "uninspectable", part
    for s in secrets:
        assert s not in json.dumps(part), part


@pytest.mark.parametrize("api", ["chat", "ollama"])
def test_an_answer_labelled_as_an_event_stream_it_is_not_is_blocked(stack, api):
    # A plain chat answer, and Ollama's JSON lines, labelled
    # `text/event-stream`: no `data:` line, so before this every byte went
    # out unread (and lenient clients read the JSON).
    request = req("chat", GUARDED) if api == "chat" else \
        ("/api/chat", {"model": GUARDED, "messages": [{"role": "user", "content": "hi"}]})
    a = send(stack, request, headers={"x-demo-content-type": "text/event-stream", "x-demo-reply": SECRET_REPLY})
    assert_blocked_stream(stack, a, EMAIL, CARD, "scully", "4111")


def test_event_data_that_is_not_one_json_object_blocks_the_stream(stack):
    chunk = lambda text: {"choices": [{"index": 0, "delta": {"content": text}}]}  # noqa: E731
    for bad in (
        # Text over two events, which nothing joins: never masked a piece at a time.
        ["mail dana.scully@fbi.exa", "mple.org"],
        # A duplicate key hides the first member from the gateway's reading.
        [json.dumps(chunk(EMAIL))[:-1] + ', "choices": []}'],
    ):
        script = [chunk("Hello. "), *bad, "[DONE]"]
        a = send(stack, req("chat", GUARDED, stream=True), headers={"x-demo-answer": json.dumps(script)})
        assert_blocked_stream(stack, a, EMAIL, "scully", "mple.org")
        assert answer_text("chat", a.raw, True) == "Hello. "


def test_a_plain_answer_with_a_duplicate_key_is_withheld(stack):
    answer = ('{"choices":[{"index":0,"message":{"role":"assistant","content":"%s"},"finish_reason":"stop"}],'
              '"choices":[]}' % EMAIL)
    a = send(stack, req("chat", GUARDED), headers={"x-demo-answer": answer})
    assert_nowhere(a.raw, EMAIL, "scully")
    assert a.json()["error"]["code"] == "response_uninspectable", a.raw[:300]
    assert a.status == 502, (a.status, a.raw[:300])
    part = response_record(stack, a.request_id)
    assert part["blocked_by"] == "unreadable_response" and EMAIL not in json.dumps(part), part


@pytest.mark.parametrize(("delta", "done", "field"), [
    ("response.code_interpreter_call_code.delta", "response.code_interpreter_call_code.done", "code"),
    ("response.mcp_call_arguments.delta", "response.mcp_call_arguments.done", "arguments"),
    # A delta the gateway's table does not list gets a channel of its own.
    ("response.some_future_tool_input.delta", "response.some_future_tool_input.done", "text"),
], ids=["code-interpreter", "mcp", "unlisted"])
def test_responses_tool_input_split_over_deltas_is_masked(stack, delta, done, field):
    whole = f"send('{EMAIL}')"
    cut = whole.index("@") + 4
    script = [
        {"type": "response.created", "response": {"id": "r", "status": "in_progress", "output": []}},
        {"type": "response.output_item.added", "output_index": 0, "item": {"type": "x", "id": "t"}},
        {"type": delta, "output_index": 0, "item_id": "t", "delta": whole[:cut]},
        {"type": delta, "output_index": 0, "item_id": "t", "delta": whole[cut:]},
        {"type": done, "output_index": 0, "item_id": "t", field: whole},
        {"type": "response.completed", "response": {"id": "r", "status": "completed", "output": []}},
    ]
    a = send(stack, req("responses", GUARDED, stream=True), headers={"x-demo-answer": json.dumps(script)})
    assert a.status == 200, a.raw[:300]
    assert_nowhere(a.raw, EMAIL, "scully")
    events = sse_events(a.raw)
    sent = "".join(e["delta"] for e in events if e.get("type") == delta)
    assert sent.startswith("send('<EMAIL_") and sent.endswith("')"), sent
    assert [e[field] for e in events if e.get("type") == done] == [sent]
    part = response_record(stack, a.request_id)
    assert part["body"] == sent and part["blocked_by"] is None, part


# ------------------------------------------------------------------ tool arguments streamed in pieces

STREAMED_ARGS = {"tools": [{"functionDeclarations": [{"name": "send_mail", "parameters": {
    "type": "object", "properties": {"to": {"type": "string"}}}}]}],
    "toolConfig": {"functionCallingConfig": {"mode": "AUTO", "streamFunctionCallArguments": True}}}


@pytest.mark.parametrize("guard", list(GUARDS))
def test_asking_for_streamed_function_call_arguments_is_refused_where_the_answer_is_guarded(stack, guard):
    # Vertex AI streams a call's string arguments in pieces
    # (`functionCall.partialArgs[].stringValue`) that the client joins and
    # that no channel of the gateway's answer table follows: refused before
    # the model, naming the field, like logprobs.
    model, prompt = GUARDS[guard]
    a = send(stack, req("gemini", model, True, prompt=prompt, **STREAMED_ARGS))
    assert a.status == 400, a.raw[:300]
    err = a.json()["error"]
    assert "`toolConfig.functionCallingConfig.streamFunctionCallArguments`" in err["message"], err
    assert EMAIL not in err["message"]
    assert stack.backend.stats()["started"] == 0
    # Where nothing guards the answer, the caller gets what it asked for.
    a = send(stack, req("gemini", OPEN, True, **STREAMED_ARGS), headers={"x-demo-reply": "all is well"})
    assert a.status == 200, a.raw[:300]


def test_function_call_arguments_streamed_in_pieces_block_the_stream(stack):
    # A backend that streams them unasked: a value split over two pieces
    # went out, each chunk masked alone. Now the stream ends with the
    # error at the first piece, and the record says why.
    cut = EMAIL.index("@") + 4
    call = lambda **c: {"candidates": [{"index": 0, "content": {"role": "model", "parts": [{"functionCall": c}]}}]}  # noqa: E731
    script = [
        {"candidates": [{"index": 0, "content": {"role": "model", "parts": [{"text": "Sending it. "}]}}]},
        call(name="send_mail", partialArgs=[{"jsonPath": "$.to", "stringValue": EMAIL[:cut], "willContinue": True}],
             willContinue=True),
        call(partialArgs=[{"jsonPath": "$.to", "stringValue": EMAIL[cut:]}], willContinue=False),
        {"candidates": [{"index": 0, "content": {"role": "model", "parts": []}, "finishReason": "STOP"}]},
    ]
    a = send(stack, req("gemini", GUARDED, stream=True), headers={"x-demo-answer": json.dumps(script)})
    assert a.status == 200, a.raw[:300]
    assert_nowhere(a.raw, EMAIL, EMAIL[:cut], EMAIL[cut:])
    last = sse_events(a.raw)[-1]
    assert "functionCall.partialArgs" in last["error"]["message"], a.raw[:600]
    part = response_record(stack, a.request_id)
    assert part["blocked_by"] == "pieced_text", part
    assert "scully" not in json.dumps(part), part


def seeded_script(api: str, first: str, second: str) -> list:
    """A stream whose opening event already carries `first`, which the
    deltas continue with `second` (the SDKs start the item or message with
    the opening event's text and add each delta to it)."""
    if api == "responses":
        at = {"output_index": 0, "item_id": "m0", "content_index": 0}
        item = {"type": "message", "id": "m0", "role": "assistant", "status": "in_progress",
                "content": [{"type": "output_text", "text": first, "annotations": []}]}
        return [
            {"type": "response.created", "response": {"id": "r", "status": "in_progress", "output": []}},
            {"type": "response.output_item.added", "output_index": 0, "item": item},
            {"type": "response.output_text.delta", **at, "delta": second},
            {"type": "response.completed", "response": {"id": "r", "status": "completed", "output": []}},
        ]
    return [
        {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "model": GUARDED,
                                              "content": [{"type": "text", "text": first}]}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": second}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_stop"},
    ]


@pytest.mark.parametrize(("api", "field"), [
    ("responses", "response.output_item.added item.content[].text"),
    ("messages", "message_start message.content"),
])
def test_text_in_an_event_that_deltas_continue_blocks_the_stream(stack, api, field):
    # A backend whose opening event (a Responses item, an Anthropic
    # message_start) already carries text: the SDKs add the deltas to it,
    # but that text was masked alone, so a value split between it and the
    # first delta went out. Now the stream ends with the error there.
    cut = EMAIL.index("@") + 4
    script = seeded_script(api, f"write to {EMAIL[:cut]}", f"{EMAIL[cut:]} today")
    a = send(stack, req(api, GUARDED, stream=True), headers={"x-demo-answer": json.dumps(script)})
    assert a.status == 200, a.raw[:300]
    assert_nowhere(a.raw, EMAIL, EMAIL[:cut], EMAIL[cut:])
    last = sse_events(a.raw)[-1]
    message = last["message"] if api == "responses" else last["error"]["message"]
    assert field in message, a.raw[:600]
    part = response_record(stack, a.request_id)
    assert part["blocked_by"] == "pieced_text", part
    assert "scully" not in json.dumps(part), part


def test_a_value_split_around_a_long_tool_call_blocks_the_stream(stack):
    # Text blocks are one text to a client (and to the plain answer's
    # masking), whatever lies between. A stream holds a text block's tail
    # for the next text block only so many events: a server tool call
    # streaming its input in more deltas than that between the two halves
    # of a value let each half out masked alone. Now the later half, read
    # with the tail that went out, blocks the stream before it leaves.
    cut = EMAIL.index("@") + 4
    script = [
        {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
                                              "content": [], "model": GUARDED}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": f"write to {EMAIL[:cut]}"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": {
            "type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}}},
        *[{"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": piece}}
          for piece in ['{"query": "', *["a"] * 20, '"}']],
        {"type": "content_block_stop", "index": 1},
        {"type": "content_block_start", "index": 2, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 2, "delta": {"type": "text_delta", "text": f"{EMAIL[cut:]} today"}},
        {"type": "content_block_stop", "index": 2},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 1}},
        {"type": "message_stop"},
    ]
    a = send(stack, req("messages", GUARDED, stream=True), headers={"x-demo-answer": json.dumps(script)})
    assert a.status == 200, a.raw[:300]
    assert_nowhere(a.raw, EMAIL, EMAIL[cut:])
    last = sse_events(a.raw)[-1]
    assert last["error"]["message"].endswith("`email`"), a.raw[-600:]
    part = response_record(stack, a.request_id)
    assert part["blocked_by"] == "email", part
    assert EMAIL not in json.dumps(part), part


@pytest.mark.parametrize(("first", "second", "place"), [
    ({"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "x", "arguments": ""}}]},
     {"tool_calls": [{"index": 0, "function": {"name": "y"}}]},
     "choices[0].delta.tool_calls[index 0].function.name"),
    ({"reasoning_details": [{"type": "reasoning.text", "index": 0, "text": "x"}]},
     {"reasoning_details": [{"type": "reasoning.text", "index": 0, "text": "y"}]},
     "choices[0].delta.reasoning_details[index 0].text"),
], ids=["tool-name", "reasoning-details"])
def test_chat_delta_strings_joined_across_chunks_block_the_stream(stack, first, second, place):
    # OpenAI's SDKs join every string of a choice's delta with the one at
    # the same place before it, not only the fields the gateway follows:
    # a value split over two chunks of another field went out, each chunk
    # masked alone. Now the second piece ends the stream with the error.
    cut = EMAIL.index("@") + 4
    fill = lambda d, text: json.loads(json.dumps(d).replace('"x"', json.dumps(text)).replace('"y"', json.dumps(text)))  # noqa: E731
    chunk = lambda delta: {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}  # noqa: E731
    script = [chunk({"role": "assistant", "content": "Hello. "}), chunk(fill(first, EMAIL[:cut])),
              chunk(fill(second, EMAIL[cut:])), chunk({"content": "bye"}), "[DONE]"]
    a = send(stack, req("chat", GUARDED, stream=True), headers={"x-demo-answer": json.dumps(script)})
    assert a.status == 200, a.raw[:300]
    assert_nowhere(a.raw, EMAIL, EMAIL[cut:])
    last = sse_events(a.raw)[-1]
    assert last["error"]["code"] == "response_blocked" and place in last["error"]["message"], a.raw[:600]
    part = response_record(stack, a.request_id)
    assert part["blocked_by"] == "pieced_text", part


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_fetched_page_in_a_web_fetch_result_is_masked(stack, stream):
    # Anthropic's web fetch tool returns the page as a document whose
    # plain-text source keeps the text under `data`, a key read elsewhere as
    # base64 and skipped: the page's values went out unmasked.
    result = {"type": "web_fetch_tool_result", "tool_use_id": "srvtoolu_1", "content": {
        "type": "web_fetch_result", "url": "https://example.org/page", "retrieved_at": "2026-01-01T00:00:00Z",
        "content": {"type": "document", "title": "Page", "citations": {"enabled": True},
                    "source": {"type": "text", "media_type": "text/plain", "data": SECRET_REPLY}}}}
    fetch = {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_fetch",
             "input": {"url": "https://example.org/page"}}
    if stream:
        script = [
            {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
                                                  "content": [], "model": GUARDED}},
            {"type": "content_block_start", "index": 0, "content_block": fetch},
            {"type": "content_block_stop", "index": 0},
            {"type": "content_block_start", "index": 1, "content_block": result},
            {"type": "content_block_stop", "index": 1},
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 1}},
            {"type": "message_stop"},
        ]
    else:
        script = {"id": "msg_1", "type": "message", "role": "assistant", "model": GUARDED, "stop_reason": "end_turn",
                  "content": [fetch, result, {"type": "text", "text": "Fetched."}],
                  "usage": {"input_tokens": 1, "output_tokens": 1}}
    a = send(stack, req("messages", GUARDED, stream=stream), headers={"x-demo-answer": json.dumps(script)})
    assert a.status == 200, a.raw[:300]
    assert_nowhere(a.raw, EMAIL, CARD)
    docs = sse_events(a.raw) if stream else [a.json()]
    sources = [d["content_block"]["content"]["content"]["source"]["data"] for d in docs
               if d.get("type") == "content_block_start" and d["content_block"]["type"] == "web_fetch_tool_result"] \
        if stream else [docs[0]["content"][1]["content"]["content"]["source"]["data"]]
    assert len(sources) == 1 and "[CREDIT_CARD]" in sources[0] and "<EMAIL_" in sources[0], sources


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_text_under_a_key_for_opaque_blobs_is_masked(stack, stream):
    # `signature`, `data`, `encrypted_content` and the like hold blobs and
    # were skipped whatever they held: a backend's text there went out
    # unmasked. Only a blob (base64) is skipped now.
    extra = {"signature": SECRET_REPLY, "data": {"note": SECRET_REPLY}}
    if stream:
        script = [{"id": "c", "object": "chat.completion.chunk", "model": GUARDED,
                   "choices": [{"index": 0, "delta": {"content": "hi", **extra}, "finish_reason": "stop"}]}]
    else:
        script = {"id": "c", "object": "chat.completion", "model": GUARDED,
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi", **extra},
                               "finish_reason": "stop"}]}
    a = send(stack, req("chat", GUARDED, stream=stream), headers={"x-demo-answer": json.dumps(script)})
    assert a.status == 200, a.raw[:300]
    assert_nowhere(a.raw, EMAIL, CARD)
    doc = sse_events(a.raw)[0]["choices"][0]["delta"] if stream else a.json()["choices"][0]["message"]
    assert "[CREDIT_CARD]" in doc["signature"] and "[CREDIT_CARD]" in doc["data"]["note"], doc


def output_text(answer: dict) -> str:
    """What the SDKs' `response.output_text` gives: the output text of every
    `message` item of a Responses answer, joined."""
    return "".join(p.get("text", "") for item in answer["output"] if item["type"] == "message"
                   for p in item["content"] if p["type"] == "output_text")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_output_text_split_over_two_message_items_is_masked(stack, stream):
    # The SDKs' `output_text` joins the text of every message item, whatever
    # lies between (a hosted tool's call, reasoning): a value the model split
    # over two messages was masked one message at a time, so neither half was
    # a value and both went out.
    cut = EMAIL.index("@") + 4
    halves = (f"write to {EMAIL[:cut]}", f"{EMAIL[cut:]} today")
    message = lambda i, t: {"type": "message", "id": f"m{i}", "role": "assistant", "status": "completed",  # noqa: E731
                            "content": [{"type": "output_text", "text": t, "annotations": []}]}
    search = {"type": "web_search_call", "id": "ws", "status": "completed", "action": {"type": "search", "query": "q"}}
    items = [message(0, halves[0]), search, message(2, halves[1])]
    whole = {"id": "r", "object": "response", "status": "completed", "model": GUARDED, "output": items}
    if stream:
        script = [{"type": "response.created", "response": {**whole, "status": "in_progress", "output": []}}]
        for i, item in enumerate(items):
            script.append({"type": "response.output_item.added", "output_index": i,
                           "item": {**item, "content": []} if item["type"] == "message" else item})
            if item["type"] == "message":
                text = item["content"][0]["text"]
                at = {"output_index": i, "item_id": item["id"], "content_index": 0}
                script.append({"type": "response.content_part.added", **at,
                               "part": {"type": "output_text", "text": "", "annotations": []}})
                script += [{"type": "response.output_text.delta", **at, "delta": text[k:k + 5]}
                           for k in range(0, len(text), 5)]
                script.append({"type": "response.output_text.done", **at, "text": text})
            script.append({"type": "response.output_item.done", "output_index": i, "item": item})
        script.append({"type": "response.completed", "response": whole})
    else:
        script = whole
    a = send(stack, req("responses", GUARDED, stream=stream), headers={"x-demo-answer": json.dumps(script)})
    assert a.status == 200, a.raw[:300]
    assert_nowhere(a.raw, EMAIL, "scully@", EMAIL[cut:])
    if stream:
        events = sse_events(a.raw)
        joined = "".join(e["delta"] for e in events if e.get("type") == "response.output_text.delta")
        final = output_text(next(e["response"] for e in events if e.get("type") == "response.completed"))
        assert final == joined, (final, joined)
    else:
        joined = output_text(a.json())
    assert joined.startswith("write to <EMAIL_") and joined.endswith("> today"), joined
    part = response_record(stack, a.request_id)
    assert EMAIL not in json.dumps(part) and part["blocked_by"] is None, part


@pytest.mark.parametrize("odd", [1.0, "1"], ids=["float", "string"])
def test_an_index_clients_read_otherwise_blocks_the_stream(stack, odd):
    # `1.0` (or `"1"`) is candidate 1 to JavaScript and to the SDKs' models,
    # not to the gateway's reading: the halves of a value split over two
    # chunks of one candidate were masked as two texts and went out.
    cut = EMAIL.index("@") + 4
    chunk = lambda index, text: {"candidates": [{"index": index, "content": {"role": "model", "parts": [{"text": text}]}}]}  # noqa: E731
    script = [chunk(1, "Hello. mail " + EMAIL[:cut]), chunk(odd, EMAIL[cut:] + " now")]
    two = {"generationConfig": {"candidateCount": 2}}  # candidate 1 is asked for
    a = send(stack, req("gemini", GUARDED, stream=True, **two), headers={"x-demo-answer": json.dumps(script)})
    assert a.status == 200, a.raw[:300]
    assert_nowhere(a.raw, EMAIL, EMAIL[cut:])
    assert sse_events(a.raw)[-1]["error"]["status"] == "PERMISSION_DENIED", a.raw[:600]
    assert response_record(stack, a.request_id)["blocked_by"] == "uninspectable"


def test_anthropic_blocks_out_of_order_block_the_stream(stack):
    # The SDKs put a delta into the block its index names; the gateway
    # follows one open block at a time. Interleaved, a value's halves went
    # out in two blocks a reader joins (the final text).
    cut = EMAIL.index("@") + 4
    start = lambda i: {"type": "content_block_start", "index": i, "content_block": {"type": "text", "text": ""}}  # noqa: E731
    delta = lambda i, t: {"type": "content_block_delta", "index": i, "delta": {"type": "text_delta", "text": t}}  # noqa: E731
    script = [
        {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "content": [],
                                              "model": GUARDED}},
        start(0), start(1), delta(1, EMAIL[cut:] + " now"), delta(0, "mail " + EMAIL[:cut]),
        {"type": "content_block_stop", "index": 0}, {"type": "content_block_stop", "index": 1},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 1}},
        {"type": "message_stop"},
    ]
    a = send(stack, req("messages", GUARDED, stream=True), headers={"x-demo-answer": json.dumps(script)})
    assert a.status == 200, a.raw[:300]
    assert_nowhere(a.raw, EMAIL, EMAIL[cut:], EMAIL[:cut])
    assert sse_events(a.raw)[-1]["type"] == "error", a.raw[:600]
    assert response_record(stack, a.request_id)["blocked_by"] == "uninspectable"


def with_upstream_outcome_headers(config: dict):
    """The model's answers carry countersign's outcome headers, as a
    backend claiming a review could send them (added on the route, which
    Envoy applies to the upstream's head before the filter sees it)."""
    for listener in config["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for f in chain["filters"]:
                for vhost in f.get("typed_config", {}).get("route_config", {}).get("virtual_hosts", []):
                    for route in vhost["routes"]:
                        route["response_headers_to_add"] = [{"header": {"key": k, "value": v}} for k, v in (
                            ("x-countersign-outcome", "approved"), ("x-countersign-review-id", "rev_forged"),
                            ("x-countersign-answer-outcome", "approved"),
                            ("x-countersign-answer-review-id", "rev_forged"))]


def test_outcome_headers_come_only_from_the_gateway(make_stack):
    """An upstream's `x-countersign-*` outcome headers reached the caller
    where the filter did not set its own: an allowed answer nobody
    reviewed came with `x-countersign-answer-outcome: approved` and a
    review id, a passthrough with `x-countersign-outcome: approved`."""
    stack = make_stack(filter_config={"default_action": "allow"}, envoy_mutate=with_upstream_outcome_headers)
    r = httpx.post(stack.url + "/v1/chat/completions", json=chat(), timeout=20)
    assert r.status_code == 200, r.text
    assert {k: v for k, v in r.headers.items() if k.startswith("x-countersign-")} == \
        {"x-countersign-outcome": "allowed"}, r.headers
    r = httpx.get(stack.url + "/v1/models", timeout=20)
    assert r.status_code == 200, r.text
    assert not [k for k in r.headers if k.startswith("x-countersign-")], r.headers


def extra_answer_script(api: str, stream: bool, first: str, second: str):
    """An answer whose first choice (candidate) says `first` and whose
    second says `second`."""
    if api == "chat":
        if not stream:
            return {"id": "c1", "object": "chat.completion", "choices": [
                {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
                for i, t in enumerate((first, second))]}
        chunk = lambda i, t: {"choices": [{"index": i, "delta": {"content": t}, "finish_reason": None}]}  # noqa: E731
        return [chunk(0, first), chunk(1, second), "[DONE]"]
    cand = lambda i, t: {"index": i, "content": {"role": "model", "parts": [{"text": t}]}}  # noqa: E731
    if not stream:
        return {"candidates": [cand(0, first), cand(1, second)]}
    return [{"candidates": [cand(0, first)]}, {"candidates": [cand(1, second)]}]


@pytest.mark.parametrize(("api", "stream"), [("chat", True), ("chat", False), ("gemini", True), ("gemini", False)],
                         ids=["chat-stream", "chat-plain", "gemini-stream", "gemini-plain"])
def test_a_choice_nobody_asked_for_is_blocked(stack, api, stream):
    # A request asks for one answer unless it says `n` (`candidateCount`),
    # and many clients read every chunk's first choice
    # (`chunk.choices[0].delta.content`), whatever its index: the halves of
    # a value split over choice 0 and a choice 1 nobody asked for were
    # masked as two answers and read as one. Now the answer is blocked
    # there, naming the choice, and the record says why.
    cut = EMAIL.index("@") + 4
    script = extra_answer_script(api, stream, "Hello. mail " + EMAIL[:cut], EMAIL[cut:] + " now")
    list_name = "choices" if api == "chat" else "candidates"
    a = send(stack, req(api, GUARDED, stream=stream), headers={"x-demo-answer": json.dumps(script)})
    assert_nowhere(a.raw, EMAIL, EMAIL[cut:])
    # A stream's head has gone out with the model's status, and the stream
    # ends with the error event; a plain answer's head waited with its
    # body, so the error comes with its own status (before: the model's 200).
    assert a.status == (200 if stream else 403), (a.status, a.raw[:300])
    err = sse_events(a.raw)[-1]["error"] if stream else a.json()["error"]
    assert f"`{list_name}[" in err["message"] and "more answers than the request asked for" in err["message"], err
    assert response_record(stack, a.request_id)["blocked_by"] == "extra_answer"
    # Asked for, the second answer is an answer of its own.
    asked = {"n": 2} if api == "chat" else {"generationConfig": {"candidateCount": 2}}
    a = send(stack, req(api, GUARDED, stream=stream, **asked), headers={"x-demo-answer": json.dumps(script)})
    assert a.status == 200, a.raw[:300]
    assert EMAIL[cut:].encode() in a.raw and b'"error"' not in a.raw, a.raw[:600]
    # Where nothing guards the answer, it goes out as the model sent it.
    a = send(stack, req(api, OPEN, stream=stream), headers={"x-demo-answer": json.dumps(script)})
    assert a.status == 200 and EMAIL[cut:].encode() in a.raw, a.raw[:300]


@pytest.mark.parametrize("case", ["odd-index", "blocks-out-of-order"])
def test_where_masking_only_monitors_unfollowable_streams_pass(stack, case):
    # An index clients read otherwise (`1.0`) and Anthropic blocks out of
    # order block a stream whose answer is changed; where masking only
    # monitors, blocking hid nothing and only broke the answer. Now such
    # a stream goes on: what was held back goes out, then the rest as the
    # model sent it, each candidate's (block's) text where the client puts it.
    cut = EMAIL.index("@") + 4
    if case == "odd-index":
        api = "gemini"
        chunk = lambda index, text: {"candidates": [{"index": index, "content": {"role": "model", "parts": [{"text": text}]}}]}  # noqa: E731
        script = [chunk(0, "Hello. mail " + EMAIL[:cut]), chunk(1.0, EMAIL[cut:] + " now")]
        want = {0: "Hello. mail " + EMAIL[:cut], 1: EMAIL[cut:] + " now"}
    else:
        api = "messages"
        start = lambda i: {"type": "content_block_start", "index": i, "content_block": {"type": "text", "text": ""}}  # noqa: E731
        delta = lambda i, t: {"type": "content_block_delta", "index": i, "delta": {"type": "text_delta", "text": t}}  # noqa: E731
        script = [
            {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
                                                  "content": [], "model": MONITORED}},
            start(0), delta(0, "mail " + EMAIL[:cut]), start(1), delta(1, EMAIL[cut:] + " now"), delta(0, " more"),
            {"type": "content_block_stop", "index": 0}, {"type": "content_block_stop", "index": 1},
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 1}},
            {"type": "message_stop"},
        ]
        want = {0: "mail " + EMAIL[:cut] + " more", 1: EMAIL[cut:] + " now"}
    a = send(stack, req(api, MONITORED, stream=True), headers={"x-demo-answer": json.dumps(script)})
    assert a.status == 200, a.raw[:300]
    got: dict[int, str] = {}
    for e in sse_events(a.raw):
        assert "error" not in e and e.get("type") != "error", a.raw[:600]
        if api == "gemini":
            for c in e.get("candidates", []):
                for p in c["content"]["parts"]:
                    got[int(c.get("index", 0))] = got.get(int(c.get("index", 0)), "") + p.get("text", "")
        elif e.get("type") == "content_block_delta":
            got[e["index"]] = got.get(e["index"], "") + e["delta"]["text"]
    assert got == want, a.raw[:600]
    part = response_record(stack, a.request_id)
    assert part.get("blocked_by") is None, part
    # The rest went unread, its hits uncounted: the record says so (before:
    # nothing did, and it passed for a clean answer).
    assert part.get("unscanned") is True, part
