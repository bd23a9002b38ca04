#!/usr/bin/env python3
"""tract (Tether's engine) against ONNX Runtime on every zoo model's device file: one thread,
batch 1, p50 of one call, reps interleaved (tract, ORT, tract, ORT, ...), medians printed as
one table.

    cargo build --release -p tools        # target/release/tether
    target/bench-venv/bin/python bench/engine_compare.py [--reps 3] [--seconds 3]

tract is timed by `tether bench --variant device --batch 1` (inputs: the test splits of the
classifiers, the golden requests of the others); ONNX Runtime by bench/engine_ort.py on the
same files (golden inputs, first row), with intra- and inter-op threads at 1 and sequential
execution, from Python, so its figures include a few microseconds of interpreter per call.
"""

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


def tract(tether, seconds):
    out = subprocess.run([tether, "bench", "--variant", "device", "--batch", "1", "--seconds", str(seconds)],
                         capture_output=True, text=True, check=True).stdout
    # model variant prec batch threads calls p50 p90 p99 samples/s
    return {m.group(1): float(m.group(2)) for m in
            re.finditer(r"^(\w+)\s+device\s+\w+\s+1\s+1\s+\d+\s+([\d.]+)", out, re.M)}


def ort(seconds):
    out = subprocess.run([sys.executable, str(BENCH / "engine_ort.py"), "--seconds", str(seconds)],
                         capture_output=True, text=True, check=True).stdout
    version = out.splitlines()[0].split(",")[0]
    return version, {m.group(1): float(m.group(2)) for m in
                     re.finditer(r"^(\w+)\s+\S+\.onnx\s+\d+\s+([\d.]+)", out, re.M)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tether", default=str(ROOT / "target" / "release" / "tether"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    a = ap.parse_args()
    runs = {"tract": [], "ort": []}
    version = ""
    for rep in range(a.reps):
        runs["tract"].append(tract(a.tether, a.seconds))
        version, o = ort(a.seconds)
        runs["ort"].append(o)
        print(f"rep {rep + 1}: tract {runs['tract'][-1]}  ort {o}", file=sys.stderr)
    models = sorted(set(runs["tract"][0]) & set(runs["ort"][0]))
    print(f"p50 of one call in ms, medians of {a.reps} interleaved reps; {version}, tract 0.23.9")
    print("| model | tract | ONNX Runtime | tract / ORT |")
    print("|---|---|---|---|")
    for m in models:
        t = statistics.median(r[m] for r in runs["tract"])
        o = statistics.median(r[m] for r in runs["ort"])
        print(f"| {m} | {t:.3f} | {o:.3f} | {t / o:.2f} |")


if __name__ == "__main__":
    main()
