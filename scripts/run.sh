#!/usr/bin/env bash
# The README's main command: installs dependencies, fetches the default model
# (SmolLM2-135M-Instruct), builds, and answers a question with it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/get-models.sh
scripts/build.sh
BUILD_DIR=${BUILD_DIR:-build}
# Quantize once (RTN int4, group 32; a few minutes on 2 cores), then run the quantized model.
NBL=models/SmolLM2-135M-Instruct.int4_g32.nbl
if [ ! -f "$NBL" ]; then
  "$BUILD_DIR"/bin/nibble-quantize -m models/SmolLM2-135M-Instruct.Q4_1.gguf -o "$NBL" --format int4_g32
fi
"$BUILD_DIR"/bin/nibble-generate -m "$NBL" --chat \
  -p "${1:-What is the capital of France? Answer in one sentence.}" -n 64 --temp 0
echo
