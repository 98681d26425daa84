#!/usr/bin/env bash
# Installs every system and Python dependency nibble needs. Idempotent; runs as
# root or through sudo. Debian 12 (bookworm) packages + PyPI.
#   scripts/install-deps.sh            build + test dependencies
#   NIBBLE_WITH_LLAMACPP=1 scripts/install-deps.sh
#                                      also builds llama-cpp-python from source (the
#                                      independent reference used by bench/ scripts; slow)
set -euo pipefail
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

apt_pkgs=(
  build-essential cmake ninja-build ccache pkg-config git python3 python3-pip unzip
  libabsl-dev libgtest-dev libgmock-dev libbenchmark-dev
  libpcre2-dev libsentencepiece-dev nlohmann-json3-dev libcli11-dev
  libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc libcpp-httplib-dev
)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# pip package:import name. openai/grpcio*: real clients of nibble-server's endpoints in the tests.
py_pkgs=(numpy:numpy gguf:gguf safetensors:safetensors matplotlib:matplotlib openai:openai grpcio:grpc
         grpcio-tools:grpc_tools grpcio-health-checking:grpc_health grpcio-reflection:grpc_reflection)
need_py=()
for pm in "${py_pkgs[@]}"; do
  python3 -c "import ${pm#*:}" 2>/dev/null || need_py+=("${pm%%:*}")
done
if [ ${#need_py[@]} -gt 0 ]; then
  echo "install-deps: pip install ${need_py[*]}"
  python3 -m pip install --quiet --disable-pip-version-check "${need_py[@]}"
fi

if [ "${NIBBLE_WITH_LLAMACPP:-0}" = "1" ] && ! python3 -c "import llama_cpp" 2>/dev/null; then
  echo "install-deps: building llama-cpp-python from source (several minutes)"
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) CMAKE_ARGS="-DGGML_NATIVE=ON" \
    python3 -m pip install --quiet --disable-pip-version-check llama-cpp-python==0.3.36
fi
echo "install-deps: ok"
