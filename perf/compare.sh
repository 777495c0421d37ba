#!/usr/bin/env bash
# Side by side: tern (1 worker) and mosquitto on the same machine, in the same run.
# Each broker is pinned to CPU 0 with taskset, the load generator to CPU 1; loopback only; every
# run is bounded in time. Writes perf/report/{results.jsonl,REPORT.md,throughput.svg,latency.svg}.
#
#   perf/compare.sh                 # 3 repetitions, 5 s per run
#   REPS=5 DURATION=10 perf/compare.sh
#   REPORT_ONLY=1 perf/compare.sh   # redo REPORT.md and the charts from the last results.jsonl
#   ONLY=latency REPS=7 OUT=perf/report/latency perf/compare.sh   # one scenario, more runs
set -euo pipefail
cd "$(dirname "$0")/.."

REPS=${REPS:-3}
DURATION=${DURATION:-5}
PORT=${PORT:-18830}
CONNS=${CONNS:-15000}     # open files are capped per process: keep below the broker's limit
OUT=${OUT:-perf/report}
BROKER_CPU=${BROKER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
TERN=${TERN:-target/release/tern}   # another build, for before/after: TERN=/path/to/tern OUT=... perf/compare.sh

if ! command -v mosquitto >/dev/null 2>&1; then
    echo "installing mosquitto from Debian"
    apt-get update -qq && apt-get install -y -qq mosquitto >/dev/null
fi
# shellcheck source=perf/lib.sh
. perf/lib.sh
prepare_run

write_mosquitto_conf

SCENARIOS=(
    "fanout --subscribers 100 --qos 0"
    "fanin --publishers 4 --qos 0"
    "pairs --pairs 50 --qos 1"
    "latency --qos 1 --rate 20000"
    "conns --connections $CONNS --procs 2"
)

for rep in $( [ -n "${REPORT_ONLY:-}" ] || seq 1 "$REPS"); do
    for scenario in "${SCENARIOS[@]}"; do
        [ -z "${ONLY:-}" ] || [ "${scenario%% *}" = "$ONLY" ] || continue
        for broker in tern mosquitto; do
            echo "== run $rep/$REPS: $broker $scenario"
            start_broker "$broker"
            # shellcheck disable=SC2086
            timeout 120 taskset -c "$LOAD_CPU" "$LT" run $scenario --port "$PORT" --duration "$DURATION" \
                --broker-pid "$BPID" --label "$broker" --json "$RESULTS" | grep -v '^{' || echo "   (run failed: $broker $scenario)"
            stop_broker
        done
    done
done

"$LT" summarize --input "$RESULTS" --out "$WORK/table.md"
"$LT" plot --input "$RESULTS" --out-dir "$OUT"
{
    echo "# tern vs mosquitto"
    echo
    echo "Made by \`perf/compare.sh\` (REPS=$REPS, DURATION=$DURATION s) on $(date -u +%Y-%m-%d):"
    echo "$(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), tern $(git rev-parse --short HEAD 2>/dev/null || echo '?'),"
    echo "$(mosquitto -h 2>/dev/null | head -1). Broker pinned to CPU $BROKER_CPU (tern with 1 worker),"
    echo "load generator pinned to CPU $LOAD_CPU, 64-byte payloads, MQTT 3.1.1. Figures are medians over the runs."
    echo
    echo "fanout, fanin and pairs offer load as fast as the broker reads it. At QoS 0 a broker past"
    echo "its capacity must drop or buffer: tern drops what exceeds a subscriber's output bound"
    echo '(counted in `$SYS/broker/publish/messages/dropped`), which is the "lost" row. pairs runs at'
    echo "QoS 1 with a window of 16 per publisher: nothing may be lost there. latency offers a fixed"
    echo "20,000 msg/s and measures from when each message was due. conns holds $CONNS idle"
    echo "connections from two load processes (open files are capped at 20,000 per process here)."
    echo
    cat "$WORK/table.md"
    echo
    echo "![throughput](throughput.svg)"
    echo
    echo "![latency](latency.svg)"
} > "$OUT/REPORT.md"
echo "report: $OUT/REPORT.md"
