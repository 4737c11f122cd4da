#!/usr/bin/env bash
# Sets up what is missing, then runs the whole test suite on the real models.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# llama.cpp uses every core for one decode; tests in parallel would only fight.
cargo build --release
cargo test --release --no-fail-fast -- --test-threads=1
