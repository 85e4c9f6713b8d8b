#!/usr/bin/env bash
# The main job end to end on the default model: build hat, fetch SmolLM2-135M-Instruct, split it
# (2 input layers and 2 output layers on the device; the split installs the draft head the project
# trained for exactly this model and split), start the cloud side, and generate a reply in HAT mode
# over TCP on an emulated 50 Mbps / 40 ms link, then the same reply U-shaped for comparison.
#   scripts/demo.sh ["prompt"]
set -euo pipefail
cd "$(dirname "$0")/.."
PROMPT=${1:-"What is the capital of France?"}

cargo build --release
MODEL=$(scripts/fetch-default-model.sh)
target/release/hat split --model "$MODEL" --input-layers 2 --output-layers 2 --out artifacts

work=$(mktemp -d)
target/release/hat serve cloud --package artifacts/cloud --listen 127.0.0.1:0 >"$work/cloud.out" 2>"$work/cloud.log" &
cloud=$!
trap 'kill $cloud 2>/dev/null || true; wait $cloud 2>/dev/null || true; cat "$work/cloud.log" >&2; rm -rf "$work"' EXIT
addr=""
for _ in $(seq 600); do
    addr=$(sed -n 's/^listening on //p' "$work/cloud.out")
    [ -n "$addr" ] && break
    kill -0 $cloud 2>/dev/null || { echo "hat serve cloud exited early" >&2; exit 1; }
    sleep 0.1
done
[ -n "$addr" ] || { echo "hat serve cloud did not start" >&2; exit 1; }

echo "== HAT: the device drafts with its draft head, the cloud verifies every draft in one round trip" >&2
target/release/hat generate --artifacts artifacts --cloud "$addr" --mode hat --draft-len 4 \
    --link-mbps 50 --link-rtt-ms 40 --chat --prompt "$PROMPT" 2> >(tee "$work/hat.stats" >&2)
echo "== U-shaped: one round trip per token, same link, same reply" >&2
target/release/hat generate --artifacts artifacts --cloud "$addr" --mode ushape \
    --link-mbps 50 --link-rtt-ms 40 --chat --prompt "$PROMPT" 2> >(tee "$work/ushape.stats" >&2)
sleep 0.2 # let tee finish writing
tbt() { sed -n 's/.*TBT \([0-9.]*\) ms.*/\1/p' "$1" | tail -1; }
hat_tbt=$(tbt "$work/hat.stats") ushape_tbt=$(tbt "$work/ushape.stats")
if [ -n "$hat_tbt" ] && [ -n "$ushape_tbt" ]; then
    awk -v h="$hat_tbt" -v u="$ushape_tbt" 'BEGIN { printf "== this reply'"'"'s time per token: HAT %.1f ms, U-shaped %.1f ms (%.2fx; one short reply is mostly the first round)\n", h, u, h / u }' >&2
fi

# One reply is a noisy measure. Over the 8 short benchmark prompts, with the cloud in its own
# process on its own core as a real cloud would be, interleaved:
echo "== HAT against U-shaped on the 8 short benchmark prompts, 32 tokens each, same link, cloud on its own core" >&2
grep '"kind": "short"' profiles/bench-prompts.jsonl >"$work/short.jsonl"
target/release/hat bench --artifacts artifacts --spawn-cloud --prompts "$work/short.jsonl" --modes ushape,hat-nochunk \
    --link 50,40 --max-tokens 32 --quiet --json "$work/bench.json" >/dev/null
python3 - "$work/bench.json" >&2 <<'PY'
import json, sys
s = {x["mode"]: x for x in json.load(open(sys.argv[1]))["summaries"]}
u, h = s["ushape"], s["hat-nochunk"]
mean = lambda m: m["tbt_ms"]["mean"]
print(f"== time per token: HAT {mean(h):.1f} ms ({h['accept_len']:.2f} tokens per round trip), U-shaped {mean(u):.1f} ms: "
      f"HAT takes {mean(h) / mean(u):.2f}x U-shaped's time; tokens equal in {h['matches_reference']} prompts")
r = h.get("round_ms")
if r:
    print(f"== a HAT round took {sum(r.values()):.1f} ms: drafting {r['draft']:.1f}, waiting for the cloud's reply (link and middle) "
          f"{r['wait']:.1f}, verifying {r['verify']:.1f}, committing {r['commit']:.1f}")
PY
