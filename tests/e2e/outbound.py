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


class WebhookReceiver(Served):
    """Records each call (lower-cased headers, raw body); answers 204. With
    `cert` and `key` (PEM files) it speaks HTTPS."""

    def __init__(self, cert: Path | None = None, key: Path | None = None):
        self.calls: list[tuple[dict, bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
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
