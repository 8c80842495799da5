"""Configuration: every shipped Envoy YAML validates, and a bad plugin
configuration stops Envoy with a log line naming the field."""
import subprocess
import time

import pytest

from stack import ENVOY, ROOT, TEMPLATE, Approval, Backend, Envoy, render

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


def test_bad_plugin_config_stops_envoy_and_names_the_field(tmp_path):
    backend, approval = Backend(tmp_path).start(), Approval(tmp_path).start()
    envoy = Envoy(tmp_path, backend, approval, {"rules": [{"action": "allow"}, {"action": "allow", "modle": "x"}]})
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
