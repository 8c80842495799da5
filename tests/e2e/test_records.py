"""Session records end to end: one durable record per inference request,
written before the request is forwarded, with the response appended; a
hash chain the verifier checks; Envoy stats and access-log fields."""
import json
import threading
import time
from collections import Counter

import httpx
import pytest

from conftest import chat, post, send_later
from stack import Postgres, rec_field, records, verify_records, wait_until

pytestmark = pytest.mark.timeout(180)


def by_request_id(stack):
    return {r["request"]["request_id"] if "request" in r else r["request_id"]: r for r in records(stack)}


def response_part(rec):
    return rec.get("response") or {}


def test_allowed_approved_edited_rejected_expired_and_streamed(make_stack, background):
    stack = make_stack(filter_config={"hold_timeout_ms": 2000, "long_poll_ms": 500, "rules": [
        {"name": "load-tests", "model": "demo-allow*", "action": "allow"}]})
    rid = {}
    r = post(stack.url, json=chat(model="demo-allow", text="plain allowed"))
    assert r.status_code == 200
    rid["allowed"] = r.headers.get("x-request-id") or None

    fut = send_later(background, stack.url, chat(text="please approve"))
    [rev] = stack.approval.wait_pending()
    stack.approval.decide(rev["id"], "approve", reason="ok")
    assert fut.result(10).status_code == 200

    fut = send_later(background, stack.url, chat(text="edit me: secret plan"))
    [rev_e] = stack.approval.wait_pending()
    stack.approval.decide(rev_e["id"], "edit", body=chat(text="edit me"), reason="trimmed")
    assert fut.result(10).status_code == 200

    fut = send_later(background, stack.url, chat(text="reject me"))
    [rev_r] = stack.approval.wait_pending()
    stack.approval.decide(rev_r["id"], "reject", reason="nope")
    assert fut.result(10).status_code == 403

    fut = send_later(background, stack.url, chat(text="nobody decides"))
    assert fut.result(15).status_code == 504

    with httpx.stream("POST", stack.url + "/v1/chat/completions", timeout=30,
                      json=chat(model="demo-allow", text="stream this please", stream=True,
                                stream_options={"include_usage": True})) as s:
        assert s.status_code == 200
        s.read()

    def all_written():
        recs = records(stack)
        return len(recs) >= 6 and all(response_part(x) or rec_field(x, "decision") not in ("allowed", "approved", "edited")
                                      for x in recs) and recs
    recs = wait_until(all_written, timeout=10, what="six records with their responses")
    decisions = sorted(rec_field(x, "decision") for x in recs)
    assert decisions == ["allowed", "allowed", "approved", "edited", "expired", "rejected"]

    approved = next(x for x in recs if rec_field(x, "decision") == "approved")
    assert rec_field(approved, "review_id") == rev["id"]
    assert json.loads(rec_field(approved, "body"))["messages"][0]["content"] == "please approve"
    assert rec_field(approved, "body_sha256")
    assert rec_field(approved, "held_ms") is not None
    assert "alice" in json.dumps(approved)
    assert response_part(approved)["status"] == 200
    assert "echo: please approve" in response_part(approved)["body"]
    assert response_part(approved)["usage"]["total_tokens"] > 0

    edited = next(x for x in recs if rec_field(x, "decision") == "edited")
    assert "secret plan" not in rec_field(edited, "body")
    assert "secret plan" in json.dumps(edited)  # the diff shows what the reviewer removed
    rejected = next(x for x in recs if rec_field(x, "decision") == "rejected")
    assert rec_field(rejected, "refusal")["code"] == "review_rejected" and not response_part(rejected)

    streamed = next(x for x in recs if rec_field(x, "decision") == "allowed" and rec_field(x, "stream"))
    assert response_part(streamed)["body"] == "echo: stream this please"
    assert response_part(streamed)["usage"]["completion_tokens"] == 4
    assert response_part(streamed)["completion"] == "complete"

    # Filters and export.
    assert {rec_field(x, "decision") for x in records(stack, decision="rejected")} == {"rejected"}
    with stack.approval.client() as c:
        lines = c.get("/api/records/export").text.strip().splitlines()
    assert len(lines) == len(recs) and all(json.loads(line) for line in lines)

    ok = verify_records(stack)
    assert ok.returncode == 0, ok.stdout + ok.stderr

    # Envoy's own view: stats and the access log carry the decisions.
    stats = httpx.get(f"http://127.0.0.1:{stack.envoy.admin_port}/stats?filter=countersign_requests").text
    assert "wasmcustom.countersign_requests_approved_total: 1" in stats
    assert "wasmcustom.countersign_requests_rejected_total: 1" in stats
    def logged_decisions():
        lines = [json.loads(line) for line in stack.envoy.proc.log_text().splitlines() if line.startswith("{")]
        return {x["countersign_decision"] for x in lines}
    # Envoy flushes its access log about once a second.
    wait_until(lambda: {"allowed", "approved", "edited", "rejected", "expired"} <= logged_decisions(),
               timeout=10, what="access log lines with every decision")


def test_no_forward_without_a_durable_record(make_stack):
    stack = make_stack(filter_config={"rules": [{"name": "load-tests", "model": "demo-allow*", "action": "allow"}]})
    stack.approval.proc.stop()
    r = post(stack.url, json=chat(model="demo-allow"), timeout=20)
    assert r.status_code == 503
    assert stack.backend.stats()["started"] == 0
    best = make_stack(filter_config={"rules": [
        {"name": "lab", "model": "demo-allow*", "action": "allow", "record": "best_effort"}]})
    best.approval.proc.stop()
    assert post(best.url, json=chat(model="demo-allow"), timeout=20).status_code == 200


def traffic_through(stack, outage, workers: int = 4) -> list[tuple[str, int]]:
    """Allowed requests from `workers` clients, each with its own id, while
    `outage()` runs: [(request id, status its client got; 0 for none)]."""
    stop = threading.Event()
    answers: list[tuple[str, int]] = []

    def traffic(worker: int):
        with httpx.Client(timeout=10) as c:
            n = 0
            while not stop.is_set():
                rid = f"traffic-{worker}-{n}"
                n += 1
                try:
                    answers.append((rid, c.post(stack.url + "/v1/chat/completions", json=chat(model="demo-allow"),
                                                headers={"x-request-id": rid}).status_code))
                except httpx.HTTPError:
                    answers.append((rid, 0))

    threads = [threading.Thread(target=traffic, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        outage()
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    return answers


def assert_every_answer_recorded_once(stack, answers):
    """Envoy stayed up, so the model saw exactly the requests whose callers
    got their answer (the backend's counter is complete, unlike its request
    log); each of those has exactly one record, and no record of a refused
    request claims it was forwarded. The chain verifies."""
    # Refusals (503) are allowed, not required: the filter's record retries
    # (five over 1.5 s) may ride out a short outage entirely.
    codes = Counter(code for _, code in answers)
    assert set(codes) <= {200, 503} and codes[200], codes
    answered = {rid for rid, code in answers if code == 200}
    refused = {rid for rid, code in answers if code == 503}
    assert stack.backend.stats()["started"] == len(answered), (stack.backend.stats(), codes)

    forwarding = ("allowed", "approved", "edited")

    def settled():
        # A refused request has its own refusal record, or, where its
        # record was written before the outage, that record gains a
        # response part saying it was not forwarded (delivered later).
        recs = records(stack)
        return all(x.get("response") for x in recs
                   if rec_field(x, "request_id") in refused and rec_field(x, "decision") in forwarding) and recs
    recs = wait_until(settled, timeout=30, what="refusal parts of records written before the outage")
    by_id: dict[str, list[dict]] = {}
    for x in recs:
        by_id.setdefault(rec_field(x, "request_id"), []).append(x)
    missing = [rid for rid in answered if len(by_id.get(rid, [])) != 1]
    assert not missing, f"{len(missing)} answered requests without exactly one record: {missing[:5]}"
    assert {rec_field(by_id[rid][0], "decision") for rid in answered} == {"allowed"}
    for rid in refused:
        for x in by_id.get(rid, []):
            if rec_field(x, "decision") in forwarding:
                assert x["response"]["completion"] == "not_forwarded", x
            else:
                assert rec_field(x, "refusal")["status"] == 503, x
    ok = verify_records(stack)
    assert ok.returncode == 0, ok.stdout + ok.stderr


ALLOW_LOAD = {"rules": [{"name": "load-tests", "model": "demo-allow*", "action": "allow"}]}


def test_killing_the_service_under_traffic_loses_no_record(make_stack):
    stack = make_stack(filter_config=ALLOW_LOAD)

    def outage():
        stack.approval.proc.kill()
        time.sleep(1.0)
        stack.approval.start()
    assert_every_answer_recorded_once(stack, traffic_through(stack, outage))


def test_many_callers_at_once_are_each_answered_and_recorded_once(make_stack):
    """24 clients at once: each Envoy worker group-commits the records that
    arrive while one of its record calls is in flight, in batches sent from
    its root context. A batch sent from a request's context is cancelled,
    unanswered, when that request ends, and every request in it hangs: the
    clients' 10 s timeout (status 0) would show it."""
    stack = make_stack(filter_config=ALLOW_LOAD)
    answers = traffic_through(stack, lambda: time.sleep(2.0), workers=24)
    codes = Counter(code for _, code in answers)
    assert set(codes) == {200}, codes
    metrics = httpx.get(f"{stack.approval.url}/metrics", timeout=5).text
    batches = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("countersign_http_request_duration_seconds_count")
                  and 'route="/v1/records/batch"' in line)
    assert batches > 0, "no records travelled together: the group commit was not exercised"
    assert_every_answer_recorded_once(stack, answers)


def test_killing_postgresql_under_traffic_loses_no_record(make_stack):
    """kill -9 of the whole database server under traffic, with PostgreSQL's
    durability on (fsync, full-page writes: the other tests turn them off
    for speed): no answered request loses its record, and the service
    carries on once the server is back, without a restart."""
    pg = Postgres(durable=True).start()
    try:
        stack = make_stack(filter_config=ALLOW_LOAD, database=pg.create_database("kill_nine"))

        def outage():
            pg.proc.kill()
            time.sleep(1.0)
            pg.restart()
        assert_every_answer_recorded_once(stack, traffic_through(stack, outage))
        assert stack.approval.proc.alive()
        wait_until(lambda: post(stack.url, json=chat(model="demo-allow"), timeout=10).status_code == 200,
                   timeout=15, what="allowed requests recorded again")
    finally:
        stack.stop()
        pg.stop()


def test_streamed_responses_answer_is_recorded_with_text_and_usage(make_stack):
    stack = make_stack(filter_config={"rules": [{"name": "load-tests", "model": "demo-allow*", "action": "allow"}]})
    with httpx.stream("POST", stack.url + "/v1/responses", timeout=30,
                      json={"model": "demo-allow", "input": "stream this response", "stream": True}) as s:
        assert s.status_code == 200
        assert "response.output_text.delta" in s.read().decode()

    def written():
        recs = [x for x in records(stack) if rec_field(x, "stream") and response_part(x)]
        return recs and recs[0]
    rec = wait_until(written, timeout=10, what="the streamed Responses record with its response")
    assert rec_field(rec, "api") == "openai_responses"
    part = response_part(rec)
    assert part["body"] == "echo: stream this response"
    assert part["usage"]["output_tokens"] == 4
    assert part["usage"]["total_tokens"] == part["usage"]["input_tokens"] + 4
    assert part["completion"] == "complete"
