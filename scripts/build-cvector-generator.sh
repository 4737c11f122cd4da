#!/usr/bin/env bash
# Builds stock llama.cpp `llama-cvector-generator`, for `inferalign bench
# extract --cvector-generator`. The llama.cpp tree that llama-cpp-sys-2 vendors
# leaves out the tool's sources, so they are downloaded from upstream at pinned
# commits into the cache, adapted to the vendored `common` API with three
# mechanical edits, and linked against the static libraries llama-cpp-sys-2
# built from that tree (run `cargo build --release` first). Prints the path.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${INFERALIGN_CACHE:-$HOME/.cache/inferalign}/llama-tools"
src="$cache/src/cvector-generator" build="$cache/build-cvector"
mkdir -p "$src" "$build" "$cache/bin"

raw=https://raw.githubusercontent.com/ggml-org/llama.cpp
for pinned in 2fb62f8f50fdc264199edab5a0d3175dc0229466/cvector-generator.cpp \
              181a4a8fb1af6142a7bf611dddd36fe34a3de3fe/pca.hpp \
              5c5f166e8ba011eb880ebec21497d39e85a91b04/mean.hpp; do
    file="${pinned#*/}"
    [ -s "$src/$file" ] || curl -fsSL "$raw/${pinned%%/*}/tools/cvector-generator/$file" -o "$src/$file" \
        || { echo "could not download $file from $raw; check the network" >&2; exit 1; }
done

version=$(sed -n 's/^llama-cpp-sys-2 = .*"=\?\([0-9.]*\)".*/\1/p' Cargo.toml)
version=${version:-$(grep -A1 'name = "llama-cpp-sys-2"' Cargo.lock | sed -n 's/version = "\(.*\)"/\1/p')}
vendor=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/llama-cpp-sys-2-"$version"/llama.cpp | head -1)
out=$(dirname "$(ls -t target/release/build/llama-cpp-sys-2-*/out/lib/libllama-common.a 2>/dev/null | head -1)")/..
[ -f "$out/lib/libllama.a" ] || { echo "no llama.cpp static libraries under target/release/build; run cargo build --release first" >&2; exit 1; }

cp "$src/pca.hpp" "$src/mean.hpp" "$build/"
sed -e 's|^#include "arg.h"$|#include "arg.h"\n#include "build-info.h"|' \
    -e 's|^    print_build_info();$|    llama_print_build_info(llama_version());|' \
    -e 's|common_init_result llama_init = common_init_from_params(params);|common_init_result_ptr llama_init = common_init_from_params(params);|' \
    -e 's|llama_init\.model\.get()|llama_init->model()|' \
    -e 's|llama_init\.context\.get()|llama_init->context()|' \
    "$src/cvector-generator.cpp" > "$build/cvector-generator.cpp"
g++ -O2 -std=c++17 -fopenmp -I"$build" -I"$vendor/common" -I"$vendor/include" -I"$vendor/ggml/include" -I"$vendor/vendor" \
    -c "$build/cvector-generator.cpp" -o "$build/cvector-generator.o"
g++ -O2 -fopenmp -o "$cache/bin/llama-cvector-generator" "$build/cvector-generator.o" -Wl,--start-group \
    "$out/lib/libllama-common.a" "$out/build/common/libllama-common-base.a" \
    "$out/build/vendor/cpp-httplib/libcpp-httplib.a" "$out/build/vendor/hash/libvendor-hash.a" \
    "$out/lib/libllama.a" "$out/lib/libggml.a" "$out/lib/libggml-cpu.a" "$out/lib/libggml-base.a" \
    -Wl,--end-group -lssl -lcrypto -lpthread -ldl -lm
echo "$cache/bin/llama-cvector-generator"
