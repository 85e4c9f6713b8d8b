#!/usr/bin/env python3
"""TTFT and TBT through `hat serve device` against `hat generate`, same prompts, same link, interleaved.

    scripts/bench-endpoint.py --artifacts artifacts [--link 50,40] [--max-tokens 32] [--json OUT]

Starts `hat serve cloud` pinned to CPU 1 and runs the device side on CPU 0 (`hat generate` and
`hat serve device` both), greedy, on the short benchmark prompts as chat turns. For each prompt it
runs `hat generate --mode hat --json` and then one streamed request to the server, and compares:
- `generate`: TTFT and TBT as `hat generate` reports them (its session is connected before timing);
- `http (client)`: measured by this script over HTTP: request sent -> first content chunk, and
  (last chunk - first chunk) / (tokens - 1);
- `http (server)`: the server's own `timings` for the same request.
The HTTP layer's cost is `http (client)` over `generate`. Uses only Python's standard library.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--artifacts", required=True)
p.add_argument("--hat", default=os.path.join(ROOT, "target/release/hat"))
p.add_argument("--prompts", default=os.path.join(ROOT, "profiles/bench-prompts.jsonl"))
p.add_argument("--link", default="50,40", help="MBPS,RTT_MS emulated on the device side")
p.add_argument("--max-tokens", type=int, default=32)
p.add_argument("--mode", default="hat", choices=["hat", "ushape"])
p.add_argument("--json", help="write the per-prompt rows and the summary here")
args = p.parse_args()

mbps, rtt = args.link.split(",")
link = ["--link-mbps", mbps, "--link-rtt-ms", rtt]
prompts = [json.loads(line) for line in open(args.prompts) if line.strip()]
prompts = [q for q in prompts if q["kind"] == "short"]


def start(cmd):
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("listening on "):
            return proc, line.split()[-1]
    raise SystemExit(f"{cmd[:3]} did not start")


cloud, cloud_addr = start(["taskset", "-c", "1", args.hat, "serve", "cloud", "--package", f"{args.artifacts}/cloud", "--listen", "127.0.0.1:0", "--cpus", "1", "-q"])
device_cmd = ["taskset", "-c", "0", args.hat, "serve", "device", "--artifacts", args.artifacts, "--cloud", cloud_addr, "--listen", "127.0.0.1:0", "--mode", args.mode, "-q", *link]
device, device_addr = start(device_cmd)
base = f"http://{device_addr}/v1"
model = json.load(urllib.request.urlopen(base + "/models"))["data"][0]["id"]


def via_generate(text):
    out = subprocess.run(
        ["taskset", "-c", "0", args.hat, "generate", "--artifacts", args.artifacts, "--cloud", cloud_addr, "--mode", args.mode, "--chat",
         "--prompt", text, "--max-tokens", str(args.max_tokens), "--json", "-q", *link],
        check=True, capture_output=True, text=True,
    )
    g = json.loads(out.stdout)
    return {"text": g["text"], "tokens": len(g["tokens"]), "ttft_ms": g["ttft_ms"], "tbt_ms": g["tbt_ms"]}


def via_http(text):
    body = {"model": model, "messages": [{"role": "user", "content": text}], "temperature": 0, "max_tokens": args.max_tokens, "stream": True}
    req = urllib.request.Request(base + "/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first = last = None
    parts, timings = [], None
    with urllib.request.urlopen(req, timeout=300) as r:
        for line in r:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = first or now
                last = now
                parts.append(chunk["choices"][0]["delta"]["content"])
            timings = chunk.get("timings") or timings
    n = timings["predicted_n"]
    return {
        "text": "".join(parts),
        "tokens": n,
        "ttft_ms": (first - t0) * 1e3,
        "tbt_ms": (last - first) * 1e3 / max(n - 1, 1),
        "server_ttft_ms": timings["ttft_ms"],
        "server_tbt_ms": timings["tbt_ms"],
    }


rows = []
try:
    via_http(prompts[0]["text"])  # warm-up: loads caches, fills the link estimate
    for q in prompts:
        g, h = via_generate(q["text"]), via_http(q["text"])
        rows.append({"prompt": q["name"], "generate": g, "http": h, "same_text": g["text"] == h["text"]})
        print(f"{q['name']:<28} TTFT {g['ttft_ms']:6.1f} / {h['ttft_ms']:6.1f} ms   TBT {g['tbt_ms']:5.1f} / {h['tbt_ms']:5.1f} ms   same text: {g['text'] == h['text']}", file=sys.stderr)
finally:
    device.terminate()
    cloud.terminate()

med = lambda xs: statistics.median(xs)  # noqa: E731
summary = {
    "link": args.link,
    "mode": args.mode,
    "prompts": len(rows),
    "max_tokens": args.max_tokens,
    "generate_ttft_ms": med([r["generate"]["ttft_ms"] for r in rows]),
    "http_ttft_ms": med([r["http"]["ttft_ms"] for r in rows]),
    "server_ttft_ms": med([r["http"]["server_ttft_ms"] for r in rows]),
    "generate_tbt_ms": med([r["generate"]["tbt_ms"] for r in rows]),
    "http_tbt_ms": med([r["http"]["tbt_ms"] for r in rows]),
    "server_tbt_ms": med([r["http"]["server_tbt_ms"] for r in rows]),
    "same_text": sum(r["same_text"] for r in rows),
}
summary["ttft_http_over_generate"] = summary["http_ttft_ms"] / summary["generate_ttft_ms"]
summary["tbt_http_over_generate"] = summary["http_tbt_ms"] / summary["generate_tbt_ms"]
print(json.dumps(summary, indent=1))
if args.json:
    json.dump({"summary": summary, "rows": rows}, open(args.json, "w"), indent=1)
