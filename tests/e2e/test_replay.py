"""Policy replay end to end: requests through Envoy and the filter leave
session records; `countersign-approval replay` tries a stricter and a looser
draft plugin configuration on them and names the requests that would flip;
the record chain is the same afterwards (replay only reads)."""
import json
import subprocess

import pytest

from conftest import chat, post, send_later
from stack import BINARIES, rec_field, records, verify_records, wait_until

pytestmark = pytest.mark.timeout(180)


def replay(stack, draft_path, draft, *extra):
    draft_path.write_text(json.dumps(draft))
    out = subprocess.run([str(BINARIES / "countersign-approval"), "replay", "--json", "--database",
                          str(stack.approval.db), "--plugin-config", str(draft_path), *extra],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def flips(report):
    """(model, outcome before, outcome under the draft, the draft's rule) of each flip."""
    return sorted((f["model"], f["from"]["outcome"], f["to"]["outcome"], f["to"]["rule"])
                  for f in report["flips"])


def test_a_stricter_and_a_looser_draft_flip_the_recorded_requests(make_stack, background, tmp_path):
    stack = make_stack(filter_config={"hold_timeout_ms": 10000, "long_poll_ms": 500, "rules": [
        {"name": "load-tests", "model": "demo-allow*", "action": "allow"}]})
    # Allowed by the rule: one harmless, one that names a launch code.
    assert post(stack.url, json=chat(model="demo-allow-a", text="summarise the log")).status_code == 200
    assert post(stack.url, json=chat(model="demo-allow-b", text="what is the launch code")).status_code == 200
    # Reviewed: one approved, one rejected.
    fut = send_later(background, stack.url, chat(model="demo-big", text="plan the migration"))
    [rev] = stack.approval.wait_pending()
    stack.approval.decide(rev["id"], "approve", reason="ok")
    assert fut.result(15).status_code == 200
    fut = send_later(background, stack.url, chat(model="demo-echo", text="drop the table"))
    [rev] = stack.approval.wait_pending()
    stack.approval.decide(rev["id"], "reject", reason="no")
    assert fut.result(15).status_code == 403
    # Refused by the filter before its body was recorded.
    assert post(stack.url, json={"model": "demo-echo"}).status_code == 400

    recs = wait_until(lambda: len(records(stack)) >= 5 and records(stack), timeout=10, what="five records")
    assert sorted(rec_field(r, "decision") for r in recs) == [
        "allowed", "allowed", "approved", "invalid", "rejected"]
    before = verify_records(stack)
    assert before.returncode == 0, before.stdout + before.stderr

    strict = replay(stack, tmp_path / "strict.json", {
        "rules": [{"name": "no-big", "model": "demo-big", "action": "deny"},
                  {"name": "load-tests", "model": "demo-allow*", "action": "allow"}],
        "content_policy": {"request_rules": [{"name": "launch", "phrases": ["launch code"]}]}})
    assert (strict["records"], strict["replayed"]) == (5, 4), strict
    assert flips(strict) == [("demo-allow-b", "allow", "deny", "launch"),
                             ("demo-big", "review", "deny", "no-big")], strict
    assert strict["before"] == {"allow": 2, "review": 2}, strict
    assert strict["after"] == {"allow": 1, "deny": 2, "review": 1}, strict
    [skipped] = strict["skipped"]
    assert "before its body was recorded" in skipped["reason"], skipped

    loose = replay(stack, tmp_path / "loose.json", {"default_action": "allow"})
    assert flips(loose) == [("demo-big", "review", "allow", "default"),
                            ("demo-echo", "review", "allow", "default")], loose

    after = verify_records(stack)
    assert after.returncode == 0 and after.stdout == before.stdout, (before.stdout, after.stdout)
