#!/usr/bin/env python3
"""Run the benchmark matrix: each worker config x each concurrency x --reps, against the private
broker, and write raw JSON lines plus a table of medians to target/bench-results/.

    bench/run.sh                                     # echo, base1, tether at 1,8,64 and 1000/s; 3 reps
    python3 bench/run_matrix.py                      # echo, base1, base2 at 1,8,64; 3 reps
    python3 bench/run_matrix.py --configs base1-stock --concurrency 1,8
    python3 bench/run_matrix.py --concurrency "" --rates 500,1000   # open loop only

Reps are interleaved (rep 1 of every config, then rep 2, ...) so drift in background load hits
all configs alike. Besides loadgen's JSON, each run records the CPU seconds spent by the loadgen,
the broker, the worker(s), and everything else on the machine (`cpu_other_s`: a neighbour's
load shows up there). On a shared box, --quiet-wait S waits up to S s before each run for the
machine to go idle, and --max-other L repeats (up to --tries) a run during which other processes
used more than L cores on average. Stdlib only; the worker's own Python comes from --python.
"""
import argparse
import json
import os
import platform
import resource
import select
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
# loadgen and echo_worker: `cargo build --release -p loadgen` (bench/setup.sh does it).
BIN = Path(os.environ.get("BENCH_BIN", str(ROOT / "target" / "release")))
TICK = os.sysconf("SC_CLK_TCK")


def configs(a):
    base = [a.python, str(BENCH / "baseline_worker.py"), "--broker", a.broker, "--models", a.models]
    tether = [a.python, str(BENCH / "tether_worker.py"), a.agent, "--broker", a.broker, "--model", a.model,
              "--input", a.input]
    return {
        "echo": dict(cmd=[str(BIN / "echo_worker"), "--broker", a.broker], prefix="echo/dev1", procs=1,
                     what="Rust echo responder, no inference (broker + loadgen floor)"),
        "base1": dict(cmd=base, prefix="baseline/dev1", procs=1, what="baseline, 1 process"),
        "base2": dict(cmd=base + ["--procs", "2"], prefix="baseline/dev1", procs=2,
                      what="baseline, 2 processes on a shared subscription"),
        "base1-stock": dict(cmd=base + ["--stock-socket"], prefix="baseline/dev1", procs=1, requests=2000,
                            what="baseline, 1 process, paho's default socket (Nagle on)"),
        "tether": dict(cmd=tether, prefix="tether/dev1", procs=1,
                       what="tether-agent run, default workers, result cache off (every request runs the model)"),
        "tether-full": dict(cmd=tether + ["--synchronous", "full"], prefix="tether/dev1", procs=1,
                            what="tether-agent run, store.synchronous = \"full\" (WAL synced per commit)"),
        "tether1": dict(cmd=tether + ["--workers", "1"], prefix="tether/dev1", procs=1,
                        what="tether-agent run, 1 inference worker, result cache off"),
        "tether-observe": dict(cmd=tether + ["--observe", "0.05:0.5"], prefix="tether/dev1", procs=1,
                               what="tether-agent run, audit_rate 0.05 (default audit_max_per_s 5) and the candidate "
                                    "1.2.0 shadowed on 50 % of requests, a tether-relay answering the audits"),
        "tether-relay": dict(cmd=tether + ["--observe", "0:0"], prefix="tether/dev1", procs=1,
                             what="tether-observe's set-up (a relay, fleet keys) with neither audits nor a shadow"),
        "tether-audit": dict(cmd=tether + ["--observe", "0.05:0"], prefix="tether/dev1", procs=1,
                             what="tether-observe's audits alone (audit_rate 0.05), no shadow"),
        "tether-shadow": dict(cmd=tether + ["--observe", "0:0.5"], prefix="tether/dev1", procs=1,
                              what="tether-observe's shadow alone (50 % of requests), no audits"),
        "tether-cache": dict(cmd=tether + ["--cache"], prefix="tether/dev1", procs=1,
                             what="tether-agent run, result cache on (the repeated input is a cache hit)"),
    }


def proc_cpu(pid):
    """utime + stime of one process, in seconds (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def machine_busy():
    """Busy CPU seconds of the whole machine so far (all cores)."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = v[3] + v[4]
    return (sum(v[:8]) - idle) / TICK


def wait_quiet(max_wait, threshold=0.2, window=3.0):
    """Waits up to max_wait s for a `window` in which the machine used < threshold cores."""
    start = time.monotonic()
    while time.monotonic() - start < max_wait:
        busy0 = machine_busy()
        time.sleep(window)
        if (machine_busy() - busy0) / window < threshold:
            break
    return round(time.monotonic() - start, 1)


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def start_worker(cfg, log):
    """Starts a worker and waits for one `ready <pid>` line per process; returns (Popen, pids)."""
    proc = subprocess.Popen(cfg["cmd"], stdout=subprocess.PIPE, stderr=log, start_new_session=True)
    fd, text, pids, deadline = proc.stdout.fileno(), b"", [], time.monotonic() + 60
    while len(pids) < cfg["procs"]:
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_worker(proc)
            sys.exit(f"worker {cfg['cmd']} did not get ready; see {log.name}")
        # Raw reads, not readline() behind select(): one read can carry several processes' lines.
        if select.select([fd], [], [], 1)[0]:
            text += os.read(fd, 65536)
            pids = [int(line.split()[1]) for line in text.decode().splitlines() if line.startswith("ready ")]
    return proc, pids


def stop_worker(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_loadgen(a, cfg, load, broker_pid, worker_pids):
    """`load` is ("c", concurrency) for closed loop or ("r", rate) for open loop."""
    cmd = [str(BIN / "loadgen"), "--broker", a.broker, "--topic-prefix", cfg["prefix"], "--model", a.model,
           "--input", a.input, "--concurrency" if load[0] == "c" else "--rate", str(load[1]),
           "--requests", str(cfg.get("requests", a.requests)), "--warmup", str(a.warmup)]
    before = (children_cpu(), proc_cpu(broker_pid), sum(map(proc_cpu, worker_pids)), machine_busy(), time.monotonic())
    out = subprocess.run(cmd, capture_output=True, text=True)
    after = (children_cpu(), proc_cpu(broker_pid), sum(map(proc_cpu, worker_pids)), machine_busy(), time.monotonic())
    if not out.stdout.strip():
        sys.exit(f"loadgen failed ({out.returncode}): {out.stderr}")
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    d = [y - x for x, y in zip(before, after)]
    rec.update(warmup=a.warmup, cpu_loadgen_s=round(d[0], 2), cpu_broker_s=round(d[1], 2), cpu_worker_s=round(d[2], 2),
               cpu_other_s=round(max(0.0, d[3] - d[0] - d[1] - d[2]), 2), wall_s=round(d[4], 2))
    if out.returncode != 0:
        rec["loadgen_stderr"] = out.stderr.strip()[-300:]
    return rec


def summarize(records, cfgs, a):
    rows = ["| config | load | rps | p50 ms | p99 ms | worker CPU us/req | broker CPU us/req | loadgen CPU us/req"
            " | other load (cores) | errors+timeouts |", "|" + "---|" * 10]
    keys = sorted({(r["config"], r["load"]) for r in records},
                  key=lambda k: (list(cfgs).index(k[0]), k[1][0], int(k[1][2:].rstrip("/s"))))
    for cfg, load in keys:
        rs = [r for r in records if r["config"] == cfg and r["load"] == load]
        med = lambda f: statistics.median(f(r) for r in rs)  # noqa: E731
        # CPU is sampled around the whole loadgen process, so divide by every request it sent.
        per_req = lambda k: med(lambda r: r[k] / (r["requests"] + r["warmup"]) * 1e6)  # noqa: E731
        rows.append(
            f"| {cfg} | {load} | {med(lambda r: r['rps']):.0f} | {med(lambda r: r['p50_ms']):.2f} | "
            f"{med(lambda r: r['p99_ms']):.2f} | {per_req('cpu_worker_s'):.0f} | {per_req('cpu_broker_s'):.0f} | "
            f"{per_req('cpu_loadgen_s'):.0f} | {med(lambda r: r['cpu_other_s'] / r['wall_s']):.2f} | "
            f"{sum(r['errors'] + r['timeouts'] for r in rs)} |")
    return "\n".join(rows)


def run_all(a, cfgs, loads, broker_pid, raw, log, records):
    for rep in range(1, a.reps + 1):
        for name, cfg in cfgs.items():
            proc, pids = start_worker(cfg, log)
            try:
                for load in loads:
                    label = f"c={load[1]}" if load[0] == "c" else f"r={load[1]}/s"
                    for attempt in range(1, a.tries + 1):
                        waited = wait_quiet(a.quiet_wait) if a.quiet_wait else 0
                        rec = dict(config=name, rep=rep, load=label, attempt=attempt, waited_s=waited,
                                   **run_loadgen(a, cfg, load, broker_pid, pids))
                        if a.max_other is None or rec["cpu_other_s"] / rec["wall_s"] <= a.max_other:
                            break
                        print(f"  other processes used {rec['cpu_other_s'] / rec['wall_s']:.2f} cores; "
                              f"{'again' if attempt < a.tries else 'keeping it'}", file=sys.stderr)
                    records.append(rec)
                    with raw.open("a") as f:
                        f.write(json.dumps(rec) + "\n")
                    print(f"rep {rep} {name:12} {label:9} rps={rec['rps']:>7.0f} p50={rec['p50_ms']:.2f} "
                          f"p99={rec['p99_ms']:.2f} ok={rec['ok']} err={rec['errors']} to={rec['timeouts']} "
                          f"other_cpu={rec['cpu_other_s']}s", file=sys.stderr)
            finally:
                stop_worker(proc)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="echo,base1,base2")
    ap.add_argument("--concurrency", default="1,8,64", help="closed-loop points (comma list, may be empty)")
    ap.add_argument("--rates", default="", help="open-loop points in requests/s (comma list)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--model", default="digits")
    ap.add_argument("--input", default=str(BENCH / "inputs" / "digits.json"))
    ap.add_argument("--models", default=str(ROOT / "target" / "bench-models"))
    ap.add_argument("--python", default=str(ROOT / "target" / "bench-venv" / "bin" / "python"))
    ap.add_argument("--agent", default=str(ROOT / "target" / "release" / "tether-agent"))
    ap.add_argument("--broker", default="127.0.0.1:18830")
    ap.add_argument("--out", default=str(ROOT / "target" / "bench-results"))
    ap.add_argument("--nice", type=int, default=0,
                    help="priority for the broker, workers and loadgen (e.g. -10 on a box shared with builds)")
    ap.add_argument("--quiet-wait", type=float, default=0, help="max seconds to wait for an idle machine per run")
    ap.add_argument("--max-other", type=float, default=None, help="repeat runs where others used > this many cores")
    ap.add_argument("--tries", type=int, default=3)
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the `finally` that stops the worker

    all_cfgs = configs(a)
    cfgs = {n: all_cfgs[n] for n in a.configs.split(",")}
    loads = [("c", int(c)) for c in a.concurrency.split(",") if c] + [("r", int(r)) for r in a.rates.split(",") if r]
    for b in ("loadgen", "echo_worker"):
        if not (BIN / b).exists():
            sys.exit("build first: bench/setup.sh (or cargo build --release -p loadgen -p agent)")
    broker_pid = int(subprocess.run([str(BENCH / "start_mosquitto.sh")], check=True, capture_output=True,
                                    text=True).stdout.split()[-1])
    broker_nice = os.getpriority(os.PRIO_PROCESS, broker_pid)
    if a.nice:
        for pid in (0, broker_pid):  # 0 = this runner, inherited by every worker and loadgen
            os.setpriority(os.PRIO_PROCESS, pid, a.nice)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    raw = out / f"{stamp}.jsonl"
    log = open(out / f"{stamp}.worker.log", "w")
    print(f"raw results -> {raw}", file=sys.stderr)

    records = []
    try:
        run_all(a, cfgs, loads, broker_pid, raw, log, records)
    finally:
        os.setpriority(os.PRIO_PROCESS, broker_pid, broker_nice)

    versions = subprocess.run([a.python, "-c", "import paho.mqtt, onnxruntime, numpy; print("
                               "f'paho-mqtt {paho.mqtt.__version__}, onnxruntime {onnxruntime.__version__}, "
                               "numpy {numpy.__version__}')"], capture_output=True, text=True).stdout.strip()
    mosq = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True).stdout.splitlines()[0]
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.machine())
    table = summarize(records, cfgs, a)
    md = (f"# {stamp}: {a.model}, {a.reps} reps, medians\n\n"
          f"{os.cpu_count()} x {cpu}; {mosq}; {versions}; loadgen/echo_worker: rumqttc 0.25 (Rust, release).\n"
          f"requests/run {a.requests} (base1-stock 2000) after {a.warmup} warm-up; nice {a.nice}; "
          f"raw: {raw.name}\n\n"
          f"{table}\n\n"
          + "\n".join(f"- {n}: {c['what']}" for n, c in cfgs.items()) + "\n")
    (out / f"{stamp}.md").write_text(md)
    log.close()
    if Path(log.name).stat().st_size == 0:
        Path(log.name).unlink()
    print(md)


if __name__ == "__main__":
    main()
