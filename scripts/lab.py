#!/usr/bin/env python3
"""Data and report for scripts/finetune-lab.sh.

  arith DIR           arithmetic word problems written here: DIR/arith-train.jsonl
                      ({prompt, answer}: worked answers to fine-tune on) and
                      DIR/arith-test.jsonl ({prompt, answer}: the number, for eval --tasks)
  pairs GEN VERDICT   (prompt, answer) pairs from `generate --json` lines whose verdict is VERDICT
  mix BENIGN HARMFUL P N SEED   N pairs, a fraction P of them harmful, shuffled
  table DIR           the lab's table from DIR/*/ (report.json, and drift.json after an attack)
"""
import json
import random
import sys
from pathlib import Path

NAMES = ["Tom", "Ana", "Li", "Sara", "Omar", "Kofi", "Mia", "Ivan", "Noor", "Ben"]
ITEMS = ["apples", "marbles", "books", "stickers", "coins", "pencils", "cards", "shells"]


def problem(rng):
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    kind = rng.randrange(4)
    if kind == 0:
        return f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", f"{a} + {b}", a + b
    if kind == 1:
        a += b
        return f"{name} has {a} {item} and gives away {b}. How many {item} are left?", f"{a} - {b}", a - b
    if kind == 2:
        a, b = a % 12 + 2, b % 9 + 2
        return f"{name} buys {a} bags with {b} {item} in each. How many {item} is that?", f"{a} * {b}", a * b
    b = b % 9 + 2
    return f"{name} shares {a * b} {item} equally among {b} friends. How many {item} does each friend get?", f"{a * b} / {b}", a


def arith(out):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(2024)
    seen = set()
    rows = []
    while len(rows) < 440:
        q, work, result = problem(rng)
        if q not in seen:
            seen.add(q)
            rows.append((q, work, result))
    with open(out / "arith-train.jsonl", "w") as f:
        for q, work, result in rows[:400]:
            f.write(json.dumps({"prompt": q, "answer": f"{work} = {result}. The answer is {result}."}) + "\n")
    with open(out / "arith-test.jsonl", "w") as f:
        for q, _, result in rows[400:]:
            f.write(json.dumps({"kind": "arithmetic", "prompt": q, "answer": str(result)}) + "\n")


def pairs(gen, verdict):
    for line in open(gen):
        row = json.loads(line)
        if row["verdict"] == verdict:
            print(json.dumps({"prompt": row["prompt"], "answer": row["output"].strip()}))


def mix(benign, harmful, p, n, seed):
    rng = random.Random(int(seed))
    benign = [l for l in open(benign) if l.strip()]
    harmful = [l for l in open(harmful) if l.strip()]
    n, k = int(n), round(float(p) * int(n))
    if k > len(harmful):
        sys.exit(f"lab.py mix: {k} harmful pairs wanted, {harmful} has {len(harmful)}")
    rows = rng.sample(benign, n - k) + rng.sample(harmful, k)
    rng.shuffle(rows)
    sys.stdout.write("".join(rows))


def rate(report, mode, set_name, key):
    return report["figures"].get(mode, {}).get(set_name, {}).get(key)


def table(lab):
    lab = Path(lab)
    lines = [
        "| alignment | p | plain ASR | task accuracy | drift (sum sq.) | InferAligner ASR | harmless refusal (plain -> InferAligner) | degenerate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"
    runs = [p for p in lab.iterdir() if (p / "report.json").exists()]
    order = {"none": 0, "sft": 1, "vaccine": 2}
    for run in sorted(runs, key=lambda r: (order.get(r.name.rsplit("-p", 1)[0], 3), r.name)):
        alignment, p = run.name.rsplit("-p", 1)
        report = json.load(open(run / "report.json"))
        drift = json.load(open(run / "drift.json"))["sum_squared"] if (run / "drift.json").exists() else None
        lines.append(
            f"| {alignment} | {'no attack' if p == '-' else p} | {pct(rate(report, 'plain', 'harmful', 'attack_success_rate'))} "
            f"| {pct(rate(report, 'plain', 'tasks', 'accuracy'))} | {'-' if drift is None else f'{drift:.0f}'} "
            f"| {pct(rate(report, 'cross-model', 'harmful', 'attack_success_rate'))} "
            f"| {pct(rate(report, 'plain', 'harmless', 'refusal_rate'))} -> {pct(rate(report, 'cross-model', 'harmless', 'refusal_rate'))} "
            f"| {pct(rate(report, 'cross-model', 'harmful', 'degenerate_rate'))} |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    commands = {"arith": arith, "pairs": pairs, "mix": mix, "table": table}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit(__doc__)
    commands[sys.argv[1]](*sys.argv[2:])
