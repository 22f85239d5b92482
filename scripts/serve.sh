#!/usr/bin/env bash
# Start the gateway on its embedded defaults (SQLite, local storage, the sandbox provider)
# on a fresh machine: makes .venv, installs the project, then runs `lora-gateway serve`.
# Extra arguments go to `lora-gateway serve` (e.g. --port 9000, --config config.yaml).
# The install is skipped when pyproject.toml has not changed since the last one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.lora-gateway-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x .venv/bin/lora-gateway ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q --disable-pip-version-check -e .
  echo "$want" > "$stamp"
fi
echo "(the CLI is .venv/bin/lora-gateway; or run: source .venv/bin/activate)"
exec .venv/bin/lora-gateway serve "$@"
