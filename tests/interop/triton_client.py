#!/usr/bin/env python3
"""The official Triton Python client against a running tether-relay.

    python3 tests/interop/triton_client.py http://127.0.0.1:8080 models/zoo

Checks liveness, readiness, model metadata, and an inference per zoo model in JSON and with
binary tensors, comparing the outputs with the zoo's ONNX Runtime goldens. Exits non-zero on
the first failure; prints a count of passed checks at the end.
"""

import json
import sys
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

DTYPES = {"FP32": np.float32, "INT64": np.int64, "INT32": np.int32, "UINT8": np.uint8}


def main():
    url, zoo = sys.argv[1], Path(sys.argv[2])
    client = httpclient.InferenceServerClient(url=url.removeprefix("http://"))
    passed = 0

    def check(cond, what):
        nonlocal passed
        if not cond:
            raise SystemExit(f"FAILED: {what}")
        passed += 1

    check(client.is_server_live(), "server live")
    check(client.is_server_ready(), "server ready")
    meta = client.get_server_metadata()
    check(meta["name"] == "tether-relay", f"server metadata {meta}")

    for model in ["digits", "vibration", "vad", "ocr_det"]:
        check(client.is_model_ready(model), f"{model} ready")
        md = client.get_model_metadata(model)
        request = json.loads((zoo / "golden" / f"{model}.request.json").read_text())
        check(md["name"] == model, f"{model} metadata name")
        check([i["name"] for i in md["inputs"]] == [i["name"] for i in request["inputs"]], f"{model} metadata inputs")
        variant = "cloud" if model in ("digits", "vibration") else "device"
        golden = json.loads((zoo / "golden" / f"{model}.{variant}.response.json").read_text())
        for binary in (False, True):
            inputs = []
            for t in request["inputs"]:
                arr = np.array(t["data"], dtype=DTYPES[t["datatype"]]).reshape(t["shape"])
                tensor = httpclient.InferInput(t["name"], list(arr.shape), t["datatype"])
                tensor.set_data_from_numpy(arr, binary_data=binary)
                inputs.append(tensor)
            outputs = [httpclient.InferRequestedOutput(o["name"], binary_data=binary) for o in golden["outputs"]]
            result = client.infer(model, inputs, outputs=outputs)
            for o in golden["outputs"]:
                got = result.as_numpy(o["name"])
                want = np.array(o["data"], dtype=np.float32).reshape(o["shape"])
                check(got is not None and got.shape == want.shape, f"{model} {o['name']} shape (binary={binary})")
                err = float(np.abs(got - want).max())
                check(err <= 1e-4, f"{model} {o['name']} within 1e-4 of the golden (binary={binary}): {err}")

    bogus = httpclient.InferInput("input", [1, 1, 8, 8], "FP32")
    bogus.set_data_from_numpy(np.zeros([1, 1, 8, 8], dtype=np.float32))
    try:
        client.infer("resnet", [bogus])
        check(False, "an unknown model is refused")
    except InferenceServerException as e:
        check("unknown model `resnet`" in str(e), f"the error names the model: {e}")

    print(f"triton: {passed} passed, 0 failed")


if __name__ == "__main__":
    main()
