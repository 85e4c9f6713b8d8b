#!/usr/bin/env bash
# Prints HAProxy's hello health check for one hat package: the two `tcp-check` lines that send the
# hello a device of this package sends and expect the cloud's Welcome. A replica passes only when it
# speaks this protocol version and serves this very model (same fingerprint); one that serves
# another split answers with an error frame and is taken out of the pool.
#
#   deploy/haproxy-check.sh [--auth-token-file FILE | --expect-unauthorized] PACKAGE_DIR [CFG]
#
# PACKAGE_DIR is a `hat split --out` directory or its cloud/ half (its hat.json is read). With CFG,
# prints CFG with its `tcp-check send-binary` and `tcp-check expect binary` lines replaced, e.g.
#   deploy/haproxy-check.sh artifacts deploy/haproxy.cfg > /etc/haproxy/haproxy.cfg
#
# A cloud started with --auth-token-file answers a hello without the token with an Unauthorized
# error, so the check must choose:
#   --auth-token-file FILE   the token goes into the check (and so into haproxy.cfg, in hex: keep
#                            that file as secret as the token; over plain TCP it crosses the network
#                            in the clear, so use `check-ssl` with a TLS cloud)
#   --expect-unauthorized    no secret in the config: the check sends no token and expects the
#                            Unauthorized error, which the cloud sends only after the version and
#                            the fingerprint matched. Costs one "refused: auth token missing" log
#                            line and one hat:cloud_errors{code="Unauthorized"} per check.
# Needs bash and coreutils only.
set -euo pipefail

# runtime/src/protocol.rs: PROTOCOL_VERSION, MAGIC and the message kinds. The test
# tests/tests/failover.rs checks these bytes against the Rust encoder.
PROTOCOL_VERSION=3
MAGIC_HEX=48415400
K_HELLO=01
K_WELCOME=81
K_ERROR=ff
UNAUTHORIZED=0400

usage() { sed -n '7p' "$0" | sed 's/^#   /usage: /' >&2; exit 2; }
die() { echo "error: $*" >&2; exit 1; }

token_file="" expect_unauthorized=0
while [[ $# -gt 0 && $1 == --* ]]; do
    case $1 in
        --auth-token-file) [[ $# -ge 2 ]] || usage; token_file=$2; shift 2 ;;
        --expect-unauthorized) expect_unauthorized=1; shift ;;
        *) usage ;;
    esac
done
[[ $# -eq 1 || $# -eq 2 ]] || usage
[[ -n $token_file && $expect_unauthorized == 1 ]] && die "--auth-token-file and --expect-unauthorized exclude each other"
pkg=$1 cfg=${2:-}

manifest=$pkg/hat.json
[[ -f $pkg/cloud/hat.json ]] && manifest=$pkg/cloud/hat.json
[[ -f $manifest ]] || die "no hat.json in $pkg or $pkg/cloud: pass the directory \`hat split --out\` wrote"
# The manifest is JSON written by hat: one key per line.
fingerprint=$(sed -n 's/^ *"fingerprint": *"\([0-9a-f]*\)".*/\1/p' "$manifest" | head -n1)
hidden=$(sed -n 's/^ *"hidden_size": *\([0-9]*\).*/\1/p' "$manifest" | head -n1)
[[ -n $fingerprint && -n $hidden ]] || die "$manifest has no fingerprint or hidden_size: is it a hat package?"

hex() { od -An -v -tx1 | tr -d ' \n'; }
u16le() { printf '%02x%02x' $(($1 & 255)) $(($1 >> 8 & 255)); }
u32le() { printf '%02x%02x%02x%02x' $(($1 & 255)) $(($1 >> 8 & 255)) $(($1 >> 16 & 255)) $(($1 >> 24 & 255)); }
u32be() { printf '%08x' "$1"; }

token=""
if [[ -n $token_file ]]; then
    [[ -r $token_file ]] || die "cannot read the auth token file $token_file"
    # As `hat` reads it: surrounding whitespace is not part of the token.
    token=$(sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' "$token_file" | tr -d '\n')
    [[ -n $token ]] || die "the auth token file $token_file is empty"
fi

# Hello: kind, magic, version (u16 LE), fingerprint (u16 LE length + bytes), has-token flag, token.
fp_hex=$(printf '%s' "$fingerprint" | hex)
tok_hex=$(printf '%s' "$token" | hex)
body=$K_HELLO$MAGIC_HEX$(u16le $PROTOCOL_VERSION)$(u16le ${#fingerprint})$fp_hex
if [[ -n $token ]]; then body+=01; else body+=00; fi
body+=$(u16le $((${#tok_hex} / 2)))$tok_hex
send="tcp-check send-binary $(u32be $((${#body} / 2)))$body"

if [[ $expect_unauthorized == 1 ]]; then
    expect="tcp-check expect binary $K_ERROR$UNAUTHORIZED"
else
    # Welcome: an 8-byte body of kind, version, the model's hidden size and whether the cloud verifies
    # draft trees. The check matches the first 7 bytes only, so CPU and GPU replicas both pass.
    expect="tcp-check expect binary $(u32be 8)$K_WELCOME$(u16le $PROTOCOL_VERSION)$(u32le "$hidden")"
fi

if [[ -z $cfg ]]; then
    printf '    %s\n    %s\n' "$send" "$expect"
    exit 0
fi
[[ -f $cfg ]] || die "no config file $cfg"
grep -q '^[[:space:]]*tcp-check send-binary' "$cfg" && grep -q '^[[:space:]]*tcp-check expect binary' "$cfg" ||
    die "$cfg has no \`tcp-check send-binary\` and \`tcp-check expect binary\` lines to fill"
while IFS= read -r line || [[ -n $line ]]; do
    indent=${line%%[![:space:]]*}
    case ${line#"$indent"} in
        "tcp-check send-binary"*) printf '%s%s\n' "$indent" "$send" ;;
        "tcp-check expect binary"*) printf '%s%s\n' "$indent" "$expect" ;;
        *) printf '%s\n' "$line" ;;
    esac
done <"$cfg"
