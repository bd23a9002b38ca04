#!/usr/bin/env bash
# The MQTT benchmark: Tether, the Python baseline and the broker's floor (echo), in one run with
# interleaved reps, through a private Mosquitto on 127.0.0.1:18830. Run bench/setup.sh once first.
#   bench/run.sh                         # the README's table: 3 reps x 20,000 requests (~15 min)
#   bench/run.sh --reps 1 --requests 5000 --configs echo,tether    # anything run_matrix.py takes
# Results: target/bench-results/<stamp>.md (table) and .jsonl (every run).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${BENCH_VENV:-target/bench-venv}"
[ -x "$VENV/bin/python" ] && [ -x target/release/loadgen ] || { echo "run bench/setup.sh first" >&2; exit 2; }
exec python3 bench/run_matrix.py --python "$VENV/bin/python" --models target/bench-models \
  --configs echo,base1,tether --concurrency 1,8,64 --rates 1000 --reps 3 "$@"
