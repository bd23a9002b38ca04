#!/usr/bin/env python3
"""The agent's footprint, printed as one table: binary sizes, idle RSS, peak RSS under a fixed
load, RSS a while after the load, and cold start to the first answer.

    python3 bench/footprint.py [--agent target/release/tether-agent] [--loadgen target/release/loadgen]
                               [--requests 5000] [--concurrency 16] [--after 60]

Each measurement starts a fresh agent with a fresh database and the result cache off (every
request runs the model), connected to a Mosquitto broker started for the run on a free port
(what a device runs; the device build has no embedded broker). Memory is read from
/proc/PID/status: VmRSS (anonymous + file-backed), RssAnon, VmHWM (the peak).

Rows:
  idle            5 s after start, models verified but not built (the default)
  idle, preloaded 5 s after start with every zoo model built (inference.preload)
  peak            the peak after --requests digits requests at --concurrency in flight
  after load      RSS --after seconds after that load ended
  cold start      from exec to the first answer received by a requester

Needs: mosquitto, and the agent and loadgen built (`cargo build --release -p agent -p loadgen`).
Numbers from a shared machine are noisy; CI runs this as a report, with no thresholds.
"""
import argparse, os, platform, shutil, socket, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INPUT = ROOT / "bench" / "inputs" / "digits.json"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def status(pid):
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024  # MiB
    return out


def mib(x):
    return f"{x:.1f} MiB"


class Agent:
    def __init__(self, a, port, preload=False):
        self.dir = tempfile.mkdtemp(prefix="tether-footprint-")
        conf = ['device_id = "fp1"', "[mqtt]", f'broker = "mqtt://127.0.0.1:{port}"',
                "[store]", f'path = "{self.dir}/tether.db"', "[store.cache]", "enabled = false"]
        if preload:
            conf += ["[inference]", 'preload = ["digits", "ocr_det", "vad", "vibration"]']
        Path(self.dir, "agent.toml").write_text("\n".join(conf) + "\n")
        self.log = open(Path(self.dir, "agent.log"), "w")
        self.started = time.monotonic()
        self.proc = subprocess.Popen([a.agent, "--models", str(ROOT / "models" / "zoo"), "run", "--config",
                                      f"{self.dir}/agent.toml"], stdout=self.log, stderr=self.log,
                                     env=dict(os.environ, RUST_LOG="warn"))

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def loadgen(a, port, requests, concurrency, timeout_ms=5000):
    return subprocess.run([a.loadgen, "--broker", f"127.0.0.1:{port}", "--topic-prefix", "tether/fp1",
                           "--model", "digits", "--input", str(INPUT), "--concurrency", str(concurrency),
                           "--requests", str(requests), "--warmup", "0", "--timeout-ms", str(timeout_ms)],
                          capture_output=True, text=True)


def first_answer(a, port, agent):
    """Seconds from exec to the first answer, asking every few milliseconds (a request sent
    before the agent subscribed is lost, so each attempt waits only briefly)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if agent.proc.poll() is not None:
            sys.exit(f"the agent exited with {agent.proc.returncode}; its log: {agent.dir}/agent.log")
        if loadgen(a, port, 1, 1, timeout_ms=100).returncode == 0:
            return time.monotonic() - agent.started
        time.sleep(0.005)
    sys.exit("no answer within 60 s")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agent", default=str(ROOT / "target" / "release" / "tether-agent"))
    ap.add_argument("--loadgen", default=str(ROOT / "target" / "release" / "loadgen"))
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--after", type=float, default=60, help="seconds to wait after the load")
    ap.add_argument("--idle", type=float, default=5, help="seconds after start for the idle figure")
    a = ap.parse_args()
    for path, what in ((a.agent, "the agent"), (a.loadgen, "loadgen")):
        if not os.access(path, os.X_OK):
            sys.exit(f"{path} is missing: build {what} first (cargo build --release -p agent -p loadgen)")
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.access(mosquitto, os.X_OK):
        sys.exit("mosquitto is missing: apt-get install mosquitto")

    rows = []
    print("binary sizes", flush=True)
    for target in ("release", "aarch64-unknown-linux-gnu/release", "armv7-unknown-linux-gnueabihf/release"):
        for name in ("tether-agent", "tether-relay"):
            p = ROOT / "target" / target / name
            if p.exists():
                arch = "x86_64" if target == "release" else target.split("-")[0]
                rows.append((f"`{name}` {arch} ({p.relative_to(ROOT)})", f"{p.stat().st_size / 1e6:.1f} MB"))
    if a.agent not in [str(ROOT / "target" / t / "tether-agent") for t in ("release",)]:
        rows.append((f"`tether-agent` measured below ({a.agent})", f"{Path(a.agent).stat().st_size / 1e6:.1f} MB"))

    port = free_port()
    scratch = tempfile.mkdtemp(prefix="tether-footprint-broker-")
    Path(scratch, "mosquitto.conf").write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_inflight_messages 0\n")
    broker = subprocess.Popen([mosquitto, "-c", f"{scratch}/mosquitto.conf"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        print(f"idle ({a.idle:.0f} s after start), models built on first use", flush=True)
        agent = Agent(a, port)
        time.sleep(a.idle)
        s = status(agent.proc.pid)
        rows.append((f"idle RSS, {a.idle:.0f} s after start", f"{mib(s['VmRSS'])} ({mib(s['RssAnon'])} anonymous + {mib(s['RssFile'])} file-backed)"))
        agent.stop()

        print("idle, every zoo model preloaded", flush=True)
        agent = Agent(a, port, preload=True)
        time.sleep(a.idle)
        s = status(agent.proc.pid)
        rows.append((f"idle RSS, every zoo model preloaded", f"{mib(s['VmRSS'])} ({mib(s['RssAnon'])} anonymous + {mib(s['RssFile'])} file-backed)"))
        agent.stop()

        print("cold start, then the load", flush=True)
        agent = Agent(a, port)
        cold = first_answer(a, port, agent)
        rows.append(("cold start to the first answer (digits)", f"{cold:.2f} s"))
        out = loadgen(a, port, a.requests, a.concurrency)
        if out.returncode != 0:
            sys.exit(f"loadgen failed ({out.returncode}): {out.stdout}{out.stderr}")
        s = status(agent.proc.pid)
        rows.append((f"peak RSS after {a.requests} digits requests at {a.concurrency} in flight",
                     f"{mib(s['VmHWM'])} (now {mib(s['VmRSS'])}, {mib(s['RssAnon'])} anonymous)"))
        print(f"waiting {a.after:.0f} s after the load", flush=True)
        time.sleep(a.after)
        s = status(agent.proc.pid)
        rows.append((f"RSS {a.after:.0f} s after the load", f"{mib(s['VmRSS'])} ({mib(s['RssAnon'])} anonymous)"))
        agent.stop()
    finally:
        broker.terminate()
        broker.wait()
        shutil.rmtree(scratch, ignore_errors=True)

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    version = subprocess.run([a.agent, "--version"], capture_output=True, text=True).stdout.strip()
    print(f"\n{platform.machine()}, {os.cpu_count()} x {cpu}; {version}; {a.agent}\n")
    print("| measure | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
