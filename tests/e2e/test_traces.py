"""Traces end to end: a caller's W3C `traceparent` goes through the real
Envoy and the countersign filter to the approval service, whose spans
(review creation, the decision, the record appends, and the reviewer's
decision itself, stored with the review) reach a real OTLP/HTTP receiver
(protobuf, decoded with `opentelemetry-proto`) as children of the caller's
span; the model gets the same `traceparent`."""
import secrets

import pytest

from conftest import chat, post, send_later
from outbound import OtlpReceiver
from stack import wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def receiver():
    r = OtlpReceiver().start()
    yield r
    r.stop()


@pytest.fixture
def traced_stack(make_stack, receiver):
    return make_stack(
        approval_extra=f'[otlp]\nendpoint = "{receiver.url}"\nservice_name = "countersign-e2e"\n',
        # The batch processor's delay between exports (the SDK reads it).
        approval_env={"OTEL_BSP_SCHEDULE_DELAY": "100"},
    )


def spans_named(receiver, trace_id: str, names: set[str]) -> dict[str, list[dict]]:
    """The spans of `trace_id` by name, once every name in `names` came."""
    def arrived():
        by_name: dict[str, list[dict]] = {}
        for s in receiver.spans():
            if s["trace_id"] == trace_id:
                by_name.setdefault(s["name"], []).append(s)
        return names <= by_name.keys() and by_name
    return wait_until(arrived, timeout=15, what=f"spans {sorted(names)} of trace {trace_id}")


def test_the_callers_trace_runs_through_the_service_and_on_to_the_model(traced_stack, receiver, background):
    stack = traced_stack
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    traceparent = f"00-{trace_id}-{parent_id}-01"
    headers = {"traceparent": traceparent, "tracestate": "e2e=abc"}
    fut = send_later(background, stack.url, chat(text="trace me"), headers=headers)
    [review] = stack.approval.wait_pending()
    assert stack.approval.decide(review["id"], "approve").status_code == 200
    answer = fut.result(timeout=15)
    assert answer.status_code == 200, answer.text

    # (The worker's watch that waited for the decision serves every held
    # request of that worker: a span of its own, in no caller's trace.)
    calls = {"countersign.review.create", "countersign.record.append", "countersign.record.append_response"}
    spans = spans_named(receiver, trace_id, calls)
    for name in calls:
        for s in spans[name]:
            # Children of the caller's span, served by this service.
            assert s["parent_span_id"] == parent_id, (name, s)
            assert s["kind"] == 2, (name, s)  # SPAN_KIND_SERVER
            assert s["service"] == "countersign-e2e", s
            assert s["scope"] == "countersign-approval", s
    [create] = spans["countersign.review.create"]
    assert create["attributes"]["countersign.review.id"] == review["id"]
    assert create["attributes"]["http.response.status_code"] == 201
    watches = wait_until(lambda: [s for s in receiver.spans() if s["name"] == "countersign.watch"
                                  and s["attributes"].get("countersign.watch.states") == 1],
                         what="the watch that answered with the decision")
    assert all(s["trace_id"] != trace_id and s["parent_span_id"] == "" for s in watches), watches
    [record] = spans["countersign.record.append"]
    assert record["attributes"]["countersign.record.id"].startswith("rec_")
    assert isinstance(record["attributes"]["countersign.record.seq"], int)

    # The reviewer's request is a span of its own (it carried no trace), named
    # by the review.
    [decide] = wait_until(lambda: [s for s in receiver.spans() if s["name"] == "countersign.review.decide"
                                   and s["attributes"].get("countersign.review.id") == review["id"]],
                          what="the reviewer's request span")
    assert decide["trace_id"] != trace_id and decide["parent_span_id"] == "", decide
    # The decision itself is in the caller's trace: a child of the caller's
    # span (stored with the review when the filter created it), linked to the
    # reviewer's request span.
    [decided] = spans_named(receiver, trace_id, {"countersign.review.decided"})["countersign.review.decided"]
    assert decided["parent_span_id"] == parent_id, decided
    assert decided["kind"] == 1, decided  # SPAN_KIND_INTERNAL
    assert decided["attributes"]["countersign.review.id"] == review["id"]
    assert decided["attributes"]["countersign.review.decided_by"] == "alice"
    assert decided["attributes"]["countersign.review.decision"] == "approved"
    assert decided["attributes"]["countersign.review.status"] == "approved"
    assert decided["links"] == [(decide["trace_id"], decide["span_id"])], decided

    # The model saw the caller's trace context, as sent.
    [seen] = [r for r in stack.backend.requests() if r["path"].startswith("/v1/chat/completions")]
    assert seen["headers"]["traceparent"] == traceparent
    assert seen["headers"]["tracestate"] == "e2e=abc"


def test_without_a_traceparent_the_service_spans_start_their_own_trace(traced_stack, receiver):
    stack = traced_stack
    r = post(stack.url, json=chat(model="demo-allow-1", text="no trace"), headers={"x-request-id": "untraced-1"})
    assert r.status_code == 200, r.text
    record = wait_until(lambda: [s for s in receiver.spans() if s["name"] == "countersign.record.append"
                                 and s["attributes"].get("countersign.request_id") == "untraced-1"],
                        timeout=15, what="the record span")[0]
    # A root span: the filter made no parent up.
    assert record["parent_span_id"] == "", record
    [seen] = [r for r in stack.backend.requests() if r["path"].startswith("/v1/chat/completions")]
    assert "traceparent" not in seen["headers"]
