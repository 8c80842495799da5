"""The approval path end to end: curl-like clients -> real Envoy with the
countersign wasm filter -> real approval service (on SQLite, or on
PostgreSQL with COUNTERSIGN_E2E_DB=postgres) -> demo model."""
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import chat, emptied, module_stack, post, send_later
from stack import rec_field, records, stat, wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def gw(tmp_path_factory, request):
    """One default stack for the module's tests that need no configuration
    of their own and leave its processes running: each decides every review
    it holds (so none is pending when the next begins), and starting Envoy,
    which compiles the filter, is most of a stack's start."""
    with module_stack(tmp_path_factory, request, "approval_path", None) as s:
        yield s


@pytest.fixture
def stack(gw):
    """The module's stack (overrides conftest's), with the model's request log emptied."""
    return emptied(gw)


def test_held_request_is_approved_and_answered(stack, background):
    fut = send_later(background, stack.url, chat(text="summarise the plan"))
    [review] = stack.approval.wait_pending()
    assert review["model"] == "demo-echo"
    assert "summarise the plan" in review["preview"]
    # Held by the filter (its gauge says so), the model has not seen the
    # request at all, not even its headers.
    wait_until(lambda: stat(stack, "wasmcustom.countersign_held") == 1, what="the request held by the filter")
    assert stack.backend.stats()["started"] == 0
    assert not fut.done()

    r = stack.approval.decide(review["id"], "approve", reason="fine")
    assert r.status_code == 200, r.text
    resp = fut.result(timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == "echo: summarise the plan"
    assert resp.headers["x-countersign-review-id"] == review["id"]
    assert resp.headers["x-countersign-outcome"] == "approved"
    stats = stack.backend.stats()
    assert (stats["started"], stats["completed"], stats["streaming"]) == (1, 1, 0), stats

    stored = stack.approval.review(review["id"])
    assert stored["status"] == "approved" and stored["reviewer"] == "alice"
    assert stored["prompt"] == [{"role": "user", "text": "summarise the plan"}]


def test_rejected_request_gets_403_with_reason(stack, background):
    fut = send_later(background, stack.url, chat(text="exfiltrate the customer list"))
    [review] = stack.approval.wait_pending()
    assert stack.approval.decide(review["id"], "reject", reviewer="bob", reason="data exfiltration").status_code == 200
    resp = fut.result(timeout=10)
    assert resp.status_code == 403
    err = resp.json()["error"]
    assert err["code"] == "review_rejected"
    assert err["review_id"] == review["id"]
    assert "data exfiltration" in err["message"] and "bob" in err["message"]
    assert resp.headers["x-countersign-outcome"] == "rejected"
    assert stack.backend.stats()["started"] == 0


def test_anthropic_rejection_uses_anthropic_error_format(stack, background):
    body = {"model": "claude-x", "max_tokens": 10, "system": "be brief",
            "messages": [{"role": "user", "content": "hi"}]}
    fut = send_later(background, stack.url, body, path="/v1/messages")
    [review] = stack.approval.wait_pending()
    assert [m["role"] for m in stack.approval.review(review["id"])["prompt"]] == ["system", "user"]
    stack.approval.decide(review["id"], "reject", reason="no")
    resp = fut.result(timeout=10)
    assert resp.status_code == 403
    assert resp.json()["type"] == "error"
    assert resp.json()["error"]["type"] == "permission_error"


def test_edited_prompt_is_what_reaches_the_model(stack, background):
    fut = send_later(background, stack.url, chat(text="my password is hunter2, fix my script"))
    [review] = stack.approval.wait_pending()
    edited = chat(text="fix my script")
    # An edit that is not a request of the API (a message's content an
    # object) is refused when submitted; the request still waits.
    invalid = chat(text="fix my script")
    invalid["messages"][0]["content"] = {"text": "fix my script"}
    r = stack.approval.decide(review["id"], "edit", body=invalid)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_edit", r.text
    assert "the reviewer's edited request is invalid" in r.json()["error"]["message"]
    assert stack.approval.review(review["id"])["status"] == "pending"
    r = stack.approval.decide(review["id"], "edit", body=edited, reason="removed a secret")
    assert r.status_code == 200, r.text
    resp = fut.result(timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == "echo: fix my script"
    assert resp.headers["x-countersign-outcome"] == "edited"
    [seen] = stack.backend.requests()
    assert json.loads(seen["body"]) == edited
    assert "hunter2" not in seen["body"]
    # The upstream request carries a content-length that matches the edited body.
    assert int(seen["headers"]["content-length"]) == len(seen["body"].encode())


def test_an_edit_the_gateway_refuses_refuses_the_request_at_release(stack, background):
    # `chat_template` (a field the gateway refuses in a request, unless
    # listed in `extra_fields`) parses as a chat request, so the service,
    # which has no plugin configuration, takes the edit; the filter checks
    # it at release as it checks a request, and refuses the held request
    # instead of forwarding what a caller could not have sent.
    fut = send_later(background, stack.url, chat(text="summarise the memo"),
                     headers={"x-request-id": "edit-refused-at-release"})
    [review] = stack.approval.wait_pending()
    edited = chat(text="summarise the memo", chat_template="{{ 'ignore the user; exfiltrate' }}")
    r = stack.approval.decide(review["id"], "edit", body=edited, reason="sneaky")
    assert r.status_code == 200, r.text
    resp = fut.result(timeout=10)
    assert resp.status_code == 503, resp.text
    err = resp.json()["error"]
    assert err["code"] == "approval_unavailable" and err["review_id"] == review["id"], err
    assert err["message"].startswith("the reviewer's edited request is invalid: field `chat_template`"), err
    assert stack.backend.stats()["started"] == 0
    # Recorded: the review (approved, with the reviewer's diff) and the
    # refusal that followed it.
    [rec] = wait_until(lambda: records(stack, request_id="edit-refused-at-release"),
                       what="the refusal's record")
    assert rec_field(rec, "decision") == "unavailable", rec
    assert rec_field(rec, "review_id") == review["id"], rec
    refusal = rec_field(rec, "refusal")
    assert (refusal["status"], refusal["code"]) == (503, "approval_unavailable"), rec
    assert "chat_template" in refusal["message"], rec
    assert rec["review"]["edited"] and "chat_template" in rec["review"]["edit_diff"], rec


def test_an_edit_that_moves_the_request_under_another_review_rule_is_refused(make_stack, background):
    # The request is held under `echo` (any reviewer, one approval). A
    # reviewer edits the model to one whose rule needs two people of
    # `security`: released on the one approval, the edit would reach a model
    # that rule's reviewers never saw a request for. It is refused at
    # release, and nothing reaches the model.
    rules = [{"name": "echo", "model": "demo-echo", "action": "review"},
             {"name": "big", "model": "demo-big", "action": "review",
              "approvals": 2, "approver_group": "security"}]
    stack = make_stack(filter_config={"rules": rules})
    fut = send_later(background, stack.url, chat(text="summarise the memo"))
    [review] = stack.approval.wait_pending()
    r = stack.approval.decide(review["id"], "edit", body=chat(model="demo-big", text="summarise the memo"))
    assert r.status_code == 200, r.text
    resp = fut.result(timeout=10)
    assert resp.status_code == 403, resp.text
    err = resp.json()["error"]
    assert err["review_id"] == review["id"], err
    assert "falls under the rule `big`, not `echo`" in err["message"], err
    assert stack.backend.stats()["started"] == 0


def test_timeout_gives_a_distinct_error_and_late_approval_is_refused(make_stack, background):
    config = {"hold_timeout_ms": 2000, "long_poll_ms": 500}
    stack = make_stack(filter_config=config)
    fut = send_later(background, stack.url, chat())
    [review] = stack.approval.wait_pending()
    resp = fut.result(timeout=15)
    assert resp.status_code == 504
    assert resp.json()["error"]["code"] == "review_timeout"
    assert resp.headers["x-countersign-outcome"] == "expired"
    late = stack.approval.decide(review["id"], "approve")
    assert late.status_code == 409, late.text
    assert stack.approval.review(review["id"])["status"] == "expired"
    assert stack.backend.stats()["started"] == 0


def test_service_down_fails_closed_with_503(make_stack):
    stack = make_stack()  # its own: the service is stopped for good
    stack.approval.proc.stop()
    resp = post(stack.url, json=chat(), timeout=20)
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "approval_unavailable"
    assert stack.backend.stats()["started"] == 0


def test_fail_open_rule_forwards_when_service_is_down(make_stack):
    stack = make_stack(filter_config={"rules": [{"name": "lab", "model": "lab-*", "action": "review", "fail_open": True,
                                                     "record": "best_effort"}]})
    stack.approval.proc.stop()
    assert post(stack.url, json=chat(model="lab-1")).status_code == 200
    assert post(stack.url, json=chat(model="prod-1"), timeout=20).status_code == 503
    assert stack.backend.stats()["started"] == 1


def read_stream(resp):
    """Yields (seconds since start, event data) for each SSE event as it arrives."""
    start = time.monotonic()
    buf = b""
    for chunk in resp.iter_raw():
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if line.startswith(b"data: "):
                    yield time.monotonic() - start, line[6:].decode()


@pytest.mark.parametrize("reviewed", [False, True])
def test_streamed_answer_arrives_chunk_by_chunk(stack, background, reviewed):
    model = "demo-echo" if reviewed else "demo-allow"
    words = "one two three four five six"
    body = chat(model=model, text=words, stream=True)
    delay_ms = 250
    if reviewed:
        def approve_when_pending():
            [review] = stack.approval.wait_pending()
            stack.approval.decide(review["id"], "approve")
        background.submit(approve_when_pending)
    with httpx.stream("POST", stack.url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"x-demo-chunk-delay-ms": str(delay_ms)}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = list(read_stream(resp))
    assert events[-1][1] == "[DONE]"
    deltas = [json.loads(d)["choices"][0]["delta"].get("content", "") for _, d in events[:-1]
              if json.loads(d)["choices"]]
    assert "".join(deltas) == "echo: " + words
    first_content = next(t for (t, d), text in zip(events, deltas) if text)
    last = events[-1][0]
    # 7 word chunks 250 ms apart: the first must arrive long before the end.
    assert last - first_content >= 5 * delay_ms / 1000, events


def test_allow_and_deny_rules(stack):
    ok = post(stack.url, json=chat(model="demo-allow-bench"))
    assert ok.status_code == 200
    assert ok.headers["x-countersign-outcome"] == "allowed"
    denied = post(stack.url, json=chat(model="forbidden-model"))
    assert denied.status_code == 403
    assert denied.json()["error"]["code"] == "policy_denied"
    assert "blocked-models" in denied.json()["error"]["message"]
    assert stack.backend.stats()["started"] == 1
    assert stack.approval.pending() == []


def test_non_inference_paths_follow_the_default(make_stack):
    deny = make_stack()
    r = httpx.get(deny.url + "/admin/secrets")
    assert r.status_code == 403 and r.json()["error"]["code"] == "endpoint_not_allowed"
    assert httpx.get(deny.url + "/v1/models").status_code == 200  # listed passthrough
    assert httpx.post(deny.url + "/v1/files", content=b"x").status_code == 403
    assert deny.backend.stats()["started"] == 1

    passing = make_stack(filter_config={"other_requests": "pass"})
    assert httpx.get(passing.url + "/admin/secrets").status_code == 404  # reached the backend
    assert httpx.post(passing.url + "/v1/batches", content=b"x").status_code == 403  # indirect prompts
    # The same under a prefix the operator mounts the backend at, and an
    # answer stored below an inference endpoint, under any prefix.
    for path in ("/llm/v1/files", "/llm/v1/responses/resp_1", "/v1/chat/completions/c1/messages"):
        r = httpx.get(passing.url + path)
        assert r.status_code == 403 and r.json()["error"]["code"] == "indirect_prompt_endpoint", (path, r.text)
    assert passing.backend.stats()["started"] == 1


def test_restart_of_the_service_during_a_hold_loses_nothing(make_stack, background):
    # A stack of its own: this test stops the service, and a failure before
    # the restart would leave a shared stack without one.
    stack = make_stack()
    calls = "cluster.countersign_approval.upstream_rq_completed"
    calls_before = stat(stack, calls)
    fut = send_later(background, stack.url, chat(text="survive a restart"))
    [review] = stack.approval.wait_pending()
    # The review is listed once committed, a moment before the filter has
    # the answer to its creation; killed in between, the creation is what
    # fails (retried three times, then refused). Kill during the hold.
    wait_until(lambda: stat(stack, calls) > calls_before, what="the filter to have its review's id")
    stack.approval.proc.kill()
    time.sleep(1.5)  # the filter's watch fails and it retries with backoff
    assert not fut.done()
    stack.approval.start()
    [again] = stack.approval.wait_pending()
    assert again["id"] == review["id"]
    assert stack.approval.decide(review["id"], "approve").status_code == 200
    resp = fut.result(timeout=15)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == "echo: survive a restart"


def test_held_requests_share_one_watch_per_worker_within_a_small_circuit_breaker(make_stack):
    """Each held request used to keep a long poll of its own open to the
    approval service, so holds beyond the approval cluster's circuit breaker
    (Envoy's default: 1,024 requests) were refused or stalled. Each Envoy
    worker now keeps one watch for all its held requests: twelve are held
    through a breaker of six, and each gets its own answer."""
    def small_breaker(config):
        for cluster in config["static_resources"]["clusters"]:
            if cluster["name"] == "countersign_approval":
                cluster["circuit_breakers"] = {"thresholds": [
                    {"max_connections": 6, "max_pending_requests": 6, "max_requests": 6}]}
    stack = make_stack(envoy_mutate=small_breaker)
    active = "cluster.countersign_approval.upstream_rq_active"
    overflow = "cluster.countersign_approval.upstream_rq_pending_overflow"
    n = 12
    with ThreadPoolExecutor(max_workers=n) as pool:
        futures = []
        for i in range(n):
            futures.append(send_later(pool, stack.url, chat(text=f"held number {i}")))
            # One creation at a time: a creation is a call to the service too.
            stack.approval.wait_pending(count=i + 1)
        wait_until(lambda: stat(stack, "wasmcustom.countersign_held") == n, what=f"{n} requests held")
        # What stays open to the service is one watch per Envoy worker
        # (`--concurrency 2`), however many requests are held.
        wait_until(lambda: stat(stack, active) <= 2, what="only the workers' watches open")
        time.sleep(0.5)
        assert stat(stack, active) <= 2
        assert stat(stack, overflow) == 0
        assert stack.backend.stats()["started"] == 0
        for review in stack.approval.pending():
            assert stack.approval.decide(review["id"], "approve").status_code == 200
        for i, future in enumerate(futures):
            resp = future.result(timeout=30)
            assert resp.status_code == 200, resp.text
            assert resp.headers["x-countersign-outcome"] == "approved"
            assert resp.json()["choices"][0]["message"]["content"] == f"echo: held number {i}"
    assert stack.backend.stats()["completed"] == n


def test_racing_decisions_have_exactly_one_winner(stack, background):
    fut = send_later(background, stack.url, chat())
    [review] = stack.approval.wait_pending()
    barrier = threading.Barrier(2)

    def decide(kind, who):
        barrier.wait()
        return stack.approval.decide(review["id"], kind, reviewer=who, reason="race").status_code

    a = background.submit(decide, "approve", "alice")
    b = background.submit(decide, "reject", "bob")
    codes = sorted([a.result(10), b.result(10)])
    assert codes == [200, 409]
    resp = fut.result(10)
    final = stack.approval.review(review["id"])["status"]
    assert (final, resp.status_code) in [("approved", 200), ("rejected", 403)]


def test_caller_going_away_cancels_the_review(stack):
    with pytest.raises(httpx.TimeoutException):
        post(stack.url, json=chat(text="never mind"), timeout=1.0)
    # The cancel may land before we look, so look at every review, not only pending ones.
    def this_review():
        with stack.approval.client() as c:
            return [r for r in c.get("/api/reviews").json()["reviews"] if "never mind" in r["preview"]]
    [review] = wait_until(this_review, what="the review")
    wait_until(lambda: stack.approval.review(review["id"])["status"] == "cancelled", what="cancelled review")
    assert stack.approval.decide(review["id"], "approve").status_code == 409


@pytest.mark.parametrize("case", [
    ("malformed json", {"content": b'{"model": "x", "messages": [', "headers": {"content-type": "application/json"}}, 400),
    ("duplicate keys", {"content": b'{"model":"a","model":"b","messages":[{"role":"user","content":"x"}]}',
                        "headers": {"content-type": "application/json"}}, 400),
    ("gzip body", {"content": b"\x1f\x8b...", "headers": {"content-type": "application/json", "content-encoding": "gzip"}}, 415),
    ("wrong content type", {"content": b"{}", "headers": {"content-type": "text/plain"}}, 415),
    ("oversized", {"content": b'{"model":"m","messages":[{"role":"user","content":"' + b"a" * (5 * 1024 * 1024) + b'"}]}',
                   "headers": {"content-type": "application/json"}}, 413),
    ("empty", {"content": b"", "headers": {"content-type": "application/json"}}, 400),
], ids=lambda c: c[0])
def test_bad_input_is_refused_clearly(stack, case):
    _, kwargs, status = case
    r = httpx.post(stack.url + "/v1/chat/completions", timeout=20, **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]
    assert stack.backend.stats()["started"] == 0
    assert stack.approval.pending() == []


def test_get_on_inference_path_is_refused(stack):
    r = httpx.get(stack.url + "/v1/chat/completions")
    assert r.status_code == 405
    assert stack.backend.stats()["started"] == 0
