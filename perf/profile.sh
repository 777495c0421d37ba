#!/usr/bin/env bash
# Profiles tern under one load scenario with `perf record -e cpu-clock -g` (a software event, so it
# works where hardware counters do not) and renders a flamegraph with inferno.
#
#   perf/profile.sh fanout            # any tern-loadtest scenario, extra flags after it
#   perf/profile.sh pairs --qos 1
#   WORKERS=2 BROKER_CPU= perf/profile.sh fanin --publishers 4   # 2 workers, unpinned
set -euo pipefail
cd "$(dirname "$0")/.."
SCENARIO=${1:?usage: perf/profile.sh SCENARIO [tern-loadtest flags]}
shift
PORT=${PORT:-18831}
DURATION=${DURATION:-5}
OUT=${OUT:-perf/out}

if ! command -v perf >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq linux-perf >/dev/null
fi
if ! command -v inferno-flamegraph >/dev/null 2>&1; then
    cargo install -q inferno
fi
cargo build --release -q -p tern -p tern-loadtest
mkdir -p "$OUT"
BROKER_CPU=${BROKER_CPU-0}   # empty: unpinned
pin=()
[ -n "$BROKER_CPU" ] && pin=(taskset -c "$BROKER_CPU")
"${pin[@]}" target/release/tern -p "$PORT" --workers "${WORKERS:-1}" 2>/dev/null &
BPID=$!
trap 'kill $BPID 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.05; done

perf record -e cpu-clock -F 999 -g --call-graph dwarf,16384 -p "$BPID" -o "$OUT/perf.data" -- sleep $((DURATION + 2)) 2>/dev/null &
PERF=$!
sleep 0.5
taskset -c 1 target/release/tern-loadtest run "$SCENARIO" --port "$PORT" --duration "$DURATION" --label tern "$@" | grep -v '^{' || true
wait $PERF || true
perf report -i "$OUT/perf.data" --no-children --percent-limit 1.5 --stdio 2>/dev/null | grep -E '^ +[0-9]' > "$OUT/$SCENARIO.top.txt" || true
perf script -i "$OUT/perf.data" 2>/dev/null | inferno-collapse-perf > "$OUT/$SCENARIO.folded"
inferno-flamegraph --title "tern: $SCENARIO" < "$OUT/$SCENARIO.folded" > "$OUT/$SCENARIO.svg"
echo "top functions: $OUT/$SCENARIO.top.txt"
echo "flamegraph:    $OUT/$SCENARIO.svg"
