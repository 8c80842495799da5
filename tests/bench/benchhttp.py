"""A minimal asyncio HTTP/1.1 client for the benchmark's own measuring clients.

Raw sockets rather than an HTTP library, so that holding 10k connections at
once costs little and so that the time of the first response byte is seen as
soon as the event loop sees it. Times are `time.monotonic()`, which on Linux is
CLOCK_MONOTONIC and therefore comparable between processes.
"""
from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field


CONTENT = re.compile(rb'"(?:content|text)":"[^"]')


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    t_first_byte: float  # monotonic time the status line arrived
    t_first_data: float | None = None  # first body chunk carrying an SSE `data:` line
    t_first_content: float | None = None  # first body chunk carrying answer text (`"content":"x`, `"text":"x`)
    t_done: float = 0.0
    chunks: int = 0
    extra: dict = field(default_factory=dict)


def request_bytes(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
                  host: str = "bench") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    hdrs = {"content-type": "application/json", **(headers or {})}
    for k, v in hdrs.items():
        lines.append(f"{k}: {v}")
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def read_response(reader: asyncio.StreamReader, method: str = "POST") -> Response:
    status_line = await reader.readline()
    t_first = time.monotonic()
    if not status_line:
        raise ConnectionError("connection closed before a response")
    parts = status_line.split(b" ", 2)
    status = int(parts[1])
    headers: dict[str, str] = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        k, _, v = line.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    resp = Response(status=status, headers=headers, body=b"", t_first_byte=t_first)
    body = bytearray()
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        pass
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size_line = await reader.readline()
            if not size_line:
                raise ConnectionError("connection closed inside a chunked body")
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                # trailers, then the final CRLF
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                break
            chunk = await reader.readexactly(size)
            await reader.readexactly(2)
            if resp.t_first_data is None and b"data:" in chunk:
                resp.t_first_data = time.monotonic()
            if resp.t_first_content is None and CONTENT.search(chunk):
                resp.t_first_content = time.monotonic()
            resp.chunks += 1
            body += chunk
    elif "content-length" in headers:
        n = int(headers["content-length"])
        if n:
            body += await reader.readexactly(n)
            resp.chunks = 1
    else:
        body += await reader.read()
    resp.t_done = time.monotonic()
    if resp.t_first_data is None and b"data:" in body:
        resp.t_first_data = resp.t_done
    if resp.t_first_content is None and CONTENT.search(body):
        resp.t_first_content = resp.t_done
    resp.body = bytes(body)
    return resp


class Conn:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> "Conn":
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 22)
        return self

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: dict[str, str] | None = None) -> tuple[float, Response]:
        if self.writer is None:
            await self.open()
        assert self.writer is not None and self.reader is not None
        t0 = time.monotonic()
        self.writer.write(request_bytes(method, path, body, headers))
        await self.writer.drain()
        resp = await read_response(self.reader, method)
        if resp.headers.get("connection", "").lower() == "close":
            await self.close()
        return t0, resp

    async def close(self):
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except (ConnectionError, OSError):
                pass
        self.reader = self.writer = None


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100) of a list; None when empty."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def raise_nofile(want: int) -> int:
    """Raises RLIMIT_NOFILE (hard too, when allowed); returns the soft limit in force."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for new_hard in (max(hard, want), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, new_hard), new_hard))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
