#!/usr/bin/env bash
# Generates a private CA and certificates signed by it, with openssl, for mutual TLS between
# publishers, receivers and the MQTT broker (install guide §6.2, steps 1–2).
#
#   scripts/gen-certs.sh DIR ca                      # DIR/ca.key, DIR/ca.crt (kept if present)
#   scripts/gen-certs.sh DIR server NAME [SAN...]    # DIR/NAME.{key,crt}; SANs: DNS names or IPs
#   scripts/gen-certs.sh DIR client CN               # DIR/CN.{key,crt}, subject CN=<CN>
#
# Server certificates carry serverAuth, client certificates clientAuth; a server certificate
# without SANs gets NAME as its DNS name. Keys: CERT_KEY=rsa (4096 bits, the guide's choice,
# the default) or CERT_KEY=ec (P-256, much faster to make; tests use it). CERT_DAYS sets the
# validity (default 730). Private keys are written mode 0600. Exit code 0 on success, 1 on a
# usage error or an openssl failure.
set -euo pipefail

usage() {
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 1
}

[ $# -ge 2 ] || usage
dir=$1
what=$2
shift 2
days=${CERT_DAYS:-730}
mkdir -p "$dir"
umask 077

newkey() {
    case "${CERT_KEY:-rsa}" in
        rsa) openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:4096 -out "$1" 2>/dev/null ;;
        ec) openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null ;;
        *) echo "CERT_KEY must be rsa or ec" >&2; exit 1 ;;
    esac
}

# Signs DIR/$1.csr with the CA, adding the extensions in $2.
sign() {
    local name=$1 ext=$2
    [ -f "$dir/ca.crt" ] && [ -f "$dir/ca.key" ] || {
        echo "no CA in $dir: run '$0 $dir ca' first" >&2
        exit 1
    }
    printf '%s\n' "$ext" >"$dir/$name.ext"
    openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
        -CAcreateserial -days "$days" -sha256 -extfile "$dir/$name.ext" \
        -out "$dir/$name.crt" 2>/dev/null
    rm -f "$dir/$name.csr" "$dir/$name.ext"
    chmod 644 "$dir/$name.crt"
    echo "$dir/$name.crt"
}

case "$what" in
    ca)
        if [ -f "$dir/ca.crt" ] && [ -f "$dir/ca.key" ]; then
            echo "$dir/ca.crt (kept)"
            exit 0
        fi
        newkey "$dir/ca.key"
        openssl req -x509 -new -key "$dir/ca.key" -sha256 -days "$days" \
            -subj "/CN=cvmfs-prepub test CA" \
            -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign" \
            -out "$dir/ca.crt"
        chmod 644 "$dir/ca.crt"
        echo "$dir/ca.crt"
        ;;
    server)
        [ $# -ge 1 ] || usage
        name=$1
        shift
        [ $# -ge 1 ] || set -- "$name"
        sans=()
        for s in "$@"; do
            if [[ $s =~ ^[0-9.]+$ || $s == *:* ]]; then sans+=("IP:$s"); else sans+=("DNS:$s"); fi
        done
        newkey "$dir/$name.key"
        openssl req -new -key "$dir/$name.key" -subj "/CN=$name" -out "$dir/$name.csr"
        sign "$name" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$(IFS=,; echo "${sans[*]}")"
        ;;
    client)
        [ $# -eq 1 ] || usage
        cn=$1
        newkey "$dir/$cn.key"
        openssl req -new -key "$dir/$cn.key" -subj "/CN=$cn" -out "$dir/$cn.csr"
        sign "$cn" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
        ;;
    *)
        usage
        ;;
esac
