#!/usr/bin/env bash
# What persistence costs: 50 pairs QoS 1 with persistent-session subscribers (so every message is
# queued for a session the store keeps), tern with persistence off, periodic and durable beside
# mosquitto with persistence false and true. Then recovery: 1,000,000 QoS 1 messages queued for
# one offline persistent subscriber, the broker killed with SIGKILL, restarted on the same store:
# the time to recover, the store's bytes per queued message, and the time for the subscriber to
# get them all back. Broker pinned to CPU 0, load to CPU 1, loopback only, bounded in time.
# A run that lost an acknowledged message is reported as failed. The store lives under $STORE_DIR
# (default: a directory under /var/tmp, a real disk; /tmp may be a tmpfs where fsync is free).
#
#   perf/persist.sh                     # 3 repetitions, 5 s per run
#   REPS=1 DURATION=3 QUEUED=100000 perf/persist.sh
set -euo pipefail
cd "$(dirname "$0")/.."

REPS=${REPS:-3}
DURATION=${DURATION:-5}
QUEUED=${QUEUED:-1000000}
PORT=${PORT:-18834}
OUT=${OUT:-perf/report/persist}
BROKER_CPU=${BROKER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
TERN=${TERN:-target/release/tern}

for tool in mosquitto mosquitto_sub; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "installing mosquitto and mosquitto-clients from Debian"
        apt-get update -qq && apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
    fi
done
# shellcheck source=perf/lib.sh
. perf/lib.sh
prepare_run
[ -z "${KEEP:-}" ] || echo "scratch: $WORK"
STORE=$(mktemp -d -p "${STORE_DIR:-/var/tmp}" tern-persist.XXXXXX)
trap 'kill $BPID 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$WORK" "$STORE"' EXIT

# tern_conf MODE [QUEUE [extra lines]]: the perf scripts' usual bounds, with MODE's persistence.
tern_conf() {
    local mode=$1 queue=${2:-1000}
    shift $(($# > 1 ? 2 : 1))
    {
        printf 'port = %s\nworkers = 1\nmax_inflight_messages = 20\nmax_queued_messages = %s\nlog_level = "info"\n' "$PORT" "$queue"
        printf 'persistence = "%s"\n' "$mode"
        [ "$mode" = off ] || printf 'persistence_location = "%s"\n' "$STORE"
        for line in "$@"; do echo "$line"; done
    } > "$WORK/tern-$mode.toml"
}

mosquitto_conf() {
    cat > "$WORK/mosquitto-$1.conf" <<CONF
listener $PORT 127.0.0.1
allow_anonymous true
max_inflight_messages 20
max_queued_messages 1000
set_tcp_nodelay true
log_dest none
persistence $1
persistence_location $STORE/
CONF
}

for m in off periodic durable; do tern_conf "$m"; done
mosquitto_conf false
mosquitto_conf true

start() { # start LABEL
    rm -rf "${STORE:?}"/*
    local pin=(taskset -c "$BROKER_CPU")
    case "$1" in
        tern-*) "${pin[@]}" "$TERN" -c "$WORK/$1.toml" 2>>"$WORK/broker.log" & ;;
        mosquitto-*) "${pin[@]}" mosquitto -c "$WORK/$1.conf" 2>/dev/null & ;;
    esac
    BPID=$!
    wait_port "$PORT" "$1"
}

for rep in $(seq 1 "$REPS"); do
    for label in tern-off tern-periodic tern-durable mosquitto-false mosquitto-true; do
        echo "== run $rep/$REPS: $label"
        start "$label"
        line=$(mktemp -p "$WORK")
        timeout 120 taskset -c "$LOAD_CPU" "$LT" run pairs --pairs 50 --qos 1 --persistent --port "$PORT" \
            --duration "$DURATION" --broker-pid "$BPID" --label "$label" --json "$line" >/dev/null \
            || echo "   ($label lost messages or failed)"
        stop_broker
        [ -s "$line" ] && jq -c '. + {name: "pairs-qos1-persistent"}' "$line" >> "$RESULTS"
    done
done

# Recovery of QUEUED messages for one offline subscriber.
RECOVERY="$OUT/recovery.txt"
: > "$RECOVERY"
for mode in durable periodic; do
    tern_conf "$mode" "$QUEUED" "max_queued_bytes = 0"
    : > "$WORK/broker.log"
    start "tern-$mode"
    mosquitto_sub -p "$PORT" -c -i fill-sub -q 1 -t 'lt/#' -E
    per=$((QUEUED / 4))
    timeout 600 taskset -c "$LOAD_CPU" "$LT" run fanin --publishers 4 --qos 1 --count "$per" --duration 600 \
        --port "$PORT" --label "fill-$mode" >/dev/null
    if [ "$mode" = periodic ]; then
        sleep 3 # periodic promises only what the last sync wrote
    fi
    kill -9 "$BPID"
    wait "$BPID" 2>/dev/null || true
    bytes=$(du -sb "$STORE" | cut -f1)
    t0=$(date +%s.%N)
    taskset -c "$BROKER_CPU" "$TERN" -c "$WORK/tern-$mode.toml" 2>>"$WORK/broker.log" &
    BPID=$!
    wait_port "$PORT" "tern-$mode"
    t1=$(date +%s.%N)
    # one line per message (the payloads are binary and may hold newlines)
    got=$(timeout 600 mosquitto_sub -p "$PORT" -c -i fill-sub -q 1 -t 'lt/#' -C "$QUEUED" -W 590 -F '%t' | wc -l || true)
    t2=$(date +%s.%N)
    stop_broker
    recovered=$(grep -o 'recovered .* in [0-9.]*[a-z]*' "$WORK/broker.log" | tail -1)
    python3 - "$mode" "$QUEUED" "$bytes" "$t0" "$t1" "$t2" "$got" "$recovered" >> "$RECOVERY" <<'PY'
import sys
mode, queued, size, t0, t1, t2, got, rec = sys.argv[1:9]
queued, size, got = int(queued), int(size), int(got)
t0, t1, t2 = float(t0), float(t1), float(t2)
print(f"| `{mode}` | {queued:,} | {size / queued:.0f} | {rec} | {got:,} | {t2 - t0:.2f} s |")
PY
done

python3 - "$RESULTS" "$RECOVERY" "$OUT/PERSIST.md" "$REPS" "$DURATION" "$QUEUED" <<'PY'
import json, statistics, sys, subprocess, datetime
results, recovery, out, reps, duration, queued = sys.argv[1:7]
rows = {}
for line in open(results):
    r = json.loads(line)
    rows.setdefault(r["label"], []).append(r)
med = lambda xs: statistics.median(xs) if xs else float("nan")
base = med([r["throughput"] for r in rows.get("tern-off", []) if r["lost"] == 0])
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
o = open(out, "w")
o.write(f"# Persistence: throughput and recovery\n\n")
o.write(f"`perf/persist.sh` (REPS={reps}, DURATION={duration}, QUEUED={queued}) on {datetime.date.today()}, commit {commit}. ")
o.write("Broker on CPU 0, load on CPU 1, 1 worker, 64 B payloads, 50 pairs QoS 1, subscribers with persistent sessions, ")
o.write("max_inflight_messages 20 and max_queued_messages 1000 on both brokers. Medians; a run that lost an acknowledged message does not count.\n\n")
o.write("| broker / persistence | delivered msg/s (runs) | vs tern off | lost (all runs) | p50 µs | p99 µs | broker CPU-s per M |\n|---|---:|---:|---:|---:|---:|---:|\n")
for label in ["tern-off", "tern-periodic", "tern-durable", "mosquitto-false", "mosquitto-true"]:
    rs = rows.get(label, [])
    ok = [r for r in rs if r["lost"] == 0]
    t = med([r["throughput"] for r in ok])
    runs = ", ".join(f"{r['throughput'] / 1000:.0f}k" for r in rs)
    o.write(f"| {label} | {t:,.0f} ({runs}) | {t / base:.2f} | {sum(r['lost'] for r in rs)} | {med([r['p50_us'] for r in ok]):.0f} | "
            f"{med([r['p99_us'] for r in ok]):.0f} | {med([r['cpu_s_per_million'] for r in ok]):.2f} |\n")
o.write("\nmosquitto with `persistence true` writes its store only at `autosave_interval` (30 min by default) and at exit, so "
        "its row costs no disk work during the run: it is the comparison for `periodic`, not for `durable`.\n\n")
o.write(f"## Recovery\n\n{int(queued):,} QoS 1 messages (64 B, 4 publishers) queued for one offline persistent subscriber, "
        "the broker killed with SIGKILL, restarted on the same store (periodic: 3 s after the last PUBACK).\n\n")
o.write("| mode | queued | store bytes per message | tern's log at start-up | messages the subscriber got back | restart to the last of them |\n|---|---:|---:|---|---:|---:|\n")
o.write(open(recovery).read())
PY
cat "$OUT/PERSIST.md"
