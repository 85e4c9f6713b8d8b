#!/usr/bin/env bash
# llama.cpp against `hat generate --mode local` on the same GGUF, the same prompts and the same number
# of threads, interleaved prompt by prompt; prints decode and prompt tok/s for each and their ratio.
# Installs llama-cpp-python (built from source, a few minutes the first time) into a virtual
# environment of its own.
#   scripts/llama-compare.sh [--quant q8_0,q8_0:generic,keep] [--tokens 64] [--threads N] [--json FILE]
# `TYPE:candle` runs the TYPE package on candle's kernels instead of hat's q8_0 kernel
# (HAT_Q8_KERNEL=candle); `TYPE:generic` also leaves rows unpadded (HAT_Q8_TILED=0), `TYPE:head`
# pads the LM head only (see model/src/weights.rs, model/src/q8.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
QUANTS=q8_0,q8_0:generic,keep TOKENS=64 THREADS=$(nproc) JSON_OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quant) QUANTS=$2; shift 2 ;;
        --tokens) TOKENS=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        --json) JSON_OUT=$2; shift 2 ;;
        -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
        *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
VENV=${HAT_LLAMA_VENV:-$HOME/.cache/hat/llama-venv}
LLAMA_CPP_PYTHON=${LLAMA_CPP_PYTHON:-llama-cpp-python==0.3.36}
if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
    echo "installing $LLAMA_CPP_PYTHON into $VENV (compiles llama.cpp for this CPU)" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
    # The CPU's own vector extensions, chosen from /proc/cpuinfo rather than -march=native: some
    # virtual machines list AMX, which then traps (invalid opcode) on the first batched prompt.
    flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
    has() { [[ " $flags " == *" $1 "* ]] && echo ON || echo OFF; }
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=$(has avx) -DGGML_AVX2=$(has avx2) -DGGML_FMA=$(has fma) -DGGML_F16C=$(has f16c) \
-DGGML_AVX512=$(has avx512f) -DGGML_AVX512_VNNI=$(has avx512_vnni) -DGGML_AVX512_BF16=$(has avx512_bf16) -DGGML_AVX_VNNI=$(has avx_vnni) \
-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
        "$VENV/bin/pip" install --quiet --no-cache-dir "$LLAMA_CPP_PYTHON"
fi
cargo build --release --quiet
MODEL=$(scripts/fetch-default-model.sh)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for q in $(tr ',' '\n' <<<"$QUANTS" | cut -d: -f1 | sort -u); do
    target/release/hat --quiet split --model "$MODEL" --input-layers 2 --output-layers 2 \
        --device-quant "$q" --cloud-quant "$q" --out "$work/$q" >/dev/null
done
RAYON_NUM_THREADS=$THREADS "$VENV/bin/python" - "$MODEL" "$work" "$QUANTS" "$TOKENS" "$THREADS" "$JSON_OUT" <<'PY'
import json, os, statistics, subprocess, sys, time
import llama_cpp
from llama_cpp import Llama

model, work, quants, tokens, threads, json_out = sys.argv[1:7]
quants, tokens, threads = quants.split(","), int(tokens), int(threads)
prompts = [json.loads(l)["text"] for l in open("profiles/bench-prompts.jsonl") if l.strip()]
llm = Llama(model_path=model, n_ctx=2048, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)
tmpl = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"

def llama_run(text):
    ids = llm.tokenize(tmpl.format(text).encode(), add_bos=False, special=True)
    llm.reset()
    llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
    t0 = time.perf_counter()
    first, n = None, 0
    for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        if n == 0:
            first = time.perf_counter()
        n += 1
        if tok == llm.token_eos() or n >= tokens:
            break
    end = time.perf_counter()
    # llama.cpp's own timers: its prompt and decode evaluation without this Python loop around it.
    perf = llama_cpp.llama_perf_context(llm._ctx.ctx)
    own = {"prompt_tok_s": perf.n_p_eval / (perf.t_p_eval_ms / 1e3), "decode_tok_s": perf.n_eval / (perf.t_eval_ms / 1e3)}
    return {"prompt_tokens": len(ids), "ttft_ms": (first - t0) * 1e3, "decode_tok_s": (n - 1) / (end - first) if n > 1 else 0.0, "own": own}

def hat_run(q, text):
    package, _, variant = q.partition(":")
    env = dict(os.environ, HAT_Q8_TILED={"tiled": "1", "generic": "0", "head": "head"}.get(variant, ""))
    if variant in ("candle", "generic", "head", "tiled"):
        env["HAT_Q8_KERNEL"] = "candle"
    out = subprocess.run(["target/release/hat", "--quiet", "generate", "--artifacts", f"{work}/{package}", "--mode", "local", "--chat",
                          "--prompt", text, "--max-tokens", str(tokens), "--json"], check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout)

llama_run(prompts[0])  # warm-up
engines = ["llama.cpp"] + [f"hat {q}" for q in quants]
rows = {"llama.cpp": [], "llama.cpp (wall clock)": []} | {f"hat {q}": [] for q in quants}
for i, p in enumerate(prompts):
    order = engines if i % 2 == 0 else list(reversed(engines))
    for name in order:
        if name == "llama.cpp":
            r = llama_run(p)
            rows["llama.cpp"].append(r["own"])
            rows["llama.cpp (wall clock)"].append({"decode_tok_s": r["decode_tok_s"], "prompt_tok_s": r["prompt_tokens"] / (r["ttft_ms"] / 1e3)})
        else:
            r = hat_run(name[4:], p)
            rows[name].append({"decode_tok_s": r["decode_tok_s"], "prompt_tok_s": r["prompt_tokens"] / (r["ttft_ms"] / 1e3)})
    print(f"prompt {i + 1}/{len(prompts)}", file=sys.stderr)
summary = {n: {k: statistics.median(x[k] for x in v) for k in ("decode_tok_s", "prompt_tok_s")} for n, v in rows.items()}
ref = summary["llama.cpp"]
print(f"same GGUF ({os.path.basename(model)}), {len(prompts)} prompts, {tokens} tokens max, {threads} threads, medians")
print("llama.cpp: its own evaluation timers (the reference); wall clock: the same runs timed around the Python loop")
print("hat: its own TTFT and decode timing (`hat generate --json`), each run a fresh process")
print(f"{'engine':24} {'decode tok/s':>13} {'prompt tok/s':>13} {'decode ratio':>13} {'prompt ratio':>13}")
for n, s in summary.items():
    s["decode_ratio"] = s["decode_tok_s"] / ref["decode_tok_s"]
    s["prompt_ratio"] = s["prompt_tok_s"] / ref["prompt_tok_s"]
    print(f"{n:24} {s['decode_tok_s']:13.1f} {s['prompt_tok_s']:13.1f} {s['decode_ratio']:13.2f} {s['prompt_ratio']:13.2f}")
if json_out:
    json.dump({"threads": threads, "tokens": tokens, "prompts": len(prompts), "summary": summary, "runs": rows}, open(json_out, "w"), indent=2)
PY
