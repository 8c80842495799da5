"""Records to a SIEM: `countersign-approval export-chain --follow --cursor`
over a real service's database (SQLite, and PostgreSQL) while requests keep
going through Envoy, stopped by SIGTERM (nothing lost or repeated) and by
SIGKILL (nothing lost; at most the one entry being written when it died is
written again, identical), then resumed; one run sends RFC 5424 syslog over
TCP (RFC 6587 octet counting) to a receiver written here. Every chain entry
arrives in `seq` order, and the hashes link up as the SIEM would check."""
import hashlib
import json
import signal
import socket
import threading

import pytest

from conftest import chat, post
from stack import BINARIES, Proc, records, verify_records, wait_until

pytestmark = pytest.mark.timeout(180)

ALLOW = {"rules": [{"name": "load-tests", "model": "demo-allow*", "action": "allow"}]}
GENESIS = "0" * 64


class SyslogReceiver:
    """A TCP syslog collector: reads octet-counted frames (RFC 6587) until
    the sender closes, then closes too."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.messages: list[str] = []
        self.leftover = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def start(self) -> "SyslogReceiver":
        self.thread.start()
        return self

    def _serve(self):
        conn, _ = self.sock.accept()
        with conn:
            buf = b""
            while chunk := conn.recv(65536):
                buf += chunk
                while b" " in buf:
                    length, rest = buf.split(b" ", 1)
                    n = int(length)
                    if len(rest) < n:
                        break
                    self.messages.append(rest[:n].decode())
                    buf = rest[n:]
            self.leftover = buf

    def stop(self):
        self.sock.close()
        self.thread.join(10)


def exporter(stack, tmp_path, name: str, *args: str) -> tuple[Proc, object]:
    out = open(tmp_path / f"{name}.out", "wb")
    proc = Proc(name, [str(BINARIES / "countersign-approval"), "export-chain", "--database",
                       str(stack.approval.db), "--cursor", str(tmp_path / "cursor"), *args],
                tmp_path / f"{name}.log", stdout=out).start()
    return proc, out


def lines_of(tmp_path, name: str) -> list[str]:
    return (tmp_path / f"{name}.out").read_text().splitlines()


def entry_text(line: str) -> str:
    """The hashed entry text: the line's `entry` value, byte for byte (it is last)."""
    start = line.index('"entry":') + len('"entry":')
    return line[start:-1]


def traffic(stack, stop: threading.Event, sent: list):
    while not stop.is_set():
        r = post(stack.url, json=chat(model="demo-allow", text=f"siem {len(sent)}"), timeout=20)
        assert r.status_code == 200, r.text
        sent.append(r)


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_a_stopped_or_killed_export_resumes_without_losing_or_repeating(
        make_stack, pg_database, tmp_path, background, database):
    stack = make_stack(filter_config=ALLOW, **({"database": pg_database()} if database == "postgres" else {}))
    stop, sent = threading.Event(), []
    flow = background.submit(traffic, stack, stop, sent)
    follow = ("--follow", "--poll-interval-ms", "50")
    runs = []  # (name, how it ended, lines)
    try:
        wait_until(lambda: len(sent) >= 5, timeout=30, what="traffic")

        def run_until(name, count, sig, *extra):
            proc, out = exporter(stack, tmp_path, name, *follow, *extra)
            try:
                wait_until(lambda: count(name) >= 10, timeout=30, what=f"{name} to export")
                # Records keep arriving while it is stopped.
                before = len(sent)
                wait_until(lambda: len(sent) >= before + 2, timeout=30, what="more traffic")
                proc.popen.send_signal(sig)
                code = proc.popen.wait(15)
            finally:
                proc.stop()
                out.close()
            return code

        # 1. SIGTERM: a clean stop, exit 0.
        assert run_until("term", lambda n: len(lines_of(tmp_path, n)), signal.SIGTERM) == 0
        runs.append(("term", lines_of(tmp_path, "term")))
        # 2. SIGKILL, in the middle of the run.
        assert run_until("kill", lambda n: len(lines_of(tmp_path, n)), signal.SIGKILL) == -signal.SIGKILL
        runs.append(("kill", lines_of(tmp_path, "kill")))
        # 3. Syslog over TCP, stopped by SIGINT.
        receiver = SyslogReceiver().start()
        try:
            code = run_until("syslog", lambda n: len(receiver.messages), signal.SIGINT,
                             "--syslog-url", f"tcp://127.0.0.1:{receiver.port}")
            assert code == 0, (tmp_path / "syslog.log").read_text()
        finally:
            receiver.stop()
        assert lines_of(tmp_path, "syslog") == []
        assert receiver.leftover == b"", "a clean stop sends whole frames"
        messages = receiver.messages
        for m in messages:
            head, line = m.split("] ", 1)
            pri_version, time, host, app, procid, msgid, sd = head.split(" ", 6)
            assert (pri_version, app, procid) == ("<134>1", "countersign", "-"), m
            assert time.endswith("Z") and msgid in ("request", "response"), m
            seq = json.loads(line)["seq"]
            assert sd.startswith(f'[countersign@32473 seq="{seq}" hash="'), m
        runs.append(("syslog", [m.split("] ", 1)[1] for m in messages]))
    finally:
        stop.set()
        flow.result(60)

    # 4. Traffic over: without --follow, the rest, and the export ends by itself.
    wait_until(lambda: all(r.get("response") for r in records(stack)), what="every response recorded")
    proc, out = exporter(stack, tmp_path, "rest")
    try:
        assert proc.popen.wait(30) == 0, (tmp_path / "rest.log").read_text()
    finally:
        proc.stop()
        out.close()
    runs.append(("rest", lines_of(tmp_path, "rest")))

    # Each run starts right after the last one's cursor: after a clean stop
    # with the next seq; after SIGKILL with the next seq or, when it died
    # between writing an entry and moving the cursor, with that entry again.
    exported: list[str] = []
    for (name, lines), previous in zip(runs, [None] + runs[:-1]):
        assert lines, name
        first = json.loads(lines[0])["seq"]
        if exported:
            last = json.loads(exported[-1])["seq"]
            if previous[0] == "kill" and first == last:
                assert lines[0] == exported[-1], "a repeat is the same line"
                lines = lines[1:]
            else:
                assert first == last + 1, (name, first, last)
        exported += lines

    # Every entry of the chain, once, in order; the hashes link up.
    verified = verify_records(stack)
    assert verified.returncode == 0, verified.stdout
    total = int(verified.stdout.split(" records")[0].removeprefix("ok: "))
    prev = GENESIS
    for n, line in enumerate(exported, start=1):
        e = json.loads(line)
        assert e["seq"] == n, (n, line[:200])
        assert e["prev_hash"] == prev
        text = entry_text(line)
        assert json.loads(text) == e["entry"]
        assert hashlib.sha256(f"{prev}\n{n}\n{text}".encode()).hexdigest() == e["hash"]
        prev = e["hash"]
    assert len(exported) == total >= 2 * len(sent)
    assert (tmp_path / "cursor").read_text() == f"{total} {prev}\n"

