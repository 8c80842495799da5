"""Stand-ins for what the approval service calls out to, besides Slack: a
webhook receiver (plain HTTP, or HTTPS with a certificate of the test's
CA) and an HTTPS proxy (HTTP CONNECT tunnels). Both serve from threads of
the test process on free loopback ports and are stopped by the test."""
from __future__ import annotations

import select
import socket
import socketserver
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from socketserver import StreamRequestHandler, ThreadingTCPServer


class Served:
    """A server (`self.server`, set by the subclass) run by a thread of the
    test process until `stop`."""

    server: socketserver.BaseServer

    def start(self):
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that logs nothing and reads a request's body."""

    def log_message(self, *args):
        pass

    def body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("content-length") or 0))


class WebhookReceiver(Served):
    """Records each call (lower-cased headers, raw body); answers 204. With
    `cert` and `key` (PEM files) it speaks HTTPS."""

    def __init__(self, cert: Path | None = None, key: Path | None = None):
        self.calls: list[tuple[dict, bytes]] = []
        receiver = self

        class Handler(QuietHandler):
            def do_POST(self):
                body = self.body()
                receiver.calls.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        scheme = "http"
        if cert is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert, key)
            # The handshake happens in the handler's thread, not at accept.
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True,
                                                     do_handshake_on_connect=False)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}/hook"

    def events_for(self, review_id: str) -> list[tuple[dict, bytes]]:
        return [(h, b) for h, b in list(self.calls) if review_id.encode() in b]


class ConnectProxy(Served):
    """An HTTPS proxy: answers `CONNECT host:port` by tunnelling to it, and
    records each target."""

    def __init__(self):
        self.targets: list[str] = []
        proxy = self

        class Handler(StreamRequestHandler):
            def handle(self):
                line = self.rfile.readline().decode("latin-1").split()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                if len(line) < 2 or line[0] != "CONNECT":
                    self.wfile.write(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n")
                    return
                proxy.targets.append(line[1])
                host, port = line[1].rsplit(":", 1)
                with socket.create_connection((host, int(port)), timeout=10) as upstream:
                    self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    self.wfile.flush()
                    tunnel(self.connection, upstream)

        self.server = ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


def tunnel(a: socket.socket, b: socket.socket):
    """Copies bytes both ways until either side closes."""
    while True:
        readable, _, _ = select.select([a, b], [], [], 10)
        if not readable:
            return
        for src in readable:
            data = src.recv(65536)
            if not data:
                return
            (b if src is a else a).sendall(data)


class OtlpReceiver(Served):
    """An OTLP/HTTP trace receiver, as a collector is: `POST /v1/traces`
    with an `ExportTraceServiceRequest` in protobuf, decoded with the
    `opentelemetry-proto` package; answers an empty
    `ExportTraceServiceResponse`. `spans()` lists what arrived, flattened:
    hex trace, span and parent ids, name, kind, attributes, the resource's
    service name."""

    def __init__(self):
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        self.lock = threading.Lock()
        self.received: list[dict] = []
        self.paths: list[str] = []
        receiver = self

        class Handler(QuietHandler):
            def do_POST(self):
                body = self.body()
                with receiver.lock:
                    receiver.paths.append(self.path)
                if self.path != "/v1/traces" or self.headers.get("content-type") != "application/x-protobuf":
                    self.send_response(404)
                    self.end_headers()
                    return
                request = trace_service_pb2.ExportTraceServiceRequest()
                request.ParseFromString(body)
                spans = []
                for resource_spans in request.resource_spans:
                    resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                    for scope_spans in resource_spans.scope_spans:
                        for s in scope_spans.spans:
                            spans.append({
                                "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                                "parent_span_id": s.parent_span_id.hex(), "name": s.name, "kind": s.kind,
                                "attributes": {a.key: receiver._value(a.value) for a in s.attributes},
                                "links": [(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                                "service": resource.get("service.name"), "scope": scope_spans.scope.name,
                            })
                with receiver.lock:
                    receiver.received.extend(spans)
                answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    @staticmethod
    def _value(v):
        kind = v.WhichOneof("value")
        return getattr(v, kind) if kind else None

    def spans(self) -> list[dict]:
        with self.lock:
            return list(self.received)
