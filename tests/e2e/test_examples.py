"""Every `examples/*/envoy.yaml` run with traffic in a real Envoy, started
as its README says (from the repo root, with `examples/approval.toml`): the
requests its README shows get the answers it documents.

What a test changes, and only that: every listener, admin and cluster
address moves to a free loopback port, the service's database to the
test's directory, and the demo model stands in for the model. The plugin
configuration stays exactly as shipped (checked), and so does the path of
the wasm (relative to the repo root, where Envoy runs, as in the READMEs)."""
import copy
import re

import httpx
import pytest
import yaml

from conftest import chat
from stack import BINARIES, ENVOY, ROOT, Backend, Proc, free_port, wait_started, wait_until

pytestmark = pytest.mark.timeout(120)

EXAMPLES = ROOT / "examples"
APPROVAL_TOML = EXAMPLES / "approval.toml"
# The reviewer token the examples' READMEs use; the shipped approval.toml
# holds only its hash, so signing in with it checks the two agree.
DEMO_TOKEN = "demo-reviewer-token"
WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"


def wasm_configurations(config: dict) -> list:
    """The `configuration` of every Wasm HTTP filter, in order."""
    found = []
    for listener in config["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                for http_filter in network_filter.get("typed_config", {}).get("http_filters", []):
                    typed = http_filter.get("typed_config", {})
                    if typed.get("@type") == WASM_TYPE:
                        found.append(typed["config"].get("configuration"))
    return found


def endpoint_addresses(cluster: dict) -> list[dict]:
    return [lb["endpoint"]["address"]["socket_address"]
            for group in cluster["load_assignment"]["endpoints"] for lb in group["lb_endpoints"]]


def on_test_ports(shipped: dict, model_port: int, approval_port: int) -> tuple[dict, int, int]:
    """The shipped configuration with its listener and admin on free
    loopback ports and its clusters at the test's processes; returns it with
    the listener's and the admin's ports."""
    config = copy.deepcopy(shipped)
    admin_port = free_port()
    config["admin"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": admin_port}
    [listener] = config["static_resources"]["listeners"]
    listen_port = free_port()
    listener["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": listen_port}
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == "countersign_approval":
            port = approval_port
        elif cluster["name"] == "model":
            port = model_port
            if "transport_socket" in cluster:
                # openai-upstream: the demo backend stands in for
                # api.openai.com, so the cluster speaks plain HTTP to
                # loopback: its upstream TLS transport socket (and the DNS
                # lookup of the host name) go. The route's host rewrite stays.
                del cluster["transport_socket"]
                cluster["type"] = "STATIC"
                cluster.pop("dns_lookup_family", None)
        else:
            raise AssertionError(f"cluster {cluster['name']!r}: this test does not know where to point it")
        for address in endpoint_addresses(cluster):
            address.update({"address": "127.0.0.1", "port_value": port})
    assert wasm_configurations(config) == wasm_configurations(shipped)
    return config, listen_port, admin_port


class Example:
    """One example's Envoy, the shipped approval service and the demo model."""

    def __init__(self, name: str, workdir):
        self.name = name
        self.backend = Backend(workdir)
        shipped = yaml.safe_load((EXAMPLES / name / "envoy.yaml").read_text())
        [approval_cluster] = [c for c in shipped["static_resources"]["clusters"]
                              if c["name"] == "countersign_approval"]
        [shipped_approval] = endpoint_addresses(approval_cluster)

        self.approval_port = free_port()
        self.approval_url = f"http://127.0.0.1:{self.approval_port}"
        toml = APPROVAL_TOML.read_text()
        # The service listens where the example's approval cluster points.
        assert f'\nlisten = "{shipped_approval["address"]}:{shipped_approval["port_value"]}"\n' in toml
        toml, listens = re.subn(r'(?m)^listen = ".*"$', f'listen = "127.0.0.1:{self.approval_port}"', toml)
        toml, databases = re.subn(r'(?m)^database = ".*"$', f'database = "{workdir / "examples.db"}"', toml)
        assert (listens, databases) == (1, 1), "approval.toml: one `listen` and one `database` line expected"
        (workdir / "approval.toml").write_text(toml)
        self.approval = Proc("countersign-approval", [str(BINARIES / "countersign-approval"), "serve", "--config",
                                                      str(workdir / "approval.toml")],
                             workdir / "approval.log", cwd=ROOT)

        config, self.port, self.admin_port = on_test_ports(shipped, self.backend.port, self.approval_port)
        self.url = f"http://127.0.0.1:{self.port}"
        (workdir / "envoy.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.envoy = Proc("envoy", [str(ENVOY), "-c", str(workdir / "envoy.yaml"), "--concurrency", "2",
                                    "--log-level", "warn", "--component-log-level", "wasm:info",
                                    "--base-id", str(self.admin_port)],
                          workdir / "envoy.log", cwd=ROOT)

    def start(self):
        self.backend.start()
        self.approval.start()
        wait_started(self.approval, f"{self.approval_url}/healthz", "approval service")
        self.envoy.start()
        wait_started(self.envoy, f"http://127.0.0.1:{self.admin_port}/ready", "envoy", timeout=20)
        return self

    def stop(self):
        self.envoy.stop()
        self.approval.stop()
        self.backend.proc.stop()

    def reviewer(self) -> httpx.Client:
        return httpx.Client(base_url=self.approval_url, headers={"authorization": f"Bearer {DEMO_TOKEN}"},
                            timeout=10)

    def decide_when_held(self, pool, request: dict, decision: str, headers=None, **decision_body) -> httpx.Response:
        """Sends `request`, waits until it is held for review, decides it as the
        demo reviewer and returns the caller's answer."""
        seen_before = backend_started(self)
        answer = pool.submit(httpx.post, f"{self.url}/v1/chat/completions", json=request, headers=headers or {},
                             timeout=60)
        with self.reviewer() as c:
            def one_pending():
                r = c.get("/api/reviews", params={"status": "pending"})
                r.raise_for_status()
                reviews = r.json()["reviews"]
                return len(reviews) == 1 and reviews[0]
            review = wait_until(one_pending, what="the request held for review")
            assert review["model"] == request["model"]
            assert backend_started(self) == seen_before, "the model saw a held request"
            r = c.post(f"/api/reviews/{review['id']}/{decision}", json=decision_body)
            assert r.status_code == 200, r.text
        resp = answer.result(timeout=30)
        assert resp.headers.get("x-countersign-review-id") == review["id"]
        return resp


def backend_started(example: Example) -> int:
    return example.backend.stats()["started"]


@pytest.fixture
def example(request, tmp_path):
    ex = Example(request.param, tmp_path)
    try:
        yield ex.start()
    finally:
        ex.stop()


def examples_with(*names):
    return pytest.mark.parametrize("example", names, indirect=True)


def test_every_example_is_run_here():
    shipped = sorted(p.parent.name for p in EXAMPLES.glob("*/envoy.yaml"))
    assert shipped == sorted(["quickstart", "openai-upstream", "local-model"]), \
        "a new example needs its README's requests in test_examples.py"


def answer_text(resp: httpx.Response) -> str:
    return resp.json()["choices"][0]["message"]["content"]


def assert_refused(resp: httpx.Response, status: int, code: str, outcome: str) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["x-countersign-outcome"] == outcome
    error = resp.json()["error"]
    assert error["code"] == code
    return error


def assert_common_refusals(example: Example):
    """What every example's policy says besides reviews: `forbidden-*` is
    denied by the rule `blocked-models`, other endpoints are refused,
    `GET /v1/models` passes. None of it reaches the model."""
    before = backend_started(example)
    denied = httpx.post(f"{example.url}/v1/chat/completions", json=chat("forbidden-model"), timeout=30)
    assert "blocked-models" in assert_refused(denied, 403, "policy_denied", "denied")["message"]
    other = httpx.get(f"{example.url}/anything-else", timeout=30)
    assert_refused(other, 403, "endpoint_not_allowed", "denied")
    assert backend_started(example) == before
    models = httpx.get(f"{example.url}/v1/models", timeout=30)
    assert models.status_code == 200, models.text


@examples_with("quickstart")
def test_quickstart(example, background):
    prompt = chat("demo-echo", "Summarise our Q3 plan")
    approved = example.decide_when_held(background, prompt, "approve", reason="fine")
    assert approved.status_code == 200, approved.text
    assert answer_text(approved) == "echo: Summarise our Q3 plan"
    assert approved.headers["x-countersign-outcome"] == "approved"

    rejected = example.decide_when_held(background, prompt, "reject", reason="contains customer data")
    error = assert_refused(rejected, 403, "review_rejected", "rejected")
    assert error["message"].startswith("request rejected by demo (review rev_")
    assert error["message"].endswith("): contains customer data")

    edited_body = chat("demo-echo", "Summarise the public Q3 plan")
    edited = example.decide_when_held(background, prompt, "edit", body=edited_body, reason="narrowed")
    assert edited.status_code == 200, edited.text
    assert answer_text(edited) == "echo: Summarise the public Q3 plan"
    assert edited.headers["x-countersign-outcome"] == "edited"

    # `demo-allow*` is allowed without review; the stream arrives event by event.
    with httpx.stream("POST", f"{example.url}/v1/chat/completions", timeout=30,
                      headers={"x-demo-chunk-delay-ms": "20"},
                      json=chat("demo-allow", "one two three", stream=True)) as streamed:
        assert streamed.status_code == 200
        assert streamed.headers["x-countersign-outcome"] == "allowed"
        events = [line for line in streamed.iter_lines() if line.startswith("data:")]
    assert len(events) > 3 and events[-1] == "data: [DONE]"

    assert_common_refusals(example)


@examples_with("openai-upstream")
def test_openai_upstream(example, background):
    # The caller's own key goes to the model as is (no identity or
    # credential injection configured), with the host rewritten for OpenAI.
    caller_key = {"authorization": "Bearer sk-callers-own-key"}
    approved = example.decide_when_held(background, chat("gpt-4o", "hello"), "approve", headers=caller_key,
                                        reason="fine")
    assert approved.status_code == 200, approved.text
    assert answer_text(approved) == "echo: hello"
    assert approved.headers["x-countersign-outcome"] == "approved"
    [seen] = example.backend.requests()
    assert seen["headers"]["authorization"] == "Bearer sk-callers-own-key"
    assert seen["headers"]["host"] == "api.openai.com"

    allowed = httpx.post(f"{example.url}/v1/chat/completions", json=chat("gpt-4o-mini", "hi"), headers=caller_key,
                         timeout=30)
    assert allowed.status_code == 200, allowed.text
    assert allowed.headers["x-countersign-outcome"] == "allowed"
    assert answer_text(allowed) == "echo: hi"

    assert_common_refusals(example)


@examples_with("local-model")
def test_local_model(example, background):
    # No allow rule: every request waits for a reviewer.
    approved = example.decide_when_held(background, chat("llama3.2", "hello"), "approve", reason="fine")
    assert approved.status_code == 200, approved.text
    assert answer_text(approved) == "echo: hello"
    assert approved.headers["x-countersign-outcome"] == "approved"
    held_too = example.decide_when_held(background, chat("demo-allow", "hi"), "reject", reason="no")
    assert_refused(held_too, 403, "review_rejected", "rejected")

    assert_common_refusals(example)
