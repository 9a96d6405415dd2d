#!/usr/bin/env bash
# The fleet demo on a fresh machine: install what it needs, then emulate 10 devices for
# 20 rounds with an embedded MQTT broker and the data set shipped in the package.
# Extra arguments go to `fedmpq emulate` (e.g. ./demo.sh --policy float32).
set -euo pipefail
cd "$(dirname "$0")"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python3 -c "import torch" 2>/dev/null; then
    # Pinned so that pip takes a CPU wheel where one is at hand instead of a CUDA build.
    python3 -m pip install -q torch==2.13.0
fi
python3 -m pip install -q -e '.[demo]'
exec python3 -m fedmpq.cli emulate --clients 10 --rounds 20 "$@"
