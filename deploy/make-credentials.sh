#!/usr/bin/env bash
# Make the credentials of a fedmpq fleet: a CA, the broker's TLS certificate, and a
# random password (plus optionally a client certificate) for the coordinator and for
# every device listed.
#
#   deploy/make-credentials.sh --out DIR --server-name broker.example.org DEVICE_ID...
#   deploy/make-credentials.sh --out DIR --devices-file devices.txt --server-name HOST
#
# Writes into DIR (existing files are kept, so re-running adds devices):
#   ca.crt ca.key                 the CA (keep ca.key offline)
#   server.crt server.key         the broker's certificate for --server-name
#   fedmpq.passwd                 mosquitto password file (mosquitto_passwd hashes)
#   passwords/ID                  each account's clear-text password (mode 600)
#   devices/ID.env                what install-agent.sh --env-file takes for that device
#   keys/coordinator.toml         every device's signing key and the coordinator's Ed25519
#                                 key pair: the run config's device_keys (fedmpq keys)
#   keys/devices/ID.toml          what install-agent.sh --keys-file takes for that device
#   clients/ID.crt clients/ID.key with --client-certs: client certificates
set -euo pipefail

usage() {
    sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

out=""
server_name="localhost"
server_port=8883
devices_file=""
client_certs=0
days=825
devices=()
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out="$2"; shift 2 ;;
        --server-name) server_name="$2"; shift 2 ;;
        --server-port) server_port="$2"; shift 2 ;;
        --devices-file) devices_file="$2"; shift 2 ;;
        --client-certs) client_certs=1; shift ;;
        --days) days="$2"; shift 2 ;;
        -h|--help) usage 0 ;;
        -*) echo "unknown option $1" >&2; usage 2 ;;
        *) devices+=("$1"); shift ;;
    esac
done
[ -n "$out" ] || { echo "--out DIR is required" >&2; exit 2; }
if [ -n "$devices_file" ]; then
    while IFS= read -r line; do
        line="${line%%#*}"
        line="${line//[[:space:]]/}"
        [ -n "$line" ] && devices+=("$line")
    done <"$devices_file"
fi
for id in "${devices[@]}"; do
    if ! [[ "$id" =~ ^[A-Za-z0-9_.-]{1,64}$ ]] || [ "$id" = coordinator ]; then
        echo "invalid device id '$id': use 1-64 of A-Z a-z 0-9 _ . - (not 'coordinator')" >&2
        exit 2
    fi
done
command -v openssl >/dev/null || { echo "openssl is required (apt-get install openssl)" >&2; exit 1; }
command -v mosquitto_passwd >/dev/null \
    || { echo "mosquitto_passwd is required (apt-get install mosquitto)" >&2; exit 1; }

umask 077
mkdir -p "$out/passwords" "$out/devices" "$out/clients" "$out/keys"

if [ ! -f "$out/ca.key" ]; then
    openssl req -x509 -new -newkey rsa:3072 -nodes -sha256 -days "$days" \
        -subj "/CN=fedmpq fleet CA" -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null
fi

sign() { # sign NAME SUBJECT EXTFILE: key + certificate signed by the CA
    local name="$1" subject="$2" ext="$3"
    openssl req -new -newkey rsa:2048 -nodes -subj "$subject" \
        -keyout "$name.key" -out "$name.csr" 2>/dev/null
    openssl x509 -req -in "$name.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
        -CAcreateserial -days "$days" -sha256 -extfile "$ext" -out "$name.crt" 2>/dev/null
    rm -f "$name.csr"
}

if [ ! -f "$out/server.crt" ]; then
    ext="$(mktemp)"
    if [[ "$server_name" =~ ^[0-9.]+$ ]]; then san="IP:$server_name"; else san="DNS:$server_name"; fi
    printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\n' "$san" >"$ext"
    sign "$out/server" "/CN=$server_name" "$ext"
    rm -f "$ext"
fi

add_account() { # add_account ID: random password, hashed into fedmpq.passwd
    local id="$1"
    if [ ! -f "$out/passwords/$id" ]; then
        openssl rand -base64 24 | tr -d '/+=\n' >"$out/passwords/$id"
    fi
    if [ -f "$out/fedmpq.passwd" ]; then
        mosquitto_passwd -b "$out/fedmpq.passwd" "$id" "$(cat "$out/passwords/$id")"
    else
        mosquitto_passwd -c -b "$out/fedmpq.passwd" "$id" "$(cat "$out/passwords/$id")"
    fi
}

add_account coordinator
for id in "${devices[@]}"; do
    add_account "$id"
    cat >"$out/devices/$id.env" <<ENV
FEDMPQ_BROKER=mqtts://$id:$(cat "$out/passwords/$id")@$server_name:$server_port
FEDMPQ_CLIENT_ID=$id
ENV
    if [ "$client_certs" = 1 ] && [ ! -f "$out/clients/$id.crt" ]; then
        ext="$(mktemp)"
        printf 'extendedKeyUsage=clientAuth\n' >"$ext"
        sign "$out/clients/$id" "/CN=$id" "$ext"
        rm -f "$ext"
    fi
done
# Keys (on by default): needs fedmpq importable by $FEDMPQ_PYTHON (default python3).
if [ "${#devices[@]}" -gt 0 ]; then
    "${FEDMPQ_PYTHON:-python3}" -m fedmpq.cli keys --out "$out/keys/coordinator.toml" \
        --device-dir "$out/keys/devices" "${devices[@]}" >/dev/null || {
        echo "fedmpq keys failed: install fedmpq (pip install .) or set FEDMPQ_PYTHON" >&2
        exit 1
    }
fi
chmod 644 "$out/ca.crt" "$out/server.crt"
echo "credentials for coordinator and ${#devices[@]} device(s) in $out"
