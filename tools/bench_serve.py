#!/usr/bin/env python3
"""Aggregate decode throughput of `fp4moe serve` at several client concurrencies.

Starts the server (any `fp4moe serve` flags after `--`; a synthetic model without --model), runs
N concurrent clients that each send non-streaming greedy completions of exactly --max-tokens
tokens (`ignore_eos`) back to back, and prints a
markdown table: completion tokens of all requests / wall time, per concurrency. Standard library
only; loopback only.

    python3 tools/bench_serve.py --bin target/release/fp4moe --concurrency 1 8 32 \\
        --max-tokens 32 -- --layers 2 --backend cpu
"""

import argparse
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def run_level(base: str, clients: int, requests_per_client: int, max_tokens: int) -> dict:
    tokens, lock, errors = [0], threading.Lock(), []

    def client(c: int) -> None:
        for r in range(requests_per_client):
            body = {
                "prompt": f"client {c} request {r}: the quick brown fox",
                "max_tokens": max_tokens,
                "temperature": 0,
                # Fixed-length completions (vLLM's extension): every request decodes max_tokens.
                "ignore_eos": True,
            }
            try:
                u = post(base + "/completions", body)["usage"]
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))
                return
            with lock:
                tokens[0] += u["completion_tokens"]

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        sys.exit(f"bench_serve: {len(errors)} requests failed, e.g. {errors[0]}")
    return {"clients": clients, "requests": clients * requests_per_client, "tokens": tokens[0], "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", default="target/release/fp4moe")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="requests per client per level")
    ap.add_argument("serve_args", nargs="*", help="extra `fp4moe serve` flags (after --)")
    args = ap.parse_args()

    max_batch = str(max(args.concurrency))
    cmd = [args.bin, "serve", "--port", "0", "--max-batch", max_batch, *args.serve_args]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    base, model_line = None, ""
    try:
        for line in proc.stderr:
            sys.stderr.write(line)
            if line.startswith("model:"):
                model_line = line.strip()
            m = re.search(r"serving on (http://\S+/v1)", line)
            if m:
                base = m.group(1)
                break
        if base is None:
            sys.exit("bench_serve: the server did not start")
        threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
        # Warm-up: first-touch of weights and buffers, with a prompt long enough for the prefill
        # kernels.
        post(base + "/completions", {"prompt": "warm up " * 16, "max_tokens": 4, "temperature": 0})
        rows = [run_level(base, c, args.rounds, args.max_tokens) for c in args.concurrency]
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    print(f"\n{model_line}\n`fp4moe serve {' '.join(args.serve_args)}`, max_tokens {args.max_tokens}, "
          f"{args.rounds} requests per client, greedy, loopback\n")
    print("| concurrent clients | requests | completion tokens | wall s | aggregate tok/s | per-client tok/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        agg = r["tokens"] / r["wall_s"]
        print(f"| {r['clients']} | {r['requests']} | {r['tokens']} | {r['wall_s']:.1f} | {agg:.1f} | "
              f"{agg / r['clients']:.2f} |")


if __name__ == "__main__":
    main()
