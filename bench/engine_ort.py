#!/usr/bin/env python3
"""ONNX Runtime's side of the engine comparison: p50 of one call per zoo model, batch 1.

Same files and inputs as `tether bench --batch 1` (each model's device variant from
models/zoo/MANIFEST.toml; the golden request's inputs, first row), ONNX Runtime on one thread
with sequential execution, so the two engines are compared like for like. Timed from Python, so
ORT's figures include a few microseconds of interpreter per call.

    target/bench-venv/bin/python bench/engine_ort.py [--seconds 3] [--model ocr_det]...
"""

import argparse
import json
import pathlib
import statistics
import time
import tomllib

import numpy as np
import onnxruntime as ort

ZOO = pathlib.Path(__file__).resolve().parent.parent / "models" / "zoo"
DTYPES = {"FP32": np.float32, "INT64": np.int64, "INT32": np.int32, "UINT8": np.uint8}


def inputs_of(name, spec):
    request = json.loads((ZOO / "golden" / f"{name}.request.json").read_text())
    feeds = {}
    for tensor in request["inputs"]:
        array = np.asarray(tensor["data"], dtype=DTYPES[tensor["datatype"]])
        array = array.reshape(tensor["shape"])
        declared = next(t for t in spec["inputs"] if t["name"] == tensor["name"])
        if declared["shape"][0] == -1:
            array = array[:1]
        feeds[tensor["name"]] = array
    return feeds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--model", action="append", help="a zoo model name (default: all)")
    parser.add_argument("--optimization", choices=["all", "extended", "basic"], default="all",
                        help="ONNX Runtime's graph optimisation level (all includes its NCHWc layout rewrite)")
    args = parser.parse_args()
    manifest = tomllib.loads((ZOO / "MANIFEST.toml").read_text())
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    }[args.optimization]
    print(f"onnxruntime {ort.__version__}, one thread, batch 1, p50 of one call, optimization {args.optimization}")
    print(f"{'model':<12} {'file':<24} {'calls':>7} {'p50 ms':>9} {'p99 ms':>9}")
    for spec in manifest["model"]:
        if args.model and spec["name"] not in args.model:
            continue
        variant = next(v for v in spec["variants"] if v["variant"] == "device")
        session = ort.InferenceSession(
            str(ZOO / variant["file"]), options, providers=["CPUExecutionProvider"]
        )
        feeds = inputs_of(spec["name"], spec)
        for _ in range(20):
            session.run(None, feeds)
        times = []
        deadline = time.perf_counter() + args.seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - start)
        times.sort()
        p50 = statistics.median(times) * 1e3
        p99 = times[min(len(times) - 1, int(len(times) * 0.99))] * 1e3
        print(f"{spec['name']:<12} {variant['file']:<24} {len(times):>7} {p50:>9.3f} {p99:>9.3f}")


if __name__ == "__main__":
    main()
