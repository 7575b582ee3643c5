#!/usr/bin/env bash
# The wheels the GPU machine lacks for bench/gpu_check.py, into .whl/ (git-ignored): pydantic and DeepSpeed with
# what they need beyond that machine's image (torch, transformers, peft, numpy, tqdm, rich, typer, ... are there).
# MLflow, Prefect and DVC stay behind: the check runs the stages with tracking off.
#
#   bash bench/gpu_wheels.sh          # here, with the package index reachable (about 3 MB)
#   # there, before the check:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
# Pinned to the versions requirements/constraints.txt tests together; binary wheels for CPython 3.12 on x86-64.
pin() { grep -iE "^${1//[-_]/[-_]}==" requirements/constraints.txt | cut -d= -f3; }
PYTHON=${PYTHON:-.venv/bin/python}  # the project's environment: DeepSpeed's build imports torch
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "pydantic==$(pin pydantic)" "pydantic-core==$(pin pydantic-core)" "annotated-types==$(pin annotated-types)" \
  "typing-inspection==$(pin typing-inspection)" "hjson==$(pin hjson)"
# DeepSpeed is published as a source archive only: build its pure-Python wheel here, with no C++ ops compiled
# (they JIT-compile on first use where needed; the check uses none of them).
DS_BUILD_OPS=0 DS_BUILD_AIO=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$(pin deepspeed)"
ls -la .whl
du -sh .whl
