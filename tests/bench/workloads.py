"""Request bodies used by the benchmark: realistic OpenAI chat requests of a
given size, with or without things a masking rule would match."""
from __future__ import annotations

import json

SYSTEM = ("You are a careful assistant for the platform team at Example Corp. Answer concisely, cite the "
          "runbook section you rely on, and never invent configuration keys. If you are unsure, say so.")

# Ordinary prose: nothing a masking rule for secrets or personal data should match.
PROSE = [
    "Our checkout service started returning intermittent 502 errors after yesterday's deploy.",
    "The errors cluster around the top of each hour, which lines up with the cache warm-up job.",
    "I looked at the dashboards and the upstream latency stays flat while the error rate climbs.",
    "Could the connection pool be exhausted while the warm-up job holds long-running queries?",
    "We run three replicas behind the gateway, each with a pool of forty connections to the database.",
    "The warm-up job was changed last week to prefetch twice as many product pages as before.",
    "Please suggest what to check first, and how to confirm the theory without another outage.",
    "Also outline a safe rollback plan in case the new release itself is the cause of the errors.",
]

# The same kind of text with personal data and credentials in it.
SENSITIVE = [
    "Contact the on-call engineer, Jane Doe, at jane.doe@example.com or +1 415 555 0134 if it recurs.",
    "The staging database URL is postgres://svc_checkout:Sup3rS3cret!@10.1.2.3:5432/checkout.",
    "Here is the key the job uses: sk-proj-4fJ9kQ2mN7xR1tV8wY3zA6bC0dE5gH2iK9lM4nP7qS1uT, rotate it later.",
    "The customer who reported it is John Smith, card 4111 1111 1111 1111, account id 7734-2291.",
    "Our AWS access key AKIAIOSFODNN7EXAMPLE appears in the job's environment as well.",
    "His SSN on the ticket is 078-05-1120 and the callback number is (212) 555-0199.",
]


def _text(size: int, sentences: list[str], offset: int = 0) -> str:
    out: list[str] = []
    n = 0
    i = offset
    while n < size:
        s = sentences[i % len(sentences)]
        out.append(s)
        n += len(s) + 1
        i += 1
    return " ".join(out)[:size]


def chat_body(size: int, model: str = "demo-allow-bench", marker: str = "", sensitive: bool = False,
              stream: bool = False) -> bytes:
    """A chat completion request of about `size` bytes: a system prompt and a few turns, the last
    user message ending with `marker` (so answers can be told apart)."""
    sentences = PROSE + SENSITIVE if sensitive else PROSE
    base = {"model": model, "messages": [], "temperature": 0.2, "max_tokens": 512}
    if stream:
        base["stream"] = True
    messages = [{"role": "system", "content": SYSTEM}]
    # Fill four turns to reach the size; the last user message carries the marker.
    overhead = len(json.dumps(base)) + len(json.dumps(messages)) + 4 * 40 + len(marker)
    per = max(40, (size - overhead) // 4)
    messages.append({"role": "user", "content": _text(per, sentences, 0)})
    messages.append({"role": "assistant", "content": _text(per, sentences, 3)})
    messages.append({"role": "user", "content": _text(per, sentences, 5)})
    last = _text(max(10, size - overhead - 3 * per), sentences, 2)
    messages.append({"role": "user", "content": (last + " " + marker).strip()})
    base["messages"] = messages
    body = json.dumps(base, separators=(",", ":")).encode()
    return body


def last_user_text(body: bytes) -> str:
    return json.loads(body)["messages"][-1]["content"]


def create_review_body(chat: bytes, model: str = "demo-echo", async_review: bool = False) -> bytes:
    """A filter-API `POST /v1/reviews` body for `chat`, as the filter would send it: a held
    request's review, or with `async_review` one that an approval token will carry (nobody
    holds it, so deciding it does not depend on a filter polling)."""
    msgs = json.loads(chat)["messages"]
    return json.dumps({
        "request_id": "bench", "api": "openai_chat", "method": "POST", "path": "/v1/chat/completions",
        "authority": "bench", "route": "model", "caller": None, "model": model, "stream": False,
        "rule": None, "prompt": [{"role": m["role"], "text": m["content"]} for m in msgs],
        "body": chat.decode(), "hold_timeout_ms": 3_600_000, "async_review": async_review,
    }, separators=(",", ":")).encode()
