#!/usr/bin/env python3
"""Rewrites the `figures` of gguf-vectors/manifest.json from what each shipped
file records (`inferalign inspect --json`), so the manifest says what the files
hold. Usage: scripts/manifest-figures.py INFERALIGN_BINARY"""
import json
import os
import subprocess
import sys

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "gguf-vectors")
path = os.path.join(root, "manifest.json")
manifest = json.load(open(path))
for entry in manifest["vectors"]:
    out = subprocess.run([sys.argv[1], "inspect", "--json", os.path.join(root, entry["file"])],
                         check=True, capture_output=True, text=True).stdout
    info = json.loads(out)
    cal, gate = info["calibration"], info["calibration"]["gate"]
    tpr, fpr = gate["chosen"]
    entry["figures"] = {
        "data": cal["data"],
        "tool_version": cal["tool_version"],
        "gate_terms": gate["terms"],
        "gate_decides_at_layer": cal["gate_layer"],
        "gate_context_floor": gate.get("context_floor"),
        "cross_validated_tpr_by_family_left_out": {f: round(t, 4) for f, t in zip(gate["families"], tpr)},
        "cross_validated_fpr": {k: round(f, 4) for k, f in zip(["plain", "wrapped", "multi_turn"], fpr)},
        "gate_plain_held_out": {"tpr": gate["held_out"][0], "fpr": gate["held_out"][1]},
        "defaults": info["defaults"],
    }
tmp = path + ".tmp"
with open(tmp, "w") as f:
    json.dump(manifest, f, indent=2)
    f.write("\n")
os.replace(tmp, path)
