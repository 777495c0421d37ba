#!/usr/bin/env bash
# Where the kernel runs each worker thread during one load run: tern unpinned on the CPUs in
# BROKER_CPUS (default 0,1), the load generator on LOAD_CPU (default 1). While the load runs it
# samples, every 40 ms, the CPU each thread last ran on (`/proc/PID/task/*/stat`, field 39), then
# prints per worker thread its CPU time and how many samples found it on each CPU, and the run's
# broker CPU-seconds per million delivered. Loopback only; bounded in time.
#
#   perf/threads.sh                                    # fan-in 4->1 QoS 0, 2 workers
#   WORKERS=4 perf/threads.sh pairs --pairs 50 --qos 0
set -euo pipefail
cd "$(dirname "$0")/.."

WORKERS=${WORKERS:-2}
SEED=${SEED:-1}
PORT=${PORT:-18837}
BROKER_CPUS=${BROKER_CPUS:-0,1}
LOAD_CPU=${LOAD_CPU:-1}
DURATION=${DURATION:-3}
TERN=${TERN:-target/release/tern}
[ $# -gt 0 ] || set -- fanin --publishers 4 --qos 0

cargo build --release -q -p tern -p tern-loadtest
WORK=$(mktemp -d)
BPID=
trap 'kill $BPID 2>/dev/null || true; rm -rf "$WORK"' EXIT
printf 'port = %s\nworkers = %s\npin_workers = false\nplacement_seed = %s\nlog_level = "warn"\n' \
    "$PORT" "$WORKERS" "$SEED" > "$WORK/tern.toml"
taskset -c "$BROKER_CPUS" "$TERN" -c "$WORK/tern.toml" 2>/dev/null &
BPID=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.05; done

taskset -c "$LOAD_CPU" target/release/tern-loadtest run "$@" --id-prefix "run$SEED" --port "$PORT" \
    --duration "$DURATION" --drain 1 --broker-pid "$BPID" --json "$WORK/run.json" >/dev/null 2>&1 &
LOAD=$!
sleep 0.8
end=$((SECONDS + DURATION - 1))
: > "$WORK/samples"
while [ $SECONDS -lt $end ]; do
    for t in /proc/$BPID/task/*; do
        name=$(cat "$t/comm" 2>/dev/null) || continue
        case "$name" in tern-worker-*) echo "$name $(awk '{print $39}' "$t/stat")" >> "$WORK/samples" ;; esac
    done
    sleep 0.04
done
for t in /proc/$BPID/task/*; do
    name=$(cat "$t/comm")
    case "$name" in tern-worker-*) echo "$name $(awk '{print $14 + $15}' "$t/stat")" >> "$WORK/ticks" ;; esac
done
wait $LOAD
awk 'FNR == NR { ticks[$1] = $2; next } { n[$1]++; on[$1 " " $2]++; cpus[$2] = 1 }
     END {
         for (w in n) {
             line = sprintf("%s: %s ticks of CPU time; samples on CPU", w, ticks[w])
             for (c in cpus) line = line sprintf(" %s: %d/%d", c, on[w " " c], n[w])
             print line
         }
     }' "$WORK/ticks" "$WORK/samples" | sort
echo "broker CPU-s per million delivered: $(jq -r .cpu_s_per_million "$WORK/run.json")"
