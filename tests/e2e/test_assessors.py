"""Assessors and automatic decisions in a real Envoy: a second demo backend
plays the OpenAI moderation endpoint and a Llama-Guard-style guard model
(their exact formats), the approval service asks both about each new
review, and a rule's `auto_approve` / `auto_deny` lets the service decide.
A harmless prompt is released without a person; a flagged one waits for a
human; with the assessors down, every prompt waits for a human."""
import httpx
import pytest

from conftest import chat, emptied, module_stack, send_later
from stack import DEFAULT_FILTER_CONFIG, Backend, stat, wait_until

pytestmark = pytest.mark.timeout(120)

FILTER_CONFIG = {
    **DEFAULT_FILTER_CONFIG,
    "masking": {"profiles": {"default": {"detectors": {"email": "redact"}}}},
    "rules": [{
        "name": "assessed",
        "action": "review",
        "hold_timeout_ms": 60000,
        "auto_approve": {"max_score": 0.5, "unless_hits": ["email"]},
        "auto_deny": {"labels": ["S2"]},
    }],
}


def assessors_toml(url: str) -> str:
    return f"""
[[assessors]]
name = "moderation"
kind = "moderation"
url = "{url}/v1/moderations"
model = "omni-moderation-latest"
timeout_ms = 2000

[[assessors]]
name = "guard"
kind = "guard_model"
url = "{url}/v1/chat/completions"
model = "llama-guard-3-1b"
timeout_ms = 2000
"""


@pytest.fixture(scope="module")
def assessed_gw(tmp_path_factory, request):
    """(stack, assessor backend) for the module's tests that share them: the
    assessors are a demo backend of their own. Each test decides every
    review it holds; starting Envoy, which compiles the filter, is most of
    a stack's start."""
    assessor = Backend(tmp_path_factory.mktemp("assessor"), name="assessor-backend").start()
    try:
        with module_stack(tmp_path_factory, request, "assessed", FILTER_CONFIG,
                          approval_extra=assessors_toml(assessor.url)) as s:
            yield s, assessor
    finally:
        assessor.proc.stop()


@pytest.fixture
def assessed(assessed_gw):
    """The module's stack and assessor, with both request logs emptied."""
    stack, assessor = assessed_gw
    httpx.post(assessor.url + "/_demo/reset").raise_for_status()
    return emptied(stack), assessor


@pytest.fixture
def own_assessed(make_stack, tmp_path):
    """(stack, assessor backend) of a test's own, for a test that stops the assessor."""
    assessor = Backend(tmp_path, name="assessor-backend").start()
    try:
        yield make_stack(filter_config=FILTER_CONFIG, approval_extra=assessors_toml(assessor.url)), assessor
    finally:
        assessor.proc.stop()


def test_a_harmless_prompt_is_released_by_the_assessors_without_a_person(assessed):
    stack, assessor = assessed
    from conftest import post
    resp = post(stack.url, json=chat(text="what is the capital of France?"), timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == "echo: what is the capital of France?"
    assert resp.headers["x-countersign-outcome"] == "approved"
    review = stack.approval.review(resp.headers["x-countersign-review-id"])
    assert review["status"] == "approved"
    assert review["automatic"] is True
    assert review["reviewer"] == "assessor:moderation+guard"
    assert review["approvals"][0]["reviewer"] == "assessor:moderation+guard"
    kinds = [(a["assessor"], a["kind"], a.get("error")) for a in review["assessment"]["assessments"]]
    assert kinds == [("moderation", "moderation", None), ("guard", "guard_model", None)]
    # Both assessors were really asked, in their own formats.
    seen = {r["path"]: r for r in assessor.requests()}
    assert set(seen) == {"/v1/moderations", "/v1/chat/completions"}, seen.keys()
    # The record keeps the assessors' report and who decided.
    from stack import records
    [rec] = records(stack, review_id=review["id"])
    assert rec["review"]["automatic"] is True
    assert rec["review"]["assessment"]["outcome"]["decision"] == "approve"
    assert stack.backend.stats()["completed"] == 1


def test_a_flagged_prompt_waits_for_a_human(assessed, background):
    stack, _ = assessed
    fut = send_later(background, stack.url, chat(text="how do I build a bomb"))
    [review] = stack.approval.wait_pending()
    detail = wait_until(lambda: (d := stack.approval.review(review["id"]))["assessment"] and d,
                        what="the assessors' report")
    assert detail["status"] == "pending"
    assert detail["assessment"]["outcome"]["decision"] == "for_people"
    moderation = detail["assessment"]["assessments"][0]
    assert moderation["flagged"] is True
    assert any(l["name"] == "violence" and l["flagged"] for l in moderation["labels"])
    guard = detail["assessment"]["assessments"][1]
    assert [l["name"] for l in guard["labels"]] == ["S1"]
    wait_until(lambda: stat(stack, "wasmcustom.countersign_held") == 1, what="the request held")
    assert stack.backend.stats()["started"] == 0
    assert stack.approval.decide(review["id"], "reject", reason="no bombs").status_code == 200
    assert fut.result(timeout=15).status_code == 403


def test_a_denied_label_rejects_without_a_person(assessed):
    stack, _ = assessed
    from conftest import post
    resp = post(stack.url, json=chat(text="help me steal a car"), timeout=30)
    assert resp.status_code == 403, resp.text
    assert resp.headers["x-countersign-outcome"] == "rejected"
    assert "S2" in resp.json()["error"]["message"]
    assert stack.backend.stats()["started"] == 0


def test_masked_evidence_keeps_the_review_for_a_human_and_is_shown(assessed, background):
    stack, _ = assessed
    body = chat(text="write to ann@example.com and bob@example.com",
                tools=[{"type": "function", "function": {"name": "run_shell", "parameters": {"type": "object"}}}])
    fut = send_later(background, stack.url, body)
    [review] = stack.approval.wait_pending()
    detail = wait_until(lambda: (d := stack.approval.review(review["id"]))["assessment"] and d,
                        what="the assessors' report")
    assert detail["status"] == "pending"
    assert "`email` fired" in detail["assessment"]["outcome"]["why"]
    assert detail["evidence"]["tools"] == ["run_shell"]
    assert {"name": "email", "action": "redact", "count": 2} in detail["evidence"]["hits"]
    assert stack.approval.decide(review["id"], "approve").status_code == 200
    assert fut.result(timeout=15).status_code == 200


def test_an_assessor_outage_leaves_every_prompt_to_a_human(own_assessed, background):
    stack, assessor = own_assessed
    assessor.proc.stop()
    fut = send_later(background, stack.url, chat(text="what is the capital of France?"))
    [review] = stack.approval.wait_pending()
    detail = wait_until(lambda: (d := stack.approval.review(review["id"]))["assessment"] and d,
                        what="the assessors' report", timeout=15)
    assert detail["status"] == "pending"
    assert all(a["error"] for a in detail["assessment"]["assessments"]), detail["assessment"]
    assert "failed" in detail["assessment"]["outcome"]["why"]
    assert stack.backend.stats()["started"] == 0
    assert not fut.done()
    assert stack.approval.decide(review["id"], "approve").status_code == 200
    resp = fut.result(timeout=15)
    assert resp.status_code == 200
    assert stack.approval.review(review["id"])["automatic"] is False



def test_a_rule_that_names_one_assessor_calls_only_that_one(make_stack, tmp_path):
    """`[rule_assessors]` gives rule `assessed` the guard model only: the
    moderation endpoint is never asked, and the guard alone approves."""
    from conftest import post
    assessor = Backend(tmp_path, name="assessor-backend").start()
    try:
        extra = assessors_toml(assessor.url) + '\n[rule_assessors]\nassessed = ["guard"]\n'
        stack = make_stack(filter_config=FILTER_CONFIG, approval_extra=extra)
        resp = post(stack.url, json=chat(text="what is the capital of France?"), timeout=30)
        assert resp.status_code == 200, resp.text
        review = stack.approval.review(resp.headers["x-countersign-review-id"])
        assert (review["automatic"], review["reviewer"]) == (True, "assessor:guard")
        assert [a["assessor"] for a in review["assessment"]["assessments"]] == ["guard"]
        assert [r["path"] for r in assessor.requests()] == ["/v1/chat/completions"]
    finally:
        assessor.proc.stop()

# ------------------------------------------------------------------ Presidio

PRESIDIO_CONFIG = {
    **DEFAULT_FILTER_CONFIG,
    "rules": [{
        "name": "pii-assessed",
        "action": "review",
        "hold_timeout_ms": 60000,
        "auto_approve": {"max_score": 0.5},
        "auto_deny": {"labels": ["CREDIT_CARD"], "min_score": 0.9},
    }],
}


@pytest.fixture
def presidio(tmp_path):
    """Presidio's analyzer (the package from PyPI, pattern recognizers) on
    its REST contract; stopped by PID at the end."""
    pytest.importorskip("presidio_analyzer", reason="presidio-analyzer is installed by ./dev test")
    import sys
    from pathlib import Path
    from stack import Proc, free_port, wait_started
    port = free_port()
    proc = Proc("presidio", [sys.executable, str(Path(__file__).parent / "presidio_server.py"), str(port)],
                tmp_path / "presidio.log").start()
    try:
        wait_started(proc, f"http://127.0.0.1:{port}/health", "presidio analyzer", timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


def test_presidio_entities_decide_with_their_scores(make_stack, presidio):
    from conftest import post
    extra = f"""
[[assessors]]
name = "pii"
kind = "presidio"
url = "{presidio}/analyze"
timeout_ms = 5000
"""
    stack = make_stack(filter_config=PRESIDIO_CONFIG, approval_extra=extra)
    resp = post(stack.url, json=chat(text="please summarise the meeting notes"), timeout=30)
    assert resp.status_code == 200, resp.text
    review = stack.approval.review(resp.headers["x-countersign-review-id"])
    assert (review["automatic"], review["reviewer"]) == (True, "assessor:pii")
    assert review["assessment"]["assessments"][0]["labels"] == []

    resp = post(stack.url, json=chat(text="charge my card 4111 1111 1111 1111 today"), timeout=30)
    assert resp.status_code == 403, resp.text
    review = stack.approval.review(resp.json()["error"]["review_id"])
    assert review["automatic"] is True and review["status"] == "rejected"
    [label] = [l for l in review["assessment"]["assessments"][0]["labels"] if l["name"] == "CREDIT_CARD"]
    assert label["score"] >= 0.9
    assert stack.backend.stats()["started"] == 1
