"""Configuration: every shipped Envoy YAML validates, a bad plugin
configuration stops Envoy with a log line naming the field, and the plugin
configuration may be a YAML map (a `google.protobuf.Struct`) as well as a
JSON string."""
import json
import subprocess
import time

import httpx
import pytest

from conftest import chat
from stack import BINARIES, DEFAULT_FILTER_TOKEN, ENVOY, ROOT, TEMPLATE, Approval, Backend, Envoy, render

pytestmark = pytest.mark.timeout(120)


def envoy_validate(path, cwd=ROOT):
    return subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(path)], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("example", sorted(p.relative_to(ROOT) for p in (ROOT / "examples").glob("*/envoy.yaml")),
                         ids=str)
def test_example_yaml_validates(example):
    r = envoy_validate(example)
    assert r.returncode == 0, r.stderr[-2000:]


def test_template_validates_when_rendered(tmp_path):
    out = tmp_path / "envoy.yaml"
    out.write_text(render(TEMPLATE.read_text(), {
        "ADMIN_PORT": 1, "LISTEN_PORT": 2, "MODEL_PORT": 3, "APPROVAL_PORT": 4, "BUFFER_LIMIT": 1024,
        "WASM_PATH": ROOT / "target/wasm32-wasip1/wasm/countersign_filter.wasm",
        "FILTER_CONFIG": (ROOT / "envoy/filter-config.json").read_text().replace("\n", " "),
    }))
    r = envoy_validate(out)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("form", ["json", "struct"])
def test_bad_plugin_config_stops_envoy_and_names_the_field(tmp_path, form):
    backend, approval = Backend(tmp_path).start(), Approval(tmp_path).start()
    envoy = Envoy(tmp_path, backend, approval, {"rules": [{"action": "allow"}, {"action": "allow", "modle": "x"}]},
                  mutate=as_struct if form == "struct" else None)
    try:
        envoy.start(wait_ready=False)
        deadline = time.monotonic() + 15
        while envoy.proc.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not envoy.proc.alive(), "Envoy kept running with an invalid countersign configuration"
        log = envoy.proc.log_text()
        assert "invalid plugin configuration: field `rules[1].modle`" in log
        assert backend.stats()["started"] == 0
        # `envoy --mode validate` catches it too, before deploying.
        r = envoy_validate(envoy.yaml)
        assert r.returncode != 0 and "rules[1].modle" in r.stderr + r.stdout
    finally:
        envoy.stop()
        approval.proc.stop()
        backend.proc.stop()


STRUCT_TYPE = "type.googleapis.com/google.protobuf.Struct"


def as_struct(config: dict):
    """The rendered configuration with the plugin configuration as a YAML
    map (`google.protobuf.Struct`) instead of a JSON string. Envoy hands the
    filter the Struct's protobuf encoding, not JSON."""
    converted = 0
    for listener in config["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                for http_filter in network_filter["typed_config"].get("http_filters", []):
                    wasm = http_filter["typed_config"].get("config", {})
                    if "configuration" in wasm:
                        text = wasm["configuration"]["value"]
                        wasm["configuration"] = {"@type": STRUCT_TYPE, "value": json.loads(text)}
                        converted += 1
    assert converted == 1


def test_plugin_config_as_a_struct_runs_with_traffic(tmp_path, background):
    # A `'` in a name, which a JSON string in single quotes would have to
    # double; integers that travel as doubles in a Struct.
    config = {"approval_cluster": "countersign_approval", "hold_timeout_ms": 420000, "max_body_bytes": 1048576,
              "rules": [{"name": "Bob's blocked models", "model": "forbidden-*", "action": "deny"},
                        {"name": "load-tests", "model": "demo-allow*", "action": "allow"}],
              "default_action": "review", "approval_token": DEFAULT_FILTER_TOKEN}
    backend = Backend(tmp_path).start()
    approval = Approval(tmp_path, filter_token=DEFAULT_FILTER_TOKEN).start()
    envoy = Envoy(tmp_path, backend, approval, config, mutate=as_struct)
    try:
        assert STRUCT_TYPE in envoy.yaml.read_text()
        # check-config reads it as the filter does.
        checked = subprocess.run([str(BINARIES / "countersign-approval"), "check-config", "--envoy", str(envoy.yaml)],
                                 capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        envoy.start()
        url = f"{envoy.url}/v1/chat/completions"

        allowed = httpx.post(url, json=chat("demo-allow", "hi"), timeout=30)
        assert allowed.status_code == 200, allowed.text
        assert allowed.headers["x-countersign-outcome"] == "allowed"
        denied = httpx.post(url, json=chat("forbidden-model"), timeout=30)
        assert denied.status_code == 403, denied.text
        assert denied.json()["error"]["code"] == "policy_denied"
        assert "Bob's blocked models" in denied.json()["error"]["message"]
        too_large = httpx.post(url, json=chat("demo-allow", "x" * 1100000), timeout=30)
        assert too_large.status_code == 413, too_large.text

        held = background.submit(httpx.post, url, json=chat("demo-echo", "hold me"), timeout=60)
        [review] = approval.wait_pending()
        assert approval.review(review["id"])["hold_timeout_ms"] == 420000
        assert approval.decide(review["id"], "approve", reason="fine").status_code == 200
        answer = held.result(timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-countersign-outcome"] == "approved"
    finally:
        envoy.stop()
        approval.proc.stop()
        backend.proc.stop()
