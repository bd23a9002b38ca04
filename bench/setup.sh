#!/usr/bin/env bash
# One-time setup for the MQTT benchmark (bench/run.sh), on Debian 12 as root or with sudo:
# Mosquitto, a Python venv with what the baseline script needs, the model file the baseline
# serves (the same one Tether serves), and release builds of the agent and the load generator.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${BENCH_VENV:-target/bench-venv}"
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || {
  echo "== installing mosquitto"
  $SUDO apt-get install -y mosquitto mosquitto-clients
}
if [ ! -x "$VENV/bin/python" ]; then
  echo "== python venv for the baseline ($VENV)"
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check 'paho-mqtt==2.2.0' 'onnxruntime==1.32.0' 'numpy==2.4.6'
mkdir -p target/bench-models
cp models/zoo/digits.int8.onnx target/bench-models/digits.onnx
echo "== release builds: tether-agent, loadgen, echo_worker, tether-relay and tether (for tether-observe; several minutes the first time)"
cargo build --release -p agent -p loadgen -p cloud-relay -p tools
echo "ready: bench/run.sh"
