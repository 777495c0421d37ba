#!/usr/bin/env bash
# MQTT 5.0 against 3.1.1 on tern (1 worker, pinned to CPU 0; load on CPU 1): the same fanout and
# pairs scenarios, alternating versions, REPS times. Writes perf/report/v5.md.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${REPS:-3}
DURATION=${DURATION:-5}
PORT=${PORT:-18832}
OUT=${OUT:-perf/report}
cargo build --release -q -p tern -p tern-loadtest
LT=target/release/tern-loadtest
mkdir -p "$OUT"
RESULTS="$OUT/v5-results.jsonl"
: > "$RESULTS"
for rep in $(seq 1 "$REPS"); do
    for scenario in "fanout --subscribers 100 --qos 0" "pairs --pairs 50 --qos 1"; do
        for mqtt in 3.1.1 5; do
            echo "== run $rep/$REPS: MQTT $mqtt $scenario"
            taskset -c 0 target/release/tern -p "$PORT" --workers 1 2>/dev/null &
            BPID=$!
            for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.05; done
            # shellcheck disable=SC2086
            timeout 120 taskset -c 1 "$LT" run $scenario --mqtt "$mqtt" --port "$PORT" --duration "$DURATION" \
                --broker-pid "$BPID" --label "mqtt-$mqtt" --json "$RESULTS" | grep -E 'delivered|lost' || true
            kill "$BPID"; wait "$BPID" 2>/dev/null || true
        done
    done
done
"$LT" summarize --input "$RESULTS" --out "$OUT/v5-table.md" --first mqtt-5 --second mqtt-3.1.1
{
    echo "# tern: MQTT 5.0 against 3.1.1"
    echo
    echo "Made by \`perf/v5.sh\` (REPS=$REPS, DURATION=$DURATION s) on $(date -u +%Y-%m-%d), tern $(git rev-parse --short HEAD 2>/dev/null || echo '?'),"
    echo "1 worker pinned to CPU 0, load generator on CPU 1, 64-byte payloads. Medians over the runs."
    echo
    cat "$OUT/v5-table.md"
} > "$OUT/v5.md"
rm -f "$OUT/v5-table.md"
echo "report: $OUT/v5.md"
