#!/usr/bin/env python3
"""Greedy output of quantized packages against the f32 package of the same split.

For each benchmark prompt, `hat generate --mode local` runs on every package; the report gives, per
storage type, the mean number of leading tokens identical to f32's, how many replies are identical
in full, and the decode speed. Usage:
    scripts/quant-quality.py MODEL.gguf [--tokens 64] [--types f32,q8_0,q8_0:candle,q8_0:generic,q4_0,keep]
`TYPE:candle` runs the TYPE package on candle's kernels instead of hat's own q8_0 kernel
(HAT_Q8_KERNEL=candle, candle's tiled kernel on padded rows); `TYPE:generic` also leaves rows unpadded
(HAT_Q8_TILED=0) and `TYPE:head` pads the LM head only (see model/src/weights.rs, model/src/q8.rs).
"""
import argparse, json, os, statistics, subprocess, sys, tempfile

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--tokens", type=int, default=64)
ap.add_argument("--types", default="f32,q8_0,q8_0:candle,q8_0:generic,q4_0,keep")
ap.add_argument("--prompts", default="profiles/bench-prompts.jsonl")
ap.add_argument("--hat", default="target/release/hat")
ap.add_argument("--json", action="store_true")
args = ap.parse_args()
types = args.types.split(",")
if types[0] != "f32":
    types.insert(0, "f32")
prompts = [json.loads(l)["text"] for l in open(args.prompts) if l.strip()]
work = tempfile.mkdtemp(prefix="hat-quant-")
for t in sorted({t.split(":")[0] for t in types}):
    subprocess.run([args.hat, "--quiet", "split", "--model", args.model, "--input-layers", "2", "--output-layers", "2",
                    "--device-quant", t, "--cloud-quant", t, "--out", f"{work}/{t}"], check=True, stdout=subprocess.DEVNULL)
runs = {t: [] for t in types}
for i, p in enumerate(prompts):
    for t in types:
        package, _, variant = t.partition(":")
        env = dict(os.environ, HAT_Q8_TILED={"tiled": "1", "generic": "0", "head": "head"}.get(variant, ""))
        if variant in ("candle", "generic", "head", "tiled"):
            env["HAT_Q8_KERNEL"] = "candle"
        out = subprocess.run([args.hat, "--quiet", "generate", "--artifacts", f"{work}/{package}", "--mode", "local", "--chat",
                              "--prompt", p, "--max-tokens", str(args.tokens), "--json"], check=True, capture_output=True, text=True, env=env)
        runs[t].append(json.loads(out.stdout))
    print(f"prompt {i + 1}/{len(prompts)}", file=sys.stderr)

def prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n

report = {}
for t in types:
    ref = [r["tokens"] for r in runs["f32"]]
    got = [r["tokens"] for r in runs[t]]
    report[t] = {
        "mean_prefix_tokens": statistics.mean(prefix(a, b) for a, b in zip(ref, got)),
        "identical_replies": sum(a == b for a, b in zip(ref, got)),
        "replies": len(ref),
        "mean_reply_tokens": statistics.mean(len(a) for a in ref),
        "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs[t]),
        "ttft_ms": statistics.median(r["ttft_ms"] for r in runs[t]),
    }
if args.json:
    print(json.dumps(report, indent=2))
else:
    print(f"{'type':11} {'same prefix':>12} {'identical':>10} {'decode tok/s':>13} {'TTFT ms':>8}")
    for t, r in report.items():
        print(f"{t:11} {r['mean_prefix_tokens']:12.1f} {r['identical_replies']:>5}/{r['replies']:<4} {r['decode_tok_s']:13.1f} {r['ttft_ms']:8.0f}")
