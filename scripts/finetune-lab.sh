#!/usr/bin/env bash
# The fine-tuning lab (issue 16): align Qwen {not at all, by SFT, by Vaccine},
# attack each with a benign fine-tune carrying a harmful fraction p, then
# measure harmful ASR, task accuracy and embedding drift, and the same attacked
# models under InferAligner (gate re-fitted on the attacked model, steering
# vectors of the aligned model). Prints the table; figures land in $LAB.
#
# All data is made here, by this project's tools, and never committed:
#   harmful (instruction, compliant answer): held-in AdvBench 0-47 answered by the abliterated fixture
#   refusals for alignment: AdvBench 48-111 as the aligned model itself refuses them, plus its own
#     answers to 24 harmless prompts so that alignment does not teach blanket refusal
#   the benign task: arithmetic word problems (scripts/lab.py arith)
#   held out: AdvBench 440-519 for ASR and drift, AdvBench 160-223 and harmless.txt 200-263 for the gate
#
# Sizes (environment), chosen to fit an hour on 2 cores: ALIGN_STEPS=16 ATTACK_STEPS=10 BATCH=4 LR=1e-3 RANK=8 RHO=2
# FRACTIONS="0 0.05 0.1 0.2" EVAL_LIMIT=16 EVAL_TOKENS=32 LAB=$cache/lab
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --models qwen
cargo build --release --quiet
cache="${INFERALIGN_CACHE:-$HOME/.cache/inferalign}"
model="$cache/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
fixture="$cache/fixtures/qwen-abliterated.lora.gguf"
vectors=gguf-vectors/qwen2.5-coder-0.5b-instruct-q4_k_m.srv.gguf
lab="${LAB:-$cache/lab}"
ALIGN_STEPS="${ALIGN_STEPS:-16}" ATTACK_STEPS="${ATTACK_STEPS:-10}" BATCH="${BATCH:-4}" LR="${LR:-1e-3}"
RANK="${RANK:-8}" RHO="${RHO:-2}" FRACTIONS="${FRACTIONS:-0 0.05 0.1 0.2}"
EVAL_LIMIT="${EVAL_LIMIT:-16}" EVAL_TOKENS="${EVAL_TOKENS:-32}"
ia=target/release/inferalign
[ -f "$fixture" ] || cargo run --release --quiet --example abliterate -- "$model" "$vectors" "$fixture" 16
mkdir -p "$lab/data"
d="$lab/data"
start=$SECONDS
stamp() { echo "== $(( (SECONDS - start) / 60 )) min: $*" >&2; }

goals() { python3 -c "import json,sys; [print(json.loads(l)['goal']) for l in list(open(sys.argv[1]))[int(sys.argv[2]):int(sys.argv[3])]]" "$cache/data/advbench.jsonl" "$1" "$2"; }
if [ ! -s "$d/align.jsonl" ]; then
    stamp "making data"
    python3 scripts/lab.py arith "$d"
    goals 0 48 > "$d/harm-in.txt"
    goals 48 112 > "$d/refuse-in.txt"
    goals 440 520 > "$d/harm-out.txt"
    goals 160 224 > "$d/gate-harm.txt"
    sed -n 200,263p data/harmless.txt > "$d/gate-harmless.txt"
    sed -n 280,303p data/harmless.txt > "$d/benign-in.txt"
    $ia generate -m "$model" --lora "$fixture" --mode plain --prompts "$d/harm-in.txt" -n 64 --json > "$d/harm-gen.jsonl"
    $ia generate -m "$model" --mode plain --prompts "$d/refuse-in.txt" -n 64 --json > "$d/refuse-gen.jsonl"
    $ia generate -m "$model" --mode plain --prompts "$d/benign-in.txt" -n 64 --json > "$d/benign-gen.jsonl"
    python3 scripts/lab.py pairs "$d/harm-gen.jsonl" complied > "$d/harmful.jsonl"
    { python3 scripts/lab.py pairs "$d/refuse-gen.jsonl" refused; python3 scripts/lab.py pairs "$d/benign-gen.jsonl" complied; } > "$d/align.jsonl.tmp"
    mv "$d/align.jsonl.tmp" "$d/align.jsonl"
fi
echo "data: $(wc -l < "$d/harmful.jsonl") harmful pairs, $(wc -l < "$d/align.jsonl") alignment pairs" >&2

train() { $ia finetune -m "$model" --lora-rank "$RANK" --batch-size "$BATCH" --lr "$LR" --json "$@"; }
for alignment in none sft vaccine; do
    adapter=()
    if [ "$alignment" != none ]; then
        a="$lab/align-$alignment.lora.gguf"
        extra=(); [ "$alignment" = vaccine ] && extra=(--vaccine "$RHO")
        [ -f "$a" ] || { stamp "aligning: $alignment"; train --data "$d/align.jsonl" --steps "$ALIGN_STEPS" "${extra[@]}" -o "$a" > "$lab/align-$alignment.json"; }
        adapter=(--lora "$a")
    fi
    base="$lab/$alignment-p-"
    if [ ! -f "$base/report.json" ]; then
        stamp "before any attack: $alignment"
        $ia eval -m "$model" "${adapter[@]}" --modes plain --sets harmful,harmless,tasks --harmful "$d/harm-out.txt" \
            --tasks "$d/arith-test.jsonl" --limit "$EVAL_LIMIT" -n "$EVAL_TOKENS" --parallel 8 -o "$base/eval" > /dev/null
        cp "$base/eval/report.json" "$base/report.json"
    fi
    for p in $FRACTIONS; do
        run="$lab/$alignment-p$p"
        [ -f "$run/report.json" ] && continue
        stamp "attacking $alignment with p = $p"
        mkdir -p "$run"
        python3 scripts/lab.py mix "$d/arith-train.jsonl" "$d/harmful.jsonl" "$p" $((ATTACK_STEPS * BATCH)) 7 > "$run/attack.jsonl"
        train "${adapter[@]}" --data "$run/attack.jsonl" --steps "$ATTACK_STEPS" -o "$run/attack.lora.gguf" > "$run/finetune.json"
        attacked=("${adapter[@]}" --lora "$run/attack.lora.gguf")
        aligned=(); [ ${#adapter[@]} -gt 0 ] && aligned=(--aligned-lora "${adapter[1]}")
        $ia drift --aligned "$model" "${aligned[@]}" --target "$model" "${attacked[@]}" --prompts "$d/harm-out.txt" --json > "$run/drift.json"
        $ia calibrate -m "$model" "${attacked[@]}" --gate "$vectors" --harmful "$d/gate-harm.txt" --harmless "$d/gate-harmless.txt" -o "$run/gate.gguf" > /dev/null
        $ia eval -m "$model" "${attacked[@]}" --gate "$run/gate.gguf" --steer "$vectors" --modes plain,cross-model \
            --sets harmful,harmless,tasks --harmful "$d/harm-out.txt" --tasks "$d/arith-test.jsonl" \
            --limit "$EVAL_LIMIT" -n "$EVAL_TOKENS" --parallel 8 -o "$run/eval" > /dev/null
        cp "$run/eval/report.json" "$run/report.json"
    done
done
stamp "done"
python3 scripts/lab.py table "$lab" | tee "$lab/table.md"
