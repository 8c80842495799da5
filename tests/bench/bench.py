"""countersign load benchmarks: run them with `tests/bench/run` (see tests/bench/README.md).

Starts the release binaries and Envoy on loopback, drives them with wrk (and
small asyncio clients where wrk cannot measure what is asked), and writes a
markdown report to stdout and docs/benchmarks.md. Processes are started with
the e2e tests' harness (tests/e2e/stack.py): each runs in its own session on
free loopback ports and is stopped by PID at the end, also on Ctrl-C.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import datetime as dt
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
sys.path.insert(0, str(HERE))

try:  # from .venv-bench (tests/bench/run sets it up); --help works without them
    import httpx
    import yaml
    from stack import (DEFAULT_FILTER_CONFIG, ENVOY, REVIEWERS, Approval, Backend, Envoy, Proc, StartError, free_port,
                       stop_all, wait_started, without_wasm_filter)
except ImportError:  # pragma: no cover
    httpx = yaml = None
    REVIEWERS = {}

from benchhttp import Conn, percentile, raise_nofile  # noqa: E402
from workloads import PROSE, chat_body, create_review_body  # noqa: E402

LITELLM = ROOT / ".venv-bench" / "bin" / "litellm"
LITELLM_VERSION = "1.89.7"
POST_LUA = HERE / "wrk" / "post.lua"
# The floor of any wasm filter: tests/bench/noop-filter, built by tests/bench/run.
# System calls the record path's profile counts in the approval service (per request): the WAL's writes and
# flushes, the thread hand-offs, the event loop.
COUNTED_SYSCALLS = ("pwrite64", "fsync", "fdatasync", "pread64", "futex", "epoll_wait", "writev", "recvfrom")
NOOP_WASM = ROOT / "target" / "bench-noop" / "wasm32-wasip1" / "release" / "countersign_bench_noop.wasm"
APPROVE_LUA = HERE / "wrk" / "approve.lua"
REVIEWER_AUTH = f"Bearer {REVIEWERS.get('alice', '')}"  # a reviewer the harness configures in every service
LITELLM_KEY = "sk-bench-master-key-0123456789"
ALLOW_MODEL = "demo-allow-bench"  # matched by the demo config's `demo-allow*` allow rule
HELD_MODEL = "demo-echo-held"
VM_MEMORY_STAT = "wasmcustom.countersign_vm_memory_bytes"
AUTO_MODEL = "demo-auto-bench"  # scenario 6 puts its `review` + `auto_approve` rule first for this model
NOOP_LABEL = "no-op wasm filter, reads the body (the floor)"  # no rule matches: default_action review
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Targets from the issues.
T_ALLOW_RATIO, T_ALLOW_ADDED_P50_MS, T_RECORD_RATIO = 0.85, 0.05, 0.70
T_ALLOW_VS_FLOOR = 0.95  # scenario 1 within 5% of the no-op filter's throughput
# Issue #17's targets: 10k held in < 0.5 GiB (<= 50 KiB per held request, Envoy + service), decision ->
# first byte p99 < 50 ms, request masking (2 KB with matches) >= 0.75x, the record on PostgreSQL >= 0.60x.
T_HELD_RSS_BYTES, T_HELD_PER_REQUEST_KIB, T_DECISION_P99_MS, T_STREAM_TTFB_MS = 1 << 29, 50.0, 50.0, 1.0
T_MASK_RATIO, T_RECORD_PG_RATIO = 0.75, 0.60


def log(msg: str):
    print(f"\033[1m[bench {time.strftime('%H:%M:%S')}]\033[0m {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ processes

def stop_everything():
    """Stops every process the harness started and has not stopped yet."""
    for failure in stop_all():
        log(failure)


def tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = open(f"/proc/{d}/stat").read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def cpu_seconds(pid: int) -> float:
    total = 0
    for p in tree(pid):
        try:
            f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            total += int(f[11]) + int(f[12])  # utime, stime (fields 14, 15)
        except (OSError, IndexError):
            pass
    return total / CLK_TCK


def held_floor_and_hold(R: dict) -> tuple[dict | None, dict | None]:
    """The held floor (requests paused in the no-op filter) if it was measured, and the held-capacity run
    at the same N whose Envoy heap was read, if any: the two sides of "what any filter pays, what is
    countersign's own"."""
    floor = R.get("held_floor")
    if not floor:
        return None, None
    same = next((h for h in R["held"] if h["n"] == floor["n"] and h["status"] == "ok"
                 and h.get("envoy_memory") and h.get("envoy_memory_base")), None)
    return floor, same


def held_vm_kib(h: dict) -> float | None:
    """KiB per held request that the filter's VMs grew by, when the run read their gauge."""
    base, held = h.get("vm_memory_base"), h.get("vm_memory_held")
    if base is None or held is None:
        return None
    return (held - base) / held_count(h) / 1024


def held_floor_sentence(R: dict) -> str:
    """How much of a held request's memory any wasm filter that holds it pays (the no-op floor), and how
    much is countersign's own, when both were measured at the same N."""
    floor, same = held_floor_and_hold(R)
    if floor is None or floor["status"] != "ok" or same is None:
        return ""
    own = hold_alloc_kib(same) - floor["alloc_per_kib"]
    return (f" Measured at N = {floor['n']:,}: a request paused in the no-op wasm filter grows Envoy's heap "
            f"{floor['alloc_per_kib']:.1f} KiB, countersign's hold {hold_alloc_kib(same):.1f} KiB: {own:.0f} KiB "
            f"of Envoy's share is countersign's own; the "
            f"{floor['alloc_per_kib']:.0f} KiB of the caller's connection and stream stay with any filter that "
            f"holds a request here ({floor['alloc_per_kib'] * 10000 / 1024:,.0f} MiB of Envoy heap for 10k).")


def hold_alloc_kib(h: dict) -> float:
    """Envoy's heap growth (tcmalloc `allocated`) per held request of one held-capacity run."""
    return (h["envoy_memory"]["allocated"] - h["envoy_memory_base"]["allocated"]) / held_count(h) / 1024


def rss_bytes(pid: int) -> int:
    total = 0
    for p in tree(pid):
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


# ------------------------------------------------------------------ components

def approval_service(work: Path, name: str, extra: str = "", database: str | None = None) -> Approval:
    """An approval service on `database`, or on a SQLite file of its own, emptied first (.run/bench outlives a
    run). It logs warnings only: a log line per request would be measured too."""
    if database is None:
        db = work / f"{name}.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        database = str(db)
    return Approval(work, extra=extra, database=database, name=name, env={"RUST_LOG": "warn"})


def reviews(approval: Approval, status: str) -> dict[str, dict]:
    """Every review with this status, by id (pages through the reviewer API, newest first)."""
    seen: dict[str, dict] = {}
    before = None
    with approval.client(timeout=30) as c:
        while True:
            params = {"status": status, "limit": 500}
            if before is not None:
                params["before_ms"] = before
            r = c.get("/api/reviews", params=params)
            r.raise_for_status()
            page = r.json()["reviews"]
            new = [x for x in page if x["id"] not in seen]
            for x in page:
                seen[x["id"]] = x
            if len(page) < 500 or not new:
                break
            # +1 so that reviews created in the same millisecond as the page's last are not skipped
            before = min(x["created_at_ms"] for x in page) + 1
    return seen


def last_request(backend: Backend) -> dict | None:
    """The last request the demo backend received."""
    seen = backend.requests()
    return seen[-1] if seen else None


# Envoy's calls to the approval service (the filter's record calls, in scenario 3).
RECORD_CALLS_STAT = "cluster.countersign_approval.upstream_rq_total"


def calls_per_request_text(per_conns: dict) -> str:
    """What the batching achieved: Envoy's calls to the service per request, by connection count."""
    if not per_conns:
        return ""
    parts = [f"{v:.2f} at {c} connection{'s' if c != '1' else ''}" for c, v in sorted(per_conns.items(), key=lambda kv: int(kv[0]))]
    return ("Calls from Envoy to the service per request: " + " and ".join(parts) + " (both parts of its record; "
            f"`{RECORD_CALLS_STAT}` over the backend's completed requests, warm-up included), so under load one "
            "call carries several records and the cost left is per record, not per call. ")


def histogram(envoy: Envoy, name: str) -> dict | None:
    """Cumulative P50/P99 of one Envoy histogram (ms for *_time), from the admin /stats."""
    try:
        text = httpx.get(f"{envoy.admin}/stats", params={"filter": f"^{re.escape(name)}$"}, timeout=10).text
    except httpx.HTTPError:
        return None
    out = {}
    for q in ("P50", "P99"):
        m = re.search(rf"{q}\(([^,]+),([^)]+)\)", text)
        if m and m.group(2) != "nan":
            out[q.lower()] = float(m.group(2))
    return out or None


def counters(envoy: Envoy, pattern: str = "") -> dict[str, int]:
    """Envoy's counters and gauges whose names match `pattern`."""
    r = httpx.get(f"{envoy.admin}/stats", params={"filter": pattern} if pattern else None, timeout=5)
    out = {}
    for line in r.text.splitlines():
        k, _, v = line.partition(": ")
        if v.strip().lstrip("-").isdigit():
            out[k] = int(v)
    return out


def stat(envoy: Envoy, name: str) -> int | None:
    """One of Envoy's counters or gauges, by its exact name (`None` until it exists)."""
    return counters(envoy, f"^{re.escape(name)}$").get(name)


def vm_memory(envoy: Envoy) -> int | None:
    """The filter's wasm VMs' memory, summed over Envoy's workers (the filter's own gauge; V8's wasm
    memory is outside Envoy's heap, so `/memory` does not see it)."""
    return stat(envoy, VM_MEMORY_STAT)


def raise_circuit_breakers(limit: int):
    """Raises the default (1024) circuit breakers of every cluster: a bulk approval releases every held
    request to the model at once, so the model cluster's default would refuse those beyond 1k (the held
    requests themselves wait in one watch per worker and count against no breaker)."""
    def mutate(cfg: dict):
        for c in cfg.get("static_resources", {}).get("clusters", []):
            c["circuit_breakers"] = {"thresholds": [{
                "priority": "DEFAULT", "max_connections": limit, "max_pending_requests": limit,
                "max_requests": limit, "max_retries": 3}]}
    return mutate


def config_rejection(envoy_log: str, overlay: dict) -> str:
    """A short reason why the filter refused a configuration, from Envoy's log."""
    keys = ", ".join(f"`{k}`" for k in overlay)
    m = re.search(r"invalid plugin configuration: ([^\n]*)", envoy_log)
    if not m:
        return f"Envoy did not start with {keys} in the filter configuration"
    msg = m.group(1)
    f = re.match(r"field `([^`]*)`: (unknown field|unknown variant)", msg)
    if f:
        return f"the filter does not know `{f.group(1)}` yet ({f.group(2)})"
    return f"the filter rejects {keys}: {msg.split(', expected')[0][:120]}"


def add_access_log(path: Path):
    """An access log with per-request timings in microseconds (for the held-capacity breakdown)."""
    def mutate(cfg: dict):
        for listener in cfg.get("static_resources", {}).get("listeners", []):
            for chain in listener.get("filter_chains", []):
                for f in chain.get("filters", []):
                    tc = f.get("typed_config", {})
                    if "http_filters" in tc:
                        tc["access_log"] = [{"name": "envoy.access_loggers.file", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                            "path": str(path), "log_format": {"json_format": {
                                "start": "%START_TIME(%s.%6f)%", "rid": "%RESP(X-COUNTERSIGN-REVIEW-ID)%",
                                "code": "%RESPONSE_CODE%",
                                "us_tx_beg": "%COMMON_DURATION(DS_RX_BEG:US_TX_BEG:us)%",
                                "us_rx_beg": "%COMMON_DURATION(DS_RX_BEG:US_RX_BEG:us)%",
                                "ds_tx_beg": "%COMMON_DURATION(DS_RX_BEG:DS_TX_BEG:us)%"}}}}]
    return mutate


def with_wasm_code(path: Path):
    """The same Envoy with another wasm module in the countersign filter's place (same VM, runtime, position
    in the chain): the no-op floor."""
    def mutate(cfg: dict):
        found = 0
        for listener in cfg.get("static_resources", {}).get("listeners", []):
            for chain in listener.get("filter_chains", []):
                for f in chain.get("filters", []):
                    for h in f.get("typed_config", {}).get("http_filters", []):
                        tc = h.get("typed_config", {})
                        if tc.get("@type", "").endswith(".wasm.v3.Wasm"):
                            tc["config"]["vm_config"]["code"] = {"local": {"filename": str(path)}}
                            found += 1
        if not found:
            raise ValueError("no wasm filter found in the Envoy configuration")
    return mutate


def chain(*mutations):
    def mutate(cfg: dict):
        for m in mutations:
            if m:
                m(cfg)
    return mutate


def deep_merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


# ------------------------------------------------------------------ load

class Wrk:
    def __init__(self, work: Path):
        self.work = work
        self.n = 0

    def run(self, url: str, conns: int, duration: float, body: Path | None = None, script: Path = POST_LUA,
            env: dict | None = None, threads: int = 1) -> dict:
        self.n += 1
        e = {"BENCH_BODY": str(body) if body else "", **(env or {})}
        out = self.work / f"wrk-{self.n}.out"
        cmd = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{max(1, int(round(duration)))}s", "--timeout", "10s",
               "-s", str(script), url]
        done = self.work / f"wrk-{self.n}.done"
        done.unlink(missing_ok=True)
        e["BENCH_DONE"] = str(done)
        with open(out, "wb") as f:
            p = Proc("wrk", cmd, self.work / f"wrk-{self.n}.err", env=e, stdout=f).start()
            try:
                deadline = time.monotonic() + duration + 60
                while p.popen.poll() is None and time.monotonic() < deadline:
                    if done.exists():
                        # The script has finished its work: stop wrk early, it prints its summary.
                        os.kill(p.pid, signal.SIGINT)
                        p.popen.wait(30)
                        break
                    time.sleep(0.02)
            finally:
                p.stop()
        text = out.read_text(errors="replace")
        m = re.search(r"^BENCH_JSON (\{.*\})$", text, re.M)
        if not m:
            raise RuntimeError(f"wrk gave no result ({' '.join(cmd)}):\n{text}\n{p.log_text()[-4000:]}")
        r = json.loads(m.group(1))
        r["seconds"] = r["duration_us"] / 1e6
        r["rps"] = r["requests"] / r["seconds"] if r["seconds"] else 0.0
        r["errors"] = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
        return r


# ------------------------------------------------------------------ the suite

class Suite:
    def __init__(self, args):
        self.args = args
        self.work = ROOT / ".run" / "bench"
        self.work.mkdir(parents=True, exist_ok=True)
        for f in self.work.glob("wrk-*"):
            f.unlink()
        self.wrk = Wrk(self.work)
        self.d = float(args.duration)
        self.results: dict = {"rows": [], "stream": [], "held": [], "approval": None, "masking": [],
                              "features": {}, "profile": None, "notes": []}
        self.allow_config: dict | None = None
        self.bodies = {}
        for key, size, sensitive in [("2k", 2048, False), ("20k", 20480, False),
                                     ("2k-sensitive", 2048, True), ("20k-sensitive", 20480, True),
                                     ("2k-auto", 2048, False)]:
            path = self.work / f"body-{key}.json"
            data = chat_body(size, model=AUTO_MODEL if key.endswith("-auto") else ALLOW_MODEL, sensitive=sensitive)
            path.write_bytes(data)
            self.bodies[key] = (path, len(data))

    # -- one measured wrk run, with CPU of the watched processes

    def measure(self, label: str, system: str, url: str, conns: int, body: str = "2k", watch: dict | None = None,
                backend: Backend | None = None, env: dict | None = None, warmup: float = 2.0,
                scenario: str = "", duration: float | None = None) -> dict:
        path, size = self.bodies[body]
        dur = duration or self.d
        if warmup:
            self.wrk.run(url, conns, warmup, path, env=env)
        before_stats = settle(backend) if backend else None
        cpu0 = {k: cpu_seconds(p) for k, p in (watch or {}).items()}
        r = self.wrk.run(url, conns, dur, path, env=env)
        cpu = {k: cpu_seconds(p) - cpu0[k] for k, p in (watch or {}).items()}
        row = {"label": label, "system": system, "scenario": scenario, "conns": conns, "body": body,
               "body_bytes": size, "status": "ok", "rps": r["rps"], "p50_ms": r["p50_us"] / 1000,
               "p99_ms": r["p99_us"] / 1000, "requests": r["requests"], "errors": r["errors"],
               "seconds": r["seconds"], "cpu_s": cpu, "wrk": r}
        if backend and before_stats:
            after = settle(backend)
            row["backend_completed"] = after["completed"] - before_stats["completed"]
            # wrk counts answers received in time; the backend may have answered up to `conns` more
            # (cut off at the end), and a proxy with a queue may finish up to `conns` of the warm-up's.
            if not (r["requests"] <= row["backend_completed"] <= r["requests"] + 2 * conns):
                row["errors"] += 1
                row["note"] = (f"backend answered {row['backend_completed']} requests, wrk counted "
                               f"{r['requests']}")
        log(f"{label:<48} c={conns:<3} {row['rps']:9.0f} req/s  p50 {row['p50_ms']:.3f} ms  "
            f"p99 {row['p99_ms']:.3f} ms  errors {row['errors']}  cpu {', '.join(f'{k} {v:.2f}s' for k, v in cpu.items())}")
        self.results["rows"].append(row)
        return row

    def keep_medians(self):
        """Of rows measured several times (--rounds), keeps the one with the median req/s."""
        groups: dict[tuple, list[dict]] = {}
        for r in self.results["rows"]:
            if r["status"] == "ok":
                groups.setdefault((r["label"], r["conns"], r["body"]), []).append(r)
        drop = set()
        for rows in groups.values():
            if len(rows) < 2:
                continue
            ranked = sorted(rows, key=lambda r: r["rps"])
            keep = ranked[(len(ranked) - 1) // 2]
            keep["rounds"] = [round(r["rps"]) for r in rows]
            keep["rounds_p50_ms"] = [round(r["p50_ms"], 3) for r in rows]
            drop |= {id(r) for r in rows if r is not keep}
        self.results["rows"] = [r for r in self.results["rows"] if id(r) not in drop]

    def pending_row(self, label: str, system: str, scenario: str, reason: str, conns=None, body="2k"):
        self.results["rows"].append({"label": label, "system": system, "scenario": scenario, "conns": conns,
                                     "body": body, "status": "pending", "reason": reason})

    # -- feature detection

    def feature(self, name: str, backend: Backend, approval: Approval) -> tuple[Envoy | None, str]:
        """Starts an Envoy with the feature's configuration; (envoy, "") if it works, else (None, why)."""
        spec = json.loads((HERE / "features.json").read_text())[name]
        cfg = deep_merge(self.allow_config, spec["filter_config"])
        envoy = Envoy(self.work, backend, approval, cfg, name=f"envoy-{name}")
        try:
            envoy.start()
        except StartError:
            envoy.stop()
            reason = "not yet available: " + config_rejection(envoy.proc.log_text(), spec["filter_config"])
            self.results["features"][name] = {"available": False, "reason": reason}
            log(f"feature {name}: {reason}")
            return None, reason
        # Probe: one allowed request must get through, and masking must really change the body.
        body = chat_body(2048, model=ALLOW_MODEL, sensitive=True, marker=f"probe-{name}")
        r = httpx.post(f"{envoy.url}/v1/chat/completions", content=body,
                       headers={"content-type": "application/json"}, timeout=20)
        reason = ""
        if r.status_code != 200:
            reason = f"not yet available: configuration accepted but a probe request got {r.status_code}: {r.text[:120]}"
        elif spec.get("probe") == "masks":
            seen = last_request(backend)
            if seen is None or seen["body"].encode() == body:
                reason = "not yet available: configuration accepted but the model received the prompt unmasked"
        if reason:
            envoy.stop()
            self.results["features"][name] = {"available": False, "reason": reason}
            log(f"feature {name}: {reason}")
            return None, reason
        self.results["features"][name] = {"available": True, "reason": "", "filter_config": spec["filter_config"]}
        log(f"feature {name}: available")
        return envoy, ""

    # -- scenarios

    def proxy_scenarios(self, allow_only: bool = False, automatic: bool = False):
        """Backend ceiling, plain Envoy, the no-op floor, scenarios 1-6 (`allow_only`: only up to scenario 1
        and its profile, plus scenario 6 with `automatic`)."""
        w = self.work
        backend = Backend(w).start()
        approval = approval_service(w, "approval").start()
        plain = Envoy(w, backend, approval, DEFAULT_FILTER_CONFIG, name="envoy-plain",
                      mutate=without_wasm_filter).start()
        allow = Envoy(w, backend, approval, self.baseline_config(backend, approval), name="envoy-filter").start()
        noop = self.noop_envoy(backend, approval)
        chat = "/v1/chat/completions"
        env_rss = {}

        # The demo backend's own ceiling.
        for c in (1, 32):
            self.measure("demo backend direct (ceiling)", "backend", backend.url + chat, c,
                         watch={"backend": backend.proc.pid}, backend=backend, scenario="ceiling")
        # Plain Envoy, the no-op floor and scenario 1, interleaved so that drift hits them alike; with
        # --rounds N each runs N times and the round with the median req/s is kept (all rounds are listed
        # in the report).
        for c, body in ((1, "2k"), (32, "2k"), (32, "20k")):
            for _ in range(self.args.rounds):
                self.measure("plain Envoy (no wasm filter)", "plain", plain.url + chat, c, body=body,
                             watch={"envoy": plain.proc.pid, "backend": backend.proc.pid}, backend=backend,
                             scenario="plain")
                if noop:
                    self.measure(NOOP_LABEL, "noop", noop.url + chat, c, body=body,
                                 watch={"envoy": noop.proc.pid, "backend": backend.proc.pid}, backend=backend,
                                 scenario="noop")
                self.measure("1. `allow` policy, no masking", "filter", allow.url + chat, c, body=body,
                             watch={"envoy": allow.proc.pid, "backend": backend.proc.pid}, backend=backend,
                             scenario="allow")
        self.keep_medians()
        env_rss["plain"] = rss_bytes(plain.proc.pid)
        env_rss["filter"] = rss_bytes(allow.proc.pid)
        if noop:
            env_rss["noop"] = rss_bytes(noop.proc.pid)
        self.results["envoy_rss_idle"] = env_rss

        if self.results_allow_missed() and not self.args.no_profile:
            self.results["profile"] = {"plain": self.profile(plain, chat), "filter": self.profile(allow, chat)}
            if noop:
                self.results["profile"]["noop"] = self.profile(noop, chat)
        if noop:
            noop.stop()
        if allow_only:
            if automatic:
                self.automatic_approval(backend, chat)
            self.stop_all_of(plain, allow, approval, backend)
            return

        # Scenario 2: request masking.
        masking, why = self.feature("masking", backend, approval)
        for body in ("2k", "2k-sensitive", "20k", "20k-sensitive"):
            for c in ((1, 32) if body == "2k" else (32,)):
                label = "2. `allow` + request masking"
                if masking:
                    self.measure(label, "filter", masking.url + chat, c, body=body,
                                 watch={"envoy": masking.proc.pid, "backend": backend.proc.pid},
                                 backend=backend, scenario="masking")
                else:
                    self.pending_row(label, "filter", "masking", why, c, body)
        self.masking_throughput(masking, allow, backend, why)

        self.record_scenarios(backend, approval, chat)

        # Scenario 4: approval-token path.
        self.approval_tokens(backend, chat)

        # Scenario 6: automatic approval by an assessor.
        self.automatic_approval(backend, chat)

        # Scenario 5: streamed answers.
        self.streaming(backend, plain, allow, masking, why_masking=self.results["features"]["masking"]["reason"])
        if masking:
            masking.stop()
        self.stop_all_of(plain, allow, approval, backend)

    def noop_envoy(self, backend: Backend, approval: Approval) -> Envoy | None:
        """Envoy with the no-op filter (tests/bench/noop-filter) in countersign's place, or None (and a
        pending row) when it was not built or does not start."""
        reason = ""
        if not NOOP_WASM.exists():
            reason = f"not built: {NOOP_WASM.relative_to(ROOT)} is missing (tests/bench/run builds it)"
        else:
            envoy = Envoy(self.work, backend, approval, self.allow_config or DEFAULT_FILTER_CONFIG,
                          name="envoy-noop", mutate=with_wasm_code(NOOP_WASM))
            try:
                return envoy.start()
            except StartError as e:
                envoy.stop()
                reason = f"Envoy did not start with the no-op filter: {str(e).splitlines()[0][:160]}"
        log(f"no-op floor: {reason}")
        for c, body in ((1, "2k"), (32, "2k"), (32, "20k")):
            self.pending_row(NOOP_LABEL, "noop", "noop", reason, c, body)
        return None

    def record_scenarios(self, backend: Backend, approval: Approval, chat: str):
        """Scenario 3, the durable pre-forward record, on SQLite and then on PostgreSQL (3b)."""
        record, why = self.feature("record", backend, approval)
        for c in (1, 32):
            if record:
                calls0, done0 = stat(record, RECORD_CALLS_STAT) or 0, settle(backend)["completed"]
                self.measure("3. `allow` + durable pre-forward record", "filter", record.url + chat, c,
                             watch={"envoy": record.proc.pid, "backend": backend.proc.pid,
                                    "approval": approval.proc.pid}, backend=backend, scenario="record")
                calls, done = (stat(record, RECORD_CALLS_STAT) or 0) - calls0, settle(backend)["completed"] - done0
                if done:
                    # Both parts of each request's record travel in these calls (warm-up included).
                    self.results.setdefault("record_calls_per_request", {})[str(c)] = calls / done
                    log(f"record calls to the service: {calls / done:.2f} per request at {c} connection(s)")
            else:
                self.pending_row("3. `allow` + durable pre-forward record", "filter", "record", why, c)
        if record:
            self.results["record_callout_ms"] = histogram(record, "cluster.countersign_approval.upstream_rq_time")
            if not self.args.no_profile and self.results_record_missed():
                self.results["record_profile"] = self.profile(record, chat, {"approval": approval.proc.pid})
            record.stop()
            self.record_on_postgres(backend, chat)

    def records_only(self):
        """Plain Envoy and scenarios 3 and 3b alone: the short run for work on the record path."""
        w = self.work
        backend = Backend(w).start()
        approval = approval_service(w, "approval").start()
        plain = Envoy(w, backend, approval, DEFAULT_FILTER_CONFIG, name="envoy-plain",
                      mutate=without_wasm_filter).start()
        self.baseline_config(backend, approval)  # the configuration scenario 3 adds its records to
        chat = "/v1/chat/completions"
        for c in (1, 32):
            self.measure("plain Envoy (no wasm filter)", "plain", plain.url + chat, c,
                         watch={"envoy": plain.proc.pid, "backend": backend.proc.pid}, backend=backend,
                         scenario="plain")
        self.record_scenarios(backend, approval, chat)
        self.stop_all_of(plain, approval, backend)

    def record_on_postgres(self, backend: Backend, chat: str):
        """Scenario 3 again with the service on PostgreSQL (Debian's server on loopback, default durability:
        fsync on, synchronous_commit on), as several replicas would run it."""
        label = "3b. `allow` + durable record, service on PostgreSQL"
        try:
            from stack import Postgres
            pg = Postgres(durable=True).start()
        except (ImportError, RuntimeError, OSError) as e:
            for c in (1, 32):
                self.pending_row(label, "filter", "record-pg", f"PostgreSQL could not start: {e}", c)
            return
        approval = envoy = None
        try:
            approval = approval_service(self.work, "approval-pg", database=pg.create_database("bench")).start()
            envoy, why = self.feature("record", backend, approval)
            for c in (1, 32):
                if envoy:
                    self.measure(label, "filter", envoy.url + chat, c,
                                 watch={"envoy": envoy.proc.pid, "backend": backend.proc.pid,
                                        "approval": approval.proc.pid, "postgres": pg.proc.pid},
                                 backend=backend, scenario="record-pg")
                else:
                    self.pending_row(label, "filter", "record-pg", why, c)
        finally:
            if envoy:
                envoy.stop()
            if approval:
                approval.proc.stop()
            pg.stop()

    def baseline_config(self, backend: Backend, approval: Approval) -> dict:
        """The demo configuration plus whichever `allow_baseline` overlays (e.g. records off) the filter
        accepts, so scenario 1 and the held requests measure the policy and the hold alone."""
        if self.allow_config is not None:
            return self.allow_config
        cfg, used = copy.deepcopy(DEFAULT_FILTER_CONFIG), []
        for overlay in json.loads((HERE / "features.json").read_text())["allow_baseline"]["overlays"]:
            trial = deep_merge(cfg, overlay)
            probe = Envoy(self.work, backend, approval, trial, name="envoy-baseline-probe")
            try:
                probe.start()
                cfg = trial
                used.append(overlay)
            except StartError:
                pass
            finally:
                probe.stop()
        self.allow_config = cfg
        self.results["allow_overlays"] = used
        return cfg

    def approval_tokens(self, backend: Backend, chat: str):
        """Scenario 4: an asynchronous caller's retry with an approval token (docs/approvals.md)."""
        spec = json.loads((HERE / "features.json").read_text())["approval_token"]
        labels = {False: "4. approval-token retry, verified offline (`single_use: false`)",
                  True: "4. approval-token retry, spent at the service (`single_use: true`)"}
        things: list = []

        def pending(reason: str):
            self.results["features"]["approval_token"] = {"available": False, "reason": reason}
            log(f"feature approval_token: {reason}")
            for c in (1, 32):
                for single in (False, True):
                    self.pending_row(labels[single], "filter", "token", reason, c)
            self.stop_all_of(*things)

        svc = approval_service(self.work, "approval-tokens",
                               extra=f"{spec['service_toml_top']}\n\n{spec['service_toml_tables']}")
        things.append(svc)
        try:
            svc.start()
        except StartError:
            m = re.search(r"unknown field `([^`]+)`", svc.proc.log_text())
            return pending("not yet available: the approval service " + (
                f"does not know `{m.group(1)}` yet" if m else "does not start with the token settings"))
        cfg = deep_merge(self.allow_config, spec["filter_config"])
        cfg["rules"] = spec["prepend_rules"] + cfg.get("rules", [])
        envoys = {}
        for single in (True, False):
            e = Envoy(self.work, backend, svc, deep_merge(cfg, {"approval_tokens": {"single_use": single}}),
                      name=f"envoy-tokens-{'spent' if single else 'offline'}")
            things.append(e)
            try:
                e.start()
            except StartError:
                overlay = dict(spec["filter_config"], rules=spec["prepend_rules"])
                return pending("not yet available: " + config_rejection(e.proc.log_text(), overlay))
            envoys[single] = e
        # One `Host` for both Envoys (each on its own port): a token binds the
        # `:authority` it was approved for, and wrk's own `Host` names the port.
        who = {spec["caller_header"]: spec["caller"], "content-type": "application/json",
               "Host": "gateway.bench"}
        gw = envoys[True].url
        try:
            r = httpx.post(gw + chat, content=chat_body(2048, model=spec["model"]), headers=who, timeout=20)
            if r.status_code != 202:
                return pending(f"not yet available: an asynchronous request got {r.status_code}, not 202: {r.text[:100]}")
            first = r.json()
            with svc.client() as c:
                d = c.post(f"/api/reviews/{first['id']}/approve", json={"reason": "bench"})
            if d.status_code != 200:
                return pending(f"not yet available: approving the asynchronous review got {d.status_code}: {d.text[:100]}")
            st = httpx.get(gw + first["status_url"], headers=who, timeout=20)
            token = st.json().get("approval_token") if st.status_code == 200 else None
            if not token:
                return pending(f"not yet available: the status URL gave no approval token ({st.status_code}: {st.text[:100]})")
            approved = st.json()["approved_body"].encode()
            hdrs = {**who, spec["token_header"]: token}
            for single, e in envoys.items():
                check = httpx.post(e.url + chat, content=approved, headers=hdrs, timeout=20)
                if check.status_code != 200:
                    return pending(f"not yet available: the retry with the token got {check.status_code} "
                                   f"({'single use' if single else 'offline'}): {check.text[:100]}")
        except (httpx.HTTPError, ValueError, KeyError) as e:
            return pending(f"not yet available: the asynchronous flow failed: {e!r}"[:200])
        path = self.work / "body-2k-token.json"
        path.write_bytes(approved)
        self.bodies["2k-token"] = (path, len(approved))
        env = {"BENCH_HEADERS": "\n".join(f"{k}: {v}" for k, v in hdrs.items() if k != "content-type")}
        self.results["features"]["approval_token"] = {"available": True, "reason": ""}
        for c in (1, 32):
            for single in (False, True):
                e = envoys[single]
                self.measure(labels[single], "filter", e.url + chat, c, body="2k-token", env=env,
                             watch={"envoy": e.proc.pid, "backend": backend.proc.pid, "approval": svc.proc.pid},
                             backend=backend, scenario="token-spent" if single else "token-offline")
        self.results["token_callout_ms"] = histogram(envoys[True], "cluster.countersign_approval.upstream_rq_time")
        self.stop_all_of(*things)

    def automatic_approval(self, backend: Backend, chat: str):
        """Scenario 6: a `review` rule whose prompts an assessor on loopback approves automatically
        (docs/cutting-reviewer-load.md): request in -> answer out, against the `allow` path."""
        label = "6. `review`, approved automatically by an assessor (loopback)"
        assessor = Backend(self.work, name="assessor-backend")
        svc = approval_service(self.work, "approval-auto", extra=(
            "[[assessors]]\nname = \"moderation\"\nkind = \"moderation\"\n"
            f"url = \"{assessor.url}/v1/moderations\"\nmodel = \"omni-moderation-latest\"\ntimeout_ms = 1500\n"))
        cfg = copy.deepcopy(self.allow_config)
        cfg["rules"] = [{"name": "bench-auto", "model": AUTO_MODEL, "action": "review",
                         "auto_approve": {"max_score": 0.5}}] + cfg.get("rules", [])
        envoy = Envoy(self.work, backend, svc, cfg, name="envoy-auto")
        things = [assessor, svc, envoy]
        try:
            assessor.start()
            svc.start()
            envoy.start()
            probe = httpx.post(envoy.url + chat, content=self.bodies["2k-auto"][0].read_bytes(),
                               headers={"content-type": "application/json"}, timeout=30)
            if probe.status_code != 200:
                raise RuntimeError(f"a prompt under the auto_approve rule got {probe.status_code}: {probe.text[:120]}")
            with svc.client() as c:
                page = c.get("/api/reviews", params={"status": "approved", "limit": 5}).json()["reviews"]
            if not page or not page[0].get("automatic"):
                raise RuntimeError("the probe's review was not approved automatically")
        except (StartError, RuntimeError, httpx.HTTPError, ValueError, KeyError) as e:
            self.results["features"]["automatic"] = {"available": False, "reason": str(e)[:200]}
            log(f"feature automatic: {e}")
            for c in (1, 32):
                self.pending_row(label, "filter", "automatic", f"failed: {e}"[:200], c)
            self.stop_all_of(*things)
            return
        self.results["features"]["automatic"] = {"available": True, "reason": ""}
        for c in (1, 32):
            self.measure(label, "filter", envoy.url + chat, c, body="2k-auto",
                         watch={"envoy": envoy.proc.pid, "backend": backend.proc.pid, "approval": svc.proc.pid,
                                "assessor": assessor.proc.pid},
                         backend=backend, scenario="automatic")
        self.results["auto_callout_ms"] = histogram(envoy, "cluster.countersign_approval.upstream_rq_time")
        self.stop_all_of(*things)

    def results_record_missed(self) -> bool:
        rec, plain = self.row("record", 32), self.row("plain", 32)
        return bool(rec and plain and rec["rps"] < 0.70 * plain["rps"])

    def results_allow_missed(self) -> bool:
        t = self.targets_allow()
        return bool(t) and not all(ok for _, ok, _ in t)

    def profile(self, envoy: Envoy, path: str, others: dict[str, int] | None = None) -> dict:
        """perf profile of an Envoy under the 32-connection 2 KB load: share of samples per shared
        object (Envoy's binary is stripped, so finer symbols are not available). `others` (name: PID)
        are profiled under the same load at the same time, each by shared object and by symbol (the
        approval service keeps its symbols): {"shares": ..., "others": {name: {"shares", "symbols"}}}."""
        if not shutil_which("perf"):
            return {"error": "perf is not installed"}
        secs = int(min(5, self.d))
        targets = {envoy.name: envoy.proc.pid, **(others or {})}
        log(f"profiling {', '.join(targets)} (perf, {secs} s) under the 32-connection load")
        path_body, _ = self.bodies["2k"]
        wrk = Proc("wrk", ["wrk", "-t1", "-c32", f"-d{secs + 3}s", "-s", str(POST_LUA), envoy.url + path],
                   self.work / "wrk-profile.err", env={"BENCH_BODY": str(path_body)},
                   stdout=subprocess.DEVNULL).start()
        time.sleep(1)
        # The other processes (the approval service) with kernel call chains, so that their kernel time
        # can be split by system call, and their system calls counted over the same window.
        perfs = {name: (self.work / f"perf-{name}.data",
                        Proc("perf", ["perf", "record", "-F", "499", *(["-g"] if name in (others or {}) else []),
                                      "-o", str(self.work / f"perf-{name}.data"),
                                      "-p", str(pid), "--", "sleep", str(secs)], self.work / f"perf-{name}.log").start())
                 for name, pid in targets.items()}
        counted = {name: (self.work / f"perf-stat-{name}.txt",
                          Proc("perf", ["perf", "stat", "-x", ",", "-o", str(self.work / f"perf-stat-{name}.txt"),
                                        "-e", ",".join(f"syscalls:sys_enter_{c}" for c in COUNTED_SYSCALLS),
                                        "-p", str(pid), "--", "sleep", str(secs)],
                               self.work / f"perf-stat-{name}.log").start())
                   for name, pid in (others or {}).items()}
        served0 = stat(envoy, "http.inference.downstream_rq_total")
        for _, perf in [*perfs.values(), *counted.values()]:
            perf.popen.wait(secs + 30)
            perf.stop()
        served = (stat(envoy, "http.inference.downstream_rq_total") or 0) - (served0 or 0)
        wrk.popen.wait(30)
        wrk.stop()

        def shares(data: Path, sort: str) -> dict[str, float]:
            p = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", sort, "--stdio"],
                               capture_output=True, text=True, timeout=120)
            out: dict[str, float] = {}
            for ln in p.stdout.splitlines():
                m = re.match(r"\s*([\d.]+)%\s+(.+?)\s*$", ln)
                if m:
                    key = m.group(2)
                    if sort == "dso":
                        key = "V8 JIT code (the wasm filter, compiled)" if key.startswith("[JIT]") else key
                    else:
                        key = re.sub(r"^\[[.k]\]\s+", "", key)
                    out[key] = out.get(key, 0.0) + float(m.group(1))
            return out

        def syscall_shares(data: Path) -> dict[str, float]:
            """Share of the samples under each system call (its kernel work, and the waits and switches
            it led to), from the kernel call chains."""
            p = subprocess.run(["perf", "report", "-i", str(data), "--children", "--sort", "sym", "-g", "none",
                                "--stdio"], capture_output=True, text=True, timeout=120)
            out: dict[str, float] = {}
            for ln in p.stdout.splitlines():
                m = re.match(r"\s*([\d.]+)%\s+[\d.]+%\s+\[k\]\s+__x64_sys_(\w+)\s*$", ln)
                if m:
                    out[m.group(2)] = out.get(m.group(2), 0.0) + float(m.group(1))
            return dict(sorted(out.items(), key=lambda kv: -kv[1]))

        def syscall_counts(path: Path) -> dict[str, int]:
            out: dict[str, int] = {}
            for ln in path.read_text(errors="replace").splitlines() if path.exists() else []:
                fields = ln.split(",")
                m = re.search(r"sys_enter_(\w+)", ln)
                if m and fields and fields[0].strip().isdigit():
                    out[m.group(1)] = int(fields[0])
            return out

        result = {"shares": shares(perfs[envoy.name][0], "dso"), "others": {}, "requests": served}
        for name in others or {}:
            result["others"][name] = {"shares": shares(perfs[name][0], "dso"),
                                      "symbols": dict(sorted(shares(perfs[name][0], "sym").items(),
                                                             key=lambda kv: -kv[1])[:12]),
                                      "syscalls": syscall_shares(perfs[name][0]),
                                      "syscall_counts": syscall_counts(counted[name][0])}
        return result

    def masking_throughput(self, masking: Envoy | None, allow: Envoy, backend: Backend, why: str):
        spec = json.loads((HERE / "features.json").read_text())["masking"]
        # Natively: the masking engine's own benchmark, when one is provided.
        cmd = spec.get("native_bench")
        if masking and cmd:
            log("masking natively (builds tests/bench/masking-native on first use)")
            cases = [f"{b}={self.bodies[b][0]}" for b in ("2k", "2k-sensitive", "20k", "20k-sensitive")]
            env = {**os.environ, **spec.get("native_bench_env", {}), "BENCH_SECONDS": str(max(1.0, min(3.0, self.d / 3)))}
            try:
                p = subprocess.run(cmd + [json.dumps(spec["filter_config"]["masking"])] + cases, cwd=ROOT,
                                   capture_output=True, text=True, timeout=900, env=env)
                found = list(re.finditer(r"^BENCH_MASK (\{.*\})$", p.stdout, re.M))
                for m in found:
                    x = json.loads(m.group(1))
                    self.results["masking"].append({"where": "native", "case": x["case"],
                                                    "mb_s": x["bytes"] / x["seconds"] / 1e6})
                if not found:
                    raise RuntimeError((p.stderr or p.stdout).strip()[-300:])
            except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
                self.results["masking"].append({"where": "native", "case": "all", "status": "pending",
                                                "reason": f"the native masking benchmark failed: {e}"[:300]})
        elif not cmd:
            self.results["masking"].append({"where": "native", "case": "all", "status": "pending",
                                            "reason": why or "no native masking benchmark is named in tests/bench/features.json"})
        # Inside Envoy: bytes per Envoy CPU-second beyond the same load without masking.
        if masking:
            rows = self.results["rows"]
            for body in ("2k", "2k-sensitive", "20k", "20k-sensitive"):
                m = next((r for r in rows if r["scenario"] == "masking" and r["body"] == body and r["conns"] == 32), None)
                base = next((r for r in rows if r["scenario"] == "allow" and r["body"] == body.split("-")[0]
                             and r["conns"] == 32), None)
                if not m or not base:
                    continue
                per_req = m["cpu_s"]["envoy"] / m["requests"] - base["cpu_s"]["envoy"] / base["requests"]
                self.results["masking"].append({
                    "where": "Envoy", "case": body, "extra_cpu_us_per_req": per_req * 1e6,
                    "mb_s": (m["body_bytes"] / per_req / 1e6) if per_req > 0 else None})
        else:
            self.results["masking"].append({"where": "Envoy", "case": "all", "status": "pending", "reason": why})

    def streaming(self, backend: Backend, plain: Envoy, allow: Envoy, masking: Envoy | None, why_masking: str):
        """Scenario 5. Set "short": a 20-word answer, events 2 ms apart, through every path. Sets "long" and
        "long-paced": a 200-word answer (longer than the masking hold-back window) sent at once, and with
        events 1 ms apart, unmasked vs response masking: with the whole answer there at once, the window
        costs no waiting, so the TTFB difference is what masking adds beyond it."""
        sets = [("short", 20, 2, max(30, int(self.d * 15)), [("demo backend direct", "backend", backend.url),
                                                              ("plain Envoy", "plain", plain.url),
                                                              ("5. streamed, `allow`, unmasked", "filter", allow.url)]),
                ("long", 200, 0, max(30, int(self.d * 15)), [("5. streamed, `allow`, unmasked", "filter", allow.url)]),
                ("long-paced", 200, 1, max(20, int(self.d * 4)), [("5. streamed, `allow`, unmasked", "filter", allow.url)])]
        for name, words, delay, n, targets in sets:
            if masking:
                targets = targets + [("5. streamed, `allow` + response masking", "masking", masking.url)]
            body = json.loads(chat_body(2048, model=ALLOW_MODEL, stream=True))
            text = " ".join((" ".join(PROSE).split() * (1 + words // 100))[:words])
            body["messages"][-1]["content"] = text
            data = json.dumps(body, separators=(",", ":")).encode()
            expect = "echo: " + text
            for label, system, url in targets:
                port = int(url.rsplit(":", 1)[1])
                res = asyncio.run(stream_samples(port, n, data, delay, expect))
                res.update(label=label, system=system, status="ok", words=words, delay_ms=delay, set=name,
                           answer_chars=len(expect))
                self.results["stream"].append(res)
                log(f"stream {name:<10} {label:<40} ttfb p50 {fmt(res['ttfb_p50'], '.3f')} p99 "
                    f"{fmt(res['ttfb_p99'], '.3f')}  total p50 {fmt(res['total_p50'])} p99 {fmt(res['total_p99'])} ms  "
                    f"bad {res['bad']}")
            if not masking:
                self.results["stream"].append({"label": "5. streamed, `allow` + response masking", "system": "masking",
                                               "status": "pending", "reason": why_masking, "set": name})

    def held(self, n: int):
        """Hold n requests at once, approve them all, check every answer."""
        w = self.work
        full = n > 1000
        log(f"held capacity: {n} requests")
        backend = Backend(w, f"demo-backend-held{n}").start()
        approval = approval_service(w, f"approval-held{n}").start()
        access_log = w / f"held-{n}-access.log"
        access_log.unlink(missing_ok=True)
        mutate = chain(raise_circuit_breakers(4 * n) if full else None, add_access_log(access_log))
        config = self.baseline_config(backend, approval)
        if full:
            # All N come from one caller: the per-worker hold limits (1,000 per caller by default) would
            # refuse the rest with 429.
            config = deep_merge(config, {"hold_limits": {"per_caller": n, "total": max(n, 10000)}})
        envoy = Envoy(w, backend, approval, config, name=f"envoy-held{n}",
                      mutate=mutate).start()
        res = {"n": n, "status": "ok", "circuit_breakers_raised": full, "hold_limits_raised": full}
        try:
            # Warm up: a few allowed requests and two reviewed ones, so code paths and pools exist.
            for i in range(20):
                httpx.post(envoy.url + "/v1/chat/completions", content=chat_body(2048, model=ALLOW_MODEL),
                           headers={"content-type": "application/json"}, timeout=10)
            self.hold_and_approve(envoy, approval, 4, w / "held-warmup")
            time.sleep(0.5)
            base = {"envoy": rss_bytes(envoy.proc.pid), "approval": rss_bytes(approval.proc.pid)}
            cpu0 = {"envoy": cpu_seconds(envoy.proc.pid), "approval": cpu_seconds(approval.proc.pid)}
            try:
                mem0 = httpx.get(f"{envoy.admin}/memory", timeout=10).json()
                res["envoy_memory_base"] = {k: int(v) for k, v in mem0.items() if str(v).isdigit()}
                res["vm_memory_base"] = vm_memory(envoy)
            except (httpx.HTTPError, ValueError):
                pass
            r = self.hold_and_approve(envoy, approval, n, w / f"held-{n}", measure_base=base, access_log=access_log)
            res.update(r)
            res["cpu_s"] = {"envoy": cpu_seconds(envoy.proc.pid) - cpu0["envoy"],
                            "approval": cpu_seconds(approval.proc.pid) - cpu0["approval"]}
            res["backend"] = backend.stats()
        except (StartError, RuntimeError, httpx.HTTPError) as e:
            where = getattr(e, "request", None)
            try:
                where = f" ({where.method} {where.url.path})" if where is not None else ""
            except RuntimeError:
                where = ""
            res.update(status="failed", error=f"{type(e).__name__}{where}: {e}"[:2000])
            log(f"held {n}: FAILED: {res['error']}")
        finally:
            self.stop_all_of(envoy, approval, backend)
        self.results["held"].append(res)

    def held_floor(self, n: int):
        """What Envoy keeps for a request paused in a wasm filter with nothing else going on: n requests
        paused at once in the no-op filter (`noop_pause`: it reads the body and never continues; no call, no
        review), none answered. Beside countersign's hold at the same n, the difference is the hold's own:
        what Envoy keeps for the filter's context while the worker's watch waits for the review."""
        w = self.work
        res: dict = {"n": n, "status": "ok"}
        log(f"held floor: {n} requests paused in the no-op filter")
        backend = Backend(w, f"demo-backend-floor{n}").start()
        approval = approval_service(w, f"approval-floor{n}").start()
        envoy = Envoy(w, backend, approval, {"noop_pause": True}, name=f"envoy-floor{n}",
                      mutate=with_wasm_code(NOOP_WASM))
        client = None
        active_stat = "http.inference.downstream_rq_active"
        try:
            if not NOOP_WASM.exists():
                raise RuntimeError(f"{NOOP_WASM.relative_to(ROOT)} is not built (tests/bench/run builds it)")
            envoy.start()
            # Warm up as the held runs do: requests that are paused, then given up by their caller.
            for _ in range(10):
                try:
                    httpx.post(envoy.url + "/v1/chat/completions", content=chat_body(2048, model=HELD_MODEL),
                               headers={"content-type": "application/json"}, timeout=0.3)
                except httpx.TimeoutException:
                    pass
            time.sleep(0.5)
            mem0 = int(httpx.get(f"{envoy.admin}/memory", timeout=10).json()["allocated"])
            rss0 = rss_bytes(envoy.proc.pid)
            client = Proc("holdclient", [sys.executable, str(HERE / "holdclient.py"), "--port", str(envoy.port),
                                         "--n", str(n), "--out", str(w / f"held-floor-{n}-client.json"),
                                         "--model", HELD_MODEL, "--timeout", "60"],
                          w / f"held-floor-{n}-client.log", stdout=subprocess.PIPE).start()
            line = client.popen.stdout.readline().decode()
            if not line.startswith("SENT"):
                raise RuntimeError(f"hold client failed: {line!r} {client.log_text()[-2000:]}")
            active, deadline = 0, time.monotonic() + 30
            while time.monotonic() < deadline:
                active = stat(envoy, active_stat) or 0
                if active >= n:
                    break
                time.sleep(0.2)
            time.sleep(1.0)
            mem = int(httpx.get(f"{envoy.admin}/memory", timeout=10).json()["allocated"])
            res.update(paused=active, alloc_per_kib=(mem - mem0) / max(active, 1) / 1024,
                       rss_per_kib=(rss_bytes(envoy.proc.pid) - rss0) / max(active, 1) / 1024)
            if active < n:
                res.update(status="failed", error=f"only {active:,} of {n:,} requests were paused")
        except (StartError, RuntimeError, httpx.HTTPError, KeyError, ValueError) as e:
            res.update(status="failed", error=f"{type(e).__name__}: {e}"[:500])
            log(f"held floor: FAILED: {res['error']}")
        finally:
            if client is not None:
                client.stop()
            self.stop_all_of(envoy, approval, backend)
        self.results["held_floor"] = res

    @staticmethod
    def held_rate(n: int) -> float:
        """Arrival rate of held requests: up to 1,000 arrive at once; more arrive at 500/s, because every
        hold first creates its review (one SQLite commit each) and a create that waits longer than the
        filter's callout_timeout_ms (5 s) is refused with 503, which would test admission, not holding."""
        return 0 if n <= 1000 else 500

    def hold_and_approve(self, envoy: Envoy, approval: Approval, n: int, prefix: Path, measure_base=None,
                         access_log: Path | None = None) -> dict:
        out = Path(f"{prefix}-client.json")
        ids_file = Path(f"{prefix}-ids.txt")
        client = Proc("holdclient", [sys.executable, str(HERE / "holdclient.py"), "--port", str(envoy.port),
                                     "--n", str(n), "--out", str(out), "--model", HELD_MODEL,
                                     "--rate", str(self.held_rate(n)),
                                     # bounded: a request Envoy never accepted must not hang the run
                                     "--timeout", str(60 + 2 * (n / self.held_rate(n) if self.held_rate(n) else 0))],
                      Path(f"{prefix}-client.log"), stdout=subprocess.PIPE).start()
        t_start = time.monotonic()
        line = client.popen.stdout.readline().decode()
        if not line.startswith("SENT"):
            client.stop()
            raise RuntimeError(f"hold client failed: {line!r} {client.log_text()[-4000:]}")
        # Wait until the service has every review (or the count stops growing).
        ids: list[str] = []
        last_change, last_len = time.monotonic(), -1
        while True:
            ids = list(reviews(approval, "pending"))
            if len(ids) != last_len:
                last_change, last_len = time.monotonic(), len(ids)
            if len(ids) >= n or time.monotonic() - last_change > 10 or not client.alive():
                break
            time.sleep(0.2 if n > 100 else 0.05)
        r: dict = {"pending_seen": len(ids), "seconds_to_hold_all": time.monotonic() - t_start}
        if measure_base is not None:
            time.sleep(1.0)
            r["rss_base"] = measure_base
            r["rss_held"] = {"envoy": rss_bytes(envoy.proc.pid), "approval": rss_bytes(approval.proc.pid)}
            # Envoy's admin may not answer when Envoy is out of file descriptors: not fatal.
            try:
                mem = httpx.get(f"{envoy.admin}/memory", timeout=5).json()
                r["envoy_memory"] = {k: int(mem[k]) for k in ("allocated", "heap_size", "pageheap_unmapped",
                                                              "pageheap_free", "total_thread_cache") if k in mem}
                r["vm_memory_held"] = vm_memory(envoy)
                st = counters(envoy, "downstream_cx_active|upstream_rq_active|overflow|rq_pending_active")
                r["envoy_stats_held"] = {k: v for k, v in st.items() if v and (
                    "inference" in k or "countersign_approval" in k or "cluster.model" in k)}
            except (httpx.HTTPError, ValueError) as e:
                r["envoy_stats_held"] = {}
                r["admin_error"] = f"{type(e).__name__}: {e}"
        # Bulk approval with wrk (32 connections, each id once): a C client, so that the load
        # generator takes as little CPU as possible from Envoy and the service.
        ids_file.write_text("\n".join(ids) + "\n")
        t_approve = time.monotonic()
        t_approve_wall = time.time()
        ap = self.wrk.run(approval.url, 32, 300, None, script=APPROVE_LUA,
                          env={"BENCH_IDS": str(ids_file), "BENCH_AUTH": REVIEWER_AUTH})
        client.popen.wait(600)
        client.stop()
        t_end = time.monotonic()
        got = json.loads(out.read_text())
        to_wall = got["clock"]["wall"] - got["clock"]["mono"]
        records = got["results"]
        # The decision's time is when the service recorded it (decided_at_ms, wall clock).
        decided = {k: v["decided_at_ms"] / 1000 for k, v in reviews(approval, "approved").items() if v.get("decided_at_ms")}
        envoy_fb = read_access_log(access_log, n) if access_log else {}
        lat_client, lat_envoy, bad, seg = [], [], [], {"release": [], "model": [], "envoy": [], "client": []}
        # Wall-clock times of this run's decisions, releases (Envoy began sending to the model) and first bytes
        # to the callers: how the burst of decisions and the releases overlap.
        t_decided, t_released, t_first_byte = [], [], []
        for rec in records:
            rid = rec["review_id"] or ""
            if not (rec["ok"] and rec["outcome"] == "approved" and rid in decided):
                bad.append(rec)
                continue
            fb_client = rec["t_first_byte"] + to_wall
            lat_client.append((fb_client - decided[rid]) * 1000)
            e = envoy_fb.get(rid)
            if e:
                start = float(e["start"])
                lat_envoy.append((start + e["ds_tx_beg"] / 1e6 - decided[rid]) * 1000)
                seg["release"].append((start + e["us_tx_beg"] / 1e6 - decided[rid]) * 1000)
                seg["model"].append((e["us_rx_beg"] - e["us_tx_beg"]) / 1000)
                seg["envoy"].append((e["ds_tx_beg"] - e["us_rx_beg"]) / 1000)
                seg["client"].append((fb_client - start - e["ds_tx_beg"] / 1e6) * 1000)
                t_decided.append(decided[rid])
                t_released.append(start + e["us_tx_beg"] / 1e6)
                t_first_byte.append(start + e["ds_tx_beg"] / 1e6)
        errors: dict[str, int] = {}
        for rec in bad:
            key = f"{rec['status']} {(rec['error'] or '')[:200]}"
            errors[key] = errors.get(key, 0) + 1
        r.update({
            "completed_ok": len(lat_client), "failed": len(bad), "errors": errors, "approved": ap["decided"],
            "approve_refused": ap["refused"], "approve_seconds": ap["seconds"],
            "approvals_per_s": ap["decided"] / max(1e-9, ap["seconds"]),
            "approve_api_p50_ms": ap["p50_us"] / 1000, "approve_api_p99_ms": ap["p99_us"] / 1000,
            "d2fb_p50_ms": percentile(lat_envoy, 50), "d2fb_p99_ms": percentile(lat_envoy, 99),
            "d2fb_max_ms": max(lat_envoy) if lat_envoy else None, "d2fb_n": len(lat_envoy),
            "d2fb_client_p50_ms": percentile(lat_client, 50), "d2fb_client_p99_ms": percentile(lat_client, 99),
            "segments": {k: {"p50": percentile(v, 50), "p99": percentile(v, 99)} for k, v in seg.items()},
            "seconds_total": t_end - t_start, "seconds_approve_to_last": t_end - t_approve,
        })
        if t_decided:
            last_decision = max(t_decided)
            r["burst"] = {
                # first to last decision, and from the approval's start to the last caller's first byte
                "decisions_ms": (last_decision - min(t_decided)) * 1000,
                "approve_start_to_last_first_byte_ms": (max(t_first_byte) - t_approve_wall) * 1000,
                "released_after_last_decision": sum(t > last_decision for t in t_released) / len(t_released),
                "release_after_last_decision_ms": (max(t_released) - last_decision) * 1000,
            }
        if n > 10:
            log(f"held {n}: ok {len(lat_client)} failed {len(bad)} {errors if errors else ''} decision -> first byte "
                f"(Envoy) p50 {fmt(r['d2fb_p50_ms'], '.1f')} p99 {fmt(r['d2fb_p99_ms'], '.1f')} ms; (client) p50 "
                f"{fmt(r['d2fb_client_p50_ms'], '.1f')} p99 {fmt(r['d2fb_client_p99_ms'], '.1f')} ms; "
                f"segments {json.dumps(r['segments'])}")
        elif bad:
            raise RuntimeError(f"warm-up holds failed: {errors}")
        return r

    def approval_alone(self):
        """Reviews created and decided per second, straight at the service (SQLite)."""
        w = self.work
        approval = approval_service(w, "approval-alone").start()
        res: dict = {"status": "ok"}
        try:
            create = w / "body-create.json"
            create.write_bytes(create_review_body(chat_body(2048, model=HELD_MODEL)))
            res["create_body_bytes"] = create.stat().st_size
            pid = approval.proc.pid
            for c in (1, 32):
                cpu0 = cpu_seconds(pid)
                r = self.wrk.run(approval.url + "/v1/reviews", c, self.d, create)
                res[f"create_c{c}"] = {**r, "cpu_s": cpu_seconds(pid) - cpu0}
                log(f"approval alone: create c={c} {r['rps']:.0f}/s p50 {r['p50_us']/1000:.2f} ms "
                    f"p99 {r['p99_us']/1000:.2f} ms errors {r['errors']}")
            # Held reviews that nobody polls are judged gone after `hold_grace_ms`, and
            # approving them is refused (409 review_abandoned), as it should be. Decisions are
            # therefore measured on asynchronous reviews (the approval-token flow), created here.
            create_async = w / "body-create-async.json"
            create_async.write_bytes(create_review_body(chat_body(2048, model=HELD_MODEL), async_review=True))
            r = self.wrk.run(approval.url + "/v1/reviews", 32, self.d, create_async)
            res["create_async_c32"] = r
            log(f"approval alone: create async c=32 {r['rps']:.0f}/s errors {r['errors']}")
            ids = [i for i, x in reviews(approval, "pending").items() if x.get("async_review")]
            res["pending_before_decide"] = len(ids)
            ids_file = w / "approval-alone-ids.txt"
            ids_file.write_text("\n".join(ids) + "\n")
            cpu0 = cpu_seconds(pid)
            r = self.wrk.run(approval.url, 32, self.d, None, script=APPROVE_LUA,
                             env={"BENCH_IDS": str(ids_file), "BENCH_AUTH": REVIEWER_AUTH})
            r["decided_per_s"] = r["decided"] / r["seconds"] if r["seconds"] else 0
            res["decide_c32"] = {**r, "cpu_s": cpu_seconds(pid) - cpu0}
            log(f"approval alone: decide c=32 {r['decided_per_s']:.0f}/s ({r['decided']} of {len(ids)}, "
                f"refused {r['refused']}) p50 {r['p50_us']/1000:.2f} ms p99 {r['p99_us']/1000:.2f} ms")
            res["db_bytes"] = sum(Path(str(approval.db) + s).stat().st_size for s in ("", "-wal")
                                  if Path(str(approval.db) + s).exists())
        except (StartError, RuntimeError, httpx.HTTPError) as e:
            res = {"status": "failed", "error": str(e)[:2000]}
            log(f"approval alone: FAILED: {e}")
        finally:
            self.stop_all_of(approval)
        self.results["approval"] = res

    def litellm(self):
        w = self.work
        label = f"LiteLLM proxy {LITELLM_VERSION} (1 worker)"
        if not LITELLM.exists():
            self.pending_row(label, "litellm", "peer", f"not installed: {LITELLM} missing (see tests/bench/run)", None)
            return
        backend = Backend(w, "demo-backend-litellm").start()
        port = free_port()
        cfg = w / "litellm.yaml"
        cfg.write_text(yaml.safe_dump({
            "model_list": [{"model_name": ALLOW_MODEL, "litellm_params": {
                "model": f"openai/{ALLOW_MODEL}", "api_base": f"{backend.url}/v1", "api_key": "sk-unused"}}],
            "general_settings": {"master_key": LITELLM_KEY},
            "litellm_settings": {"telemetry": False},
        }))
        self.results["litellm_config"] = cfg.read_text()
        proc = Proc("litellm", [str(LITELLM), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port),
                                "--num_workers", "1", "--telemetry", "False"], w / "litellm.log",
                    env={"LITELLM_LOG": "ERROR", "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                         "NO_PROXY": "*", "no_proxy": "*"})
        try:
            proc.start()
            wait_started(proc, f"http://127.0.0.1:{port}/health/liveliness", "LiteLLM", timeout=120)
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            env = {"BENCH_AUTH": f"Bearer {LITELLM_KEY}"}
            # Its first requests load modules lazily: warm it up well first.
            self.wrk.run(url, 8, 5, self.bodies["2k"][0], env=env)
            for c in (1, 32):
                self.measure(label, "litellm", url, c, watch={"litellm": proc.pid, "backend": backend.proc.pid},
                             backend=backend, env=env, scenario="peer", warmup=2)
            self.results["litellm_rss"] = rss_bytes(proc.pid)
        except (StartError, RuntimeError, httpx.HTTPError) as e:
            self.pending_row(label, "litellm", "peer", f"could not run: {str(e).splitlines()[0][:200]}", None)
        finally:
            self.stop_all_of(proc, backend)

    @staticmethod
    def stop_all_of(*things):
        for t in things:
            try:
                t.stop() if isinstance(t, Envoy) else (t.proc.stop() if hasattr(t, "proc") else t.stop())
            except Exception as e:
                log(f"stop: {e!r}")

    # ------------------------------------------------------------ targets

    def row(self, scenario, conns, body="2k"):
        return next((r for r in self.results["rows"] if r["scenario"] == scenario and r["conns"] == conns
                     and r["body"] == body and r["status"] == "ok"), None)

    def targets_allow(self):
        out = []
        p32, a32, p1, a1 = self.row("plain", 32), self.row("allow", 32), self.row("plain", 1), self.row("allow", 1)
        n32 = self.row("noop", 32)
        if p32 and a32:
            ratio = a32["rps"] / p32["rps"]
            out.append((f"allow path ≥ {T_ALLOW_RATIO:.0%} of plain Envoy's throughput (32 connections, 2 KB)",
                        ratio >= T_ALLOW_RATIO, f"{ratio:.0%} ({a32['rps']:,.0f} vs {p32['rps']:,.0f} req/s)"))
        if n32 and a32:
            ratio = a32["rps"] / n32["rps"]
            out.append((f"allow path ≥ {T_ALLOW_VS_FLOOR:.0%} of the no-op wasm filter's throughput (32 "
                        "connections, 2 KB)", ratio >= T_ALLOW_VS_FLOOR,
                        f"{ratio:.0%} ({a32['rps']:,.0f} vs {n32['rps']:,.0f} req/s)"))
        if p1 and a1:
            added = a1["p50_ms"] - p1["p50_ms"]
            out.append((f"allow path adds ≤ {T_ALLOW_ADDED_P50_MS} ms to p50 at one connection",
                        added <= T_ALLOW_ADDED_P50_MS, f"{added:+.3f} ms ({a1['p50_ms']:.3f} vs {p1['p50_ms']:.3f} ms)"))
        return out


def burst_note(h: dict) -> str:
    """How a held run's decisions and releases overlapped (empty for results without it)."""
    b = h.get("burst")
    if not b or not b["decisions_ms"]:
        return ""
    n = h["completed_ok"]
    decided_per_s = n / (b["decisions_ms"] / 1000)
    released_per_s = n / ((b["decisions_ms"] + b["release_after_last_decision_ms"]) / 1000)
    return (f" Its decisions came at {decided_per_s:,.0f}/s ({b['decisions_ms']:,.0f} ms from first to last), and "
            f"requests went to the model at {released_per_s:,.0f}/s over the same burst (first decision to last "
            f"release; {b['released_after_last_decision'] * 100:.0f}% of them after the last decision, the last "
            f"{b['release_after_last_decision_ms']:,.0f} ms after it); the last caller had its first byte "
            f"{b['approve_start_to_last_first_byte_ms']:,.0f} ms after the bulk approval began. When decisions come "
            "faster than the machine can release requests, which on these 2 cores it does alongside the approvals "
            "themselves, the model and the clients reading their answers, decision → first byte is mostly each "
            "request's wait in that queue, and it grows with N.")


def read_access_log(path: Path, n: int, wait: float = 10.0) -> dict[str, dict]:
    """Envoy's access-log entries by review id (the file log is flushed about once a second)."""
    deadline = time.monotonic() + wait
    out: dict[str, dict] = {}
    while True:
        out = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    e = json.loads(line)
                except ValueError:
                    continue
                if e.get("rid") and isinstance(e.get("ds_tx_beg"), int) and isinstance(e.get("us_tx_beg"), int):
                    out[e["rid"]] = e
        if len(out) >= n or time.monotonic() > deadline:
            return out
        time.sleep(0.5)


def settle(backend: Backend, quiet: float = 0.3, limit: float = 15.0) -> dict:
    """The backend's counters once they stop moving (a proxy may still be draining its queue)."""
    deadline = time.monotonic() + limit
    last = backend.stats()
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = backend.stats()
        if now == last:
            return now
        last = now
    return last


def shutil_which(name):
    import shutil
    return shutil.which(name)


async def stream_samples(port: int, n: int, body: bytes, delay_ms: int, expect: str) -> dict:
    conn = await Conn("127.0.0.1", port).open()
    headers = {"x-demo-chunk-delay-ms": str(delay_ms)}
    ttfb, total, bad = [], [], 0
    for i in range(n + 5):
        t0, r = await conn.request("POST", "/v1/chat/completions", body, headers)
        text = "".join(
            (json.loads(line[6:])["choices"] or [{}])[0].get("delta", {}).get("content", "")
            for line in r.body.decode().split("\n") if line.startswith("data: {"))
        ok = r.status == 200 and text == expect and b"data: [DONE]" in r.body and r.t_first_content
        if i < 5:  # warm-up
            continue
        if not ok:
            bad += 1
            continue
        ttfb.append((r.t_first_content - t0) * 1000)
        total.append((r.t_done - t0) * 1000)
    await conn.close()
    return {"n": n, "bad": bad, "ttfb_p50": percentile(ttfb, 50), "ttfb_p99": percentile(ttfb, 99),
            "total_p50": percentile(total, 50), "total_p99": percentile(total, 99)}


# ------------------------------------------------------------------ report

def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    mem = next((int(ln.split()[1]) for ln in open("/proc/meminfo") if ln.startswith("MemTotal")), 0)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    envoy = subprocess.run([str(ENVOY), "--version"], capture_output=True, text=True).stdout.strip()
    m = re.search(r"version: \S+/(\d+\.\d+\.\d+)", envoy)
    return {"nproc": os.cpu_count(), "cpu": cpu, "ram_gib": mem / 1024 / 1024, "kernel": platform.release(),
            "envoy": m.group(1) if m else envoy[:80], "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "git": git + (" (with uncommitted changes)" if dirty else ""),
            "wrk": subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("[")[0].strip(),
            "load_before": open("/proc/loadavg").read().split()[:3]}


def fmt(x, spec=".2f", none="—"):
    return none if x is None else format(x, spec)


def held_count(h: dict) -> int:
    """How many requests a held-capacity run actually held at once (all N, or fewer when some were refused):
    what memory per held request is divided by."""
    return max(1, min(h["n"], h.get("pending_seen") or h["n"]))


def mib(b):
    return f"{b / 1048576:.0f} MiB"


def report(s: Suite, m: dict, command: str) -> str:
    R = s.results
    L: list[str] = []
    a = L.append
    a("# Benchmarks")
    a("")
    a("Generated by `tests/bench/run` (see [tests/bench/README.md](../tests/bench/README.md)); do not edit by hand.")
    a("Each run rewrites this file. Rows marked *not yet available* are features still being built: the suite")
    a("detects them (tests/bench/features.json) and measures them once they land; no number here is estimated.")
    a("")
    a("## Machine and run")
    a("")
    a(f"- Command: `{command}`")
    a(f"- Date: {m['date']}; commit {m['git']}")
    a(f"- Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']:.1f} GiB RAM, Linux {m['kernel']}")
    a(f"- Envoy {m['envoy']} (`--concurrency 2`), {m['wrk']} (`-t1`), demo backend and approval service in "
      "release mode; everything on 127.0.0.1, no CPU pinning: load generator, proxy and backend share the cores.")
    a(f"- Load average (1/5/15 min) before: {' / '.join(m['load_before'])}; after: {' / '.join(m['load_after'])}. "
      "Other work on the machine shows up as noise.")
    a(f"- {s.d:.0f} s per measured run after a 2 s warm-up; request body: an OpenAI chat request of "
      f"{s.bodies['2k'][1]:,} bytes (system prompt and four turns) or {s.bodies['20k'][1]:,} bytes.")
    a("")

    # ---- main table
    a("## Request path")
    a("")
    a("req/s ratio and added p50 are against plain Envoy (same listener, routes, buffer filter and clusters, "
      "without the wasm filter) at the same connection count and body, measured in this run. CPU is the proxy's "
      "(Envoy's, LiteLLM's, or the backend's for the ceiling row): CPU-ms per 1,000 requests and % of one core.")
    a("")
    a("| scenario | conns | body | req/s | p50 ms | p99 ms | req/s vs plain | p50 vs plain | proxy CPU ms/1k req | proxy CPU % core | service CPU % core | errors |")
    a("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in R["rows"]:
        body = {"2k": "2 KB", "20k": "20 KB", "2k-sensitive": "2 KB, with matches",
                "20k-sensitive": "20 KB, with matches", "2k-token": "2 KB (approved body)",
                "2k-auto": "2 KB"}.get(r["body"], r["body"])
        conns = "—" if r["conns"] is None else str(r["conns"])
        if r["status"] != "ok":
            a(f"| {r['label']} | {conns} | {body} | *{r['reason']}* | | | | | | | | |")
            continue
        base = s.row("plain", r["conns"], r["body"].split("-")[0])
        ratio = added = "—"
        if base and r["scenario"] not in ("plain", "ceiling"):
            ratio = f"{r['rps'] / base['rps']:.0%}"
            added = f"{r['p50_ms'] - base['p50_ms']:+.3f} ms"
        elif r["scenario"] == "ceiling" and base:
            ratio = f"{r['rps'] / base['rps']:.2f}×"
        key = {"backend": "backend", "litellm": "litellm"}.get(r["system"], "envoy")
        cpu = r["cpu_s"].get(key)
        per_k = f"{cpu / r['requests'] * 1e6:.0f}" if cpu is not None and r["requests"] else "—"
        pct = f"{cpu / r['seconds'] * 100:.0f}%" if cpu is not None else "—"
        svc = r["cpu_s"].get("approval")
        svc_pct = f"{svc / r['seconds'] * 100:.0f}%" if svc is not None else "—"
        a(f"| {r['label']} | {conns} | {body} | {r['rps']:,.0f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
          f"{ratio} | {added} | {per_k} | {pct} | {svc_pct} | {r['errors']} |")
    a("")
    a("`errors` counts socket errors, non-2xx answers and any mismatch between the answers wrk counted and the "
      "requests the demo backend completed.")
    multi = [r for r in R["rows"] if r.get("rounds")]
    if multi:
        a(f"Plain Envoy and scenario 1 ran {len(multi[0]['rounds'])} interleaved rounds each; the table shows the "
          "round with the median req/s. All rounds (req/s; p50 ms): " + "; ".join(
              f"{r['label'].split(' (')[0]} c={r['conns']} {r['body']}: "
              f"{', '.join(f'{x:,}' for x in r['rounds'])} ({', '.join(str(x) for x in r['rounds_p50_ms'])})"
              for r in multi) + ".")
    ov = R.get("allow_overlays")
    if ov is not None:
        a("Envoy with the filter runs the demo plugin configuration (envoy/filter-config.json: models `demo-allow*` "
          "are allowed)" + (" plus " + ", ".join(f"`{json.dumps(o)}`" for o in ov) + ", so that scenario 1 measures "
                            "the policy alone" if ov else "") + ".")
    feats = R.get("features", {})
    if feats:
        a("Features being built, as detected in this run: " + "; ".join(
            f"{name}: {'available' if f['available'] else f['reason']}" for name, f in feats.items()) + ".")
    if R.get("envoy_rss_idle"):
        rss = R["envoy_rss_idle"]
        a(f"Envoy RSS after these runs: plain {mib(rss['plain'])}"
          + (f", with the no-op filter {mib(rss['noop'])}" if "noop" in rss else "")
          + f", with the filter {mib(rss['filter'])}.")
    if any(r["scenario"] == "noop" for r in R["rows"]):
        a("The no-op row is tests/bench/noop-filter, a proxy-wasm filter that waits for the whole request body, "
          "reads it into the VM once and continues, in countersign's place (same V8 VM settings, listener, buffer "
          "filter, router): what any wasm filter costs here, so the gap between it and scenario 1 is countersign's "
          "own.")
    a("")

    # ---- streaming
    a("## Streamed answers (scenario 5)")
    a("")
    window = json.loads((HERE / "features.json").read_text())["masking"].get("response_window_chars", 256)
    titles = {
        "short": "a {words}-word answer ({chars} characters), events {delay} ms apart, through every path",
        "long": "a {words}-word answer ({chars} characters, longer than the masking hold-back window), all events "
                "sent at once: the window fills at once, so the TTFB difference is what response masking adds "
                "beyond it",
        "long-paced": "the same {words}-word answer with events {delay} ms apart: here masking's TTFB includes "
                      "waiting for the window to fill",
    }
    a("One connection, sequential requests (asyncio client, after 5 warm-up requests). Time to first byte is the "
      "first SSE event carrying answer text (the role-only first event does not count); total is the end of the "
      "stream. Added is against the first row of the same set "
      f"through Envoy (plain Envoy, or the unmasked filter). Masking's hold-back window: `response_window_chars` "
      f"{window} (default).")
    a("")
    for name in ("short", "long", "long-paced"):
        rows = [x for x in R["stream"] if x.get("set", "short") == name]
        if not rows:
            continue
        ok = [x for x in rows if x["status"] == "ok"]
        x0 = ok[0] if ok else None
        if x0:
            a("*" + titles[name].format(words=x0["words"], chars=x0["answer_chars"] if "answer_chars" in x0 else "?",
                                        delay=x0["delay_ms"]) + f" ({x0['n']} samples each).*")
            a("")
        a("| path | TTFB p50 ms | TTFB p99 ms | total p50 ms | total p99 ms | TTFB p50 added | failed |")
        a("|---|---:|---:|---:|---:|---:|---:|")
        ref = next((x for x in ok if x["system"] in ("plain", "filter")), None)
        for x in rows:
            if x["status"] != "ok":
                a(f"| {x['label']} | *{x['reason']}* | | | | | |")
                continue
            added = (f"{x['ttfb_p50'] - ref['ttfb_p50']:+.3f} ms"
                     if ref and x is not ref and x["system"] != "backend" and x["ttfb_p50"] is not None else "—")
            a(f"| {x['label']} | {fmt(x['ttfb_p50'], '.3f')} | {fmt(x['ttfb_p99'], '.3f')} | {fmt(x['total_p50'])} | "
              f"{fmt(x['total_p99'])} | {added} | {x['bad']} |")
        a("")

    # ---- held
    a("## Held capacity")
    a("")
    a("N clients each send one 2 KB chat request that policy holds for review, each on its own connection, all at "
      "once. When the approval service lists all N as pending, RSS is read (Δ per request is against the same "
      "processes idle after a warm-up); then every review is approved through the reviewer API as fast as it takes "
      "them (wrk, 32 connections, `POST /api/reviews/{id}/approve` once per id), and every caller's answer is "
      "checked: 200, `x-countersign-outcome: approved`, and the demo model's echo of that caller's own prompt.")
    a("")
    a("Decision → first byte runs from the decision's time as the service recorded it (`decided_at_ms`) to the "
      "moment Envoy started sending the answer to the caller (Envoy's access log, µs); the last column is the same "
      "up to the moment the Python client read it, which adds the client's own scheduling delay.")
    a("")
    a("| N | completed correctly | time to hold all | Envoy RSS held (Δ per request) | service RSS held (Δ per request) | "
      "Envoy + service | approvals/s | decision → first byte p50 / p99 / max | same, as the client read it p50 / p99 |")
    a("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for h in R["held"]:
        if h["status"] != "ok":
            a(f"| {h['n']:,} | *failed: {h.get('error', '')[:200]}* | | | | | | | |")
            continue
        eb, eh = h["rss_base"]["envoy"], h["rss_held"]["envoy"]
        sb, sh = h["rss_base"]["approval"], h["rss_held"]["approval"]
        n, held = h["n"], held_count(h)
        a(f"| {n:,} | {h['completed_ok']:,} of {n:,} | {h['seconds_to_hold_all']:.1f} s | {mib(eh)} "
          f"({(eh - eb) / held / 1024:.1f} KiB) | {mib(sh)} ({(sh - sb) / held / 1024:.1f} KiB) | {mib(eh + sh)} | "
          f"{h['approvals_per_s']:,.0f} | {fmt(h['d2fb_p50_ms'], '.1f')} / {fmt(h['d2fb_p99_ms'], '.1f')} / "
          f"{fmt(h['d2fb_max_ms'], '.1f')} ms | {fmt(h['d2fb_client_p50_ms'], '.1f')} / "
          f"{fmt(h['d2fb_client_p99_ms'], '.1f')} ms |")
    a("")
    for h in R["held"]:
        if h["status"] != "ok":
            continue
        sg = h["segments"]
        mem, mem0 = h.get("envoy_memory"), h.get("envoy_memory_base")
        if mem and mem0 and "allocated" in mem and "allocated" in mem0:
            d_alloc = hold_alloc_kib(h)
            d_rss = (h["rss_held"]["envoy"] - h["rss_base"]["envoy"]) / held_count(h) / 1024
            d_vm = held_vm_kib(h)
            a(f"**N = {h['n']:,}, memory.** Envoy's RSS grew {d_rss:.1f} KiB per held request. "
              + (f"Of that, countersign's wasm VMs grew {d_vm:.1f} KiB (`countersign_vm_memory_bytes`): each held "
                 "request's state and the body it will forward and record, and, while its review is being "
                 "created, the creation call; a wasm memory keeps its largest size. " if d_vm is not None else "")
              + f"Envoy's own heap (tcmalloc `allocated` in the admin `/memory`) grew {d_alloc:.1f} KiB: the "
              "caller's connection and stream with the buffered body (a held request has no stream of its own "
              "to the approval service: each Envoy worker's one watch waits for all its reviews). The heap "
              "counts what Envoy "
              "allocated, RSS only the pages touched (a buffer slice larger than the body it holds counts whole "
              "in the heap), so the two need not add up.")
            a("")
        a(f"**N = {h['n']:,}.** Where decision → first byte goes (p50 / p99, ms): service wakes the worker's "
          f"watch, answers it and the filter releases the request to the model {fmt(sg['release']['p50'], '.1f')} / "
          f"{fmt(sg['release']['p99'], '.1f')}; model's first byte back {fmt(sg['model']['p50'], '.1f')} / "
          f"{fmt(sg['model']['p99'], '.1f')}; Envoy to the caller {fmt(sg['envoy']['p50'], '.2f')} / "
          f"{fmt(sg['envoy']['p99'], '.2f')}; the client reading it {fmt(sg['client']['p50'], '.1f')} / "
          f"{fmt(sg['client']['p99'], '.1f')}. Approving all {h['approved']:,} took {h['approve_seconds']:.1f} s "
          f"(approve API p50 / p99 {h['approve_api_p50_ms']:.1f} / {h['approve_api_p99_ms']:.1f} ms at 32 "
          f"connections). CPU over the whole test: Envoy {h['cpu_s']['envoy']:.1f} s, service "
          f"{h['cpu_s']['approval']:.1f} s. " + (
              "Envoy stats while held: " + ", ".join(f"`{k}` {v:,}" for k, v in sorted(h["envoy_stats_held"].items()))
              + "." if h["envoy_stats_held"] else f"Envoy's admin did not answer while held ({h.get('admin_error', '')})."))
        if h["failed"] or h["errors"]:
            a("")
            a(f"Failures at N = {h['n']:,}: " + "; ".join(f"{v:,}× {k}" for k, v in h["errors"].items()))
        if h.get("circuit_breakers_raised"):
            a("")
            a(f"N = {h['n']:,} ran with every cluster's circuit breakers raised to {4 * h['n']:,} (programmatically, "
              "in the rendered config): the bulk approval releases every held request to the model at once, and "
              "Envoy's default limit of 1,024 requests per cluster would refuse those beyond it (the held "
              "requests wait in one watch per Envoy worker: `upstream_rq_active` of the approval cluster above)"
              + (f"; and with `hold_limits` raised to {h['n']:,} per caller (all N come from one caller)"
                 if h.get("hold_limits_raised") else "") + ".")
        a("")
    floor, same = held_floor_and_hold(R)
    if floor:
        if floor["status"] != "ok":
            a(f"**Without countersign's hold (N = {floor['n']:,}).** Not measured: {floor.get('error', '')}")
        else:
            a(f"**Without countersign's hold (N = {floor['n']:,}).** The same {floor['n']:,} requests paused in the "
              "no-op wasm filter (tests/bench/noop-filter with `noop_pause`: it reads the body and never lets the "
              f"request continue; no call, no review) grew Envoy's heap {floor['alloc_per_kib']:.1f} KiB and its "
              f"RSS {floor['rss_per_kib']:.1f} KiB per request: the caller's connection, its stream with the "
              "buffered body and the filter chain's state, which holding a request in any wasm filter costs here."
              + (f" countersign's hold grew the heap {hold_alloc_kib(same):.1f} KiB per request at the same N, so "
                 f"{hold_alloc_kib(same) - floor['alloc_per_kib']:.1f} KiB is the hold's own: what Envoy keeps "
                 "for the filter's context while its worker's watch waits, and the review creation's call while "
                 "it lasts (the filter's own state is in its VMs' memory, outside this heap)."
                 if same else ""))
        a("")
    if any(h["n"] > 1000 for h in R["held"]):
        a(f"Sizes above 1,000 arrive paced at {Suite.held_rate(10000):,.0f} requests/s rather than all at once: "
          "each hold first creates its review (one SQLite commit), and a create that waits longer than the "
          "filter's `callout_timeout_ms` (5 s) is refused with 503; all at once measures admission, not holding.")
        a("")
    if not any(h["n"] >= 10000 for h in R["held"]):
        a("10k held requests: not run in this run (`tests/bench/run --full` runs them).")
        a("")

    # ---- approval alone
    a("## Approval service alone (SQLite)")
    a("")
    ap = R["approval"]
    if ap and ap["status"] == "ok":
        a(f"wrk straight at the service, default settings (SQLite WAL, `synchronous = FULL`). Create: the filter "
          f"API's `POST /v1/reviews` with the {ap['create_body_bytes']:,}-byte review of a 2 KB chat request. Decide: "
          f"`POST /api/reviews/{{id}}/approve`, each once, on asynchronous reviews (the approval-token flow) created "
          f"just before: held reviews that no filter polls are refused as abandoned once `hold_grace_ms` has passed.")
        a("")
        a("| operation | conns | per second | p50 ms | p99 ms | service CPU % core | errors |")
        a("|---|---:|---:|---:|---:|---:|---:|")
        for c in (1, 32):
            r = ap[f"create_c{c}"]
            a(f"| create review | {c} | {r['rps']:,.0f} | {r['p50_us'] / 1000:.2f} | {r['p99_us'] / 1000:.2f} | "
              f"{r['cpu_s'] / r['seconds'] * 100:.0f}% | {r['errors']} |")
        r = ap["decide_c32"]
        a(f"| approve review | 32 | {r['decided_per_s']:,.0f} | {r['p50_us'] / 1000:.2f} | {r['p99_us'] / 1000:.2f} | "
          f"{r['cpu_s'] / r['seconds'] * 100:.0f}% | {r['refused']} |")
        a("")
        a(f"{r['decided']:,} of {ap['pending_before_decide']:,} pending asynchronous reviews decided; database "
          f"{mib(ap['db_bytes'])} after the run.")
    else:
        a(f"*failed: {ap and ap.get('error')}*")
    a("")

    # ---- masking
    a("## Masking throughput")
    a("")
    a("| where | prompt | MB/s | note |")
    a("|---|---|---:|---|")
    names = {"2k": "2 KB, no matches", "2k-sensitive": "2 KB, with matches", "20k": "20 KB, no matches",
             "20k-sensitive": "20 KB, with matches"}
    for x in R["masking"]:
        case = names.get(x["case"], x["case"])
        if x.get("status") == "pending":
            a(f"| {x['where']} | {case} | — | *{x['reason']}* |")
        else:
            note = (f"{x['extra_cpu_us_per_req']:.0f} µs more Envoy CPU per request than unmasked"
                    if x["where"] == "Envoy" else "one thread")
            a(f"| {x['where']} | {case} | {fmt(x['mb_s'], '.0f')} | {note} |")
    a("")
    a("Natively: `countersign_core::mask::mask_request` on the whole request body in a loop, release build, "
      "default profile (every built-in detector, `redact`), tests/bench/masking-native. Inside Envoy: request "
      "body bytes per Envoy CPU-second spent beyond the same 32-connection load without masking (scenario 2 vs "
      "scenario 1); with `responses: true` the demo model's echo of the prompt is masked on the way back as well, "
      "so this covers both directions. \"With matches\" prompts carry e-mail addresses, phone numbers, card "
      "numbers, API and AWS keys, an SSN and a password in a URL.")
    a("")

    # ---- peer
    a("## Peer: LiteLLM proxy")
    a("")
    lt = [r for r in R["rows"] if r["system"] == "litellm"]
    ceil = {c: s.row("ceiling", c) for c in (1, 32)}
    al = {c: s.row("allow", c) for c in (1, 32)}
    pl = {c: s.row("plain", c) for c in (1, 32)}
    a("Overhead against calling the demo backend directly, same body, same wrk settings:")
    a("")
    a("| gateway | added p50 at 1 conn | added p99 at 1 conn | req/s at 32 conns | ÷ plain Envoy | RSS |")
    a("|---|---:|---:|---:|---:|---:|")

    def peer_line(name, rows, rss):
        r1, r32 = rows.get(1), rows.get(32)
        if not (r1 and r32 and ceil[1] and pl[32]):
            return
        a(f"| {name} | {r1['p50_ms'] - ceil[1]['p50_ms']:+.3f} ms | {r1['p99_ms'] - ceil[1]['p99_ms']:+.3f} ms | "
          f"{r32['rps']:,.0f} | {r32['rps'] / pl[32]['rps']:.2f} | {rss} |")
    envrss = R.get("envoy_rss_idle", {})
    peer_line("plain Envoy", pl, mib(envrss["plain"]) if envrss else "—")
    peer_line("Envoy + no-op wasm filter (the floor)", {c: s.row("noop", c) for c in (1, 32)},
              mib(envrss["noop"]) if "noop" in envrss else "—")
    peer_line("Envoy + countersign (`allow`)", al, mib(envrss["filter"]) if envrss else "—")
    ok_lt = {r["conns"]: r for r in lt if r["status"] == "ok"}
    if ok_lt:
        peer_line(lt[0]["label"], ok_lt, mib(R["litellm_rss"]) if R.get("litellm_rss") else "—")
    else:
        for r in lt:
            a(f"| {r['label']} | *{r['reason']}* | | | | |")
    a("")
    a(f"LiteLLM was installed from PyPI into `.venv-bench` as `litellm[proxy]=={LITELLM_VERSION}` (a version "
      "reported good; 1.82.7 and 1.82.8 were reported compromised) and run as "
      "`litellm --config FILE --host 127.0.0.1 --port P --num_workers 1 --telemetry False` with "
      "`LITELLM_LOG=ERROR LITELLM_LOCAL_MODEL_COST_MAP=True` (no network access, no database, no callbacks). "
      "It was warmed up for 5 s first (it loads modules lazily on the first requests). Its configuration, an "
      "OpenAI-compatible route to the demo backend with a master key that the load generator sends as "
      "`Authorization: Bearer`:")
    a("")
    a("```yaml")
    a((R.get("litellm_config") or "(not run)").rstrip().replace(LITELLM_KEY, "sk-bench-…"))
    a("```")
    a("")

    # ---- targets
    a("## Targets")
    a("")
    a("| target | result | met? |")
    a("|---|---|---|")
    for name, ok, detail in s.targets_allow():
        a(f"| {name} | {detail} | {'met' if ok else '**missed**'} |")
    rec_row = s.row("record", 32)
    if rec_row and pl[32]:
        ratio = rec_row["rps"] / pl[32]["rps"]
        a(f"| allow path with durable pre-forward record ≥ 70% of plain Envoy | {ratio:.0%} | "
          f"{'met' if ratio >= T_RECORD_RATIO else '**missed**'} |")
    else:
        a(f"| allow path with durable pre-forward record ≥ 70% of plain Envoy | not measured: "
          f"{R['features'].get('record', {}).get('reason', '')} | pending |")
    pg_row = s.row("record-pg", 32)
    if pg_row and pl[32]:
        ratio = pg_row["rps"] / pl[32]["rps"]
        a(f"| durable record on PostgreSQL ≥ {T_RECORD_PG_RATIO:.0%} of plain Envoy (32 connections) | {ratio:.0%} | "
          f"{'met' if ratio >= T_RECORD_PG_RATIO else '**missed**'} |")
    mask_row = s.row("masking", 32, "2k-sensitive")
    if mask_row and pl[32]:
        ratio = mask_row["rps"] / pl[32]["rps"]
        a(f"| request masking, 2 KB with matches ≥ {T_MASK_RATIO:.0%} of plain Envoy (32 connections) | {ratio:.0%} | "
          f"{'met' if ratio >= T_MASK_RATIO else '**missed**'} |")
    for h in R["held"]:
        if h["status"] == "ok":
            per = ((h["rss_held"]["envoy"] - h["rss_base"]["envoy"]) + (h["rss_held"]["approval"]
                                                                        - h["rss_base"]["approval"])) / held_count(h) / 1024
            all_held = held_count(h) == h["n"]
            a(f"| ≤ {T_HELD_PER_REQUEST_KIB:.0f} KiB per held request, Envoy + service (N = {h['n']:,}) | "
              f"{per:.1f} KiB" + ("" if all_held else f" with only {held_count(h):,} of {h['n']:,} held") + " | "
              f"{'met' if per <= T_HELD_PER_REQUEST_KIB and all_held else '**missed**'} |")
    h10 = next((h for h in R["held"] if h["n"] >= 10000 and h["status"] == "ok"), None)
    h1 = next((h for h in R["held"] if h["status"] == "ok"), None)
    if h10:
        tot = h10["rss_held"]["envoy"] + h10["rss_held"]["approval"]
        ok = tot < T_HELD_RSS_BYTES and h10["failed"] == 0
        a(f"| 10k held requests under {mib(T_HELD_RSS_BYTES)} RSS, Envoy + service | {mib(tot)} with {h10['pending_seen']:,} held at "
          f"once ({h10['completed_ok']:,} of {h10['n']:,} completed correctly) | {'met' if ok else '**missed**'} |")
    elif h1:
        big = max((h for h in R["held"] if h["status"] == "ok"), key=lambda h: h["n"])
        tot = big["rss_held"]["envoy"] + big["rss_held"]["approval"]
        per = (tot - big["rss_base"]["envoy"] - big["rss_base"]["approval"]) / held_count(big)
        proj = big["rss_base"]["envoy"] + big["rss_base"]["approval"] + per * 10000
        tried = next((h for h in R["held"] if h["n"] >= 10000), None)
        why = ("attempted, " + (f"{tried['completed_ok']:,} of {tried['n']:,} completed correctly"
                                if tried["status"] == "ok" else f"failed ({tried.get('error', '')[:120]})")
               if tried else "not run (`--full` runs it)")
        a(f"| 10k held requests under {mib(T_HELD_RSS_BYTES)} RSS, Envoy + service | 10k {why}; measured at N = {big['n']:,}: "
          f"{mib(tot)}; linear extrapolation to 10k: about {mib(proj)} | "
          f"{'not measured (extrapolation within target)' if proj < T_HELD_RSS_BYTES else '**missed** (extrapolated)'} |")
    for h in R["held"]:
        if h["status"] == "ok" and h["d2fb_p99_ms"] is not None:
            ok = h["d2fb_p99_ms"] < T_DECISION_P99_MS and h["failed"] == 0
            a(f"| decision → first byte p99 < {T_DECISION_P99_MS:.0f} ms after a bulk approval (N = {h['n']:,}) | "
              f"{h['d2fb_p99_ms']:.1f} ms ({h['completed_ok']:,} of {h['n']:,} correct) | {'met' if ok else '**missed**'} |")
    ms = next((x for x in R["stream"] if x["system"] == "masking" and x["status"] == "ok" and x.get("set") == "long"), None)
    un = next((x for x in R["stream"] if x["system"] == "filter" and x["status"] == "ok" and x.get("set") == "long"), None)
    if ms and un:
        added, added99 = ms["ttfb_p50"] - un["ttfb_p50"], ms["ttfb_p99"] - un["ttfb_p99"]
        a(f"| response masking adds < 1 ms to TTFB beyond the hold-back window | {added:+.3f} ms p50, "
          f"{added99:+.3f} ms p99 (answer longer than the window, sent at once) | "
          f"{'met' if added < T_STREAM_TTFB_MS else '**missed**'} |")
    else:
        a(f"| response masking adds < 1 ms to TTFB beyond the hold-back window | not measured: "
          f"{R['features'].get('masking', {}).get('reason', '')} | pending |")
    a("")
    a("### Where the time goes")
    a("")
    p32, a32 = s.row("plain", 32), s.row("allow", 32)
    if p32 and a32:
        per_p = p32["cpu_s"]["envoy"] / p32["requests"] * 1e6
        per_a = a32["cpu_s"]["envoy"] / a32["requests"] * 1e6
        a(f"- **`allow` path.** The filter adds {per_a - per_p:.0f} µs of Envoy CPU per request at 32 connections "
          f"({per_p:.0f} → {per_a:.0f} µs). wrk, Envoy and the demo backend share the 2 cores, so Envoy's CPU per "
          "request sets the throughput; the split by component is below when perf could run. CPU per request is "
          "also the measure that other load on the machine disturbs least: by it alone, the filter's path costs "
          f"{per_a / per_p:.1f}× plain Envoy's, so with Envoy's CPU as the only limit it would reach about "
          f"{per_p / per_a:.0%} of plain Envoy's throughput. Reaching {T_ALLOW_RATIO:.0%} needs the filter's own "
          f"cost per request under about {per_p / T_ALLOW_RATIO - per_p:.0f} µs.")
        p1, a1, n1 = s.row("plain", 1), s.row("allow", 1), s.row("noop", 1)
        if p1 and a1:
            # One request at a time: Envoy's work on each is on its path, so its CPU per request is the
            # latency it adds (less what overlaps with wrk and the backend on the other core).
            cpu1 = {k: r["cpu_s"]["envoy"] / r["requests"] * 1e6 for k, r in (("p", p1), ("a", a1), ("n", n1)) if r}
            a(f"- **`allow` path at one connection.** One request at a time, so Envoy's work on each is on its "
              f"path: Envoy used {cpu1['a']:.0f} µs of CPU per request with the filter against {cpu1['p']:.0f} "
              + (f"plain and {cpu1['n']:.0f} with the no-op filter " if "n" in cpu1 else "plain ")
              + f"(more than at 32 connections: each request wakes Envoy's event loop and its wasm callbacks "
              f"alone), {cpu1['a'] - cpu1['p']:.0f} µs more, and p50 rose {a1['p50_ms'] - p1['p50_ms']:+.3f} ms. "
              f"Adding at most {T_ALLOW_ADDED_P50_MS} ms needs that difference, the floor's included, under "
              f"{T_ALLOW_ADDED_P50_MS * 1000:.0f} µs: the same cost per request as above, seen one request at a time.")
        n32 = s.row("noop", 32)
        if n32:
            per_n = n32["cpu_s"]["envoy"] / n32["requests"] * 1e6
            a(f"- **The floor.** The no-op wasm filter adds {per_n - per_p:.0f} µs per request ({per_p:.0f} → "
              f"{per_n:.0f} µs): V8, the proxy-wasm callbacks and one copy of the body into the VM, which any wasm "
              f"filter pays here. countersign's own cost on the `allow` path is the rest, {per_a - per_n:.0f} µs.")
    nat = next((x for x in R["masking"] if x["where"] == "native" and x.get("case") == "2k-sensitive"
                and x.get("mb_s")), None)
    env_m = next((x for x in R["masking"] if x["where"] == "Envoy" and x.get("case") == "2k-sensitive"
                  and x.get("extra_cpu_us_per_req") is not None), None)
    if nat and env_m:
        size = s.bodies["2k-sensitive"][1]
        native_us = size / (nat["mb_s"] * 1e6) * 1e6
        a(f"- **Request masking** (2 KB with matches). Natively the masking engine takes {native_us:.0f} µs per "
          f"request body (`masking-native`, every built-in detector); inside Envoy masking adds "
          f"{env_m['extra_cpu_us_per_req']:.0f} µs of Envoy CPU per request over scenario 1. That covers the "
          "request and, with `responses: true`, the demo model's echo of the prompt on the way back (so about "
          "twice the text), run as wasm in V8 (slower than native code) with the body copied into the VM and the "
          "masked body copied back. The detectors scan every text for their seeds (digits, `@`, `:`, and key "
          "words and token prefixes through one Aho-Corasick automaton per detector) and run their patterns only "
          "around them; a profile of the engine compiled to wasm (V8, in Node) puts those automata at about a "
          "quarter of masking a 2 KB prompt (the password detector's case-insensitive words, which no rare byte "
          "can skip to, the most), then the detectors' windows and checks, then parsing the JSON and rewriting it.")
    rec32 = s.row("record", 32)
    if rec32:
        cm = R.get("record_callout_ms") or {}
        a(f"- **Durable record.** Each allowed request is forwarded only after the approval service has committed "
          f"its record. A record goes at once when no record call of its Envoy worker is in flight; the records that "
          f"arrive while one is travel together in the next call (`POST /v1/records/batch`, sent when that call is "
          f"answered or after `record_batch_ms`, 1 ms), and Envoy saw the record calls take p50 {fmt(cm.get('p50'), '.1f')} / "
          f"p99 {fmt(cm.get('p99'), '.1f')} ms (`cluster.countersign_approval.upstream_rq_time`, both runs); the "
          "response parts due in one timer tick travel together the same way. "
          f"{calls_per_request_text(R.get('record_calls_per_request') or {})}The service hands every append to "
          "one writer, which appends what is queued to the one hash chain in one `BEGIN IMMEDIATE` transaction "
          "and one flush (`synchronous = FULL`) and answers each append once it is committed; the chain is one "
          "sequence, so appends are written one after another. Copying the WAL back into the database file "
          "(the checkpoint) is left to a thread of its own, so no group waits for it, and record ids begin with "
          "their time, so each append adds to the last page of the id indexes instead of a random one. "
          f"The service used "
          f"{rec32['cpu_s'].get('approval', 0) / rec32['seconds'] * 100:.0f}% of a core while Envoy waited.")
    pg32 = s.row("record-pg", 32)
    if pg32:
        pg_cpu = pg32["cpu_s"].get("postgres")
        a(f"- **Durable record on PostgreSQL** (row 3b): {pg32['rps']:,.0f} req/s at 32 connections"
          + (f" against {rec32['rps']:,.0f} on SQLite" if rec32 else "")
          + ". Appends serialise on the one hash chain (an advisory lock, taken with `BEGIN` in one round trip) "
          "and share transactions the same way; each append is one INSERT with its duplicate check inside it, "
          "so one round trip to the server per request or response part (the blocking client sends one "
          "statement at a time), and the service fills in the query columns the query API reads (six `jsonb` "
          "generated columns did that before, parsing each entry six times)" + (
              f"; PostgreSQL used {pg_cpu / pg32['seconds'] * 100:.0f}% of a core" if pg_cpu is not None else "")
          + ". CPU per request at 32 connections: "
          + ", ".join(f"{name} {sec / pg32['requests'] * 1e6:.0f} µs" for name, sec in pg32["cpu_s"].items())
          + " (plain Envoy "
          + (f"{p32['cpu_s']['envoy'] / p32['requests'] * 1e6:.0f} µs and the backend "
             f"{p32['cpu_s'].get('backend', 0) / p32['requests'] * 1e6:.0f} µs" if p32 else "not measured")
          + "): on the two cores that also run wrk, the record's work in Envoy, the service and PostgreSQL "
          "bounds the throughput, as on SQLite, before any wait for the WAL flush.")
    tk = s.row("token-spent", 32)
    if tk:
        cm = R.get("token_callout_ms") or {}
        a(f"- **Approval token, single use.** Each retry waits for `POST /v1/reviews/{{id}}/consume` at the "
          f"service (p50 {fmt(cm.get('p50'), '.1f')} / p99 {fmt(cm.get('p99'), '.1f')} ms as Envoy saw it), one "
          "SQLite commit per use; verified offline only, the retry costs the filter's HMAC check and nothing at "
          "the service.")
    au1, al1 = s.row("automatic", 1, "2k-auto"), s.row("allow", 1)
    if au1 and al1:
        au32 = s.row("automatic", 32, "2k-auto")
        a(f"- **Automatic approval (scenario 6).** A prompt under a `review` rule with `auto_approve`, judged by a "
          f"moderation assessor on loopback: request in → answer out p50 {au1['p50_ms']:.2f} / p99 "
          f"{au1['p99_ms']:.2f} ms at one connection, against {al1['p50_ms']:.2f} / {al1['p99_ms']:.2f} ms on the "
          f"`allow` path (+{au1['p50_ms'] - al1['p50_ms']:.2f} ms at p50)"
          + (f"; {au32['rps']:,.0f} req/s at 32 connections" if au32 else "")
          + ". Each request creates a review (one commit), the service asks the assessor in a task of its own, "
          "commits the decision as `assessor:moderation` and wakes the filter worker's watch, which releases the "
          "request: the same path as a person's approval, without the person.")
    for h in R["held"]:
        if h["status"] == "ok" and h["d2fb_p99_ms"] is not None and h["d2fb_p99_ms"] >= T_DECISION_P99_MS:
            sg = h["segments"]
            a(f"- **Decision → first byte (N = {h['n']:,}).** p99 {h['d2fb_p99_ms']:.0f} ms, of which: the service "
              f"waking the worker's watch and the filter releasing the request, p99 {fmt(sg['release']['p99'], '.0f')} ms; "
              f"the model's first byte, p99 {fmt(sg['model']['p99'], '.0f')} ms; Envoy to the caller, p99 "
              f"{fmt(sg['envoy']['p99'], '.1f')} ms. The bulk approval ran at {h['approvals_per_s']:,.0f} decisions/s, "
              "so requests are released in a burst that Envoy, the service, the backend and the clients take on "
              "the same 2 cores. A decision wakes its worker's watch with the state it committed (no re-read), and "
              "one answer carries every decision since the last, so what remains in the first part is the "
              "service answering the watch and the filter's release path "
              "while the burst of approvals, releases and model calls shares the cores."
              + burst_note(h))
    if h10 or h1:
        h = h10 or max((h for h in R["held"] if h["status"] == "ok"), key=lambda h: h["n"])
        de = (h["rss_held"]["envoy"] - h["rss_base"]["envoy"]) / held_count(h) / 1024
        ds = (h["rss_held"]["approval"] - h["rss_base"]["approval"]) / held_count(h) / 1024
        fd = sum(v for k, v in h["errors"].items() if "local connection failure" in k or "TimeoutError" in k)
        dv = held_vm_kib(h)
        a(f"- **Held requests' memory (N = {h['n']:,}).** About {de:.0f} KiB of Envoy RSS and {ds:.0f} KiB of "
          f"service RSS per held request, so {(de + ds) * 10000 / 1024:,.0f} MiB for 10k on top of the idle "
          "processes. "
          + (f"Of Envoy's share, {dv:.0f} KiB is countersign's wasm VMs (the held request's state and body; "
             "see the held-capacity notes) and the rest Envoy's own: " if dv is not None else "Envoy's share: ")
          + "the caller's connection and stream with its buffered body (no stream to the service: each Envoy "
          "worker keeps one watch for all its held requests); in the service, the review, its place in the "
          "watcher's mailbox and the database's pages."
          + held_floor_sentence(R)
          + (f" {fd} of the failures at this size are the file-descriptor limit (connections Envoy could not "
             "open or accept), not the product." if fd else ""))
    if ms and un:
        a(f"- **Response masking, time to first byte.** Prose is released with the event that carries it, so no "
          f"window has to fill first: with events spaced, masking adds about as much to the first text as to "
          f"any other. With the whole {un.get('answer_chars', '?')}-character answer sent at once, the unmasked "
          f"filter delivers its first text after {un['ttfb_p50']:.2f} ms and the masking filter after "
          f"{ms['ttfb_p50']:.2f} ms (to the end: {un['total_p50']:.2f} and {ms['total_p50']:.2f} ms): Envoy hands "
          "the filter the answer's events in few body chunks, and a chunk's text leaves only once the filter has "
          "read every event in it (SSE framing, each event's JSON, the prefix automata, the rewrite) inside the "
          "wasm VM.")
    a("")
    for note in R["notes"]:
        a(note)
        a("")
    prof = R.get("profile")
    p32, a32 = s.row("plain", 32), s.row("allow", 32)
    if prof and p32 and a32 and "shares" in prof.get("plain", {}) and "shares" in prof.get("filter", {}):
        a("### Where the filter's time goes")
        a("")
        a("`perf record` of each Envoy for a few seconds under the same 32-connection, 2 KB load, split by shared "
          "object and scaled by the Envoy CPU time per request measured above. Envoy's binary is stripped, and V8 "
          "emits no symbol map for the wasm code it compiles, so this is as fine as it goes without a debug build; "
          "the `envoy` line includes V8's runtime and the proxy-wasm host calls (header maps, body buffer copies).")
        a("")
        n32 = s.row("noop", 32)
        floor = n32 and "shares" in prof.get("noop", {})
        a("| where | plain Envoy µs/request |" + (" Envoy + no-op filter µs/request |" if floor else "")
          + " Envoy + filter µs/request | added |")
        a("|---|---:|" + ("---:|" if floor else "") + "---:|---:|")
        per_p = p32["cpu_s"]["envoy"] / p32["requests"] * 1e6
        per_a = a32["cpu_s"]["envoy"] / a32["requests"] * 1e6
        per_n = n32["cpu_s"]["envoy"] / n32["requests"] * 1e6 if floor else 0.0
        sp, sa = prof["plain"]["shares"], prof["filter"]["shares"]
        sn = prof["noop"]["shares"] if floor else {}
        for dso in sorted(set(sp) | set(sa) | set(sn), key=lambda d: -(sa.get(d, 0) * per_a - sp.get(d, 0) * per_p)):
            up, ua, un = sp.get(dso, 0) / 100 * per_p, sa.get(dso, 0) / 100 * per_a, sn.get(dso, 0) / 100 * per_n
            if max(up, ua, un) < 0.5:
                continue
            a(f"| `{dso}` | {up:.1f} |" + (f" {un:.1f} |" if floor else "") + f" {ua:.1f} | {ua - up:+.1f} |")
        a(f"| total | {per_p:.1f} |" + (f" {per_n:.1f} |" if floor else "") + f" {per_a:.1f} | {per_a - per_p:+.1f} |")
        a("")
    rprof = R.get("record_profile") or {}
    r32 = s.row("record", 32)
    if r32 and "shares" in rprof:
        a("### Where the record path's time goes")
        a("")
        a("`perf record` of Envoy with `records: required` (scenario 3, SQLite) and of the approval service at the "
          "same time, under the same 32-connection, 2 KB load, split by shared object and scaled by each process's "
          "CPU time per request measured in row 3; the `allow` column is scenario 1's profile above (no record).")
        a("")
        per_r = r32["cpu_s"]["envoy"] / r32["requests"] * 1e6
        sr = rprof["shares"]
        sa = (prof or {}).get("filter", {}).get("shares") if a32 else None
        per_a = a32["cpu_s"]["envoy"] / a32["requests"] * 1e6 if a32 and sa else 0.0
        a("| Envoy: where | " + ("`allow` µs/request | " if sa else "") + "with records µs/request |"
          + (" added |" if sa else ""))
        a("|---|" + ("---:|" if sa else "") + "---:|" + ("---:|" if sa else ""))
        for dso in sorted(set(sr) | set(sa or {}), key=lambda d: -sr.get(d, 0)):
            ur, ua = sr.get(dso, 0) / 100 * per_r, (sa or {}).get(dso, 0) / 100 * per_a
            if max(ur, ua) < 0.5:
                continue
            a(f"| `{dso}` | " + (f"{ua:.1f} | " if sa else "") + f"{ur:.1f} |" + (f" {ur - ua:+.1f} |" if sa else ""))
        a(f"| total | " + (f"{per_a:.1f} | " if sa else "") + f"{per_r:.1f} |" + (f" {per_r - per_a:+.1f} |" if sa else ""))
        a("")
        svc = rprof.get("others", {}).get("approval")
        if svc and r32["cpu_s"].get("approval"):
            per_s = r32["cpu_s"]["approval"] / r32["requests"] * 1e6
            a(f"The approval service spent {per_s:.0f} µs of CPU per request (both parts of its record), by shared "
              "object: " + ", ".join(f"`{d}` {v / 100 * per_s:.0f} µs" for d, v in
                                     sorted(svc["shares"].items(), key=lambda kv: -kv[1]) if v >= 1.0)
              + "; its hottest symbols (share of its samples): "
              + ", ".join(f"`{k}` {v:.1f}%" for k, v in list(svc["symbols"].items())[:8]) + ".")
            a("")
            calls, served = svc.get("syscall_counts") or {}, rprof.get("requests") or 0
            by_call = {k: v for k, v in (svc.get("syscalls") or {}).items() if v / 100 * per_s >= 1.0}
            if by_call:
                def count(name: str) -> str:
                    n = calls.get(name)
                    return f" ({n / served:.1f} calls per request)" if n is not None and served else ""
                a("The service's CPU by system call (each call's kernel work with the waits and thread switches it "
                  "led to, from kernel call chains; per request): "
                  + ", ".join(f"`{k}` {v / 100 * per_s:.0f} µs{count(k)}" for k, v in by_call.items())
                  + f"; {sum(by_call.values()) / 100 * per_s:.0f} µs in all of the "
                  f"{svc['shares'].get('[kernel.kallsyms]', 0) / 100 * per_s:.0f} µs in the kernel (the rest of it "
                  "interrupts and preemption, outside any call). `fsync` is the "
                  "WAL's flush at each group commit (writing back the pages the group changed), `pwrite64` SQLite "
                  "writing them to the WAL one frame at a time (and the checkpoint copying them to the database "
                  "file), `pread64` mostly the checkpoint reading them back from the WAL, `futex` the hand-offs between the HTTP tasks and the writer thread.")
                a("")
            al1 = s.row("allow", 1)
            if al1 and al1["cpu_s"].get("envoy") and a32 and a32["cpu_s"].get("envoy"):
                per_a1 = al1["cpu_s"]["envoy"] / al1["requests"] * 1e6
                per_a32 = a32["cpu_s"]["envoy"] / a32["requests"] * 1e6
                rate_a1, rate_r = al1["requests"] / al1["seconds"], r32["requests"] / r32["seconds"]
                a(f"Envoy's CPU per request depends on its request rate, not only on the work of each: scenario 1 "
                  f"without records cost it {per_a1:.0f} µs per request at one connection ({rate_a1:,.0f} req/s) "
                  f"against {per_a32:.0f} µs at 32 ({a32['requests'] / a32['seconds']:,.0f} req/s), since at a lower "
                  "rate each wake-up of its event loop (and each system call) serves fewer requests. The record "
                  f"path at 32 connections ran at {rate_r:,.0f} req/s and cost {per_r:.0f} µs"
                  + (f": at about the rate of scenario 1 at one connection, so the records' own work in Envoy is "
                     f"roughly {per_r - per_a1:+.0f} µs per request, and most of the {per_r - per_a32:+.0f} µs over "
                     "scenario 1 at 32 connections is the lower rate the record's wait imposes (a rough split: one "
                     "connection overlaps nothing, 32 held by records overlap some)."
                     if 0.5 < rate_r / rate_a1 < 2 else ".")
                  )
                a("")
            if sa:
                added = per_r - per_a + per_s
                p32r = s.row("plain", 32)
                a(f"So each recorded request costs about {added:.0f} µs of CPU more than an unrecorded one "
                  f"(Envoy {per_r - per_a:+.0f} µs: the record calls, building the record parts in the VM, "
                  f"and the lower request rate, above; the service "
                  f"{per_s:.0f} µs, about half of it in the kernel: thread hand-offs, the WAL's writes and "
                  "flushes). On two cores that also run the load generator and the model, CPU alone "
                  f"bounds the record path near {2e6 / (per_r + per_s):,.0f} req/s"
                  + (f" ({2e6 / (per_r + per_s) / p32r['rps']:.0%} of plain Envoy in this run)" if p32r else "")
                  + ", before any waiting for the flush: the target needs the record's whole cost, in Envoy "
                  "and in the service, cut several times over, not the wait for it.")
                a("")
    return "\n".join(L) + "\n"


# ------------------------------------------------------------------ main

def main():
    p = argparse.ArgumentParser(prog="tests/bench/run", description=__doc__)
    p.add_argument("--duration", type=float, default=10, help="seconds per measured run (default 10)")
    p.add_argument("--full", action="store_true", help="also hold 10k requests at once")
    p.add_argument("--rounds", type=int, default=1,
                   help="interleaved rounds of plain Envoy vs scenario 1; the median is reported (default 1)")
    p.add_argument("--held", type=int, action="append", help="held-capacity sizes (default 1000, plus 10000 with --full)")
    p.add_argument("--only", default="proxy,held,approval,litellm",
                   help="comma-separated parts: proxy, held, approval, litellm (default all); `automatic` is scenario 6 "
                        "after the first part of proxy; `allow` is the "
                        "first part of proxy alone: ceiling, plain Envoy, the no-op floor, scenario 1; `record` is plain "
                        "Envoy and scenarios 3 and 3b alone")
    p.add_argument("--no-profile", action="store_true", help="do not run perf when a target is missed")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"), help="where to write the report")
    p.add_argument("--command", default=None, help=argparse.SUPPRESS)
    p.add_argument("--from-results", default=None, metavar="FILE",
                   help="only rewrite the report from a results.json of an earlier run (no measuring)")
    args = p.parse_args()
    if httpx is None or yaml is None:
        sys.exit("bench.py needs httpx and PyYAML: run it through tests/bench/run, which sets up .venv-bench")
    command = args.command or "tests/bench/run " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_term)  # also when started in the background with SIGINT ignored
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    nofile = raise_nofile(65536)
    if nofile < 25000:
        log(f"warning: file-descriptor limit is {nofile}; 10k held requests need more than 20k")
    if args.from_results:
        saved = json.loads(Path(args.from_results).read_text())
        m = saved.pop("machine")
        args.duration = saved.pop("duration", args.duration)
        command = saved.pop("command", command)
        suite = Suite(args)
        suite.results.update(saved)
        text = report(suite, m, command)
        print(text)
        Path(args.out).write_text(text)
        log(f"rewrote {args.out} from {args.from_results}")
        return
    parts = set(args.only.split(","))
    sizes = args.held or ([1000, 10000] if args.full else [1000])
    suite = Suite(args)
    # The harness appends to a process's log, and start-up failures are read from it: each run starts afresh.
    for old in suite.work.glob("*.log"):
        old.unlink()
    import resource
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    suite.results["nofile"] = nofile
    if max(sizes) * 2 + 1000 > nofile:
        # Envoy needs a descriptor per held request (the caller's connection; the watches to the
        # approval service share a few HTTP/2 connections), and a second for the model connection while a
        # bulk approval releases them: also run the largest size that fits, then try the asked one anyway.
        fits = (nofile - 1000) // 2 // 1000 * 1000
        if fits > 1000 and fits not in sizes:
            sizes = sorted(set(sizes) | {fits})
        suite.results["notes"].append(
            f"File descriptors: this machine's limit is {nofile:,} per process (hard limit {hard:,}; raising it "
            f"needs CAP_SYS_RESOURCE, which this sandbox lacks). Envoy holds a descriptor per held request, the "
            f"caller's connection (the workers' watches to the approval service share a few HTTP/2 connections), "
            f"and needs a second for the connection to the model while a bulk approval releases them, so about "
            f"{fits:,} holds fit; larger sizes were attempted anyway and their failures are shown as they are.")
    m = machine()
    log(f"machine: {m['nproc']} CPUs, {m['cpu']}, load {' '.join(m['load_before'])}")
    try:
        if "proxy" in parts:
            suite.proxy_scenarios()
        elif "allow" in parts or "automatic" in parts:
            suite.proxy_scenarios(allow_only=True, automatic="automatic" in parts)
        elif "record" in parts:
            suite.records_only()
        if "held" in parts:
            for n in sizes:
                suite.held(n)
            suite.held_floor(min(sizes))
        if "approval" in parts:
            suite.approval_alone()
        if "litellm" in parts:
            suite.litellm()
    except KeyboardInterrupt:
        log("interrupted: stopping everything")
        stop_everything()
        sys.exit(130)
    finally:
        stop_everything()
    m["load_after"] = open("/proc/loadavg").read().split()[:3]
    (suite.work / "results.json").write_text(json.dumps(
        {"machine": m, "duration": suite.d, "command": command, **suite.results}, indent=1, default=str))
    text = report(suite, m, command)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    log(f"wrote {args.out} (raw results in {suite.work / 'results.json'})")


if __name__ == "__main__":
    main()
