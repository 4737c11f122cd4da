#!/usr/bin/env bash
# Sets up what is missing, then runs the whole test suite on the real models.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# llama.cpp uses every core for one decode; tests in parallel would only fight.
cargo build --release
# Test fixture: Qwen with its refusal direction projected out, as a LoRA (1-2 s).
# Layer 16's direction makes it answer every held-out AdvBench prompt tried
# (64 of 64; the middle layer's, 11: 37.5%; the base model: 28.1%).
cargo run --release --quiet --example abliterate -- \
    "${INFERALIGN_CACHE:-$HOME/.cache/inferalign}/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf" \
    gguf-vectors/qwen2.5-coder-0.5b-instruct-q4_k_m.srv.gguf \
    "${INFERALIGN_CACHE:-$HOME/.cache/inferalign}/fixtures/qwen-abliterated.lora.gguf" 16
cargo test --release --no-fail-fast -- --test-threads=1
