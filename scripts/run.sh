#!/usr/bin/env bash
# The README's main command: installs dependencies, fetches the default model
# (SmolLM2-135M-Instruct), builds, and answers a question with it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/get-models.sh
scripts/build.sh
BUILD_DIR=${BUILD_DIR:-build}
"$BUILD_DIR"/bin/nibble-generate -m models/SmolLM2-135M-Instruct.Q4_1.gguf --chat \
  -p "${1:-What is the capital of France? Answer in one sentence.}" -n 64 --temp 0
echo
