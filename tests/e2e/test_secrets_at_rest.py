"""Nothing secret is logged or stored in the clear. After one run that uses
every path that handles a secret (masked values in a prompt and a stream,
caller keys, the model key injected from Envoy's environment, reviewer
tokens and a browser session, an approval token spent by an asynchronous
caller, the filter token), none of them is in Envoy's log (which carries the
access log), the service's log, the database (a PostgreSQL dump) or a
records export. Prompt text is stored for reviewers and the audit trail, by
design, and logged nowhere."""
import base64
import json
import subprocess

import httpx
import pytest

from conftest import chat, send_later
from stack import BINARIES, REVIEWERS, sha256_hex, wait_until
from test_masking import AWS, EMAIL, MASKING

pytestmark = pytest.mark.timeout(180)

CALLERS = {"dana": "ck-dana-secret-0123456789abcdef", "ci-batch": "ck-batch-secret-0123456789abcdef"}
MODEL_KEY = "sk-model-key-at-rest-0123456789"
FILTER_TOKEN = "filter-token-at-rest-0123456789abcdef"
TOKEN_SECRET = base64.b64encode(b"at-rest-signing-key-0123456789ab").decode()
# Stored on purpose (the reviewer reads it, the record keeps it), logged never.
PROMPT_MARK = "quarterly-plan-zebra-7731"


def filter_config():
    return {
        "identity": {"source": "api_key", "api_keys": [
            {"sha256": sha256_hex(key), "caller": name, "groups": ["eng"]} for name, key in CALLERS.items()]},
        "upstream_credential": {"header": "authorization", "prefix": "Bearer ", "value_env": "COUNTERSIGN_UPSTREAM_KEY"},
        "approval_tokens": {"keys": [{"id": "k1", "secret": TOKEN_SECRET}]},
        "masking": MASKING,
        "rules": [
            {"name": "allowed-models", "model": "demo-allow*", "action": "allow"},
            {"name": "batch-async", "caller": "ci-batch", "action": "review", "async": True},
        ],
    }


def as_caller(name, **extra):
    return {"authorization": f"Bearer {CALLERS[name]}", **extra}


def sign_in(approval, reviewer: str) -> tuple[str, str]:
    """Signs in on the UI's form as a browser does: the session cookie and its CSRF token."""
    r = httpx.post(approval.url + "/ui/login", data={"token": REVIEWERS[reviewer], "next": "/"},
                   headers={"origin": approval.url}, timeout=10)
    assert r.status_code == 303, r.text
    cookie = r.headers["set-cookie"].split(";")[0]
    me = httpx.get(approval.url + "/api/me", headers={"cookie": cookie}, timeout=10)
    assert me.status_code == 200, me.text
    return cookie, me.json()["csrf_token"]


def test_no_secret_in_logs_database_or_exports(make_stack, pg_database, postgres, background):
    stack = make_stack(filter_config=filter_config(), filter_token=FILTER_TOKEN, database=pg_database(),
                       envoy_env={"COUNTERSIGN_UPSTREAM_KEY": MODEL_KEY},
                       approval_extra=f'token_ttl_ms = 3600000\n\n[[token_keys]]\nid = "k1"\nsecret = "{TOKEN_SECRET}"')
    prompt = f"{PROMPT_MARK}: mail {EMAIL} the key {AWS}"

    # A held prompt with masked values, approved in a browser session.
    fut = send_later(background, stack.url, chat(text=prompt), headers=as_caller("dana"))
    [review] = stack.approval.wait_pending()
    cookie, csrf = sign_in(stack.approval, "alice")
    r = httpx.post(f"{stack.approval.url}/api/reviews/{review['id']}/approve", json={"reason": "fine"},
                   headers={"cookie": cookie, "x-csrf-token": csrf}, timeout=10)
    assert r.status_code == 200, r.text
    assert fut.result(15).status_code == 200

    # An asynchronous caller's approval token, issued and spent.
    body = json.dumps(chat(text=f"{PROMPT_MARK} batch job")).encode()
    accepted = httpx.post(stack.url + "/v1/chat/completions", content=body, timeout=20,
                          headers=as_caller("ci-batch", **{"content-type": "application/json"}))
    assert accepted.status_code == 202, accepted.text
    review_id = accepted.json()["id"]
    assert stack.approval.decide(review_id, "approve", reviewer="bob").status_code == 200
    st = httpx.get(f"{stack.url}/countersign/reviews/{review_id}", headers=as_caller("ci-batch"), timeout=20).json()
    approval_token = st["approval_token"]
    assert approval_token
    spent = httpx.post(stack.url + "/v1/chat/completions", content=st["approved_body"].encode(), timeout=20,
                       headers=as_caller("ci-batch", **{"x-countersign-approval": approval_token,
                                                        "content-type": "application/json"}))
    assert spent.status_code == 200, spent.text

    # Allowed requests, plain and streamed, with masked values in them.
    allowed = httpx.post(stack.url + "/v1/chat/completions", json=chat(model="demo-allow", text=prompt),
                         headers=as_caller("dana"), timeout=20)
    assert allowed.status_code == 200, allowed.text
    with httpx.stream("POST", stack.url + "/v1/chat/completions", headers=as_caller("dana"), timeout=20,
                      json=chat(model="demo-allow", text=prompt, stream=True)) as s:
        assert s.status_code == 200
        s.read()

    # Every answer's record is complete before anything is read.
    def answers_recorded():
        with stack.approval.client() as c:
            recs = c.get("/api/records", params={"limit": 500}).json()["records"]
        # Four answered, and the asynchronous request's 202 (never
        # forwarded itself: its token's spend is one of the four).
        answered = [x for x in recs if x.get("response")]
        pending = [x for x in recs if x["request"]["decision"] == "pending"]
        return len(recs) == 5 and len(answered) == 4 and len(pending) == 1 and recs
    wait_until(answers_recorded, timeout=20, what="four records with their answers and the 202's")

    export = subprocess.run([str(BINARIES / "countersign-approval"), "export-records", "--database",
                             str(stack.approval.db)], capture_output=True, text=True, timeout=30)
    assert export.returncode == 0, export.stderr
    dump = subprocess.run([str(postgres.bin / "pg_dump"), "--data-only", str(stack.approval.db)],
                          capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0, dump.stderr
    stack.envoy.proc.stop()  # the access log is flushed at exit
    places = {
        "Envoy's log and access log": stack.envoy.proc.log_text(),
        "the service's log": stack.approval.proc.log_text(),
        "the database (pg_dump)": dump.stdout,
        "the records export": export.stdout,
    }
    # The places hold what they should: otherwise their absence of secrets
    # would prove nothing.
    assert len(export.stdout.splitlines()) == 5
    assert PROMPT_MARK in places["the database (pg_dump)"] and PROMPT_MARK in places["the records export"]
    assert "<EMAIL_" in places["the records export"] and "[AWS_ACCESS_KEY]" in places["the records export"]
    assert '"path":"/v1/chat/completions"' in places["Envoy's log and access log"].replace(" ", "")

    secrets = {
        "raw masked e-mail": EMAIL, "raw masked AWS key": AWS,
        **{f"caller key of {name}": key for name, key in CALLERS.items()},
        "model key": MODEL_KEY, "filter token": FILTER_TOKEN, "token signing key": TOKEN_SECRET,
        **{f"reviewer token of {name}": token for name, token in REVIEWERS.items()},
        "session cookie": cookie.split("=", 1)[1], "approval token": approval_token,
    }
    found = [(what, where) for what, value in secrets.items() for where, text in places.items() if value in text]
    assert not found, found
    for where in ("Envoy's log and access log", "the service's log"):
        assert PROMPT_MARK not in places[where], where
