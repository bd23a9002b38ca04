#!/usr/bin/env bash
# Smoke-tests the ARM binaries of TARGET under qemu-user: `tether-agent models --check`,
# `tether-agent infer` on every zoo model compared with its golden response, and one MQTT round
# trip through a Mosquitto broker on this host (the device build has no embedded broker; the
# request is sent with Mosquitto's clients: mosquitto and mosquitto-clients, which CI installs).
#   cross/smoke.sh aarch64-unknown-linux-gnu
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:?usage: cross/smoke.sh TARGET}
. cross/env.sh "$target"
bin="target/$target/release/tether-agent"
if [ ! -x "$bin" ]; then
  echo "$bin is missing: run cross/build.sh $target first" >&2
  exit 1
fi
# qemu's /proc/cpuinfo lacks the lines tract reads for CPU features: it warns, harmlessly.
export RUST_LOG=${RUST_LOG:-error}
run() { $QEMU "$bin" --models models/zoo "$@"; }

echo "== tether-agent models --check ($target, under qemu)"
run models --check

echo "== tether-agent infer against the goldens"
for model in $(awk '/^\[\[model\]\]/ { m = 1; next } m && /^name = / { gsub(/"/, "", $3); print $3; m = 0 }' models/zoo/MANIFEST.toml); do
  run infer --model "$model" --example --golden
done

echo "== the device build has no embedded broker, and says so with exit code 78"
set +e
msg=$($QEMU "$bin" --models models/zoo run --embedded-broker 127.0.0.1:0 --db "$(mktemp -u)" 2>&1)
code=$?
set -e
if [ "$code" != 78 ] || ! grep -q "built without the embedded broker" <<<"$msg"; then
  echo "expected exit 78 naming the missing embedded broker; got $code: $msg" >&2
  exit 1
fi

echo "== one MQTT round trip through Mosquitto"
for tool in mosquitto mosquitto_pub mosquitto_sub; do
  command -v $tool >/dev/null || { echo "$tool is missing: apt-get install mosquitto mosquitto-clients" >&2; exit 1; }
done
scratch=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$port" >"$scratch/mosquitto.conf"
mosquitto -c "$scratch/mosquitto.conf" >"$scratch/mosquitto.log" 2>&1 &
broker=$!
sleep 0.5
RUST_LOG=warn $QEMU "$bin" --models models/zoo run --broker "mqtt://127.0.0.1:$port" \
  --device-id smoke --db "$scratch/tether.db" 2>"$scratch/agent.log" &
agent=$!  # the qemu process itself: its /proc entry is the emulated agent
trap 'kill $agent $broker 2>/dev/null || true; rm -rf "$scratch"' EXIT
reply=""
for i in $(seq 1 60); do
  mosquitto_sub -V 5 -h 127.0.0.1 -p "$port" -t "smoke/replies/$i" -C 1 -W 5 >"$scratch/reply" 2>/dev/null &
  sub=$!
  sleep 0.3
  mosquitto_pub -V 5 -h 127.0.0.1 -p "$port" -q 1 -t tether/smoke/infer/digits \
    -D publish response-topic "smoke/replies/$i" -D publish correlation-data "smoke-$i" \
    -f models/zoo/golden/digits.request.json 2>/dev/null || true
  wait $sub 2>/dev/null || true
  reply=$(cat "$scratch/reply")
  if [ -n "$reply" ]; then
    break
  fi
  sleep 1
done
if ! echo "$reply" | grep -q '"route":"local"'; then
  echo "no reply from the agent under qemu; its log:" >&2
  cat "$scratch/agent.log" >&2
  exit 1
fi
echo "$reply" | head -c 300; echo
echo "== RSS of the agent after one digits request (qemu process)"
grep -E 'VmRSS|VmHWM' "/proc/$agent/status" || true
kill -TERM $agent
wait $agent || true
echo "cross/smoke.sh: $target passed"
