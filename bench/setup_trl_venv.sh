#!/usr/bin/env bash
# Creates .venv-trl: TRL's PPO trainer for bench/ppo_speed.py, in its own virtual environment (never a project
# dependency). Idempotent: a venv whose stamp matches the pins below is left alone.
#
#     bash bench/setup_trl_venv.sh            # or: VENV=/elsewhere PYTHON=python3.11 bash bench/setup_trl_venv.sh
#
# trl 1.12.0 is the last release that ships a PPO trainer (trl.experimental.ppo). torch is installed first with
# an exact pin, so pip takes the local CPU wheel instead of fetching a multi-GB CUDA build; the rest follows with
# torch held at that version.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO/.venv-trl}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PINS=(trl==1.12.0 transformers==5.23.0 accelerate==1.15.0 peft==0.21.2)
STAMP="$VENV/.bench-stamp"
WANT="torch==$TORCH_VERSION ${PINS[*]}"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
    echo "setup_trl_venv: $VENV is up to date"
else
    [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION"
    # Hold torch where it is: a resolver that wanted another torch must fail here, not download one.
    HOLD="$(mktemp)"
    trap 'rm -f "$HOLD"' EXIT
    echo "torch==$TORCH_VERSION" >"$HOLD"
    "$VENV/bin/python" -m pip install -q -c "$HOLD" "${PINS[@]}"
    "$VENV/bin/python" -m pip check
    echo "$WANT" >"$STAMP"
fi
"$VENV/bin/python" - <<'PY'
import accelerate, peft, sys, torch, transformers, trl
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"accelerate {accelerate.__version__}, peft {peft.__version__}, trl {trl.__version__}")
PY
