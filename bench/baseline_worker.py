#!/usr/bin/env python3
"""Baseline MQTT inference worker: what a user would write instead of Tether.

paho-mqtt 2.x (MQTT v5) + onnxruntime (1 intra-op thread) + numpy. Subscribes (QoS 1) to
`baseline/+/infer/+`, decodes an Open Inference Protocol (KServe V2) JSON request, runs the model
named by the last topic level, and publishes the V2 JSON response (QoS 1) to the request's
Response Topic with its Correlation Data. Bad input gets {"id","error","code"} instead of a crash.

    baseline_worker.py --broker 127.0.0.1:18830 --models target/bench-models [--procs N]

--procs N forks N worker processes that share one MQTT v5 shared subscription
(`$share/base/baseline/+/infer/+`), so the broker spreads requests over them.
Each process prints `ready <pid>` once its subscription is acknowledged.

The one tuning applied by default is TCP_NODELAY on paho's socket: paho leaves Nagle on, and the
worker's reply + PUBACK pair then stalls on delayed ACKs (p90 ~40 ms at one request in flight).
--stock-socket keeps paho's default to show that.
"""
import argparse
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

V2_TO_NP = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}
NP_TO_V2 = {np.dtype(t): name for name, t in V2_TO_NP.items()}


class RequestError(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def load_models(directory):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sessions = {}
    for path in sorted(Path(directory).glob("*.onnx")):
        sessions[path.stem] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    if not sessions:
        sys.exit(f"no .onnx files in {directory}")
    return sessions


def infer(sessions, model, req):
    """V2 request dict -> V2 response dict. Raises RequestError for anything the caller got wrong."""
    sess = sessions.get(model)
    if sess is None:
        raise RequestError(404, f"unknown model {model!r}")
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError(400, "request has no 'inputs' list")
    expected = {i.name for i in sess.get_inputs()}
    feeds = {}
    for t in inputs:
        try:
            name, shape, dtype, data = t["name"], t["shape"], t["datatype"], t["data"]
        except (KeyError, TypeError):
            raise RequestError(400, "each input needs name, shape, datatype and data")
        if name not in expected:
            raise RequestError(400, f"model {model!r} has no input {name!r} (has {sorted(expected)})")
        if dtype not in V2_TO_NP:
            raise RequestError(400, f"unsupported datatype {dtype!r}")
        try:
            arr = np.asarray(data, dtype=V2_TO_NP[dtype]).reshape(shape)
        except (ValueError, TypeError) as e:
            raise RequestError(400, f"input {name!r}: data does not fit shape {shape}: {e}")
        feeds[name] = arr
    if set(feeds) != expected:
        raise RequestError(400, f"missing inputs {sorted(expected - set(feeds))}")
    wanted = [o["name"] for o in req.get("outputs") or [] if isinstance(o, dict) and "name" in o] or None
    t0 = time.perf_counter()
    try:
        results = sess.run(wanted, feeds)
    except (ort.capi.onnxruntime_pybind11_state.InvalidArgument,
            ort.capi.onnxruntime_pybind11_state.InvalidGraph) as e:
        raise RequestError(400, str(e).splitlines()[0])
    except Exception as e:  # noqa: BLE001 - any runtime failure becomes a 500 reply, not a crash
        raise RequestError(500, str(e).splitlines()[0])
    infer_ms = (time.perf_counter() - t0) * 1e3
    names = wanted or [o.name for o in sess.get_outputs()]
    return {
        "id": req.get("id"),
        "model_name": model,
        "outputs": [
            {"name": n, "shape": list(a.shape), "datatype": NP_TO_V2.get(a.dtype, str(a.dtype)),
             "data": a.ravel().tolist()}
            for n, a in zip(names, results)
        ],
        "parameters": {"infer_ms": round(infer_ms, 4)},
    }


def handle(sessions, topic, payload):
    """Returns the reply body (bytes); never raises."""
    rid = None
    try:
        try:
            req = json.loads(payload)
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(400, f"payload is not JSON: {e}")
        if not isinstance(req, dict):
            raise RequestError(400, "payload is not a JSON object")
        rid = req.get("id")
        reply = infer(sessions, topic.rsplit("/", 1)[-1], req)
    except RequestError as e:
        reply = {"id": rid, "error": str(e), "code": e.code}
    return json.dumps(reply, separators=(",", ":")).encode()


def serve(args, shared):
    sessions = load_models(args.models)
    host, port = args.broker.rsplit(":", 1)
    topic = f"$share/{args.share_group}/{args.topic}" if shared else args.topic

    def on_connect(client, _userdata, _flags, reason_code, _props):
        if reason_code.is_failure:
            sys.exit(f"connect failed: {reason_code}")
        if not args.stock_socket:
            client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.subscribe(topic, qos=1)

    def on_subscribe(_client, _userdata, _mid, reason_codes, _props):
        if any(rc.is_failure for rc in reason_codes):
            sys.exit(f"subscribe {topic} failed: {reason_codes}")
        print(f"ready {os.getpid()} models={sorted(sessions)} topic={topic} nodelay={not args.stock_socket}",
              flush=True)

    def on_message(client, _userdata, msg):
        props = msg.properties
        response_topic = getattr(props, "ResponseTopic", None) if props else None
        if not response_topic:
            print(f"dropping request on {msg.topic}: no Response Topic", file=sys.stderr, flush=True)
            return
        out = Properties(PacketTypes.PUBLISH)
        corr = getattr(props, "CorrelationData", None)
        if corr is not None:
            out.CorrelationData = corr
        client.publish(response_topic, handle(sessions, msg.topic, msg.payload), qos=1, properties=out)

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"baseline-{os.getpid()}",
                         protocol=mqtt.MQTTv5)
    # paho's default of 20 unacked QoS 1 publishes would throttle replies under load.
    client.max_inflight_messages_set(1000)
    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    signal.signal(signal.SIGTERM, lambda *_: client.disconnect())
    client.connect(host, int(port), keepalive=30)
    try:
        client.loop_forever()
    except KeyboardInterrupt:
        client.disconnect()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--broker", default="127.0.0.1:18830")
    ap.add_argument("--models", default="target/bench-models", help="folder of .onnx files; model name = file stem")
    ap.add_argument("--topic", default="baseline/+/infer/+")
    ap.add_argument("--procs", type=int, default=1, help="worker processes (>1 uses a shared subscription)")
    ap.add_argument("--share-group", default="base")
    ap.add_argument("--stock-socket", action="store_true", help="leave Nagle on (paho's default)")
    args = ap.parse_args()

    if args.procs <= 1:
        serve(args, shared=False)
        return
    children = []
    for _ in range(args.procs):
        pid = os.fork()
        if pid == 0:  # child: load models after the fork, serve until SIGTERM
            serve(args, shared=True)
            os._exit(0)
        children.append(pid)

    def stop(*_):
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for pid in children:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


if __name__ == "__main__":
    main()
