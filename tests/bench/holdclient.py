"""Held-capacity client: opens N connections to the gateway at once, each with
one chat request that policy holds for review, and waits for every answer.

    holdclient.py --port P --n N --out FILE [--body-size 2048]

Prints `SENT <n> <connect_errors>` once every request has been written, then
waits (up to --timeout seconds) for all responses and writes one JSON record
per request to FILE: the time the status line arrived (monotonic, with one
monotonic/wall-clock pair to convert), the status, the review id header and
whether the answer is the right one. Runs in its own
process so that its event loop does nothing but this.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from benchhttp import raise_nofile, read_response, request_bytes
from workloads import chat_body, last_user_text


async def one(i: int, args, gate: asyncio.Semaphore, sent: asyncio.Event, counter: dict, results: list):
    marker = f"held-{args.nonce}-{i:06d}"
    body = chat_body(args.body_size, model=args.model, marker=marker)
    expect = "echo: " + last_user_text(body)
    rec = {"i": i, "t_sent": None, "t_first_byte": None, "status": None, "review_id": None,
           "outcome": None, "ok": False, "error": None}
    writer = None
    if args.rate > 0:
        # Paced arrivals: request i starts at i / rate seconds.
        await asyncio.sleep(max(0.0, args.t0 + i / args.rate - time.monotonic()))
    try:
        async with gate:
            reader, writer = await asyncio.open_connection(args.host, args.port)
            writer.write(request_bytes("POST", "/v1/chat/completions", body))
            await writer.drain()
            rec["t_sent"] = time.monotonic()
    except OSError as e:
        rec["error"] = f"connect/send: {e!r}"
        counter["errors"] += 1
    finally:
        counter["done"] += 1
        if counter["done"] == args.n:
            sent.set()
    if rec["error"] is None:
        try:
            resp = await asyncio.wait_for(read_response(reader), args.timeout)
            rec["t_first_byte"] = resp.t_first_byte
            rec["status"] = resp.status
            rec["review_id"] = resp.headers.get("x-countersign-review-id")
            rec["outcome"] = resp.headers.get("x-countersign-outcome")
            if resp.status == 200:
                content = json.loads(resp.body)["choices"][0]["message"]["content"]
                rec["ok"] = content == expect
                if not rec["ok"]:
                    rec["error"] = "wrong answer"
            else:
                try:
                    err = json.loads(resp.body)["error"]
                    rec["error"] = f"{err.get('code')}: {err.get('message')}"[:300]
                except (ValueError, KeyError, TypeError):
                    rec["error"] = resp.body[:300].decode(errors="replace")
        except (asyncio.TimeoutError, OSError, ConnectionError, ValueError, KeyError, asyncio.IncompleteReadError) as e:
            rec["error"] = f"response: {e!r}"
    if writer is not None:
        writer.close()
    results.append(rec)


async def main_async(args):
    gate = asyncio.Semaphore(args.connect_concurrency)
    args.t0 = time.monotonic()
    sent = asyncio.Event()
    counter = {"done": 0, "errors": 0}
    results: list = []
    tasks = [asyncio.create_task(one(i, args, gate, sent, counter, results)) for i in range(args.n)]
    await sent.wait()
    print(f"SENT {args.n} {counter['errors']}", flush=True)
    await asyncio.gather(*tasks)
    # Envoy's access log and the service use the wall clock: one pair of readings converts.
    clock = {"mono": time.monotonic(), "wall": time.time()}
    with open(args.out, "w") as f:
        json.dump({"clock": clock, "results": results}, f)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="demo-echo-held")
    p.add_argument("--body-size", type=int, default=2048)
    p.add_argument("--connect-concurrency", type=int, default=256)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--rate", type=float, default=0, help="requests started per second (0: all at once)")
    p.add_argument("--nonce", default=str(int(time.time())))
    args = p.parse_args()
    limit = raise_nofile(args.n + 1024)
    if limit < args.n + 64:
        print(f"file-descriptor limit {limit} is too low for {args.n} connections", file=sys.stderr)
        sys.exit(3)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
