"""The observability examples against the real thing: the alerting rules
(examples/prometheus) checked and unit-tested by promtool, the
PrometheusRule equal to the rules file, a real scrape of the approval
service accepted by `promtool check metrics`, and every metric the Grafana
dashboard (examples/grafana) queries present in real scrapes of the service
and of Envoy's /stats/prometheus after traffic through the stack.

promtool comes from Debian's `prometheus` package (`./dev test` installs
it). Without it these tests skip, except in CI (COUNTERSIGN_CI=1), where a
skip would hide that they never ran: there they fail."""
import json
import os
import re
import shutil
import subprocess
import time

import httpx
import pytest
import yaml

from conftest import chat, post, send_later
from stack import ROOT

pytestmark = pytest.mark.timeout(120)

PROMETHEUS = ROOT / "examples" / "prometheus"
RULES = PROMETHEUS / "countersign-rules.yaml"
RULES_TEST = PROMETHEUS / "countersign-rules.test.yaml"
PROMETHEUS_RULE = PROMETHEUS / "prometheusrule.yaml"
DASHBOARD = ROOT / "examples" / "grafana" / "countersign-dashboard.json"

MASKING = {
    "salt": "salt-for-tests-0123456789",
    "profiles": {"default": {"detectors": {"email": "pseudonymize"}}},
}
FILTER_RULES = [{"name": "load-tests", "model": "demo-allow*", "action": "allow"}]


def promtool(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    if shutil.which("promtool") is None:
        why = "promtool is not installed (Debian package prometheus; ./dev test installs it)"
        if os.environ.get("COUNTERSIGN_CI") == "1":
            pytest.fail(why + ": CI must run the promtool checks")
        pytest.skip(why)
    return subprocess.run(["promtool", *args], input=stdin, capture_output=True, text=True, cwd=PROMETHEUS)


def test_rules_pass_promtool_check_and_their_unit_tests():
    checked = promtool("check", "rules", RULES.name)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", RULES_TEST.name)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_the_prometheusrule_carries_the_rules_file_groups():
    rules = yaml.safe_load(RULES.read_text())
    [manifest] = [d for d in yaml.safe_load_all(PROMETHEUS_RULE.read_text()) if d]
    assert manifest["apiVersion"] == "monitoring.coreos.com/v1"
    assert manifest["kind"] == "PrometheusRule"
    assert manifest["spec"]["groups"] == rules["groups"]


# ---------------------------------------------------------------- PromQL names

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                "unless", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are
    not functions, aggregation modifiers or label names."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)          # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)                      # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)                     # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\boffset\s+-?\w+", "", expr)                 # offset durations
    names = set()
    # Not the tail of a number (1e3, 0.5) or of a duration.
    for m in re.finditer(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        rest = expr[m.end():].lstrip()
        if rest.startswith("(") or m.group(0).lower() in PROMQL_WORDS:
            continue
        names.add(m.group(0))
    return names


def test_metric_names_reads_promql_as_prometheus_does():
    expr = ('histogram_quantile(0.9, sum by (le, kind) (rate(a_seconds_bucket{job=~"x|y",kind!="by"}[$__rate_interval])))'
             ' / on (job) group_left sum without (instance) (b_total offset 5m) > bool 1e3 or c')
    assert metric_names(expr) == {"a_seconds_bucket", "b_total", "c"}


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    assert len(exprs) >= 10, "the dashboard lost its queries"
    return exprs


def scraped_names(text: str) -> set[str]:
    return {re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0)
            for line in text.splitlines() if line and not line.startswith("#")}


def test_a_real_scrape_passes_promtool_and_has_every_dashboard_metric(make_stack, background):
    stack = make_stack(filter_config={"masking": MASKING, "rules": FILTER_RULES})
    # Allowed by policy; held and approved (with a masked e-mail address);
    # held and rejected.
    assert post(stack.url, json=chat(model="demo-allow-1")).status_code == 200
    approved = send_later(background, stack.url, chat(text="mail mulder@fbi.example.org the plan"))
    [review] = stack.approval.wait_pending()
    assert stack.approval.decide(review["id"], "approve", reason="fine").status_code == 200
    assert approved.result(timeout=10).status_code == 200
    rejected = send_later(background, stack.url, chat(text="something else"))
    [review] = stack.approval.wait_pending()
    assert stack.approval.decide(review["id"], "reject", reason="no").status_code == 200
    assert rejected.result(timeout=10).status_code == 403

    # The decision metrics are written by a task that follows the review
    # events: wait until both decisions are in.
    def service_scrape() -> str:
        return httpx.get(f"{stack.approval.url}/metrics", timeout=5).text

    for _ in range(100):
        service = service_scrape()
        if 'countersign_review_decisions_total{decider="human",outcome="rejected"' in service:
            break
        time.sleep(0.05)
    # The filter's VMs count their memory on their timer (every 200 ms), not
    # on a request's path: give a loaded machine a few seconds to get there.
    for _ in range(100):
        envoy = httpx.get(f"{stack.envoy.admin}/stats/prometheus", timeout=5).text
        if "countersign_vm_memory_bytes" in scraped_names(envoy):
            break
        time.sleep(0.05)
    custom = httpx.get(f"{stack.envoy.admin}/stats?filter=wasmcustom", timeout=5).text
    seen = f"\nEnvoy's wasmcustom stats:\n{custom}\nEnvoy's log (end):\n{stack.envoy.proc.log_text()[-4000:]}"

    linted = promtool("check", "metrics", stdin=service)
    assert linted.returncode == 0, linted.stdout + linted.stderr + service

    available = scraped_names(service) | scraped_names(envoy)
    queried = set().union(*(metric_names(e) for e in dashboard_exprs()))
    assert queried, "no metric names read from the dashboard"
    missing = sorted(queried - available)
    assert not missing, f"the dashboard queries metrics no scrape has: {missing}{seen}"
    # Both sources are used, so both were checked.
    assert queried & scraped_names(envoy) and queried & scraped_names(service)
    # The rules' names are the scrapes' too: the filter's counters lose
    # Envoy's `wasmcustom.` prefix (no `envoy_` either), Envoy's own stats
    # gain `envoy_`.
    assert "countersign_requests_allowed_total" in scraped_names(envoy)
    # The filter's VMs' memory (the sum over Envoy's VMs, counted on their
    # timer): whole wasm pages, at least one per worker (`--concurrency 2`).
    [vm_memory] = [float(line.split()[-1]) for line in envoy.splitlines()
                   if line.startswith("countersign_vm_memory_bytes")]
    assert vm_memory >= 2 * 65536 and vm_memory % 65536 == 0, vm_memory
    # (`listener_manager.lds.update_rejected` exists only with LDS, which
    # this static stack has not: its neighbour shows the naming.)
    assert "envoy_listener_manager_listener_added" in scraped_names(envoy)
