#!/usr/bin/env bash
# Two tern builds, alternated on the same machine: fan-out 1->100, fan-in 4->1, 50 pairs QoS 0 and
# QoS 1 at saturation, one worker (WORKERS=n: n workers) on CPU 0 (BROKER_CPUS=0,1: unpinned on
# both), load on CPU 1, loopback only. Prints broker CPU-seconds per million delivered (median and
# each run) and delivered/s for each build.
#
#   git worktree add /tmp/old <rev> && (cd /tmp/old && CARGO_TARGET_DIR=/tmp/oldtarget cargo build --release -p tern)
#   BEFORE=/tmp/oldtarget/release/tern perf/beforeafter.sh      # AFTER defaults to this tree's build
#   SEED=2 WORKERS=2 BROKER_CPUS=0,1 SCENARIOS="fanin --publishers 4 --qos 0" REPS=8 DURATION=3 \
#       BEFORE=... perf/beforeafter.sh
#                   # one scenario (SCENARIOS: '|' between several); SEED=k: placement_seed = k and
#                   # client ids run<k>, so both builds place the same sessions on the same workers
set -euo pipefail
cd "$(dirname "$0")/.."

REPS=${REPS:-3}
DURATION=${DURATION:-5}
WORKERS=${WORKERS:-1}
BROKER_CPUS=${BROKER_CPUS:-0}
SEED=${SEED:-}
SCENARIOS=${SCENARIOS:-"fanout --subscribers 100|fanin --publishers 4|pairs --pairs 50 --qos 0|pairs --pairs 50 --qos 1"}
PORT=${PORT:-18970}
BEFORE=${BEFORE:?set BEFORE to the other tern binary}
AFTER=${AFTER:-target/release/tern}
cargo build --release -q -p tern -p tern-loadtest
LT=target/release/tern-loadtest
RESULTS=$(mktemp)
CONF=$(mktemp)
trap 'rm -f "$RESULTS" "$CONF"' EXIT
# Workers stay where taskset puts them: all on CPU 0, or wherever the kernel runs them.
printf 'port = %s\nworkers = %s\npin_workers = false\nlog_level = "warn"\n' "$PORT" "$WORKERS" > "$CONF"
ids=()
if [ -n "$SEED" ]; then
    printf 'placement_seed = %s\n' "$SEED" >> "$CONF"
    ids=(--id-prefix "run$SEED")
fi
IFS='|' read -r -a scenarios <<<"$SCENARIOS"

for rep in $(seq 1 "$REPS"); do
    for label in before after; do
        bin=$BEFORE
        [ "$label" = after ] && bin=$AFTER
        for sc in "${scenarios[@]}"; do
            taskset -c "$BROKER_CPUS" "$bin" -c "$CONF" 2>/dev/null &
            pid=$!
            for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.05; done
            # shellcheck disable=SC2086
            taskset -c 1 "$LT" run $sc "${ids[@]}" --port "$PORT" --duration "$DURATION" --broker-pid "$pid" \
                --label "$label" --json "$RESULTS" >/dev/null || echo "   ($label $sc failed)"
            kill "$pid"
            wait "$pid" 2>/dev/null || true
        done
    done
done

python3 - "$RESULTS" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    rows.setdefault((r["scenario"], r["qos"]), {}).setdefault(r["label"], []).append(r)
for key in sorted(rows):
    cells = []
    for label in ["before", "after"]:
        rs = rows[key].get(label, [])
        if not rs:
            continue
        cpu = [r["cpu_s_per_million"] for r in rs]
        cells.append(f"{label} {statistics.median(r['throughput'] for r in rs):,.0f}/s, "
                     f"CPU-s/M {statistics.median(cpu):.3f} [{', '.join(f'{c:.3f}' for c in cpu)}]")
    print(f"{key[0]} QoS {key[1]}: " + " | ".join(cells))
PY
