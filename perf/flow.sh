#!/usr/bin/env bash
# QoS 1/2 publishers faster than their subscribers, tern beside mosquitto: publisher windows
# larger than the subscriber's, load as fast as each broker takes it. A run that lost a message
# the broker acknowledged is a failed run, whatever its rate. Broker pinned to CPU 0, load to
# CPU 1, loopback only, bounded in time. Writes perf/report/flow/{results.jsonl,FLOW.md}.
#
#   perf/flow.sh                 # 3 repetitions, 5 s per run
#   REPS=1 DURATION=3 perf/flow.sh
set -euo pipefail
cd "$(dirname "$0")/.."

REPS=${REPS:-3}
DURATION=${DURATION:-5}
PORT=${PORT:-18832}
OUT=${OUT:-perf/report/flow}
BROKER_CPU=${BROKER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
WORKERS=${WORKERS:-1}
TERN=${TERN:-target/release/tern}

if ! command -v mosquitto >/dev/null 2>&1; then
    echo "installing mosquitto from Debian"
    apt-get update -qq && apt-get install -y -qq mosquitto >/dev/null
fi
# shellcheck source=perf/lib.sh
. perf/lib.sh
prepare_run

write_mosquitto_conf

SCENARIOS=(
    "fanin-qos1-w16|fanin --publishers 4 --qos 1 --window 16"
    "pairs-qos1-w100|pairs --pairs 50 --qos 1 --window 100"
    "fanin-qos2-w16|fanin --publishers 4 --qos 2 --window 16"
)

for rep in $(seq 1 "$REPS"); do
    for entry in "${SCENARIOS[@]}"; do
        IFS='|' read -r name args <<<"$entry"
        for broker in tern mosquitto; do
            echo "== run $rep/$REPS: $broker $name"
            start_broker "$broker"
            line=$(mktemp -p "$WORK")
            # shellcheck disable=SC2086
            timeout 120 taskset -c "$LOAD_CPU" "$LT" run $args --port "$PORT" --duration "$DURATION" \
                --broker-pid "$BPID" --label "$broker" --json "$line" >/dev/null || echo "   ($broker lost messages or failed)"
            stop_broker
            [ -s "$line" ] && jq -c --arg name "$name" '. + {name: $name}' "$line" >> "$RESULTS"
        done
    done
done

python3 - "$RESULTS" "$OUT/FLOW.md" "$REPS" "$DURATION" <<'PY'
import json, statistics, sys, subprocess, datetime
results, out, reps, duration = sys.argv[1:5]
rows = {}
for line in open(results):
    r = json.loads(line)
    rows.setdefault((r["name"], r["label"]), []).append(r)
med = lambda xs: statistics.median(xs) if xs else float("nan")
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
lines = ["# QoS 1/2 publishers faster than their subscribers", "",
         f"Made by `perf/flow.sh` (REPS={reps}, DURATION={duration} s) on {datetime.date.today()}, tern {commit}, "
         "broker on CPU 0 (tern with 1 worker), load on CPU 1, 64-byte payloads, both brokers with "
         "max_inflight_messages 20 and max_queued_messages 1000. Medians over the runs; `lost` counts "
         "messages the broker acknowledged (PUBACK/PUBREC) that no subscriber received; the worst run is "
         "beside it.", "",
         "| scenario | broker | sent (acknowledged) | delivered/s | lost (median / worst) | p50 ms | p99 ms |",
         "|---|---|---:|---:|---:|---:|---:|"]
for key in sorted(rows):
    rs = rows[key]
    lines.append(f"| {key[0]} | {key[1]} | {med([r['sent'] for r in rs]):,.0f} | {med([r['throughput'] for r in rs]):,.0f} "
                 f"| {med([r['lost'] for r in rs]):,.0f} / {max(r['lost'] for r in rs):,} "
                 f"| {med([r['p50_us'] for r in rs])/1000:.2f} | {med([r['p99_us'] for r in rs])/1000:.2f} |")
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
echo "report: $OUT/FLOW.md"
