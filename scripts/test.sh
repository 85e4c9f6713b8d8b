#!/usr/bin/env bash
# The project's test command: installs what the tests need when it is missing, then runs the whole
# workspace's tests in release (model code is unusable unoptimised). Extra arguments go to `cargo
# test`, e.g. `scripts/test.sh -p hat-tests --test failover`.
#
# Needs, beyond the Rust toolchain: Python 3 with venv and pip (the default model's fetch, the
# OpenAI endpoint test) and haproxy (tests/tests/failover.rs; installed here with apt-get when this
# runs as root or with sudo, else that test is skipped with a message).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v haproxy >/dev/null && [[ -x /usr/sbin/haproxy ]]; then
    export PATH="$PATH:/usr/sbin"
fi
if ! command -v haproxy >/dev/null; then
    sudo=""
    [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null && sudo -n true 2>/dev/null && sudo="sudo -n"
    if command -v apt-get >/dev/null && [[ $(id -u) -eq 0 || -n $sudo ]]; then
        echo "== installing haproxy (for the failover test)"
        if $sudo apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends haproxy >/dev/null; then
            export PATH="$PATH:/usr/sbin"
        else
            echo "warning: installing haproxy failed: the failover test will be skipped"
        fi
    else
        echo "note: haproxy is not installed and cannot be installed here (needs apt-get as root or sudo):"
        echo "      the failover test will be skipped"
    fi
fi

cargo test --release --workspace "$@"
