#!/usr/bin/env bash
# Regenerates the shipped vectors in gguf-vectors/ with the recipe recorded in
# gguf-vectors/manifest.json: extract on the default data, then sweep and
# store the chosen steering defaults in the file.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --quiet
cache="${INFERALIGN_CACHE:-$HOME/.cache/inferalign}"
bin=target/release/inferalign
advbench="$cache/data/advbench.jsonl"

qwen="$cache/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
$bin extract --model "$qwen" --harmful "$advbench" --harmless data/harmless.txt --out gguf-vectors/qwen2.5-coder-0.5b-instruct-q4_k_m.srv.gguf
$bin sweep --model "$qwen" --gate gguf-vectors/qwen2.5-coder-0.5b-instruct-q4_k_m.srv.gguf \
    --alphas 4,5 --ranges "14-18" --limit 40 --max-tokens 40 --write

gemma="$cache/models/gemma-3-270m-q4_k_m.gguf"
$bin extract --model "$gemma" --template gemma --harmful "$advbench" --harmless data/harmless.txt --out gguf-vectors/gemma-3-270m-q4_k_m.srv.gguf
$bin sweep --model "$gemma" --gate gguf-vectors/gemma-3-270m-q4_k_m.srv.gguf \
    --alphas 500,1000 --ranges "6-9" --limit 40 --max-tokens 40 --write
