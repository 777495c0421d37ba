#!/usr/bin/env bash
# What monitoring and bridging cost, on this machine. Writes perf/report/monitor/MONITOR.md.
#
# 1. Fan-out 1->100 QoS 0 at saturation, the build before delivery-latency recording (and the
#    drop counters, and the bridge check on delivery) against this tree's, alternated, one worker
#    on CPU 0, load on CPU 1: broker CPU-seconds per million delivered messages.
# 2. 50 pairs QoS 1 at saturation: direct to one tern, and through a bridge (publishers on an
#    edge tern whose bridge forwards lt/# at QoS 1 to a second tern, where the subscribers are).
#    Both brokers on CPU 0, load on CPU 1. Losses beside every figure.
#
#   perf/monitor.sh                      # BEFORE_REV defaults to the commit before the metrics
#   REPS=1 DURATION=2 perf/monitor.sh
set -euo pipefail
cd "$(dirname "$0")/.."

REPS=${REPS:-5}
DURATION=${DURATION:-5}
PORT=${PORT:-18940}
OUT=${OUT:-perf/report/monitor}
BEFORE_REV=${BEFORE_REV:-$(git log --format=%h --grep '^Metrics: a protocol' -1)~1}
# shellcheck source=perf/lib.sh
. perf/lib.sh
prepare_run

OLD="$WORK/old"
git worktree add -q --detach "$OLD" "$BEFORE_REV"
trap 'kill $BPID 2>/dev/null || true; git worktree remove --force "$OLD" 2>/dev/null || true; rm -rf "$WORK"' EXIT
echo "building $BEFORE_REV for comparison"
(cd "$OLD" && CARGO_TARGET_DIR="${BEFORE_TARGET:-/tmp/tern-before-target}" cargo build --release -q -p tern)
BEFORE="${BEFORE_TARGET:-/tmp/tern-before-target}/release/tern"
AFTER=target/release/tern

run() { # run LABEL BIN ARGS...: one load run against BIN on $PORT
    local label=$1 bin=$2
    shift 2
    taskset -c 0 "$bin" -p "$PORT" --workers 1 2>/dev/null &
    BPID=$!
    wait_port "$PORT" "$label"
    local line
    line=$(mktemp -p "$WORK")
    timeout 120 taskset -c 1 "$LT" run "$@" --port "$PORT" --duration "$DURATION" --broker-pid "$BPID" \
        --label "$label" --json "$line" >/dev/null || echo "   ($label failed)"
    stop_broker
    [ -s "$line" ] && jq -c '. + {name: "fanout"}' "$line" >> "$RESULTS"
}

for rep in $(seq 1 "$REPS"); do
    echo "== fan-out run $rep/$REPS"
    run before "$BEFORE" fanout --subscribers 100 --qos 0
    run after "$AFTER" fanout --subscribers 100 --qos 0
done

[ -n "${FANOUT_ONLY:-}" ] && BRIDGE_REPS=0 || BRIDGE_REPS=$REPS
# The bridge: B (the "cloud") on PORT+1, A (the edge) on PORT bridging lt/# to it.
BPORT=$((PORT + 1))
cat > "$WORK/cloud.toml" <<CONF
port = $BPORT
workers = 1
log_level = "warn"
CONF
cat > "$WORK/edge.toml" <<CONF
port = $PORT
workers = 1
log_level = "warn"
[[bridge]]
name = "cloud"
address = "127.0.0.1:$BPORT"
protocol_version = 5
topics = [{ pattern = "lt/#", direction = "out", qos = 1 }]
CONF
for rep in $(seq 1 "$BRIDGE_REPS"); do
    echo "== bridge run $rep/$BRIDGE_REPS"
    # Direct: publishers and subscribers on one tern.
    taskset -c 0 "$AFTER" -c "$WORK/cloud.toml" 2>/dev/null &
    CLOUD=$!
    wait_port "$BPORT" cloud
    line=$(mktemp -p "$WORK")
    timeout 120 taskset -c 1 "$LT" run pairs --pairs 50 --qos 1 --port "$BPORT" --duration "$DURATION" \
        --broker-pid "$CLOUD" --label direct --json "$line" >/dev/null || echo "   (direct failed)"
    [ -s "$line" ] && jq -c '. + {name: "pairs-qos1"}' "$line" >> "$RESULTS"
    # Bridged: publishers on the edge, subscribers on the cloud.
    taskset -c 0 "$AFTER" -c "$WORK/edge.toml" 2>/dev/null &
    BPID=$!
    wait_port "$PORT" edge
    for _ in $(seq 1 100); do
        mosquitto_sub -p "$PORT" -t '$SYS/broker/bridges/cloud/connected' -C 1 -W 2 2>/dev/null | grep -q 1 && break
    done
    line=$(mktemp -p "$WORK")
    timeout 120 taskset -c 1 "$LT" run pairs --pairs 50 --qos 1 --port "$PORT" --sub-port "$BPORT" \
        --duration "$DURATION" --broker-pid "$BPID" --label bridged --json "$line" >/dev/null || echo "   (bridged lost messages or failed)"
    [ -s "$line" ] && jq -c '. + {name: "pairs-qos1"}' "$line" >> "$RESULTS"
    stop_broker
    kill "$CLOUD" 2>/dev/null || true
    wait "$CLOUD" 2>/dev/null || true
done

python3 - "$RESULTS" "$OUT/MONITOR.md" "$REPS" "$DURATION" "$BEFORE_REV" <<'PY'
import json, statistics, sys, subprocess, datetime
results, out, reps, duration, before = sys.argv[1:6]
rows = {}
for line in open(results):
    r = json.loads(line)
    rows.setdefault((r["name"], r["label"]), []).append(r)
med = lambda xs: statistics.median(xs) if xs else float("nan")
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
o = open(out, "w")
o.write("# Monitoring and bridging: what they cost\n\n")
o.write(f"`perf/monitor.sh` (REPS={reps}, DURATION={duration}) on {datetime.date.today()}, commit {commit}; before = {before}. ")
o.write("Broker(s) on CPU 0, load on CPU 1, 1 worker each, 64 B. Medians of alternating runs.\n\n")
o.write("## Fan-out 1->100 QoS 0: delivery latency recording off (before) and on (after)\n\n")
o.write("| build | delivered msg/s | broker CPU-s per M delivered | runs (CPU-s per M) |\n|---|---:|---:|---|\n")
b = med([r["cpu_s_per_million"] for r in rows.get(("fanout", "before"), [])])
for label in ["before", "after"]:
    rs = rows.get(("fanout", label), [])
    o.write(f"| {label} | {med([r['throughput'] for r in rs]):,.0f} | {med([r['cpu_s_per_million'] for r in rs]):.4f} | "
            + ", ".join(f"{r['cpu_s_per_million']:.4f}" for r in rs) + " |\n")
a = med([r["cpu_s_per_million"] for r in rows.get(("fanout", "after"), [])])
o.write(f"\nafter / before, CPU per delivered message: **{a / b:.3f}**\n\n")
o.write("## 50 pairs QoS 1: direct, and through a bridge (edge tern -> cloud tern)\n\n")
o.write("| path | delivered msg/s | vs direct | lost (all runs) | p50 µs | p99 µs | runs |\n|---|---:|---:|---:|---:|---:|---|\n")
d = med([r["throughput"] for r in rows.get(("pairs-qos1", "direct"), []) if r["lost"] == 0])
for label in ["direct", "bridged"]:
    rs = rows.get(("pairs-qos1", label), [])
    ok = [r for r in rs if r["lost"] == 0]
    t = med([r["throughput"] for r in ok])
    o.write(f"| {label} | {t:,.0f} | {t / d:.2f} | {sum(r['lost'] for r in rs)} | {med([r['p50_us'] for r in ok]):.0f} | "
            f"{med([r['p99_us'] for r in ok]):.0f} | " + ", ".join(f"{r['throughput'] / 1000:.0f}k" for r in rs) + " |\n")
o.write("\nThe bridged path carries every message over one connection whose window is the cloud's receive maximum "
        "(tern's `max_inflight_messages`, 32), with both brokers sharing CPU 0.\n")
PY
cat "$OUT/MONITOR.md"
