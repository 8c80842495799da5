"""A stand-in for Slack's Web API, for the Slack app's tests.

It speaks the Web API as Slack does (`POST /api/<method>` with a bearer bot
token, a JSON or form body, answers `{"ok": true, ...}` or `{"ok": false,
"error": ...}`) for the methods the service calls (`chat.postMessage`,
`chat.update`, `views.open`, `chat.postEphemeral`) and for
`conversations.history`, which tests read the channel with through
slack_sdk's WebClient. Every call is recorded. It serves from a thread of
the test process on a free loopback port and is stopped by the test.
"""
from __future__ import annotations

import itertools
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

from outbound import Served


class SlackApiStandIn(Served):
    def __init__(self, bot_token: str):
        self.bot_token = bot_token
        self.lock = threading.Lock()
        self.calls: list[tuple[str, dict]] = []
        # channel -> {ts: message}, in posting order.
        self.channels: dict[str, dict[str, dict]] = {}
        self._ts = itertools.count(1)
        # method -> seconds to wait before answering (a slow Slack).
        self.delays: dict[str, float] = {}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api"

    # ------------------------------------------------------------ for tests

    def calls_of(self, method: str) -> list[dict]:
        with self.lock:
            return [args for m, args in self.calls if m == method]

    def wait_call(self, method: str, match=lambda args: True, timeout: float = 10.0) -> dict:
        """The first call of `method` whose arguments satisfy `match`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for args in self.calls_of(method):
                if match(args):
                    return args
            time.sleep(0.05)
        raise AssertionError(f"no {method} call matched within {timeout} s; calls: {self.calls!r}")

    # ------------------------------------------------------------ the API

    def _answer(self, method: str, args: dict) -> dict:
        if method == "chat.postMessage":
            ts = f"{int(time.time())}.{next(self._ts):06d}"
            message = {"type": "message", "ts": ts, "text": args.get("text", ""), "blocks": args.get("blocks", [])}
            self.channels.setdefault(args["channel"], {})[ts] = message
            return {"ok": True, "channel": args["channel"], "ts": ts, "message": message}
        if method == "chat.update":
            message = self.channels.get(args.get("channel"), {}).get(args.get("ts"))
            if message is None:
                return {"ok": False, "error": "message_not_found"}
            message.update(text=args.get("text", ""), blocks=args.get("blocks", []), edited={"ts": args["ts"]})
            return {"ok": True, "channel": args["channel"], "ts": args["ts"], "text": message["text"]}
        if method == "views.open":
            if not args.get("trigger_id"):
                return {"ok": False, "error": "invalid_trigger_id"}
            view = args.get("view")
            if isinstance(view, str):
                view = json.loads(view)
            return {"ok": True, "view": {"id": f"V{next(self._ts)}", **view}}
        if method == "chat.postEphemeral":
            return {"ok": True, "message_ts": f"{int(time.time())}.{next(self._ts):06d}"}
        if method == "conversations.history":
            messages = list(self.channels.get(args.get("channel"), {}).values())
            return {"ok": True, "messages": messages[::-1], "has_more": False}
        return {"ok": False, "error": "unknown_method"}

    def _handler(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _serve(self, body: bytes):
                parts = urlsplit(self.path)
                method = parts.path.removeprefix("/api/")
                args = dict(parse_qsl(parts.query))
                kind = self.headers.get("content-type", "")
                if body and kind.startswith("application/json"):
                    args.update(json.loads(body))
                elif body:
                    args.update(parse_qsl(body.decode()))
                time.sleep(standin.delays.get(method, 0))
                if self.headers.get("authorization") != f"Bearer {standin.bot_token}":
                    answer = {"ok": False, "error": "invalid_auth"}
                else:
                    with standin.lock:
                        standin.calls.append((method, args))
                        answer = standin._answer(method, args)
                data = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json; charset=utf-8")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                self._serve(self.rfile.read(int(self.headers.get("content-length") or 0)))

            def do_GET(self):
                self._serve(b"")

        return Handler
