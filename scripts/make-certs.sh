#!/usr/bin/env bash
# Makes a private CA and, signed by it, a certificate for the cloud and one for a device, to try
# hat's TLS (`hat serve cloud --tls-cert`, `hat generate --tls-ca`). In production, use your own PKI.
#
#   scripts/make-certs.sh [OUT_DIR] [CLOUD_NAME...]
#
# OUT_DIR defaults to ./certs. The cloud certificate names localhost, 127.0.0.1 and every CLOUD_NAME
# given (a DNS name or an IP address: what devices put in --cloud). Needs the openssl command.
set -euo pipefail
out=${1:-certs}
shift || true
command -v openssl >/dev/null || { echo "error: the openssl command is needed (apt install openssl)" >&2; exit 1; }
san="DNS:localhost,IP:127.0.0.1"
for name in "$@"; do
    if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then san+=",IP:$name"; else san+=",DNS:$name"; fi
done
mkdir -p "$out"
cd "$out"
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
key ca.key
openssl req -x509 -new -key ca.key -out ca.pem -days 825 -subj "/CN=hat private CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
leaf() { # name, extensions
    key "$1.key"
    openssl req -new -key "$1.key" -out "$1.csr" -subj "/CN=hat $1"
    printf '%s\n' "$2" >"$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -out "$1.pem" -days 825 -extfile "$1.ext" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
}
leaf cloud "subjectAltName=$san
extendedKeyUsage=serverAuth"
leaf device "subjectAltName=DNS:hat-device
extendedKeyUsage=clientAuth"
chmod 600 ./*.key
rm -f ca.srl
echo "wrote $(pwd)/{ca,cloud,device}.pem and their keys (cloud names: $san)"
