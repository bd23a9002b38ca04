#!/usr/bin/env python3
"""The KServe Python SDK's V2 REST client against a running tether-relay.

    python3 tests/interop/kserve_client.py http://127.0.0.1:8080 models/zoo

Checks what the SDK reads from the protocol's health API (`is_server_live`, `is_server_ready`,
`is_model_ready` parse the `{"live": true}` / `{"ready": true}` bodies), an unknown model's
readiness, and an inference per zoo model compared with the zoo's ONNX Runtime goldens. Exits
non-zero on the first failure; prints a count of passed checks at the end.
"""

import asyncio
import json
import sys
from pathlib import Path

import numpy as np
from kserve import InferenceRESTClient, RESTConfig


async def run(url, zoo):
    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=1, timeout=30))
    passed = 0

    def check(cond, what):
        nonlocal passed
        if not cond:
            raise SystemExit(f"FAILED: {what}")
        passed += 1

    check(await client.is_server_live(url) is True, "server live")
    check(await client.is_server_ready(url) is True, "server ready")
    for model in ["digits", "vibration", "vad", "ocr_det"]:
        check(await client.is_model_ready(url, model) is True, f"{model} ready")
        request = json.loads((zoo / "golden" / f"{model}.request.json").read_text())
        variant = "cloud" if model in ("digits", "vibration") else "device"
        golden = json.loads((zoo / "golden" / f"{model}.{variant}.response.json").read_text())
        result = await client.infer(url, request, model_name=model)
        check(result.model_name == model, f"{model} response names its model")
        outputs = {o.name: o for o in result.outputs}
        for o in golden["outputs"]:
            got = outputs.get(o["name"])
            check(got is not None, f"{model} answers {o['name']}")
            got = np.asarray(got.as_numpy(), dtype=np.float32)
            want = np.array(o["data"], dtype=np.float32).reshape(o["shape"])
            check(got.shape == want.shape, f"{model} {o['name']} shape")
            err = float(np.abs(got - want).max())
            check(err <= 1e-4, f"{model} {o['name']} within 1e-4 of the golden: {err}")
    check(await client.is_model_ready(url, "resnet") is False, "an unknown model is not ready")
    await client.close()
    print(f"kserve: {passed} passed, 0 failed")


def main():
    asyncio.run(run(sys.argv[1], Path(sys.argv[2])))


if __name__ == "__main__":
    main()
