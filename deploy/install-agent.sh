#!/usr/bin/env bash
# Install the fedmpq edge agent as a systemd service on Raspberry Pi OS / Debian
# (aarch64, armv7 with a torch wheel, x86-64).  Idempotent: re-running updates the
# install and keeps the existing configuration unless new values are given.
#
#   sudo deploy/install-agent.sh --env-file devices/pi-01.env \
#        --keys-file keys/devices/pi-01.toml                          # from make-credentials.sh
#   sudo deploy/install-agent.sh --broker mqtts://pi-01:PW@broker:8883 --client-id pi-01 \
#        --ca-file ca.crt
#   sudo deploy/install-agent.sh --uninstall [--purge]
#
# Options:
#   --broker URL          broker URL with this device's user name and password
#   --client-id ID        device id (= MQTT user name)
#   --env-file FILE       read FEDMPQ_BROKER / FEDMPQ_CLIENT_ID (/ FEDMPQ_DATA) from FILE
#   --ca-file FILE        CA certificate of the broker's TLS certificate (copied)
#   --keys-file FILE      this device's key file (fedmpq keys: its key and the coordinator's
#                         public key; copied); required unless an earlier install has one
#   --no-keys             run without keys (the coordinator must run without them too)
#   --data SPEC           local data set (default fashion-mnist-small)
#   --source SPEC         what pip installs (default: this checkout)
#   --inference-only      no torch, no training service: the device only receives the
#                         trained model (fedmpq agent fetch-model) and runs it with
#                         onnxruntime (fedmpq agent predict); ~5x smaller
#   --torch-index URL     the only place torch comes from (default
#                         https://download.pytorch.org/whl/cpu: PyPI's Linux torch wheels
#                         pull in the CUDA libraries, GBs a Pi cannot use; this index has
#                         the CPU-only builds; pip.conf's extra indexes are ignored for torch)
#   --torch-wheel FILE    install this torch wheel instead (armv7: no official wheels exist)
#   --dry-run             print the pip commands and exit (changes nothing)
#   --prefix DIR          venv location (default /opt/fedmpq)
#   --config-dir DIR      agent.env location (default /etc/fedmpq)
#   --state-dir DIR       model and working directory (default /var/lib/fedmpq)
#   --unit-dir DIR        systemd unit directory (default /etc/systemd/system)
#   --user NAME           unprivileged service user (default fedmpq, created if missing)
#   --python PY           python interpreter for the venv (default python3)
#   --system-site-packages  let the venv use apt's numpy etc.
#   --pip-args "ARGS"     extra pip arguments (e.g. --no-deps for an offline reinstall)
#   --no-systemd          write the unit but do not call systemctl (containers, tests)
#   --uninstall           stop and remove the service, unit and venv (--purge: config, state)
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
prefix=/opt/fedmpq
config_dir=/etc/fedmpq
state_dir=/var/lib/fedmpq
unit_dir=/etc/systemd/system
service_user=fedmpq
python=python3
source_spec="$(dirname "$script_dir")"
broker=""
client_id=""
env_file=""
ca_file=""
keys_file=""
no_keys=0
data=""
pip_args=""
site_packages=0
use_systemd=1
uninstall=0
inference_only=0
torch_index=https://download.pytorch.org/whl/cpu
torch_wheel=""
dry_run=0
purge=0

usage() {
    sed -n '2,39p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --broker) broker="$2"; shift 2 ;;
        --client-id) client_id="$2"; shift 2 ;;
        --env-file) env_file="$2"; shift 2 ;;
        --ca-file) ca_file="$2"; shift 2 ;;
        --keys-file) keys_file="$2"; shift 2 ;;
        --no-keys) no_keys=1; shift ;;
        --data) data="$2"; shift 2 ;;
        --source) source_spec="$2"; shift 2 ;;
        --prefix) prefix="$2"; shift 2 ;;
        --config-dir) config_dir="$2"; shift 2 ;;
        --state-dir) state_dir="$2"; shift 2 ;;
        --unit-dir) unit_dir="$2"; shift 2 ;;
        --user) service_user="$2"; shift 2 ;;
        --python) python="$2"; shift 2 ;;
        --system-site-packages) site_packages=1; shift ;;
        --pip-args) pip_args="$2"; shift 2 ;;
        --no-systemd) use_systemd=0; shift ;;
        --inference-only) inference_only=1; shift ;;
        --torch-index) torch_index="$2"; shift 2 ;;
        --torch-wheel) torch_wheel="$2"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        --uninstall) uninstall=1; shift ;;
        --purge) purge=1; shift ;;
        -h|--help) usage 0 ;;
        *) echo "install-agent.sh: unknown option $1" >&2; usage 2 ;;
    esac
done

unit_name=fedmpq-agent.service
unit_path="$unit_dir/$unit_name"
config_file="$config_dir/agent.env"
log() { echo "install-agent.sh: $*"; }
systemctl_() { if [ "$use_systemd" = 1 ]; then systemctl "$@"; fi; }

# --- what pip installs: torch (CPU-only) first, so the project's own requirement is met
# and pip never resolves PyPI's CUDA build; an inference-only device gets no torch -------
arch="$(uname -m)"
torch_args=()
package="$source_spec"
if [ "$inference_only" = 0 ]; then
    package="${source_spec}[train]"
    if [ -n "$torch_wheel" ]; then
        torch_args=("$torch_wheel")
    elif [[ "$arch" == armv6* || "$arch" == armv7* ]]; then
        echo "install-agent.sh: PyTorch publishes no $arch wheels: pass --torch-wheel FILE" \
            "(a community build) or --inference-only" >&2
        exit 2
    else
        torch_args=(--index-url "$torch_index" torch)
    fi
fi
pip_install() { # pip_install ARGS...: into the venv, with --pip-args, logged
    log "$arch: pip install $pip_args $*"
    if [ "$dry_run" = 0 ]; then
        # shellcheck disable=SC2086  # pip_args is a list of words on purpose
        "${pip_env[@]}" "$prefix/venv/bin/python" -m pip install --quiet \
            --disable-pip-version-check $pip_args "$@"
    fi
}
install_torch() { # torch from --torch-index / --torch-wheel only: pip configuration's extra
    # indexes and find-links (Raspberry Pi OS adds piwheels) must not offer another build
    pip_env=(env -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_FIND_LINKS -u PIP_NO_INDEX
        PIP_CONFIG_FILE=/dev/null)
    [ "${#torch_args[@]}" = 0 ] || pip_install "${torch_args[@]}"
    pip_env=(env)
}
pip_env=(env)
if [ "$dry_run" = 1 ]; then
    install_torch
    pip_install "$package"
    exit 0
fi

if [ "$uninstall" = 1 ]; then
    if [ -f "$unit_path" ]; then
        systemctl_ disable --now "$unit_name" || true
        rm -f "$unit_path"
        systemctl_ daemon-reload
    fi
    rm -rf "$prefix/venv"
    if [ "$purge" = 1 ]; then
        rm -rf "$config_file" "$config_dir/ca.crt" "$config_dir/keys.toml" "$state_dir"
    fi
    log "uninstalled (configuration and state $([ "$purge" = 1 ] && echo purged || echo kept))"
    exit 0
fi

# --- configuration: new values win, else what an earlier install wrote ---------------
read_env() { # read_env FILE KEY: the value of KEY=... in FILE ("" if absent)
    [ -f "$1" ] || return 0
    sed -n "s/^$2=//p" "$1" | tail -n 1
}
for source_file in "$env_file" "$config_file"; do
    [ -n "$source_file" ] || continue
    [ -n "$broker" ] || broker="$(read_env "$source_file" FEDMPQ_BROKER)"
    [ -n "$client_id" ] || client_id="$(read_env "$source_file" FEDMPQ_CLIENT_ID)"
    [ -n "$data" ] || data="$(read_env "$source_file" FEDMPQ_DATA)"
done
data="${data:-fashion-mnist-small}"
if [ -z "$broker" ] || [ -z "$client_id" ]; then
    echo "install-agent.sh: give --broker URL and --client-id ID (or --env-file FILE)" >&2
    exit 2
fi
if ! [[ "$client_id" =~ ^[A-Za-z0-9_.-]{1,64}$ ]]; then
    echo "install-agent.sh: invalid client id '$client_id': 1-64 of A-Z a-z 0-9 _ . -" >&2
    exit 2
fi

# --- service user ---------------------------------------------------------------------
if ! id -u "$service_user" >/dev/null 2>&1; then
    useradd --system --home-dir "$state_dir" --no-create-home --shell /usr/sbin/nologin \
        "$service_user"
    log "created system user $service_user"
fi
service_group="$(id -gn "$service_user")"

# --- venv and package -----------------------------------------------------------------
mkdir -p "$prefix"
if [ ! -x "$prefix/venv/bin/python" ]; then
    venv_args=()
    [ "$site_packages" = 1 ] && venv_args+=(--system-site-packages)
    "$python" -m venv "${venv_args[@]}" "$prefix/venv"
fi
install_torch
pip_install "$package"
"$prefix/venv/bin/fedmpq" --version >/dev/null

# --- configuration file (holds the password: root and the service group only) ----------
install -d -m 755 "$config_dir"
install -d -m 750 -o "$service_user" -g "$service_group" "$state_dir" "$state_dir/model"
ca_line=""
if [ -n "$ca_file" ]; then
    install -m 644 "$ca_file" "$config_dir/ca.crt"
fi
if [ -f "$config_dir/ca.crt" ]; then
    ca_line="FEDMPQ_CA_FILE=$config_dir/ca.crt"
fi
# Keys are on by default: the device signs what it sends and refuses what the coordinator
# did not sign (README, threat model).
keys_line=""
if [ -n "$keys_file" ]; then
    install -m 640 -g "$service_group" "$keys_file" "$config_dir/keys.toml"
fi
if [ "$no_keys" = 1 ]; then
    rm -f "$config_dir/keys.toml"
elif [ -f "$config_dir/keys.toml" ]; then
    keys_line="FEDMPQ_KEYS=$config_dir/keys.toml"
else
    echo "install-agent.sh: give --keys-file FILE (fedmpq keys / make-credentials.sh)" \
        "or --no-keys" >&2
    exit 2
fi
tmp_config="$(mktemp "$config_dir/.agent.env.XXXXXX")"
cat >"$tmp_config" <<ENV
# Written by install-agent.sh; re-run it to change these.
FEDMPQ_BROKER=$broker
FEDMPQ_CLIENT_ID=$client_id
FEDMPQ_DATA=$data
$ca_line
$keys_line
ENV
chmod 640 "$tmp_config"
chgrp "$service_group" "$tmp_config"
mv -f "$tmp_config" "$config_file"

if [ "$inference_only" = 1 ]; then
    # Nothing trains, so no service runs: fetch the model after a run, then predict.
    log "installed $client_id for inference only: venv $prefix/venv, config $config_file"
    log "fetch the model: sudo -u $service_user sh -c 'set -a; . $config_file;" \
        "$prefix/venv/bin/fedmpq agent fetch-model --model-dir $state_dir/model'"
    log "classify: $prefix/venv/bin/fedmpq agent predict IMAGE --model-dir $state_dir/model"
    exit 0
fi

# --- systemd unit -----------------------------------------------------------------------
mkdir -p "$unit_dir"
sed -e "s|/opt/fedmpq|$prefix|g" \
    -e "s|/etc/fedmpq|$config_dir|g" \
    -e "s|/var/lib/fedmpq|$state_dir|g" \
    -e "s|^User=.*|User=$service_user|" \
    -e "s|^Group=.*|Group=$service_group|" \
    "$script_dir/systemd/$unit_name" >"$unit_path.tmp"
mv -f "$unit_path.tmp" "$unit_path"
chmod 644 "$unit_path"
systemctl_ daemon-reload
systemctl_ enable "$unit_name"
systemctl_ restart "$unit_name"
log "installed $client_id: venv $prefix/venv, config $config_file, unit $unit_path"
if [ "$use_systemd" = 1 ]; then
    log "logs: journalctl -u $unit_name -f"
fi
