"""Faults, end to end: the approval channel slow, hanging or black-holed; the
database read-only or out of space; Envoy restarted with requests held; an
invalid plugin configuration pushed at run time; the service restarted while
a two-person review has one approval. In every case: the caller gets a clear
answer, nothing reaches the model unreviewed, and no record is lost or
claimed that was not written."""
from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import chat, post, send_later
from stack import free_port, rec_field, records, stat, verify_records, wait_until
from test_async_tokens import CALLERS, K1, approved_status, retry, service_extra
from test_async_tokens import filter_config as async_filter_config

pytestmark = pytest.mark.timeout(120)


# ---------------------------------------------------------------- helpers

def verify_chain(stack):
    out = verify_records(stack)
    assert out.returncode == 0, out.stdout + out.stderr


def forwarded_ids(stack) -> list[str]:
    return [r["headers"].get("x-request-id") for r in stack.backend.requests()]


class FaultProxy:
    """A TCP proxy between Envoy and the approval service that can pass,
    slow down (`delay` seconds per chunk, both ways), black-hole (accept and
    read, never forward or answer), drop the service's answers (forward
    requests, swallow responses) or refuse some requests itself
    (`reject_to`: a request whose request line matches `reject_pattern` is
    answered `reject_status` and its connection closed, never forwarded). It
    notes every request line it sees."""

    def __init__(self, listen_port: int, target_port: int):
        self.port, self.target = listen_port, target_port
        self.mode = "pass"
        self.delay = 0.0
        # With mode "drop_responses_to": only answers to requests whose
        # request line matches this pattern are swallowed.
        self.drop_pattern = ""
        # How many answers to drop (None: all of them).
        self.drop_budget = None
        self.reject_pattern, self.reject_status = "", 400
        self.seen: list[tuple[float, str]] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server = None

    def start(self) -> "FaultProxy":
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._conn, "127.0.0.1", self.port), self.loop).result(5)
        return self

    def stop(self):
        async def close():
            self.server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
        asyncio.run_coroutine_threadsafe(close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def requests(self, pattern: str, since: float = 0.0) -> list[str]:
        return [line for t, line in list(self.seen) if t >= since and re.search(pattern, line)]

    async def _conn(self, reader, writer):
        upstream = None
        pump = None
        state = {"last": ""}
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                for m in re.finditer(rb"(GET|POST) (/\S*) HTTP/1\.[01]", chunk):
                    line = f"{m.group(1).decode()} {m.group(2).decode()}"
                    self.seen.append((time.monotonic(), line))
                    state["last"] = line
                if self.mode == "blackhole":
                    continue
                if self.mode == "reject_to" and re.search(self.reject_pattern, state["last"]):
                    writer.write(f"HTTP/1.1 {self.reject_status} Refused\r\ncontent-length: 0\r\n"
                                 "connection: close\r\n\r\n".encode())
                    await writer.drain()
                    break
                if self.delay:
                    await asyncio.sleep(self.delay)
                if upstream is None:
                    try:
                        ureader, upstream = await asyncio.open_connection("127.0.0.1", self.target)
                    except OSError:
                        break
                    pump = asyncio.ensure_future(self._answers(ureader, writer, state))
                upstream.write(chunk)
                await upstream.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            if pump is not None:
                pump.cancel()
            for w in (upstream, writer):
                if w is not None:
                    w.close()

    async def _answers(self, ureader, writer, state):
        try:
            while True:
                chunk = await ureader.read(65536)
                if not chunk:
                    break
                if self.mode in ("blackhole", "drop_responses"):
                    continue
                if self.mode == "drop_responses_to" and re.search(self.drop_pattern, state["last"]) \
                        and (self.drop_budget is None or self.drop_budget > 0):
                    if self.drop_budget is not None:
                        self.drop_budget -= 1
                    continue
                if self.delay:
                    await asyncio.sleep(self.delay)
                writer.write(chunk)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


@pytest.fixture
def interpose(request):
    """interpose(stack) -> FaultProxy: the service moves to a new port and the
    proxy takes its old one, which Envoy's approval cluster points at. The
    test's own reviewer calls go straight to the service."""
    proxies = []

    def put(stack) -> FaultProxy:
        # The proxy reads HTTP/1.1 request lines: the stack must not speak
        # the template's HTTP/2 to the service.
        assert stack.approval_http1, "make_stack(..., approval_http1=True) for a FaultProxy"
        approval = stack.approval
        old_port = approval.port
        approval.proc.stop()
        new_port = free_port()
        approval.config.write_text(approval.config.read_text().replace(
            f'listen = "127.0.0.1:{old_port}"', f'listen = "127.0.0.1:{new_port}"'))
        approval.port, approval.url = new_port, f"http://127.0.0.1:{new_port}"
        approval.start()
        proxy = FaultProxy(old_port, new_port).start()
        proxies.append(proxy)
        return proxy

    yield put
    for p in proxies:
        p.stop()


@pytest.fixture
def small_fs(tmp_path):
    """small_fs(size) -> a directory on its own tmpfs of that size (root only;
    skipped where mounting is not possible, except in CI, where a skip would
    hide that the full-disk tests never ran: there it fails). Unmounted at
    teardown, after the stacks (fixture order) are stopped."""
    mounts = []

    def make(name: str, size: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(d)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            why = f"cannot mount a tmpfs here: {out.stderr.strip()}"
            if os.environ.get("COUNTERSIGN_CI") == "1":
                pytest.fail(why + " (CI must run the full-disk tests: run it as root)")
            pytest.skip(why)
        mounts.append(d)
        return d

    yield make
    for d in mounts:
        if subprocess.run(["umount", str(d)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(d)], capture_output=True)


def move_database(stack, directory: Path):
    """Restart the service with its database in `directory`."""
    approval = stack.approval
    approval.proc.stop()
    new_db = directory / "countersign.db"
    approval.config.write_text(approval.config.read_text().replace(f'database = "{approval.db}"',
                                                                   f'database = "{new_db}"'))
    approval.db = new_db
    approval.start()


def assert_no_forward_without_record(stack):
    """Every request the model saw has exactly one request record."""
    recs = records(stack)
    by_id: dict[str, int] = {}
    for r in recs:
        by_id[rec_field(r, "request_id")] = by_id.get(rec_field(r, "request_id"), 0) + 1
    for rid in forwarded_ids(stack):
        assert by_id.get(rid) == 1, f"forwarded request {rid} has {by_id.get(rid, 0)} records"


FAST = {"callout_timeout_ms": 500, "long_poll_ms": 1000}


# ---------------------------------------------------------------- slow / hanging service

def test_hanging_create_fails_closed_within_the_callout_timeout(make_stack, interpose):
    stack = make_stack(filter_config={**FAST, "hold_timeout_ms": 60000}, approval_http1=True)
    proxy = interpose(stack)
    proxy.mode = "blackhole"
    start = time.monotonic()
    r = post(stack.url, json=chat(text="nobody answers"), timeout=30)
    elapsed = time.monotonic() - start
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "approval_unavailable"
    assert r.headers["x-countersign-outcome"] == "unavailable"
    # Refused after the 0.5 s callout timeout, not after the 60 s hold.
    assert elapsed < 10, elapsed
    assert proxy.requests(r"^POST /v1/reviews$")
    assert stack.backend.stats()["started"] == 0
    assert stack.approval.pending() == []


def test_lost_create_answer_leaves_an_orphan_review_that_releases_nothing(make_stack, interpose):
    stack = make_stack(filter_config={**FAST, "hold_timeout_ms": 60000}, approval_http1=True)
    proxy = interpose(stack)
    proxy.mode = "drop_responses"  # the service stores the review; its answer never arrives
    r = post(stack.url, json=chat(text="answer lost"), timeout=30)
    assert r.status_code == 503 and r.json()["error"]["code"] == "approval_unavailable"
    [orphan] = stack.approval.wait_pending()
    # A reviewer can still approve it (the service cannot know nobody waits),
    # but no Envoy holds the request any more: nothing is released.
    assert stack.approval.decide(orphan["id"], "approve").status_code == 200
    time.sleep(1.0)
    assert stack.backend.stats()["started"] == 0
    assert not [x for x in records(stack) if rec_field(x, "decision") in ("approved", "edited")]


def wait_for_first_poll(proxy, review_id: str):
    """Until the filter's first watch after `review_id` was created went
    through the proxy (the only held request: its worker watches because of
    it): the creation's answer reached the filter. The service lists a
    review as pending once it is committed, before its answer is back, and
    a channel cut in between loses the creation's answer instead (the
    filter then refuses 503 `approval_unavailable`, after its retries)."""
    wait_until(lambda: proxy.requests(r"^POST /v1/watch$"),
               what=f"the filter's first watch (it has the answer creating {review_id})")


def test_hanging_long_poll_is_retried_and_the_hold_completes_once_healed(make_stack, interpose, background):
    stack = make_stack(filter_config={"callout_timeout_ms": 1000, "long_poll_ms": 1000, "hold_timeout_ms": 60000},
                       approval_http1=True)
    proxy = interpose(stack)
    fut = send_later(background, stack.url, chat(text="wait through an outage"))
    [review] = stack.approval.wait_pending()
    wait_for_first_poll(proxy, review["id"])
    proxy.mode = "blackhole"
    cut = time.monotonic()
    # Each long poll hangs until Envoy's callout timeout (poll + callout
    # timeout); the filter retries with backoff instead of giving up. Two
    # polls begun after the cut prove a retry of a hung poll; the timeout
    # is generous because the backoff and the suite's load (two workers on
    # two cores) both stretch the wait.
    try:
        wait_until(lambda: len(proxy.requests(r"^POST /v1/watch$", since=cut)) >= 2, timeout=60,
                   what="two watches during the outage")
    except AssertionError:
        # What the channel saw, and what Envoy made of its calls, for the
        # next reader: a hold that stops polling is a bug, not load.
        seen = [(round(t - cut, 2), line) for t, line in list(proxy.seen)]
        calls = httpx.get(f"http://127.0.0.1:{stack.envoy.admin_port}/stats?filter=countersign_approval",
                          timeout=5).text
        raise AssertionError(f"request lines seen (s after the cut): {seen}\nEnvoy: {calls}")
    # The decision is taken while the channel is down: nothing moves yet.
    assert stack.approval.decide(review["id"], "approve", reason="ok").status_code == 200
    time.sleep(1.0)
    assert not fut.done()
    assert stack.backend.stats()["started"] == 0
    assert stat(stack, "wasmcustom.countersign_held") == 1
    # The channel comes back slow (0.2 s per chunk each way) but working.
    proxy.delay, proxy.mode = 0.2, "pass"
    resp = fut.result(timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-countersign-review-id"] == review["id"]
    assert stack.backend.stats()["started"] == 1
    wait_until(lambda: stat(stack, "wasmcustom.countersign_held") == 0, what="held gauge back to 0")
    assert_no_forward_without_record(stack)


def test_deadline_is_honoured_when_the_channel_never_heals(make_stack, interpose, background):
    stack = make_stack(filter_config={**FAST, "hold_timeout_ms": 4000}, approval_http1=True)
    proxy = interpose(stack)
    start = time.monotonic()
    fut = send_later(background, stack.url, chat(text="stuck forever"))
    [review] = stack.approval.wait_pending()
    wait_for_first_poll(proxy, review["id"])
    proxy.mode = "blackhole"
    resp = fut.result(timeout=60)
    elapsed = time.monotonic() - start
    assert resp.status_code == 504, resp.text
    assert resp.json()["error"]["code"] == "review_timeout"
    # The 4 s deadline, plus at most one poll and one expire call in flight.
    assert elapsed < 4 + 1 + 0.5 + 0.5 + 5, elapsed
    # The service enforces the same deadline by itself: a late approval is refused.
    wait_until(lambda: stack.approval.review(review["id"])["status"] == "expired", timeout=10,
               what="the service expiring the review")
    assert stack.approval.decide(review["id"], "approve").status_code == 409
    assert stack.backend.stats()["started"] == 0
    wait_until(lambda: stat(stack, "wasmcustom.countersign_held") == 0, what="held gauge back to 0")


def lose_record_answer(make_stack, interpose, request_id):
    """An allowed request whose record is stored but whose answer is lost."""
    stack = make_stack(filter_config={**FAST, "rules": [{"name": "load-tests", "model": "demo-allow*", "action": "allow"}]},
                       approval_http1=True)
    proxy = interpose(stack)
    proxy.mode, proxy.drop_pattern = "drop_responses_to", r"^POST /v1/records(/batch)?$"
    r = post(stack.url, json=chat(model="demo-allow", text="record answer lost"), timeout=30,
             headers={"x-request-id": request_id})
    proxy.mode = "pass"
    return stack, r


def test_lost_record_answer_fails_closed(make_stack, interpose):
    stack, r = lose_record_answer(make_stack, interpose, "lost-record-answer")
    # No confirmed record, no forward.
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "audit_record_unavailable"
    assert stack.backend.stats()["started"] == 0
    verify_chain(stack)


def test_lost_record_answer_leaves_exactly_one_truthful_record(make_stack, interpose):
    # The pre-forward record was stored, every answer to it lost: the filter
    # refused the request it never forwarded. The record must not say
    # "allowed" and stop there, nor may a second record contradict it: the
    # refusal becomes that record's outcome.
    stack, r = lose_record_answer(make_stack, interpose, "lost-record-answer")
    assert r.status_code == 503
    recs = wait_until(lambda: (x := records(stack, request_id="lost-record-answer"))
                      and x[0].get("response") and x, what="the record's outcome")
    assert len(recs) == 1, recs
    [rec] = recs
    assert rec_field(rec, "decision") == "allowed"  # what policy decided
    outcome = rec["response"]
    assert (outcome["completion"], outcome["status"], outcome["blocked_by"]) == (
        "not_forwarded", 503, "audit_record_unavailable"), outcome
    assert stack.backend.stats()["started"] == 0
    verify_chain(stack)


def test_one_lost_record_answer_is_retried_without_a_second_record(make_stack, interpose):
    stack = make_stack(filter_config={**FAST, "rules": [{"name": "load-tests", "model": "demo-allow*", "action": "allow"}]},
                       approval_http1=True)
    proxy = interpose(stack)
    proxy.mode, proxy.drop_pattern, proxy.drop_budget = "drop_responses_to", r"^POST /v1/records(/batch)?$", 1
    r = post(stack.url, json=chat(model="demo-allow", text="first answer lost"), timeout=30,
             headers={"x-request-id": "one-lost-answer"})
    proxy.mode = "pass"
    # The retry carries the same idempotency key: the service answers with
    # the record it already wrote, and the request goes through.
    assert r.status_code == 200, r.text
    recs = records(stack, request_id="one-lost-answer")
    assert [rec_field(x, "decision") for x in recs] == ["allowed"], recs
    assert stack.backend.stats()["completed"] == 1
    verify_chain(stack)


# ---------------------------------------------------------------- lost answer to a token consume

def test_a_lost_consume_answer_does_not_burn_the_token(make_stack, interpose):
    stack = make_stack(filter_config=async_filter_config([("k1", K1)], **FAST),
                       approval_extra=service_extra([("k1", K1)]), approval_http1=True)
    proxy = interpose(stack)
    accepted, st = approved_status(stack, chat(text="consume answer lost"))
    # The service spends the use; its answer never reaches the filter.
    consume = rf"^POST /v1/reviews/{accepted['id']}/consume$"
    proxy.mode, proxy.drop_pattern, proxy.drop_budget = "drop_responses_to", consume, 1
    r = retry(stack, st)
    proxy.mode = "pass"
    assert proxy.drop_budget == 0, "the first answer was not dropped"
    # The filter asked again with the same idempotency key and was told the
    # use it had spent: the request went through, once.
    assert r.status_code == 200, r.text
    assert len(proxy.requests(consume)) == 2
    assert stack.approval.review(accepted["id"])["token_uses"] == 1
    assert stack.backend.stats()["completed"] == 1
    # Another request with the same token is still a replay.
    again = retry(stack, st)
    assert again.status_code == 403, again.text
    assert again.json()["error"]["code"] == "approval_token_used"
    assert stack.backend.stats()["started"] == 1
    verify_chain(stack)


def test_a_record_that_cannot_be_written_leaves_the_token_unspent(make_stack, interpose):
    # Single-use token, approved. The pre-forward record is written before
    # the use is spent: while no record can be confirmed the request is
    # refused and the token is never spent, so the caller's approval is not
    # burned and the same token goes through once the service is back.
    stack = make_stack(filter_config=async_filter_config([("k1", K1)], **FAST),
                       approval_extra=service_extra([("k1", K1)]), approval_http1=True)
    proxy = interpose(stack)
    accepted, st = approved_status(stack, chat(text="record lost before the spend"))
    consume = rf"^POST /v1/reviews/{accepted['id']}/consume$"
    proxy.mode, proxy.drop_pattern = "drop_responses_to", r"^POST /v1/records(/batch)?$"
    since = time.monotonic()
    r = retry(stack, st)
    proxy.mode = "pass"
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "audit_record_unavailable"
    assert proxy.requests(r"^POST /v1/records(/batch)?$", since), "no record was attempted"
    assert proxy.requests(consume) == []
    assert stack.approval.review(accepted["id"])["token_uses"] == 0
    assert stack.backend.stats()["started"] == 0
    ok = retry(stack, st)
    assert ok.status_code == 200, ok.text
    assert stack.approval.review(accepted["id"])["token_uses"] == 1
    assert stack.backend.stats()["completed"] == 1
    verify_chain(stack)


def test_a_spend_refused_after_the_record_completes_that_record(make_stack):
    # A replayed token: its record is written first, then the spend is
    # refused (409). The refusal becomes that record's outcome, so one
    # record says the request was presented with a token and not forwarded.
    stack = make_stack(filter_config=async_filter_config([("k1", K1)], **FAST),
                       approval_extra=service_extra([("k1", K1)]))
    accepted, st = approved_status(stack, chat(text="spent twice"))
    assert retry(stack, st).status_code == 200
    headers = {"authorization": "Bearer " + CALLERS["ci-batch"], "content-type": "application/json",
               "x-countersign-approval": st["approval_token"], "x-request-id": "replayed-token"}
    replay = httpx.post(stack.url + "/v1/chat/completions", content=st["approved_body"].encode(),
                        headers=headers, timeout=20)
    assert replay.status_code == 403, replay.text
    assert replay.json()["error"]["code"] == "approval_token_used"
    recs = wait_until(lambda: (x := records(stack, request_id="replayed-token"))
                      and x[0].get("response") and x, what="the replay's record outcome")
    assert len(recs) == 1, recs
    [rec] = recs
    assert (rec_field(rec, "decision"), rec_field(rec, "review_id")) == ("token", accepted["id"])
    outcome = rec["response"]
    assert (outcome["completion"], outcome["status"], outcome["blocked_by"]) == (
        "not_forwarded", 403, "approval_token_used"), outcome
    assert stack.backend.stats()["completed"] == 1
    verify_chain(stack)


# ---------------------------------------------------------------- a spot check's audit never filed

def test_an_audit_never_filed_is_counted_and_its_record_says_it_was_due(make_stack, interpose):
    # share 1: every allowed request is forwarded and an audit of it queued
    # through the outbox. The service refuses the audit's creation (a 4xx,
    # given up at once): the request went to the model and nobody will ever
    # review it. That must not pass unnoticed: the record says an audit was
    # due, and the gateway counts the lost audit.
    stack = make_stack(filter_config={**FAST, "rules": [
        {"name": "open", "action": "allow", "spot_check": {"share": 1, "mode": "audit"}}]},
        approval_http1=True)
    proxy = interpose(stack)
    proxy.mode, proxy.reject_pattern = "reject_to", r"^POST /v1/reviews$"
    r = post(stack.url, json=chat(text="audit me, if you can"), timeout=30,
             headers={"x-request-id": "audit-lost"})
    assert r.status_code == 200, r.text
    wait_until(lambda: stat(stack, "wasmcustom.countersign_spot_checks_lost_total") == 1,
               what="the lost audit counted")
    proxy.mode = "pass"
    [rec] = records(stack, request_id="audit-lost")
    assert (rec_field(rec, "decision"), rec_field(rec, "audit_due")) == ("allowed", True), rec
    with stack.approval.client() as c:
        audits = c.get("/api/reviews", params={"mode": "audit"}).json()["reviews"]
    assert audits == []
    # A request the audit of which was filed is due as well, and has one.
    r = post(stack.url, json=chat(text="audit me"), timeout=30, headers={"x-request-id": "audit-filed"})
    assert r.status_code == 200, r.text
    [rec] = records(stack, request_id="audit-filed")
    assert rec_field(rec, "audit_due") is True
    with stack.approval.client() as c:
        [audit] = wait_until(lambda: c.get("/api/reviews", params={"mode": "audit"}).json()["reviews"] or None,
                             what="the audit review")
    assert stat(stack, "wasmcustom.countersign_spot_checks_lost_total") == 1
    verify_chain(stack)


# ---------------------------------------------------------------- Envoy restarted with requests held

# The service's hold_grace_ms in the Envoy-restart test: a hold counts as
# gone this long after its last long poll.
HOLD_GRACE_MS = 2000


def test_envoy_restart_with_requests_held_releases_nothing(make_stack, background):
    # The deadline leaves room for an Envoy restart on a busy machine: the
    # first review must still be pending when it is approved below.
    stack = make_stack(filter_config={"hold_timeout_ms": 15000, "long_poll_ms": 1000,
                                      "rules": [{"name": "load-tests", "model": "demo-allow*", "action": "allow"}]},
                       approval_extra=f"hold_grace_ms = {HOLD_GRACE_MS}")
    futs = [send_later(background, stack.url, chat(text=f"held {i}"), timeout=30) for i in range(3)]
    held = stack.approval.wait_pending(count=3)
    held_ids = {r["id"] for r in held}
    held_request_ids = {r["request_id"] for r in held}
    # Envoy dies abruptly (no drain, no cancel calls).
    stack.envoy.proc.kill()
    killed_at = time.monotonic()
    for f in futs:
        with pytest.raises(httpx.HTTPError):
            f.result(timeout=15).raise_for_status()
    assert stack.backend.stats()["started"] == 0

    # A new Envoy with the same configuration: nothing is carried over.
    stack.envoy.start()
    assert post(stack.url, json=chat(model="demo-allow", text="fresh")).status_code == 200
    # Approving an old review now releases nothing, as no Envoy holds it,
    # and the reviewer is told so: once the grace after the last long poll
    # (at most one long poll before the kill) has passed, the review is
    # abandoned, not approved.
    time.sleep(max(0.0, killed_at + 1.0 + HOLD_GRACE_MS / 1000 + 0.5 - time.monotonic()))
    first, *rest = sorted(held_ids)
    r = stack.approval.decide(first, "approve", reason="too late")
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "review_abandoned", r.text
    assert "nothing was released" in r.json()["error"]["message"]
    abandoned = stack.approval.review(first)
    assert (abandoned["status"], abandoned["reviewer"]) == ("abandoned", None), abandoned
    time.sleep(1.5)
    assert stack.backend.stats()["started"] == 1  # only the fresh request
    # The others expire by the service's own deadline and cannot be approved.
    for rid in rest:
        wait_until(lambda rid=rid: stack.approval.review(rid)["status"] == "expired", timeout=30,
                   what=f"{rid} expired")
        assert stack.approval.decide(rid, "approve").status_code == 409
    # No held request has a record of being forwarded.
    forwarded = {rec_field(x, "request_id") for x in records(stack)
                 if rec_field(x, "decision") in ("approved", "edited", "allowed")}
    assert not forwarded & held_request_ids
    assert_no_forward_without_record(stack)
    verify_chain(stack)


# ---------------------------------------------------------------- invalid configuration pushed at run time

def lds_stack(make_stack, config):
    """A stack whose listener comes from a file (LDS) that the test rewrites."""
    stack = make_stack(filter_config=config)
    envoy = stack.envoy
    envoy.stop()
    doc = yaml.safe_load(envoy.yaml.read_text())
    listeners = doc["static_resources"].pop("listeners")
    lds_dir = envoy.yaml.parent / "lds"
    lds_dir.mkdir()
    doc["node"] = {"id": "countersign-test", "cluster": "countersign-test"}
    doc["dynamic_resources"] = {"lds_config": {"resource_api_version": "V3", "path_config_source": {
        "path": str(lds_dir / "lds.yaml"), "watched_directory": {"path": str(lds_dir)}}}}
    envoy.yaml.write_text(yaml.safe_dump(doc))
    stack.lds_template = listeners
    stack.lds_dir = lds_dir
    push_plugin_config(stack, config)
    envoy.start()
    return stack


def push_plugin_config(stack, config):
    """Atomically replaces the LDS file with one whose countersign plugin
    configuration is `config` (a dict, given the stack's filter token, or a
    raw string, sent as it is)."""
    listeners = copy.deepcopy(stack.lds_template)
    hcm = listeners[0]["filter_chains"][0]["filters"][0]["typed_config"]
    [wasm] = [f for f in hcm["http_filters"] if f["name"] == "countersign"]
    if isinstance(config, dict) and stack.filter_token:
        config = {**config, "approval_token": stack.filter_token}
    wasm["typed_config"]["config"]["configuration"]["value"] = (
        config if isinstance(config, str) else json.dumps(config))
    resources = [{"@type": "type.googleapis.com/envoy.config.listener.v3.Listener", **ls} for ls in listeners]
    tmp = stack.lds_dir / ".lds.tmp"
    tmp.write_text(yaml.safe_dump({"version_info": str(time.time_ns()), "resources": resources}))
    os.rename(tmp, stack.lds_dir / "lds.yaml")


def lds_counter(stack, name):
    return stat(stack, f"listener_manager.lds.{name}")


def test_invalid_plugin_configuration_pushed_at_run_time_is_rejected_loudly(make_stack, background):
    allow = {"rules": [{"name": "load-tests", "model": "demo-allow*", "action": "allow"}]}
    stack = lds_stack(make_stack, allow)
    assert post(stack.url, json=chat(model="demo-allow")).status_code == 200

    # A valid push is applied: the same model is now denied.
    tighter = {"rules": [{"name": "lockdown", "model": "demo-allow*", "action": "deny"}]}
    push_plugin_config(stack, tighter)
    wait_until(lambda: lds_counter(stack, "update_success") >= 2, what="valid LDS update applied")
    wait_until(lambda: post(stack.url, json=chat(model="demo-allow")).status_code == 403, timeout=10,
               what="the new listener denying")
    started = stack.backend.stats()["started"]

    # Invalid pushes: an unknown field, and JSON that is not even JSON.
    for bad, field in [({"rules": [{"name": "x", "model": "demo-allow*", "action": "allow", "modle": "x"}]},
                        "rules[0].modle"),
                       ('{"rules": [', None)]:
        rejected = lds_counter(stack, "update_rejected")
        push_plugin_config(stack, bad)
        wait_until(lambda: lds_counter(stack, "update_rejected") > rejected, what="LDS update rejected")
        log = stack.envoy.proc.log_text()
        assert "invalid plugin configuration" in log
        if field:
            assert f"field `{field}`" in log
        assert "config rejected: Unable to create Wasm plugin countersign" in log
        # Envoy keeps the last good listener: the valid, stricter config still rules.
        r = post(stack.url, json=chat(model="demo-allow"))
        assert r.status_code == 403 and "lockdown" in r.json()["error"]["message"]
        fut = send_later(background, stack.url, chat(model="demo-echo", text="still reviewed"))
        [review] = stack.approval.wait_pending()
        stack.approval.decide(review["id"], "reject", reason="no")
        assert fut.result(15).status_code == 403
        assert stack.envoy.proc.alive()
    assert stack.backend.stats()["started"] == started

    # Envoy restarted with the bad file in place: the listener is never
    # created, so nothing is served at all (connection refused), rather
    # than served unfiltered.
    rejections = stack.envoy.proc.log_text().count("Filesystem config update rejected")
    stack.envoy.stop()
    stack.envoy.start()
    wait_until(lambda: stack.envoy.proc.log_text().count("Filesystem config update rejected") > rejections,
               what="the bad LDS file rejected at start-up")
    with pytest.raises(httpx.ConnectError):
        post(stack.url, json=chat(model="demo-allow"), timeout=5)
    assert stack.backend.stats()["started"] == started


# ---------------------------------------------------------------- quorum survives a restart

def test_partial_approvals_of_a_two_person_review_survive_a_service_restart(make_stack, background):
    stack = make_stack(filter_config={"long_poll_ms": 1000, "rules": [
        {"name": "two-person", "model": "prod-*", "action": "review", "approvals": 2}]})
    fut = send_later(background, stack.url, chat(model="prod-large", text="needs two"))
    [review] = stack.approval.wait_pending()
    assert stack.approval.decide(review["id"], "approve", reviewer="alice").status_code == 200
    assert stack.approval.review(review["id"])["approval_count"] == 1
    stack.approval.proc.kill()
    time.sleep(1.5)
    assert not fut.done()
    stack.approval.start()
    detail = stack.approval.review(review["id"])
    assert detail["status"] == "pending" and detail["approval_count"] == 1
    assert [a["reviewer"] for a in detail["approvals"]] == ["alice"]
    # The same reviewer cannot count twice after the restart either.
    assert stack.approval.decide(review["id"], "approve", reviewer="alice").status_code == 409
    time.sleep(1.0)
    assert not fut.done() and stack.backend.stats()["started"] == 0
    assert stack.approval.decide(review["id"], "approve", reviewer="bob").status_code == 200
    resp = fut.result(timeout=20)
    assert resp.status_code == 200, resp.text
    assert stack.backend.stats()["started"] == 1
    final = stack.approval.review(review["id"])
    assert final["status"] == "approved"
    assert sorted(a["reviewer"] for a in final["approvals"]) == ["alice", "bob"]


# ---------------------------------------------------------------- the database: read-only, full

def test_read_only_database_fails_closed_and_loudly(small_fs, make_stack, background):
    stack = make_stack(filter_config={"long_poll_ms": 1000, "hold_timeout_ms": 60000,
                                      "rules": [{"name": "load-tests", "model": "demo-allow*", "action": "allow"}]})
    d = small_fs("db", "8m")
    move_database(stack, d)
    assert post(stack.url, json=chat(model="demo-allow")).status_code == 200
    fut = send_later(background, stack.url, chat(text="held across the outage"))
    [review] = stack.approval.wait_pending()

    # The volume turns read-only (as after a disk error); the service is
    # restarted onto it and refuses to run rather than serve without writes.
    stack.approval.proc.stop()
    subprocess.run(["mount", "-o", "remount,ro", str(d)], check=True)
    stack.approval.proc.start()
    wait_until(lambda: not stack.approval.proc.alive(), timeout=10, what="service refusing to start")
    assert stack.approval.proc.popen.returncode != 0
    assert f"countersign-approval: cannot open the database {stack.approval.db}: database:" \
        in stack.approval.proc.log_text()

    for body in (chat(text="new while read-only"), chat(model="demo-allow", text="allowed while read-only")):
        r = post(stack.url, json=body, timeout=30)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] in ("approval_unavailable", "audit_record_unavailable")
    assert not fut.done()  # the held request keeps waiting (the review is safe on disk)
    assert stack.backend.stats()["started"] == 1

    subprocess.run(["mount", "-o", "remount,rw", str(d)], check=True)
    stack.approval.start()
    assert stack.approval.decide(review["id"], "approve").status_code == 200
    assert fut.result(timeout=20).status_code == 200
    assert stack.backend.stats()["started"] == 2
    assert_no_forward_without_record(stack)
    verify_chain(stack)


def fill(directory: Path) -> Path:
    """Fills the filesystem of `directory` to the last byte."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
        try:
            while True:
                f.write(b"\0" * 512)
        except OSError:
            pass
    return filler


def test_full_disk_refuses_clearly_and_claims_no_record_it_did_not_write(small_fs, make_stack, background):
    # The filter keeps polling for its held request while the disk is full,
    # but the service cannot write that the hold is alive: it must not call
    # the hold gone (409 review_abandoned) once the disk has room again.
    grace_ms = 4000  # above the filter's longest retry delay (2 s)
    stack = make_stack(filter_config={"long_poll_ms": 1000, "rules": [
        {"name": "load-tests", "model": "demo-allow*", "action": "allow"}]},
        approval_extra=f"hold_grace_ms = {grace_ms}")
    d = small_fs("db", "6m")
    move_database(stack, d)
    assert post(stack.url, json=chat(model="demo-allow", text="before")).status_code == 200
    fut = send_later(background, stack.url, chat(text="held before the disk fills"))
    [review] = stack.approval.wait_pending()
    filler = fill(d)

    big = "x" * 400_000  # far more than any slack left in the WAL
    outcomes = []
    for i in range(3):
        r = post(stack.url, json=chat(model="demo-allow", text=f"allowed {i} {big}"), timeout=30)
        outcomes.append(r.status_code)
        assert r.status_code in (200, 503), r.text
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "audit_record_unavailable"
        r = post(stack.url, json=chat(text=f"held {i} {big}"), timeout=30)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "approval_unavailable"
    assert 503 in outcomes
    # A decision is a write too: it is refused (500, nothing released) unless
    # it still fits in the space SQLite already holds. Reads keep working.
    decided = stack.approval.decide(review["id"], "approve")
    assert decided.status_code in (200, 500), decided.text
    assert stack.approval.proc.alive()
    expected = "approved" if decided.status_code == 200 else "pending"
    assert stack.approval.review(review["id"])["status"] == expected

    # Polls fail for longer than the grace before the disk has room again.
    time.sleep(grace_ms / 1000 + 1)
    filler.unlink()
    if decided.status_code != 200:
        assert not fut.done()
        assert stack.approval.decide(review["id"], "approve").status_code == 200
    assert fut.result(timeout=20).status_code == 200
    # Service recovered without a restart.
    assert post(stack.url, json=chat(model="demo-allow", text="after")).status_code == 200
    assert_no_forward_without_record(stack)
    verify_chain(stack)
    log = stack.approval.proc.log_text()
    assert "database or disk is full" in log
