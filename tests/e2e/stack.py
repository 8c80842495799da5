"""Starts and stops the real processes of a countersign stack for one test.

Every process runs in its own session on free loopback ports and is stopped
by PID when the test ends, so tests never collide and never leave anything
behind. The benchmarks (tests/bench/bench.py) start their processes with
this harness too.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

from render import filter_config_value, render

ROOT = Path(__file__).resolve().parents[2]
# The service's and the demo model's binaries: the release build of `./dev
# build` unless COUNTERSIGN_BINARIES names another directory (`./dev test`
# points it at target/debug, which its unit-test build already filled, so the
# suite compiles the dependencies once instead of twice).
BINARIES = Path(os.environ.get("COUNTERSIGN_BINARIES", ROOT / "target" / "release"))
WASM = ROOT / "target" / "wasm32-wasip1" / "wasm" / "countersign_filter.wasm"
ENVOY = ROOT / ".venv" / "bin" / "envoy"
TEMPLATE = ROOT / "envoy" / "countersign.yaml"
BUFFER_LIMIT = 16 * 1024 * 1024

REVIEWERS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789",
             "carol": "carol-token-0123456789"}
REVIEWER_GROUPS = {"alice": ["security"], "bob": ["security"], "carol": ["eng"]}


def _ephemeral_ports() -> tuple[int, int]:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


# Ports the tests choose for their listeners: below the kernel's ephemeral
# range. A port from bind(0) comes from that range, which every outgoing
# connection (Envoy's to the model and the service, the tests' clients) also
# draws from, so one of them could take it between the choice and the
# listener's bind; a module's shared stack failing to start that way errors
# every test of the module.
_LISTEN_PORTS = range(10000, _ephemeral_ports()[0])
_port_choice = random.Random()


def free_port() -> int:
    """A loopback port nothing is bound to now, outside the ephemeral range
    (bind(0) when that range leaves no room below it)."""
    tries = 200 if len(_LISTEN_PORTS) >= 1000 else 0
    for _ in range(tries):
        port = _port_choice.choice(_LISTEN_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class StartError(AssertionError):
    """A process exited during start-up, or was not ready in time; says why
    with the end of its log."""


class Proc:
    """A child process started in its own session, stopped by PID. Its
    output goes to `log`, or with `stdout` (a file or subprocess.PIPE) only
    its stderr does."""

    running: list["Proc"] = []
    """Every process started and not stopped yet: what `stop_all` stops."""

    def __init__(self, name: str, cmd: list[str], log: Path, env: dict | None = None, cwd: Path | None = None,
                 stdout=None):
        self.name, self.cmd, self.log = name, cmd, log
        self.env, self.cwd, self.stdout = env, cwd, stdout
        self.popen: subprocess.Popen | None = None

    def start(self) -> "Proc":
        with open(self.log, "ab") as out:
            env = None if self.env is None else {**os.environ, **self.env}
            self.popen = subprocess.Popen(
                self.cmd, stdout=out if self.stdout is None else self.stdout,
                stderr=subprocess.STDOUT if self.stdout is None else out, stdin=subprocess.DEVNULL,
                start_new_session=True, env=env, cwd=self.cwd,
            )
        Proc.running.append(self)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout=5.0):
        try:
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
        finally:
            if self in Proc.running:
                Proc.running.remove(self)

    def kill(self):
        """Abrupt death (SIGKILL), as in a crash."""
        self.stop(signal.SIGKILL)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def stop_all() -> list[str]:
    """Stops every process still running, newest first (for a program's
    exit path, e.g. on Ctrl-C). Keeps going past a failure; returns them."""
    failures = []
    for proc in reversed(list(Proc.running)):
        try:
            proc.stop()
        except Exception as e:  # stop the others all the same
            failures.append(f"stopping {proc.name} (pid {proc.pid}): {e!r}")
    return failures


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


def wait_started(proc: Proc, url: str, what: str, timeout: float = 10.0):
    """Waits until `url` answers 200. A process that exits meanwhile fails
    at once; either failure is a StartError with the end of its log."""
    def ready():
        if not proc.alive():
            raise StartError(f"{what} exited during start-up; end of {proc.log}:\n{proc.log_text()[-4000:]}")
        return httpx.get(url).status_code == 200
    try:
        wait_until(ready, timeout=timeout, what=what)
    except StartError:
        raise
    except AssertionError as e:
        raise StartError(f"{e}; end of {proc.log}:\n{proc.log_text()[-4000:]}") from None


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


def last_seq(stack) -> int:
    """The highest record `seq` so far (0 for none): what a test on a shared
    stack passes as `after_seq` to read only the records that follow."""
    return max((r["seq"] for r in records(stack)), default=0)


def answer_records(stack, review_id: str) -> list[dict]:
    """The records whose answer was held by review `review_id`, waited for
    (the response part is written after the answer has gone)."""
    return wait_until(lambda: [r for r in records(stack)
                               if (r.get("response") or {}).get("answer_review_id") == review_id],
                      what="response record with the answer's review")


class HeldCaller:
    """POSTs `body` to `url` from a thread of its own and notes when each
    part of the answer arrives (`("head", status, time)`, then `("body",
    chunk, time)`), to count what reached the client while a review was
    pending. A context manager: the thread starts on entry and is joined on
    exit."""

    def __init__(self, url: str, body: dict):
        self.url, self.body = url, body
        self.arrived: list[tuple] = []
        self.headers: dict = {}
        self.thread = threading.Thread(target=self._call)

    def _call(self):
        with httpx.stream("POST", self.url, json=self.body, timeout=60) as r:
            self.headers.update(r.headers)
            self.arrived.append(("head", r.status_code, time.monotonic()))
            for chunk in r.iter_bytes():
                self.arrived.append(("body", chunk, time.monotonic()))

    def __enter__(self) -> "HeldCaller":
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.thread.join(30)

    def answer(self) -> dict:
        """The answer's body, as JSON."""
        return json.loads(b"".join(c for what, c, _ in self.arrived if what == "body"))


def rec_field(rec: dict, name: str):
    """Merged record views nest the request part; accept both layouts."""
    if "request" in rec and name in rec["request"]:
        return rec["request"][name]
    return rec.get(name)


def verify_records(stack, timeout: float = 30) -> subprocess.CompletedProcess:
    """Runs the hash-chain verifier over the service's database (SQLite file or PostgreSQL URL)."""
    return subprocess.run([str(BINARIES / "countersign-approval"), "verify-records", "--database",
                           str(stack.approval.db)], capture_output=True, text=True, timeout=timeout)


def stat(stack, name) -> int:
    """An Envoy stat by exact name, 0 when absent."""
    text = httpx.get(f"http://127.0.0.1:{stack.envoy.admin_port}/stats?filter={name}$", timeout=5).text
    m = re.search(rf"{re.escape(name)}: (-?\d+)", text)
    return int(m.group(1)) if m else 0


def _openssl(directory: Path, *args):
    r = subprocess.run(["openssl", *args], cwd=directory, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"openssl {args[0]}: {r.stderr}")


def make_ca(directory: Path, ca: str = "ca"):
    """A CA of its own (`{ca}.pem`, key `{ca}.key`), made with openssl in `directory`."""
    _openssl(directory, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", f"/CN=countersign test CA {ca}", "-keyout", f"{ca}.key", "-out", f"{ca}.pem")


def sign_certificate(directory: Path, ca: str, name: str, usage: str = "serverAuth",
                     sans: str = "IP:127.0.0.1,DNS:localhost"):
    """A certificate (`{name}.pem`, key `{name}.key`) signed by the CA `ca`
    in `directory`, for `usage` (serverAuth or clientAuth), naming `sans`
    (openssl's subjectAltName syntax; by default 127.0.0.1 and localhost)."""
    _openssl(directory, "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
             "-keyout", f"{name}.key", "-out", f"{name}.csr")
    (directory / f"{name}.ext").write_text(f"subjectAltName={sans}\nbasicConstraints=CA:FALSE\n"
                                           f"extendedKeyUsage={usage}\n")
    _openssl(directory, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem")


def make_certificates(directory: Path, ca: str = "ca", name: str = "server"):
    """A CA of its own (`{ca}.pem`, key `{ca}.key`) and a certificate for
    127.0.0.1 and localhost signed by it (`{name}.pem`, key `{name}.key`),
    made with openssl in `directory`."""
    make_ca(directory, ca)
    sign_certificate(directory, ca, name)


class ChannelCertificates:
    """Certificates for the filter <-> service channel, made with openssl in
    `directory`: the CA `ca` with the service's certificate `server` and
    Envoy's client certificate `client`, and another CA `other-ca` with a
    client certificate `other-client` (and a server certificate
    `other-server`) that `ca` did not sign."""

    def __init__(self, directory: Path):
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        for ca, server, client in (("ca", "server", "client"), ("other-ca", "other-server", "other-client")):
            make_ca(directory, ca)
            sign_certificate(directory, ca, server, "serverAuth")
            sign_certificate(directory, ca, client, "clientAuth")

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def named_client(self, name: str, sans: str, ca: str = "ca") -> str:
        """A client certificate `name` signed by `ca` that names `sans`
        (openssl's subjectAltName syntax); returns `name`."""
        sign_certificate(self.dir, ca, name, "clientAuth", sans)
        return name

    def service_toml(self, server: str = "server", client_ca: str | None = "ca",
                     client_names: list[str] | None = None) -> str:
        """The service's `[tls]` table: its certificate, and with `client_ca`
        mutual TLS (with `client_names`, only for certificates naming one)."""
        lines = ["[tls]", f'cert_file = "{self.path(server + ".pem")}"', f'key_file = "{self.path(server + ".key")}"']
        if client_ca:
            lines.append(f'client_ca_file = "{self.path(client_ca + ".pem")}"')
        if client_names is not None:
            lines.append(f"client_names = {json.dumps(client_names)}")
        return "\n".join(lines)

    def transport_socket(self, client: str = "client", trusted_ca: str = "ca", san: str = "localhost") -> dict:
        """Envoy's UpstreamTlsContext for the approval cluster: `client`'s
        certificate, the service's certificate checked against `trusted_ca`
        and the DNS name `san` (also sent as SNI)."""
        return {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": san,
                "common_tls_context": {
                    "tls_certificates": [{"certificate_chain": {"filename": self.path(client + ".pem")},
                                          "private_key": {"filename": self.path(client + ".key")}}],
                    "validation_context": {
                        "trusted_ca": {"filename": self.path(trusted_ca + ".pem")},
                        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": san}}],
                    },
                },
            },
        }


class Postgres:
    """A throwaway PostgreSQL cluster (Debian's server) on a free loopback port.

    initdb and postgres refuse to run as root: as root they run as the
    `postgres` system user (setpriv execs, so the PID held is the
    postmaster's), in a directory of their own outside pytest's root-only
    temp tree. Stopped by PID: SIGINT is PostgreSQL's fast shutdown.
    """

    def __init__(self, tls: bool = False, durable: bool = False):
        versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"),
                          key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
        if not versions:
            raise RuntimeError("PostgreSQL server not found in /usr/lib/postgresql/*/bin (./dev setup installs it)")
        self.bin = versions[-1].parent
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="countersign-pg-"))
        self.data = self.dir / "data"
        self.as_user = ["setpriv", "--reuid=postgres", "--regid=postgres", "--clear-groups", "--"] \
            if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.dir, "postgres", "postgres")
        # With tls: a CA of its own (ca_file) and a server certificate for
        # 127.0.0.1 signed by it; plain connections stay allowed.
        self.ca_file = self.dir / "ca.pem" if tls else None
        ssl = ["-c", "ssl=on", "-c", f"ssl_cert_file={self.dir / 'server.pem'}",
               "-c", f"ssl_key_file={self.dir / 'server.key'}"] if tls else []
        self.proc = Proc("postgres", [*self.as_user, str(self.bin / "postgres"), "-D", str(self.data),
                                      "-p", str(self.port), "-k", str(self.dir),
                                      "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=300",
                                      # Tests skip the disk flushes; a benchmark
                                      # (durable=True) keeps PostgreSQL's defaults.
                                      *([] if durable else ["-c", "fsync=off", "-c", "full_page_writes=off"]),
                                      *ssl],
                         self.dir / "postgres.log", cwd=self.dir)

    def _make_certificates(self):
        make_certificates(self.dir)
        # PostgreSQL refuses a key others can read; as root the server runs
        # as `postgres`, which must own it.
        key = self.dir / "server.key"
        key.chmod(0o600)
        if self.as_user:
            for f in ("server.key", "server.pem"):
                shutil.chown(self.dir / f, "postgres", "postgres")

    def _ready(self) -> bool:
        if not self.proc.alive():
            raise RuntimeError(f"postgres exited: {self.proc.log_text()[-2000:]}")
        return subprocess.run([str(self.bin / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)],
                              timeout=10).returncode == 0

    def restart(self) -> "Postgres":
        """Starts the server again on its data (after a stop or a kill -9:
        it recovers from its write-ahead log first)."""
        self.proc.start()
        wait_until(self._ready, timeout=60, what="postgres accepting connections again")
        return self

    def start(self) -> "Postgres":
        ready = self._ready
        try:
            init = subprocess.run([*self.as_user, str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                                   "--auth=trust", "--no-locale", "-E", "UTF8", "--no-sync"],
                                  cwd=self.dir, capture_output=True, text=True, timeout=120)
            if init.returncode != 0:
                raise RuntimeError(f"initdb failed: {init.stdout}{init.stderr}")
            if self.ca_file:
                self._make_certificates()
            self.proc.start()
            wait_until(ready, timeout=30, what="postgres accepting connections")
        except BaseException:
            self.stop()
            raise
        return self

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        r = subprocess.run([str(self.bin / "psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
                            "-p", str(self.port), "-U", "postgres", "-d", dbname, "-c", sql],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"psql {sql!r}: {r.stderr}")
        return r.stdout

    def create_database(self, name: str) -> str:
        """Creates an empty database; returns its URL."""
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise ValueError(f"bad database name {name!r}")
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def url(self, dbname: str) -> str:
        # The service requires TLS unless told otherwise; this cluster
        # speaks plain text on loopback (TLS is tested in the Rust tests).
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}?sslmode=disable"

    def stop(self):
        # SIGINT to the postmaster alone (its children have their own
        # meanings for it); SIGKILL to the whole group if it hangs.
        if self.proc.alive():
            assert self.proc.popen is not None
            os.kill(self.proc.pid, signal.SIGINT)
            try:
                self.proc.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class Backend:
    def __init__(self, workdir: Path, name: str = "demo-backend"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = Proc(name, [str(BINARIES / "demo-backend"), "--listen", f"127.0.0.1:{self.port}"],
                         workdir / f"{name}.log")

    def start(self):
        self.proc.start()
        wait_started(self.proc, f"{self.url}/_demo/stats", "demo backend")
        return self

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/_demo/stats").json()

    def requests(self) -> list[dict]:
        return httpx.get(f"{self.url}/_demo/requests").json()


class Approval:
    """One approval service process. `database` is a PostgreSQL URL that
    several replicas (each with its own `name`, hence files) may share, or a
    SQLite file; without it the service uses countersign.db in workdir.
    `extra` is TOML put before the reviewers: top-level keys, then tables.
    `reviewer_fields` adds TOML lines to a reviewer's table, by name."""

    def __init__(self, workdir: Path, filter_token: str | None = None, extra: str = "", database: str | None = None,
                 name: str = "approval", env: dict | None = None, reviewer_fields: dict[str, str] | None = None,
                 tls: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = database or workdir / "countersign.db"
        self.config = workdir / f"{name}.toml"
        lines = [f'listen = "127.0.0.1:{self.port}"', f'database = "{self.db}"']
        # With `tls` (a [tls] table), the filter API moves to a port of its
        # own (filter_listen) served over TLS; `listen` stays plain.
        self.filter_port = free_port() if tls is not None else self.port
        if tls is not None:
            lines.append(f'filter_listen = "127.0.0.1:{self.filter_port}"')
        if filter_token:
            lines.append(f'filter_token_sha256 = "{sha256_hex(filter_token)}"')
        # Top-level keys must come before the first [[table]].
        if extra:
            lines.append(extra)
        if tls:
            lines.append(tls)
        for reviewer, token in REVIEWERS.items():
            lines += ["", "[[reviewers]]", f'name = "{reviewer}"', f'token_sha256 = "{sha256_hex(token)}"',
                      f'groups = {json.dumps(REVIEWER_GROUPS[reviewer])}']
            if reviewer_fields and reviewer in reviewer_fields:
                lines.append(reviewer_fields[reviewer])
        self.config.write_text("\n".join(lines) + "\n")
        self.proc = Proc("countersign-approval",
                         [str(BINARIES / "countersign-approval"), "serve", "--config", str(self.config)],
                         workdir / f"{name}.log", env=env, cwd=workdir)

    def start(self):
        self.proc.start()
        wait_started(self.proc, f"{self.url}/healthz", "approval service")
        return self

    def client(self, reviewer="alice", timeout: float = 10) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {REVIEWERS[reviewer]}"},
                            timeout=timeout)

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


def with_http2_model(config: dict):
    """The model cluster spoken to over HTTP/2 (h2c), as to vLLM or a
    gRPC-style server: answers may then end with trailers."""
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == "model":
            cluster["typed_extension_protocol_options"] = {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }}


def with_approval_replicas(config: dict, ports: list[int]):
    """One approval endpoint per replica, checked on /healthz every second
    and ejected after two failed calls, so a dead replica is dropped at once
    and held requests re-attach to the others."""
    [cluster] = [c for c in config["static_resources"]["clusters"] if c["name"] == "countersign_approval"]
    cluster["load_assignment"]["endpoints"] = [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
        for port in ports]}]
    cluster["health_checks"] = [{
        "timeout": "1s", "interval": "1s", "no_traffic_interval": "1s",
        "unhealthy_threshold": 1, "healthy_threshold": 1, "http_health_check": {"path": "/healthz"}}]
    cluster["outlier_detection"] = {
        "consecutive_5xx": 2, "interval": "1s", "base_ejection_time": "10s", "max_ejection_percent": 50}


def with_approval_http1(config: dict):
    """The approval cluster spoken to over HTTP/1.1 instead of the
    template's HTTP/2: for a test proxy in between that reads HTTP/1.1."""
    [cluster] = [c for c in config["static_resources"]["clusters"] if c["name"] == "countersign_approval"]
    del cluster["typed_extension_protocol_options"]


def with_approval_transport_socket(config: dict, transport_socket: dict):
    """The approval cluster spoken to through `transport_socket` (TLS)."""
    [cluster] = [c for c in config["static_resources"]["clusters"] if c["name"] == "countersign_approval"]
    cluster["transport_socket"] = transport_socket


def with_route(config: dict, name: str, header: str, value: str):
    """A route named `name`, to the model cluster like the template's own,
    taken (before it) by requests carrying `header: value`: how an operator
    sends some traffic through a route that `rules[].route` treats apart."""
    for listener in config["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for f in chain["filters"]:
                for vhost in f.get("typed_config", {}).get("route_config", {}).get("virtual_hosts", []):
                    vhost["routes"].insert(0, {
                        "name": name,
                        "match": {"prefix": "/", "headers": [{"name": header, "string_match": {"exact": value}}]},
                        "route": {"cluster": "model", "timeout": "0s"}})


def without_wasm_filter(config: dict):
    """Takes the countersign wasm filter out of the HTTP filters: the same
    listener, routes, buffer filter and clusters without it (plain Envoy,
    the benchmarks' baseline)."""
    removed = 0
    for listener in config.get("static_resources", {}).get("listeners", []):
        for chain in listener.get("filter_chains", []):
            for f in chain.get("filters", []):
                typed = f.get("typed_config", {})
                http_filters = typed.get("http_filters")
                if http_filters is None:
                    continue
                keep = [h for h in http_filters
                        if not h.get("typed_config", {}).get("@type", "").endswith(".wasm.v3.Wasm")]
                removed += len(http_filters) - len(keep)
                typed["http_filters"] = keep
    if not removed:
        raise ValueError("no wasm filter found in the Envoy configuration")


class Envoy:
    """Envoy from the shipped template. `approval` is one service, or a list
    of replicas that become the endpoints of the approval cluster. `mutate`
    changes the rendered configuration (a dict) before it is written, e.g.
    `without_wasm_filter`."""

    def __init__(self, workdir: Path, backend: Backend, approval: Approval | list[Approval],
                 filter_config: dict | str, env: dict | None = None, name: str = "envoy",
                 model_http2: bool = False, mutate=None):
        self.model_http2 = model_http2
        self.replicas = approval if isinstance(approval, list) else [approval]
        self.several = isinstance(approval, list)
        self.workdir, self.backend, self.filter_config = workdir, backend, filter_config
        self.env, self.name, self.mutate = env, name, mutate
        self.yaml = workdir / f"{name}.yaml"
        self.configure()

    def configure(self):
        """Chooses free ports and writes the configuration for them."""
        self.port, self.admin_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        text = render(TEMPLATE.read_text(), {
            "ADMIN_PORT": self.admin_port, "LISTEN_PORT": self.port, "MODEL_PORT": self.backend.port,
            "APPROVAL_PORT": self.replicas[0].filter_port, "BUFFER_LIMIT": BUFFER_LIMIT, "WASM_PATH": WASM,
            "FILTER_CONFIG": filter_config_value(self.filter_config),
        })
        if self.several or self.model_http2 or self.mutate:
            config = yaml.safe_load(text)
            if self.several:
                with_approval_replicas(config, [r.filter_port for r in self.replicas])
            if self.model_http2:
                with_http2_model(config)
            if self.mutate:
                self.mutate(config)
            text = yaml.safe_dump(config, sort_keys=False)
        self.yaml.write_text(text)
        self.rendered = text
        self.proc = Proc("envoy", [str(ENVOY), "-c", str(self.yaml), "--log-level", "warn",
                                   "--component-log-level", "wasm:info", "--concurrency", "2",
                                   "--base-id", str(self.admin_port)],
                         self.workdir / f"{self.name}.log", env=self.env)

    def start(self, wait_ready=True):
        # A port chosen free can be taken by another socket before Envoy binds
        # it: then Envoy exits, and it is started again on other ports.
        for attempt in range(3):
            self.proc.start()
            if not wait_ready:
                return self
            try:
                wait_started(self.proc, f"{self.admin}/ready", "envoy", timeout=20)
                return self
            except StartError:
                # (Not when a test rewrote the configuration: it names the ports.)
                if (self.proc.alive() or attempt == 2 or "Address already in use" not in self.proc.log_text()
                        or self.yaml.read_text() != self.rendered):
                    raise
                self.proc.stop()  # exited: only forgets it
                self.configure()
        return self

    def stop(self):
        if self.proc.alive():
            try:
                httpx.post(f"{self.admin}/quitquitquit", timeout=2)
                self.proc.popen.wait(5)
            except (httpx.HTTPError, subprocess.TimeoutExpired):
                pass
        self.proc.stop()


DEFAULT_FILTER_CONFIG = json.loads((ROOT / "envoy" / "filter-config.json").read_text())

# The stacks run as the README recommends: only the filter, holding this
# token, may use the service's filter API. `filter_token=None` turns it off.
DEFAULT_FILTER_TOKEN = "e2e-filter-token-0123456789abcdef"


class Stack:
    """Demo backend + approval service + Envoy with the filter (and the
    filter token set, unless `filter_token=None`)."""

    def __init__(self, workdir: Path, filter_config: dict | None = None,
                 filter_token: str | None = DEFAULT_FILTER_TOKEN,
                 envoy_env: dict | None = None, approval_extra: str = "", database: str | None = None,
                 model_http2: bool = False, approval_env: dict | None = None,
                 reviewer_fields: dict[str, str] | None = None, approval_tls: str | None = None,
                 approval_transport_socket: dict | None = None, approval_http1: bool = False,
                 envoy_mutate=None):
        """`approval_tls`: the service's [tls] table (the filter API then on
        filter_listen); `approval_transport_socket`: Envoy's transport socket
        on the approval cluster (see ChannelCertificates); `approval_http1`:
        that cluster over HTTP/1.1 (see `with_approval_http1`);
        `envoy_mutate`: changes the rendered Envoy configuration (a dict),
        e.g. `with_route`."""
        self.filter_token = filter_token
        self.approval_http1 = approval_http1
        config = dict(DEFAULT_FILTER_CONFIG if filter_config is None else filter_config)
        if filter_token and "approval_token_env" not in config:
            config["approval_token"] = filter_token
        self.backend = Backend(workdir)
        self.approval = Approval(workdir, filter_token=filter_token, extra=approval_extra, database=database,
                                 env=approval_env, reviewer_fields=reviewer_fields, tls=approval_tls)
        def mutate(c: dict):
            if approval_transport_socket:
                with_approval_transport_socket(c, approval_transport_socket)
            if approval_http1:
                with_approval_http1(c)
            if envoy_mutate:
                envoy_mutate(c)
        self.envoy = Envoy(workdir, self.backend, self.approval, config, env=envoy_env,
                           model_http2=model_http2, mutate=mutate)

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
