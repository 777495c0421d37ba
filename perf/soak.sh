#!/usr/bin/env bash
# Fuzz soak: mutated MQTT over TCP from many short connections with random client ids (half of
# them persistent sessions), some stopping mid-packet, and one healthy QoS 1 pair, against tern
# for DURATION seconds (default 600). The broker's RSS is sampled every 5 s. Passes if tern is
# still running, logged no panic, the healthy pair never missed a message, and the RSS of the
# last minute is within 10% of that at half-time (medians). Loopback only, bounded in time.
# Writes perf/report/soak/{rss.csv,fuzz.json,SOAK.md}.
#
#   perf/soak.sh                  # 10 minutes
#   DURATION=60 perf/soak.sh      # a quick look
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-600}
PORT=${PORT:-18850}
OUT=${OUT:-perf/report/soak}
WORKERS=${WORKERS:-2}
THREADS=${THREADS:-8}
TERN=${TERN:-target/release/tern}
BROKER_CPU=

# shellcheck source=perf/lib.sh
. perf/lib.sh
prepare_run

# Budgets low enough to be reached within the run, so that "flat" means bounded, not "not
# full yet": abandoned persistent sessions go after 20 s, partial packets after 5 s, a
# session queues at most 10 messages (every persistent session subscribed to fuzz/# queues the
# QoS 1/2 messages the fuzzer sends after it, each a different set: thousands of sessions times
# their queue is where the memory goes), and the heap stops at 256 MiB as a backstop.
cat > "$WORK/soak.toml" <<CONF
port = $PORT
workers = $WORKERS
pin_workers = false
log_level = "warn"
persistent_client_expiration = "20s"
partial_packet_timeout = 5
max_retained_messages = 20000
max_retained_bytes = 16777216
max_queued_messages = 10
memory_limit = 268435456
sys_interval = 1
CONF
"$TERN" -c "$WORK/soak.toml" 2> "$WORK/tern.log" &
BPID=$!
wait_port "$PORT" tern

echo "seconds,rss_kb" > "$OUT/rss.csv"
(
    start=$(date +%s)
    while kill -0 "$BPID" 2>/dev/null; do
        rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$BPID/status" 2>/dev/null || echo 0)
        echo "$(( $(date +%s) - start )),$rss" >> "$OUT/rss.csv"
        sleep 5
    done
) &
SAMPLER=$!

# What the budgets refused, from $SYS, watched from the start (a broker at memory_limit
# refuses new connections, a late look would be one of them). Needs mosquitto_sub.
SYSWATCH=
if command -v mosquitto_sub >/dev/null 2>&1; then
    mosquitto_sub -p "$PORT" -t '$SYS/broker/limits/#' -t '$SYS/broker/clients/total' -v > "$WORK/sys.log" 2>/dev/null &
    SYSWATCH=$!
fi
fuzz_ok=0
"$LT" fuzz --port "$PORT" --duration "$DURATION" --threads "$THREADS" > "$OUT/fuzz.json" || fuzz_ok=$?
[ -n "$SYSWATCH" ] && kill "$SYSWATCH" 2>/dev/null || true
limits=$(awk '{v[$1] = $2} END {for (t in v) if (v[t] != "0") printf "%s %s\n", substr(t, 13), v[t]}' "$WORK/sys.log" 2>/dev/null \
    | sort | paste -sd, - | sed 's/,/, /g' || true)
kill "$SAMPLER" 2>/dev/null || true
alive=yes
kill -0 "$BPID" 2>/dev/null || alive=no
panics=$(grep -ciE "panick|died" "$WORK/tern.log" || true)
stop_broker

# Flat: the median RSS of the last minute within 10% of the median of the minute at half-time
# (the allocator's RSS moves by some 20% from one sample to the next under this load, so a
# lowest-to-highest spread would measure that, not growth); lowest and highest are reported too.
median() { sort -n | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : int((a[NR / 2] + a[NR / 2 + 1]) / 2)}'; }
mid=$(awk -F, -v d="$DURATION" 'NR > 1 && $1 >= d / 2 - 30 && $1 < d / 2 + 30 {print $2}' "$OUT/rss.csv" | median)
end=$(awk -F, -v d="$DURATION" 'NR > 1 && $1 >= d - 60 && $1 <= d {print $2}' "$OUT/rss.csv" | median)
read -r lo hi n < <(awk -F, -v d="$DURATION" 'NR > 1 && $1 >= d / 2 && $1 <= d {
        if (lo == "" || $2 < lo) lo = $2; if ($2 > hi) hi = $2; n++ } END { print lo, hi, n }' "$OUT/rss.csv")
growth=$(awk -v a="$mid" -v b="$end" 'BEGIN { printf "%+.1f", (a > 0) ? 100 * (b - a) / a : 0 }')
first=$(awk -F, 'NR == 2 {print $2}' "$OUT/rss.csv")
peak=$(awk -F, 'NR > 1 && $2 > m {m = $2} END {print m}' "$OUT/rss.csv")
verdict=pass
if [ "$alive" != yes ] || [ "$panics" != 0 ] || [ "$fuzz_ok" != 0 ] || awk -v g="$growth" 'BEGIN { exit !(g > 10 || g < -10) }'; then
    verdict=FAIL
fi

{
    echo "# tern under a fuzz soak"
    echo
    echo "Made by \`perf/soak.sh\` (DURATION=$DURATION s, $THREADS fuzzing threads, $WORKERS workers) on $(date -u +%F), tern $(git rev-parse --short HEAD), $(nproc) CPUs."
    echo
    echo "| | |"
    echo "|---|---|"
    echo "| fuzzer | \`$(cat "$OUT/fuzz.json")\` |"
    echo "| RSS at start / peak | ${first} kB / ${peak} kB |"
    echo "| RSS median, minute at half-time / last minute | ${mid} kB / ${end} kB (${growth}%) |"
    echo "| RSS over the last half: lowest / highest | ${lo} kB / ${hi} kB ($n samples) |"
    echo "| broker still running, panics logged | $alive, $panics |"
    echo "| \$SYS at the end (non-zero) | ${limits:-n/a} |"
    echo "| verdict | $verdict |"
    echo
    echo "RSS every 5 s is in \`rss.csv\`."
} > "$OUT/SOAK.md"
cat "$OUT/SOAK.md"
[ "$verdict" = pass ]
