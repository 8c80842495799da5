"""Starts and stops the real processes of a countersign stack for one test.

Every process runs in its own session on free loopback ports and is stopped
by PID when the test ends, so tests never collide and never leave anything
behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

from render import filter_config_value, render

ROOT = Path(__file__).resolve().parents[2]
RELEASE = ROOT / "target" / "release"
WASM = ROOT / "target" / "wasm32-wasip1" / "wasm" / "countersign_filter.wasm"
ENVOY = ROOT / ".venv" / "bin" / "envoy"
TEMPLATE = ROOT / "envoy" / "countersign.yaml"
BUFFER_LIMIT = 16 * 1024 * 1024

REVIEWERS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789",
             "carol": "carol-token-0123456789"}
REVIEWER_GROUPS = {"alice": ["security"], "bob": ["security"], "carol": ["eng"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Proc:
    """A child process started in its own session, stopped by PID."""

    def __init__(self, name: str, cmd: list[str], log: Path, env: dict | None = None):
        self.name, self.cmd, self.log = name, cmd, log
        self.env = env
        self.popen: subprocess.Popen | None = None

    def start(self) -> "Proc":
        with open(self.log, "ab") as out:
            env = None if self.env is None else {**os.environ, **self.env}
            self.popen = subprocess.Popen(
                self.cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                env=env,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout=5.0):
        if not self.alive():
            return
        assert self.popen is not None
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            return
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)

    def kill(self):
        """Abrupt death (SIGKILL), as in a crash."""
        self.stop(signal.SIGKILL)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def wait_until(check, timeout=10.0, interval=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (httpx.HTTPError, OSError) as e:
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def records(stack, timeout: float = 10, **params) -> list[dict]:
    """Every session record matching the filters, following the pages."""
    out, after = [], None
    with stack.approval.client() as c:
        while True:
            page = {"limit": 500, **params, **({"after_seq": after} if after is not None else {})}
            r = c.get("/api/records", params=page, timeout=timeout)
            r.raise_for_status()
            body = r.json()
            out += body["records"]
            after = body.get("next_after_seq")
            if after is None:
                return out


def rec_field(rec: dict, name: str):
    """Merged record views nest the request part; accept both layouts."""
    if "request" in rec and name in rec["request"]:
        return rec["request"][name]
    return rec.get(name)


def verify_records(stack, timeout: float = 30) -> subprocess.CompletedProcess:
    """Runs the hash-chain verifier over the service's database."""
    return subprocess.run([str(RELEASE / "countersign-approval"), "verify-records", "--database",
                           str(stack.approval.db)], capture_output=True, text=True, timeout=timeout)


def stat(stack, name) -> int:
    """An Envoy stat by exact name, 0 when absent."""
    text = httpx.get(f"http://127.0.0.1:{stack.envoy.admin_port}/stats?filter={name}$", timeout=5).text
    m = re.search(rf"{re.escape(name)}: (-?\d+)", text)
    return int(m.group(1)) if m else 0


class Backend:
    def __init__(self, workdir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = Proc("demo-backend", [str(RELEASE / "demo-backend"), "--listen", f"127.0.0.1:{self.port}"],
                         workdir / "demo-backend.log")

    def start(self):
        self.proc.start()
        wait_until(lambda: httpx.get(f"{self.url}/_demo/stats").status_code == 200, what="demo backend")
        return self

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/_demo/stats").json()

    def requests(self) -> list[dict]:
        return httpx.get(f"{self.url}/_demo/requests").json()


class Approval:
    def __init__(self, workdir: Path, filter_token: str | None = None, extra: str = ""):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = workdir / "countersign.db"
        self.config = workdir / "approval.toml"
        lines = [f'listen = "127.0.0.1:{self.port}"', f'database = "{self.db}"']
        if filter_token:
            lines.append(f'filter_token_sha256 = "{sha256_hex(filter_token)}"')
        # Top-level keys must come before the first [[table]].
        if extra:
            lines.append(extra)
        for name, token in REVIEWERS.items():
            lines += ["", "[[reviewers]]", f'name = "{name}"', f'token_sha256 = "{sha256_hex(token)}"',
                      f'groups = {json.dumps(REVIEWER_GROUPS[name])}']
        self.config.write_text("\n".join(lines) + "\n")
        self.proc = Proc("countersign-approval",
                         [str(RELEASE / "countersign-approval"), "serve", "--config", str(self.config)],
                         workdir / "approval.log")

    def start(self):
        self.proc.start()
        wait_until(lambda: httpx.get(f"{self.url}/healthz").status_code == 200, what="approval service")
        return self

    def client(self, reviewer="alice") -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {REVIEWERS[reviewer]}"}, timeout=10)

    def pending(self, reviewer="alice") -> list[dict]:
        with self.client(reviewer) as c:
            r = c.get("/api/reviews", params={"status": "pending"})
            r.raise_for_status()
            return r.json()["reviews"]

    def wait_pending(self, count=1, timeout=10.0) -> list[dict]:
        return wait_until(lambda: (p := self.pending()) and len(p) >= count and p, timeout=timeout,
                          what=f"{count} pending review(s)")

    def decide(self, review_id: str, decision: str, reviewer="alice", **body) -> httpx.Response:
        with self.client(reviewer) as c:
            return c.post(f"/api/reviews/{review_id}/{decision}", json=body)

    def review(self, review_id: str) -> dict:
        with self.client() as c:
            r = c.get(f"/api/reviews/{review_id}")
            r.raise_for_status()
            return r.json()


class Envoy:
    def __init__(self, workdir: Path, backend: Backend, approval: Approval, filter_config: dict | str,
                 env: dict | None = None):
        self.port, self.admin_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.yaml = workdir / "envoy.yaml"
        self.yaml.write_text(render(TEMPLATE.read_text(), {
            "ADMIN_PORT": self.admin_port, "LISTEN_PORT": self.port, "MODEL_PORT": backend.port,
            "APPROVAL_PORT": approval.port, "BUFFER_LIMIT": BUFFER_LIMIT, "WASM_PATH": WASM,
            "FILTER_CONFIG": filter_config_value(filter_config),
        }))
        self.proc = Proc("envoy", [str(ENVOY), "-c", str(self.yaml), "--log-level", "warn",
                                   "--component-log-level", "wasm:info", "--concurrency", "2",
                                   "--base-id", str(self.admin_port)],
                         workdir / "envoy.log", env=env)

    def start(self, wait_ready=True):
        self.proc.start()
        if wait_ready:
            wait_until(lambda: httpx.get(f"http://127.0.0.1:{self.admin_port}/ready").status_code == 200,
                       timeout=20, what="envoy ready")
        return self

    def stop(self):
        if self.proc.alive():
            try:
                httpx.post(f"http://127.0.0.1:{self.admin_port}/quitquitquit", timeout=2)
                self.proc.popen.wait(5)
            except (httpx.HTTPError, subprocess.TimeoutExpired):
                pass
        self.proc.stop()


DEFAULT_FILTER_CONFIG = json.loads((ROOT / "envoy" / "filter-config.json").read_text())


class Stack:
    """Demo backend + approval service + Envoy with the filter."""

    def __init__(self, workdir: Path, filter_config: dict | None = None, filter_token: str | None = None,
                 envoy_env: dict | None = None, approval_extra: str = ""):
        config = dict(DEFAULT_FILTER_CONFIG if filter_config is None else filter_config)
        if filter_token:
            config["approval_token"] = filter_token
        self.backend = Backend(workdir)
        self.approval = Approval(workdir, filter_token=filter_token, extra=approval_extra)
        self.envoy = Envoy(workdir, self.backend, self.approval, config, env=envoy_env)

    def start(self):
        self.backend.start()
        self.approval.start()
        self.envoy.start()
        return self

    def stop(self):
        self.envoy.stop()
        self.approval.proc.stop()
        self.backend.proc.stop()

    @property
    def url(self) -> str:
        return self.envoy.url
