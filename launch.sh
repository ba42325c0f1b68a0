#!/usr/bin/env bash
# One entry point: setup | demo | test | fuzz | cluster | submit CONFIG | stop-cluster | cascade ARGS...
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
PY="$VENV/bin/python"
STAMP="$VENV/.installed"

pip_install() {
  # This machine's pip config names local index folders that may not exist: drop that noise only.
  "$PY" -m pip install -q "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

setup() {
  # Wheels only, nothing compiled. No argument: what the demo, `cascade` and the cluster need;
  # "dev": also the test, lint and benchmark tools (./launch.sh test | lint). The built-in SmolLM2
  # is fetched and converted on its first use, DeepSpeed's CPU comm op built on its first use.
  local extras="${1:-}" want have=""
  case "$extras" in "" | dev) ;; *) echo "usage: ./launch.sh setup [dev]" >&2; exit 2 ;; esac
  [ -x "$PY" ] || python3 -m venv "$VENV"
  want=$(sha256sum pyproject.toml | cut -d' ' -f1)
  [ -f "$STAMP" ] && have=$(cat "$STAMP")
  if [ "$have" = "$want dev" ] || [ "$have" = "$want $extras" ]; then
    return 0  # already installed for this pyproject.toml: install nothing
  fi
  pip_install --upgrade pip
  if ! "$PY" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      pip_install torch
    else
      # CPU machine: pin the CPU build so no multi-GB CUDA wheel is pulled.
      pip_install "torch==2.13.0"
    fi
  fi
  pip_install -e ".${extras:+[$extras]}"
  echo "$want $extras" > "$STAMP"
}

export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1
cmd="${1:-demo}"
shift || true
case "$cmd" in
  setup) setup "$@" ;;
  demo) setup; exec "$VENV/bin/cascade" run configs/demo.yaml --output "${DEMO_OUT:-runs/demo}" --force "$@" ;;
  test) setup dev; exec "$PY" -m pytest -q --durations=20 "$@" ;;
  # The fuzz tests with freshly drawn cases, 10x as many (./launch.sh test replays fixed ones).
  fuzz) setup dev; CASCADE_FUZZ=explore exec "$PY" -m pytest -q tests/test_fuzz.py "$@" ;;
  lint) setup dev; "$VENV/bin/ruff" check . && "$VENV/bin/ruff" format --check . ;;
  # The head runs with the venv first on PATH: a submitted job's entrypoint (`python -m runner.cli
  # run-submitted ...`) runs the first `python` on the head's PATH, which must be the project's.
  cluster) setup; PATH="$PWD/$VENV/bin:$PATH" VIRTUAL_ENV="$PWD/$VENV" "$VENV/bin/ray" start --head --node-ip-address=127.0.0.1 --port=6379 \
      --dashboard-host=127.0.0.1 --dashboard-port=8265 --include-dashboard=true "$@"
    echo "Ray head on 127.0.0.1. Add a worker node with: ray start --address=<head-ip>:6379"
    echo "Submit with: ./launch.sh submit CONFIG   (address http://127.0.0.1:8265)" ;;
  stop-cluster) setup; exec "$VENV/bin/ray" stop "$@" ;;
  submit) setup; exec "$VENV/bin/cascade" submit --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" "$@" ;;
  cascade) setup; exec "$VENV/bin/cascade" "$@" ;;
  *) echo "usage: ./launch.sh {setup [dev]|demo|test|fuzz|lint|cluster|stop-cluster|submit CONFIG|cascade ARGS}" >&2; exit 2 ;;
esac
