#!/usr/bin/env bash
# One prepared check of hat on a machine with an NVIDIA GPU and about 16 cores, in under 8 minutes.
# Progress goes to stderr; one JSON summary goes to stdout (and to WORK/gpu-check.json).
#
#   scripts/gpu-check.sh BINARY|BINARY.tar.xz MODEL.gguf [WORK]
#
# BINARY is a CUDA build of hat (scripts/build-cuda.sh writes target/cuda/hat, with its lib/, and
# both packed in target/cuda/hat-cuda.tar.xz; the script unpacks that itself). MODEL is
# the default model's GGUF. What it does, each step timed:
#   1. split the model 2/2 twice: all f32 (for f32/bf16 on the GPU; a quantized device on a dense
#      cloud is not exact even on the CPU, see README) and q8_0 (the main job's package; candle's
#      quantized CUDA kernels);
#   2. train the draft head for a few steps on CUDA and on the CPU: seconds per step each;
#   3. serve the cloud on the GPU (f32, bf16, and the q8_0 package) and on the CPU, and run `ushape`
#      and `hat` on the held-out benchmark prompts against each: tokens equal between `ushape` and
#      `hat` on the same cloud, and how many prompts equal CPU `--mode local`;
#   4. the cloud's forward time for 1 row and for a verification round of 5, GPU against CPU;
#   5. aggregate tokens/s at 1, 16 and 64 concurrent sessions against a GPU cloud (loopback).
#
# HAT_CHECK_DEVICE=cpu runs every step with the CPU in the GPU's place: that is how the script is
# tested on a machine without a GPU (slowly on 2 cores; HAT_CHECK_QUICK=1 shrinks every step).
set -euo pipefail
[[ $# -ge 2 ]] || { echo "usage: $0 BINARY|BINARY.tar.xz MODEL.gguf [WORK]" >&2; exit 2; }
here=$(cd "$(dirname "$0")/.." && pwd)
bin=$1 model=$2 work=${3:-$(mktemp -d)}
gpu=${HAT_CHECK_DEVICE:-cuda}
quick=${HAT_CHECK_QUICK:-0}
mkdir -p "$work"
SECONDS=0
step() { printf '== [%4d s] %s\n' "$SECONDS" "$*" >&2; }

# hat-cuda.tar.xz holds hat and its lib/ of CUDA filter libraries, as scripts/build-cuda.sh packs
# them; a binary given as is needs its lib/ beside it.
if [[ $bin == *.tar.xz ]]; then
    mkdir -p "$work/bin" && tar -C "$work/bin" -xJf "$bin" && bin=$work/bin/hat
fi
# The GPU machine's libraries: the driver's, and CUDA 13's as PyTorch's wheels install them.
for d in /usr/local/nvidia/lib64 "$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13/lib"))' 2>/dev/null)"; do
    [[ -n $d && -d $d ]] && export LD_LIBRARY_PATH=$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
done
if [[ $quick == 1 ]]; then
    distill=4 tokens=16 cuda_steps=4 cpu_steps=2 levels=1,4 duration=4 n_prompts=2
else
    distill=32 tokens=32 cuda_steps=40 cpu_steps=6 levels=1,16,64 duration=15 n_prompts=8
fi
grep '"kind": "short"' "$here/profiles/bench-prompts.jsonl" | head -n "$n_prompts" >"$work/prompts.jsonl"

step "split 2/2: all f32, and q8_0"
"$bin" --quiet split --model "$model" --input-layers 2 --output-layers 2 --device-quant f32 --cloud-quant f32 --out "$work/dense" >/dev/null
"$bin" --quiet split --model "$model" --input-layers 2 --output-layers 2 --out "$work/q8" >/dev/null

train() { # DEVICE STEPS -> the report's seconds per step
    rm -rf "$work/train" && cp -r "$work/dense" "$work/train"
    "$bin" --quiet train-adapter --artifacts "$work/train" --device "$1" --self-distill "$distill" --distill-tokens 64 \
        --steps "$2" --batch 16 --seq-len 128 --eval-prompts 2 --eval-tokens 16 >/dev/null
    python3 -c 'import json, sys; r = json.load(open(sys.argv[1])); print(json.dumps({"device": r["device"], "steps": r["steps"],
        "seconds_per_step": r["train_seconds"] / r["steps"], "tokens_per_s": r["train_tokens_per_s"]}))' \
        "$work/train/device/draft-head-report.json"
}
step "train the draft head: $cuda_steps steps on $gpu"
train_gpu=$(train "$gpu" "$cuda_steps")
step "train the draft head: $cpu_steps steps on the CPU"
train_cpu=$(train cpu "$cpu_steps")

cloud_pid=""
serve() { # PACKAGE DEVICE [--dtype D] -> prints the address
    local out=$work/cloud.out
    "$bin" serve cloud --package "$1" --device "$2" "${@:3}" --listen 127.0.0.1:0 --max-sessions 80 >"$out" 2>>"$work/cloud.log" &
    cloud_pid=$!
    for _ in $(seq 1200); do
        addr=$(sed -n 's/^listening on //p' "$out")
        [[ -n $addr ]] && { echo "$addr"; return; }
        kill -0 $cloud_pid 2>/dev/null || { echo "error: the cloud on $2 exited: $(tail -1 "$work/cloud.log")" >&2; exit 1; }
        sleep 0.1
    done
    echo "error: the cloud on $2 did not start" >&2
    exit 1
}
stop() { kill "$cloud_pid" 2>/dev/null || true; wait "$cloud_pid" 2>/dev/null || true; }
trap stop EXIT

run_cloud() { # NAME PACKAGE_DIR DEVICE [--dtype D]: bench ushape and hat, then profile forward times
    local name=$1 art=$2 addr
    addr=$(serve "$art/cloud" "${@:3}")
    step "$name: ushape and hat on $n_prompts held-out prompts ($tokens tokens, 50 Mbps / 40 ms)"
    "$bin" --quiet bench --artifacts "$art" --cloud "$addr" --prompts "$work/prompts.jsonl" --modes ushape,hat-nochunk \
        --link 50,40 --max-tokens "$tokens" --json "$work/bench-$name.json" >/dev/null
    step "$name: forward time for 1 and 5 rows"
    "$bin" --quiet profile --artifacts "$art" --cloud "$addr" --sizes 1,5 --reps 5 --out "$work/profile-$name.json" >/dev/null
    stop
}
run_cloud gpu-f32 "$work/dense" "$gpu" --dtype f32
run_cloud gpu-bf16 "$work/dense" "$gpu" --dtype bf16
run_cloud gpu-q8_0 "$work/q8" "$gpu"
run_cloud cpu-f32 "$work/dense" cpu

step "aggregate tokens/s at $levels sessions against a cloud on $gpu"
"$bin" --quiet loadtest --artifacts "$work/q8" --spawn-cloud --cloud-device "$gpu" --sessions "$levels" \
    --duration "$duration" --json "$work/loadtest.json" >/dev/null

step "summary"
python3 - "$work" "$gpu" "$train_gpu" "$train_cpu" "$SECONDS" >"$work/gpu-check.json" <<'PY'
import json, subprocess, sys
work, gpu, train_gpu, train_cpu, seconds = sys.argv[1:]
def smi(q):
    try:
        return subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip().splitlines()[0]
    except Exception:
        return None
out = {"device": gpu, "gpu": smi("name"), "driver": smi("driver_version"), "train": {"gpu": json.loads(train_gpu), "cpu": json.loads(train_cpu)}}
t = out["train"]
t["cpu_over_gpu_seconds_per_step"] = t["cpu"]["seconds_per_step"] / t["gpu"]["seconds_per_step"]
clouds = {}
for name in ["gpu-f32", "gpu-bf16", "gpu-q8_0", "cpu-f32"]:
    b = json.load(open(f"{work}/bench-{name}.json"))
    runs = b["runs"]
    prompts = sorted({r["prompt"] for r in runs})
    tok = lambda p, m: next(r["tokens"] for r in runs if r["prompt"] == p and r["mode"] == m)
    s = {x["mode"]: x for x in b["summaries"]}
    prof = json.load(open(f"{work}/profile-{name}.json"))
    mid = prof["costs"]["cloud_middle"]
    clouds[name] = {
        "prompts": len(prompts),
        "hat_equals_ushape": sum(tok(p, "hat-nochunk") == tok(p, "ushape") for p in prompts),
        "ushape_equals_cpu_local": s["ushape"]["matches_reference"],
        "hat_equals_cpu_local": s["hat-nochunk"]["matches_reference"],
        "tbt_ms": {m: s[m]["tbt_ms"]["mean"] for m in s},
        "accept_len": s["hat-nochunk"]["accept_len"],
        # ms[o][s]: rows sizes[s] at context offset offsets[o]
        "forward_ms": {"rows": mid["sizes"], "offsets": mid["offsets"], "ms": mid["ms"]},
    }
out["clouds"] = clouds
lt = json.load(open(f"{work}/loadtest.json"))
out["loadtest"] = [{k: lvl.get(k) for k in ("sessions", "tokens_per_s", "tbt_ms", "errors", "cloud_peak_mb")} for lvl in lt["levels"]]
out["seconds"] = int(seconds)
print(json.dumps(out, indent=1))
PY
cat "$work/gpu-check.json"
