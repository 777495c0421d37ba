#!/usr/bin/env bash
# Work per delivered message as the worker count grows. On a 2-core machine more workers cannot
# add throughput, so this reports what each message costs: broker CPU-seconds per million
# delivered, and per delivered message the ring pushes, trie walks and wake-ups the broker counts
# under `$SYS/broker/internal/`. Workers 1, 2, 4, 8, unpinned; each scenario at saturation and at a
# fixed offered rate. Loopback only; every run is bounded in time.
#
#   perf/scaling.sh                         # REPS=3, 3 s per run
#   REPS=1 WORKERS="1 2" perf/scaling.sh    # a quick look
#   REPORT_ONLY=1 perf/scaling.sh           # redo SCALING.md from the last results
#   BROKER_CPU=0 OUT=perf/report/scaling-cpu0 perf/scaling.sh
#                                           # every worker on CPU 0: the load generator keeps CPU 1
set -euo pipefail
cd "$(dirname "$0")/.."

REPS=${REPS:-3}
DURATION=${DURATION:-3}
PORT=${PORT:-18831}
WORKERS=${WORKERS:-"1 2 4 8"}
OUT=${OUT:-perf/report/scaling}
LOAD_CPU=${LOAD_CPU:-1}
TERN=${TERN:-target/release/tern}   # another build to compare: TERN=/path/to/tern OUT=... perf/scaling.sh

if ! command -v mosquitto_sub >/dev/null 2>&1; then
    echo "installing mosquitto-clients from Debian (the counters are read with mosquitto_sub)"
    apt-get update -qq && apt-get install -y -qq mosquitto-clients >/dev/null
fi
# shellcheck source=perf/lib.sh
. perf/lib.sh
prepare_run

# name | loadtest arguments; the fixed rate is offered publishes per second.
SCENARIOS=(
    "fanout|fanout --subscribers 100 --qos 0|10000"
    "fanin|fanin --publishers 4 --qos 0|100000"
    "pairs-qos0|pairs --pairs 50 --qos 0|100000"
    "pairs-qos1|pairs --pairs 50 --qos 1|50000"
)


# Prints "ring_pushes trie_walks wakeups helped_turns dropped handed_over crossed" as the broker
# last published them (retained $SYS); dropped: messages the broker shed (QoS 0 under overload,
# limits); handed_over: workers handed to worker 0's thread while the load was light; crossed:
# messages routed to another worker.
counters() {
    # $SYS goes out once a second: wait for the update after the run. --retained-only prints every
    # retained internal/ topic, however many there are, and exits at the next live update.
    sleep 1.5
    { timeout 10 mosquitto_sub -p "$PORT" --retained-only -W 4 -t '$SYS/broker/internal/+' \
        -t '$SYS/broker/publish/messages/dropped' -v 2>/dev/null || true; } |
        awk '/ring_pushes/ {p=$2} /trie_walks/ {t=$2} /wakeups/ {w=$2} /helped_turns/ {h=$2} /messages\/dropped/ {d=$2}
             /handed_over/ {o=$2} /crossed/ {c=$2}
             END {printf "%s %s %s %s %s %s %s\n", p+0, t+0, w+0, h+0, d+0, o+0, c+0}'
}

for rep in $( [ -n "${REPORT_ONLY:-}" ] || seq 1 "$REPS"); do
    for entry in "${SCENARIOS[@]}"; do
        IFS='|' read -r name args rate <<<"$entry"
        for mode in saturation fixed; do
            for w in $WORKERS; do
                echo "== run $rep/$REPS: $name $mode, $w worker(s)"
                # Run k places sessions with placement_seed = k: with the same client ids (below),
                # the same sessions share a worker in run k of a row, in every build compared.
                printf 'port = %s\nworkers = %s\npin_workers = false\nsys_interval = 1\nlog_level = "warn"\nplacement_seed = %s\n' \
                    "$PORT" "$w" "$rep" > "$WORK/tern.toml"
                start_broker tern-config "$WORK/tern.toml"
                before=$(counters)
                extra=""
                [ "$mode" = fixed ] && extra="--rate $rate"
                line=$(mktemp -p "$WORK")
                # The same client ids in run k of every worker count (and of every build): sessions
                # are placed by a hash of the client id keyed by placement_seed, so how many
                # messages cross workers is the same in run k of a row for every build, and varies
                # from run to run (and between worker counts) as it does between deployments.
                # shellcheck disable=SC2086
                if timeout 120 taskset -c "$LOAD_CPU" "$LT" run $args $extra --id-prefix "run$rep" --port "$PORT" --duration "$DURATION" \
                    --drain 3 --broker-pid "$BPID" --label "tern-$w" --json "$line" >/dev/null; then :; else
                    echo "   (run reported loss or failed)"
                fi
                after=$(counters)
                stop_broker
                [ -s "$line" ] || continue
                read -r p0 t0 k0 h0 d0 o0 c0 <<<"$before"
                read -r p1 t1 k1 h1 d1 o1 c1 <<<"$after"
                pushes=$((p1 - p0)) walks=$((t1 - t0)) wakeups=$((k1 - k0)) helped=$((h1 - h0)) shed=$((d1 - d0))
                handovers=$((o1 - o0)) crossed=$((c1 - c0))
                if [ "$t1" = 0 ]; then
                    # $SYS was not read after the run (every run walks the trie): no counters.
                    echo "   (counters not read)"
                    pushes=null walks=null wakeups=null helped=null shed=null handovers=null crossed=null
                fi
                jq -c --arg name "$name" --arg mode "$mode" --argjson w "$w" \
                    --argjson pushes "$pushes" --argjson walks "$walks" --argjson wakeups "$wakeups" --argjson helped "$helped" \
                    --argjson shed "$shed" --argjson handovers "$handovers" --argjson crossed "$crossed" \
                    '. + {name: $name, mode: $mode, workers: $w, ring_pushes: $pushes, trie_walks: $walks, wakeups: $wakeups,
                          helped_turns: $helped, shed: $shed, handovers: $handovers, crossed: $crossed}' \
                    "$line" >> "$RESULTS"
            done
        done
    done
done

python3 - "$RESULTS" "$OUT/SCALING.md" "$REPS" "$DURATION" "${BROKER_CPU:-}" <<'PY'
import json, statistics, sys, subprocess, datetime
results, out, reps, duration, broker_cpu = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
placement = f"every worker on CPU {broker_cpu} (`BROKER_CPU={broker_cpu}`)" if broker_cpu else "broker unpinned"

rows = {}
for line in open(results):
    r = json.loads(line)
    rows.setdefault((r["name"], r["mode"], r["workers"]), []).append(r)
def lost(rs):
    # Every run's figure, not a median: one lossy run must show. QoS 0 the broker shed under
    # overload (counted by `$SYS/broker/publish/messages/dropped`) is given beside it.
    out = " / ".join(f"{r['lost']:,}" for r in rs)
    shed = [r.get("shed") for r in rs]
    if any(shed):
        out += " (shed " + " / ".join("?" if x is None else f"{x:,}" for x in shed) + ")"
    return out
def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")
lines = []
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
lines.append("# tern: work per message as workers grow")
lines.append("")
lines.append(f"Made by `perf/scaling.sh` (REPS={reps}, DURATION={duration} s) on {datetime.date.today()}, tern {commit}, "
             f"2 CPUs, {placement}, load generator on CPU 1, 64-byte payloads. Medians over the runs. "
             "`x1` is CPU per message relative to 1 worker in the same scenario and mode; "
             "lost is each run's figure; crossed: messages routed to another worker, per delivered message "
             "(run k of every row used the same client ids, `--id-prefix runk`, and `placement_seed = k`, so in run k of a row the same sessions share a worker in every build compared on one machine); handovers: workers handed to worker 0's thread in the run "
             "(including the quiet seconds around it), median.")
lines.append("")
lines.append("| scenario | mode | workers | delivered/s | lost | CPU-s per M delivered | x1 | crossed/msg | ring pushes/msg | trie walks/msg | wake-ups/msg | helped turns/msg | handovers |")
lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
base = {}
for key in sorted(rows, key=lambda k: (k[0], k[1], k[2])):
    rs = rows[key]
    recv = [r["received"] for r in rs]
    per = lambda f: med([r[f] / r["received"] if r["received"] and r.get(f) is not None else None for r in rs])
    cpu = med([r.get("cpu_s_per_million") for r in rs])
    if key[2] == 1:
        base[key[:2]] = cpu
    ratio = cpu / base[key[:2]] if base.get(key[:2]) else float("nan")
    lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {med([r['throughput'] for r in rs]):,.0f} | {lost(rs)} "
                 f"| {cpu:.3f} | {ratio:.2f} | {per('crossed'):.3f} | {per('ring_pushes'):.3f} | {per('trie_walks'):.3f} | {per('wakeups'):.4f} | {per('helped_turns'):.4f} "
                 f"| {med([r.get('handovers') for r in rs]):.0f} |")
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
echo "report: $OUT/SCALING.md"
