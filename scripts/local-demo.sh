#!/usr/bin/env bash
# The local GPU provider end to end on a tiny, randomly initialised FLUX (CPU is fine): installs
# the `local` extra, builds the tiny model into ./tiny-flux (no download), writes
# ./local-demo.yaml and starts the gateway with provider `local` for training and inference.
# Then call it as README's "The flow, by hand" shows (LoRAs train in seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,local]"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ ! -f tiny-flux/model_index.json ]; then
  .venv/bin/python -c "from pathlib import Path; from tests.tiny_flux import build_tiny_flux; build_tiny_flux(Path('tiny-flux'))"
fi
MAXLEN=$(.venv/bin/python -c "from tests.tiny_flux import T5_MAX_LENGTH; print(T5_MAX_LENGTH)")
cat > local-demo.yaml <<YAML
data_dir: $(pwd)/local-demo-data
providers:
  local:
    model_dir: $(pwd)/tiny-flux
    devices: [cpu]
    max_steps: 4            # the API asks for >= 500 steps; the tiny model needs only a few
    checkpoint_every: 2
    resolution: 32
    max_sequence_length: ${MAXLEN}
    learning_rate: 0.01
routing:
  training: {providers: [local]}
  inference: {providers: [local]}
YAML
exec .venv/bin/lora-gateway serve --config local-demo.yaml "$@"
