#!/usr/bin/env bash
# TLS and WebSockets, measured: tern beside mosquitto over TLS with the same certificates
# (fan-out 1->100 QoS 0, 50 pairs QoS 1), tern's cost per delivered message over TLS, ws and wss
# against its own plain TCP, and RSS per idle TLS connection, tern vs mosquitto. A throwaway CA
# and server certificate are made with openssl for each run. Broker pinned to CPU 0, load to
# CPU 1, loopback only, bounded in time. Writes perf/report/tls/{results.jsonl,TLS.md}.
#
#   perf/tls.sh                 # 3 repetitions, 5 s per run
#   REPS=1 DURATION=3 perf/tls.sh
set -euo pipefail
cd "$(dirname "$0")/.."

REPS=${REPS:-3}
DURATION=${DURATION:-5}
PORT=${PORT:-18880}
OUT=${OUT:-perf/report/tls}
BROKER_CPU=${BROKER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
WORKERS=1
TERN=${TERN:-target/release/tern}
CONNS=${CONNS:-5000}

if ! command -v mosquitto >/dev/null 2>&1; then
    echo "installing mosquitto from Debian"
    apt-get update -qq && apt-get install -y -qq mosquitto >/dev/null
fi
# shellcheck source=perf/lib.sh
. perf/lib.sh
prepare_run

# A CA and a server certificate for 127.0.0.1 (P-256), made fresh.
PKI="$WORK/pki"
mkdir -p "$PKI"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$PKI/ca-key.pem" \
    -out "$PKI/ca.pem" -days 2 -subj "/CN=tern perf CA" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$PKI/server-key.pem" \
    -out "$PKI/server.csr" -subj "/CN=localhost" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' > "$PKI/ext.cnf"
openssl x509 -req -in "$PKI/server.csr" -CA "$PKI/ca.pem" -CAkey "$PKI/ca-key.pem" -CAcreateserial \
    -out "$PKI/server.pem" -days 2 -extfile "$PKI/ext.cnf" 2>/dev/null
# mosquitto, started as root, reads its files as the mosquitto user: a throwaway key may be
# readable by all.
chmod a+rx "$WORK" "$PKI"
chmod a+r "$PKI"/*.pem

# Ports: PORT plain, +1 TLS, +2 ws, +3 wss; the same for both brokers.
cat > "$WORK/tern-tls.toml" <<CONF
port = $PORT
workers = $WORKERS
max_inflight_messages = 20
max_queued_messages = 1000
max_connections = 100000
log_level = "warn"
[[listener]]
port = $((PORT + 1))
certfile = "$PKI/server.pem"
keyfile = "$PKI/server-key.pem"
[[listener]]
port = $((PORT + 2))
protocol = "websockets"
[[listener]]
port = $((PORT + 3))
protocol = "websockets"
certfile = "$PKI/server.pem"
keyfile = "$PKI/server-key.pem"
CONF
# mosquitto's configuration from perf/lib.sh, plus a TLS listener (the lines after a `listener`
# line are that listener's).
write_mosquitto_conf
{
    cat "$WORK/mosquitto.conf"
    printf 'listener %s 127.0.0.1\ncertfile %s\nkeyfile %s\n' $((PORT + 1)) "$PKI/server.pem" "$PKI/server-key.pem"
} > "$WORK/mosquitto-tls.conf"

start() {
    local pin=(taskset -c "$BROKER_CPU")
    case "$1" in
        tern) "${pin[@]}" "$TERN" -c "$WORK/tern-tls.toml" 2>/dev/null & ;;
        mosquitto) "${pin[@]}" mosquitto -c "$WORK/mosquitto-tls.conf" 2>/dev/null & ;;
    esac
    BPID=$!
    wait_port $((PORT + 1)) "$1"
}

TLS=(--tls --cafile "$PKI/ca.pem")
# name|broker|port offset|loadtest arguments
RUNS=(
    "fanout-tls|tern|1|fanout --subscribers 100 ${TLS[*]}"
    "fanout-tls|mosquitto|1|fanout --subscribers 100 ${TLS[*]}"
    "pairs-qos1-tls|tern|1|pairs --pairs 50 --qos 1 ${TLS[*]}"
    "pairs-qos1-tls|mosquitto|1|pairs --pairs 50 --qos 1 ${TLS[*]}"
    "pairs-qos1-tcp|tern|0|pairs --pairs 50 --qos 1"
    "pairs-qos1-ws|tern|2|pairs --pairs 50 --qos 1 --ws"
    "pairs-qos1-wss|tern|3|pairs --pairs 50 --qos 1 --ws ${TLS[*]}"
    "fanout-tcp|tern|0|fanout --subscribers 100"
    "fanout-ws|tern|2|fanout --subscribers 100 --ws"
)

if [ -z "${REPORT_ONLY:-}" ]; then
    for rep in $(seq 1 "$REPS"); do
        for entry in "${RUNS[@]}"; do
            IFS='|' read -r name broker off args <<<"$entry"
            echo "== run $rep/$REPS: $broker $name"
            start "$broker"
            line=$(mktemp -p "$WORK")
            # shellcheck disable=SC2086
            timeout 120 taskset -c "$LOAD_CPU" "$LT" run $args --port $((PORT + off)) --duration "$DURATION" \
                --broker-pid "$BPID" --label "$broker" --json "$line" >/dev/null || echo "   ($broker $name failed)"
            stop_broker
            [ -s "$line" ] && jq -c --arg name "$name" '. + {name: $name}' "$line" >> "$RESULTS"
        done
        # Idle TLS connections: RSS per connection (spread over processes: 20,000 open files each).
        for broker in tern mosquitto; do
            echo "== run $rep/$REPS: $broker idle TLS connections"
            start "$broker"
            line=$(mktemp -p "$WORK")
            # shellcheck disable=SC2086
            timeout 300 taskset -c "$LOAD_CPU" "$LT" run conns --connections "$CONNS" --procs 2 ${TLS[*]} \
                --port $((PORT + 1)) --broker-pid "$BPID" --label "$broker" --json "$line" >/dev/null \
                || echo "   ($broker conns failed)"
            stop_broker
            [ -s "$line" ] && jq -c --arg name "idle-tls" '. + {name: $name}' "$line" >> "$RESULTS"
        done
    done
fi

python3 - "$RESULTS" "$OUT/TLS.md" "$REPS" "$DURATION" "$CONNS" <<'PY'
import json, statistics, sys, subprocess, datetime
results, out, reps, duration, conns = sys.argv[1:6]
rows = {}
for line in open(results):
    r = json.loads(line)
    rows.setdefault((r["name"], r["label"]), []).append(r)
med = lambda xs: statistics.median(xs) if xs else float("nan")
def m(name, label, key):
    return med([r[key] for r in rows.get((name, label), []) if r.get(key) is not None])
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
L = ["# TLS and WebSockets", "",
     f"Made by `perf/tls.sh` (REPS={reps}, DURATION={duration} s) on {datetime.date.today()}, tern {commit}, "
     "broker on CPU 0 (tern with 1 worker), load on CPU 1, 64-byte payloads, a P-256 server certificate "
     "made per run, both brokers with max_inflight_messages 20 and max_queued_messages 1000. Medians over "
     "the runs.", "",
     "## tern beside mosquitto over TLS", "",
     "| scenario | tern delivered/s | mosquitto delivered/s | ratio | tern lost | mosquitto lost |",
     "|---|---:|---:|---:|---:|---:|"]
for name in ["fanout-tls", "pairs-qos1-tls"]:
    t, q = m(name, "tern", "throughput"), m(name, "mosquitto", "throughput")
    L.append(f"| {name} | {t:,.0f} | {q:,.0f} | {t / q:.1f}x | {m(name, 'tern', 'lost'):,.0f} | {m(name, 'mosquitto', 'lost'):,.0f} |")
L += ["", "## tern's cost per delivered message, by transport", "",
      "| scenario | delivered/s | broker CPU-s per M delivered | x TCP | lost |", "|---|---:|---:|---:|---:|"]
for base, names in [("pairs-qos1-tcp", ["pairs-qos1-tcp", "pairs-qos1-tls", "pairs-qos1-ws", "pairs-qos1-wss"]),
                    ("fanout-tcp", ["fanout-tcp", "fanout-tls", "fanout-ws"])]:
    b = m(base, "tern", "cpu_s_per_million")
    for n in names:
        c = m(n, "tern", "cpu_s_per_million")
        L.append(f"| {n} | {m(n, 'tern', 'throughput'):,.0f} | {c:.3f} | {c / b:.2f} | {m(n, 'tern', 'lost'):,.0f} |")
L += ["", f"## Idle TLS connections ({conns})", "",
      "| broker | RSS per connection (bytes) |", "|---|---:|"]
for label in ["tern", "mosquitto"]:
    L.append(f"| {label} | {m('idle-tls', label, 'rss_per_connection'):,.0f} |")
open(out, "w").write("\n".join(L) + "\n")
print("\n".join(L))
PY
echo "report: $OUT/TLS.md"
