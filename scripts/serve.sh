#!/usr/bin/env bash
# Start the gateway on its embedded defaults (SQLite, local storage, the sandbox provider)
# on a fresh machine: makes .venv, installs the project, then runs `lora-gateway serve`.
# Extra arguments go to `lora-gateway serve` (e.g. --port 9000, --config config.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
.venv/bin/python -m pip install -q --disable-pip-version-check -e .
exec .venv/bin/lora-gateway serve "$@"
