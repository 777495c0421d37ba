#!/usr/bin/env bash
# The Open MQTT Benchmark Suite's use cases (EMQ, 2023) at one edge box's size, tern and
# mosquitto side by side, each started from the same mosquitto.conf (tern reads mosquitto's
# format). Broker pinned to CPU 0 (tern with 1 worker), load generator to CPU 1, loopback only,
# every run bounded. Writes perf/report/suite/{results.jsonl,SUITE.md}.
#
#   perf/suite.sh                    # 3 runs of each publishing case (30 s each), 1 of conn
#   REPS=5 DURATION=60 perf/suite.sh
#   ONLY=p2p-1K-1K-1K-1K perf/suite.sh
#   REPORT_ONLY=1 perf/suite.sh      # redo SUITE.md from the last results.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."

REPS=${REPS:-3}
CONN_REPS=${CONN_REPS:-1}   # conn-tcp-10k-100 takes 100 s per broker
DURATION=${DURATION:-30}
PORT=${PORT:-18830}
OUT=${OUT:-perf/report/suite}
BROKER_CPU=${BROKER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
TERN=${TERN:-target/release/tern}

if ! command -v mosquitto >/dev/null 2>&1; then
    echo "installing mosquitto from Debian"
    apt-get update -qq && apt-get install -y -qq mosquitto >/dev/null
fi
# shellcheck source=perf/lib.sh
. perf/lib.sh
prepare_run
write_mosquitto_conf

CASES=(p2p-1K-1K-1K-1K fanout-1-1k-1-1K sharedsub-1K-5-1K-1K conn-tcp-10k-100)

start() {
    local pin=(taskset -c "$BROKER_CPU")
    case "$1" in
        # The same file for both: tern reads mosquitto.conf (one worker, as mosquitto has one thread).
        tern) "${pin[@]}" "$TERN" -c "$WORK/mosquitto.conf" --workers 1 2>/dev/null & ;;
        mosquitto) "${pin[@]}" mosquitto -c "$WORK/mosquitto.conf" 2>/dev/null & ;;
    esac
    BPID=$!
    wait_port "$PORT" "$1"
}

if [ -z "${REPORT_ONLY:-}" ]; then
    for case in "${CASES[@]}"; do
        [ -z "${ONLY:-}" ] || [ "$case" = "$ONLY" ] || continue
        reps=$REPS
        [ "$case" = conn-tcp-10k-100 ] && reps=$CONN_REPS
        for rep in $(seq 1 "$reps"); do
            for broker in tern mosquitto; do
                echo "== $case run $rep/$reps: $broker"
                start "$broker"
                timeout 400 taskset -c "$LOAD_CPU" "$LT" suite "$case" --port "$PORT" --duration "$DURATION" \
                    --broker-pid "$BPID" --label "$broker" --json "$RESULTS" | grep -v '^{' \
                    || echo "   (run failed: $broker $case)"
                stop_broker
            done
        done
    done
fi

"$LT" summarize --input "$RESULTS" --out "$WORK/table.md"
{
    echo "# Open MQTT Benchmark Suite use cases: tern and mosquitto"
    echo
    echo "Made by \`perf/suite.sh\` (REPS=$REPS, CONN_REPS=$CONN_REPS, DURATION=$DURATION s) on $(date -u +%Y-%m-%d):"
    echo "$(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), tern $(git rev-parse --short HEAD 2>/dev/null || echo '?'),"
    echo "$(mosquitto -h 2>/dev/null | head -1). Both brokers start from the same mosquitto.conf"
    echo "(\`listener $PORT 127.0.0.1\`, \`max_inflight_messages 20\`, \`max_queued_messages 1000\`, persistence off),"
    echo "pinned to CPU $BROKER_CPU (tern with \`--workers 1\`); the load generator is pinned to CPU $LOAD_CPU."
    echo "Figures are medians over the runs; the ratio column is tern / mosquitto."
    echo
    echo "The use cases are the suite's (github.com/emqx/mqttbs), scaled from a 1M-client cluster"
    echo "to one edge box and named the suite's way (publishers-subscribers-topics-delivered rate):"
    echo "QoS 1, 16-byte payloads, MQTT 3.1.1 (sharedsub: 5.0), keep alive 300, clean sessions."
    echo
    echo "- \`p2p-1K-1K-1K-1K\`: 1,000 publishers, each 1 msg/s on its own topic, to 1,000 subscribers."
    echo "- \`fanout-1-1k-1-1K\`: 1 publisher at 1 msg/s to 1,000 subscribers of its topic (1,000 deliveries/s;"
    echo "  the latency of a message includes its wait behind the other 999 copies)."
    echo "- \`sharedsub-1K-5-1K-1K\`: 1,000 publishers on test/1 ... test/1000, each 1 msg/s, to 5 subscribers"
    echo "  sharing \`\$share/perf/test/#\`."
    echo "- \`conn-tcp-10k-100\`: 10,000 connections opened at 100 per second and held; latency is CONNECT to CONNACK."
    echo
    echo "Publishers run at their own phase, spread over the second as independent devices would be, and"
    echo "latency counts from when each message was due. A QoS 1 run that loses or duplicates a message"
    echo "fails (the load generator exits non-zero and the run is reported as failed)."
    echo
    cat "$WORK/table.md"
} > "$OUT/SUITE.md"
echo "report: $OUT/SUITE.md"
