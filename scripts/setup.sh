#!/usr/bin/env bash
# Installs what a fresh Debian machine with Rust and Python lacks (cmake,
# libclang, a C++ compiler, curl, PyYAML, the openai client the server tests
# use), then fetches the models and data into
# ${INFERALIGN_CACHE:-~/.cache/inferalign}, verifying sha256.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v c++ >/dev/null || missing+=(g++)
command -v curl >/dev/null || missing+=(curl)
# libclang itself, not libclang-cpp (which some images carry without it).
ldconfig -p 2>/dev/null | grep -qE 'libclang(-[0-9.]+)?\.so' || ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 || missing+=(libclang-dev)
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python3 -c "import yaml" 2>/dev/null || python3 -m pip install --quiet "pyyaml==6.0.2"
python3 -c "import openai" 2>/dev/null || python3 -m pip install --quiet "openai==2.54.0"
python3 -c "import prometheus_client" 2>/dev/null || python3 -m pip install --quiet "prometheus-client==0.21.1"
python3 scripts/fetch.py "$@"
