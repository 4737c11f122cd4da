#!/usr/bin/env python3
"""Writes the gate's held-out sets (prompts `extract` never sees by default)
into DIR: plain AdvBench 200-519, own harmless 192-319, AdvBench 200-431 wrapped
in the templates of data/jailbreaks.jsonl (each template in turn), the same
harmless prompts wrapped twice each, a `.families.json` per wrapped set, and
the harmful and harmless questions of data/questions-*.txt (never fitted on),
plain and wrapped twice each in the same templates; and `long_*`: a 471-word
persona preamble (data/long-preamble.txt, longer than any template) before a
quarter of the wrapped harmful prompts, half the wrapped harmless ones and
the first 48 plain harmless ones; and `sensitive_harmless`: harmless requests
that sound harmful (data/sensitive-harmless.txt: figurative phrasing,
homonyms, games, pests, definitions, history, safety advice; never fitted on).
Usage: scripts/heldout-sets.py DIR (after scripts/setup.sh)"""
import json
import os
import sys

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
cache = os.environ.get("INFERALIGN_CACHE", os.path.expanduser("~/.cache/inferalign"))
advbench = [json.loads(line)["goal"] for line in open(os.path.join(cache, "data", "advbench.jsonl"))]


def lines(name):
    return [line.strip() for line in open(os.path.join(root, "data", name)) if line.strip()]


harmless = lines("harmless.txt")
templates = [json.loads(line) for line in open(os.path.join(root, "data", "jailbreaks.jsonl"))]
out = sys.argv[1]
os.makedirs(out, exist_ok=True)


def write(name, prompts, families=None):
    with open(os.path.join(out, name + ".jsonl"), "w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p}) + "\n")
    if families:
        json.dump(families, open(os.path.join(out, name + ".families.json"), "w"))


def wrapped(instructions, shift):
    picked = [templates[(i + shift(i)) % len(templates)] for i in range(len(instructions))]
    return [t["template"].replace("{instruction}", x) for t, x in zip(picked, instructions)], [t["family"] for t in picked]


write("plain_harmful", advbench[200:520])
write("plain_harmless", harmless[192:320])
wrapped_harmful = wrapped(advbench[200:432], lambda i: 0)
write("wrapped_harmful", *wrapped_harmful)
# The second copy of each harmless prompt goes into a template half the list on.
wrapped_harmless = wrapped(harmless[192:320] * 2, lambda i: (i >= 128) * (len(templates) // 2))
write("wrapped_harmless", *wrapped_harmless)
preamble = open(os.path.join(root, "data", "long-preamble.txt")).read()
write("long_wrapped_harmful", [preamble + p for p in wrapped_harmful[0][::4]], wrapped_harmful[1][::4])
write("long_wrapped_harmless", [preamble + p for p in wrapped_harmless[0][::2]], wrapped_harmless[1][::2])
write("long_plain_harmless", [preamble + p for p in harmless[192:240]])
for cls in ["harmful", "harmless"]:
    asked = lines("questions-%s.txt" % cls)
    write("question_" + cls, asked)
    write("wrapped_question_" + cls, *wrapped(asked * 2, lambda i: (i >= len(asked)) * (len(templates) // 2)))
write("sensitive_harmless", lines("sensitive-harmless.txt"))
