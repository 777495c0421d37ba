#!/usr/bin/env bash
# What authentication and access control cost on the message path: tern with a 1,000-user
# password file made by mosquitto_passwd and a 100-rule ACL (10 of them patterns, which every
# user's messages are checked against) beside tern without them, in alternating runs. Every load
# client logs in as one of the users. Broker pinned to CPU 0, load to CPU 1, loopback only,
# bounded in time. Writes perf/report/auth/{results.jsonl,AUTH.md}.
#
#   perf/auth.sh                 # 5 repetitions, 5 s per run
#   REPS=1 DURATION=2 perf/auth.sh
set -euo pipefail
cd "$(dirname "$0")/.."

REPS=${REPS:-5}
DURATION=${DURATION:-5}
PORT=${PORT:-18836}
OUT=${OUT:-perf/report/auth}
BROKER_CPU=${BROKER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
TERN=${TERN:-target/release/tern}

if ! command -v mosquitto_passwd >/dev/null 2>&1; then
    echo "installing mosquitto from Debian"
    apt-get update -qq && apt-get install -y -qq mosquitto >/dev/null
fi
# shellcheck source=perf/lib.sh
. perf/lib.sh
prepare_run

# 1,000 users; the load logs in as lt-user.
PW="$WORK/passwd"
mosquitto_passwd -c -b "$PW" lt-user lt-secret
for i in $(seq 1 999); do mosquitto_passwd -b "$PW" "device-$i" "secret-$i"; done

# 100 rules: 10 patterns (checked for everyone), 88 topic rules over 44 device users, and the
# load user's 2.
ACL="$WORK/acl"
{
    for i in $(seq 1 5); do
        echo "pattern readwrite site/$i/%u/#"
        echo "pattern read fleet/$i/%c/+/status"
    done
    for i in $(seq 1 44); do
        echo "user device-$i"
        echo "topic readwrite devices/device-$i/#"
        echo "topic read fleet/+/device-$i/cmd"
    done
    echo "user lt-user"
    echo "topic deny lt/private/#"
    echo "topic readwrite lt/#"
} > "$ACL"
[ "$(grep -c '^\(topic\|pattern\)' "$ACL")" = 100 ] || { echo "the ACL does not have 100 rules" >&2; exit 1; }

base() { printf 'port = %s\nworkers = 1\nmax_inflight_messages = 20\nmax_queued_messages = 1000\nlog_level = "warn"\n' "$PORT"; }
base > "$WORK/plain.toml"
{ base; printf 'password_file = "%s"\nacl_file = "%s"\nallow_anonymous = false\n' "$PW" "$ACL"; } > "$WORK/auth.toml"

SCENARIOS=(
    "fanout-qos0|fanout --subscribers 100 --qos 0"
    "pairs-qos1|pairs --pairs 50 --qos 1"
)

for rep in $(seq 1 "$REPS"); do
    for entry in "${SCENARIOS[@]}"; do
        IFS='|' read -r name args <<<"$entry"
        for label in plain auth; do
            echo "== run $rep/$REPS: $name $label"
            start_broker tern-config "$WORK/$label.toml"
            line=$(mktemp -p "$WORK")
            # shellcheck disable=SC2086
            timeout 120 taskset -c "$LOAD_CPU" "$LT" run $args --port "$PORT" --duration "$DURATION" \
                --username lt-user --password lt-secret \
                --broker-pid "$BPID" --label "$label" --json "$line" >/dev/null || echo "   ($label lost messages or failed)"
            stop_broker
            [ -s "$line" ] && jq -c --arg name "$name" '. + {name: $name}' "$line" >> "$RESULTS"
        done
    done
done

python3 - "$RESULTS" "$OUT/AUTH.md" "$REPS" "$DURATION" <<'PY'
import json, statistics, sys, subprocess, datetime
results, out, reps, duration = sys.argv[1:5]
rows = {}
for line in open(results):
    r = json.loads(line)
    rows.setdefault((r["name"], r["label"]), []).append(r)
med = lambda xs: statistics.median(xs) if xs else float("nan")
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
o = open(out, "w")
o.write("# Authentication and access control: cost on the message path\n\n")
o.write(f"`perf/auth.sh` (REPS={reps}, DURATION={duration}) on {datetime.date.today()}, commit {commit}. Broker on CPU 0, load on CPU 1, ")
o.write("1 worker, 64 B. `auth`: a 1,000-user password file made by `mosquitto_passwd` (`$7$`), a 100-rule ACL ")
o.write("(10 patterns, 90 topic rules, one deny), `allow_anonymous = false`, every client logged in. Medians of alternating runs; ")
o.write("a run that lost an acknowledged message does not count.\n\n")
o.write("| scenario | plain msg/s | auth msg/s | auth / plain | plain CPU-s per M | auth CPU-s per M | QoS 1 lost (all runs) |\n|---|---:|---:|---:|---:|---:|---:|\n")
for name in ["fanout-qos0", "pairs-qos1"]:
    # QoS 0 may be dropped by design (output bounds); QoS 1 runs with a loss do not count
    ok = lambda r: r["qos"] == 0 or r["lost"] == 0
    p = [r for r in rows.get((name, "plain"), []) if ok(r)]
    a = [r for r in rows.get((name, "auth"), []) if ok(r)]
    tp, ta = med([r["throughput"] for r in p]), med([r["throughput"] for r in a])
    lost = sum(r["lost"] for r in rows.get((name, "plain"), []) + rows.get((name, "auth"), []) if r["qos"] > 0)
    o.write(f"| {name} | {tp:,.0f} | {ta:,.0f} | {ta / tp:.2f} | {med([r['cpu_s_per_million'] for r in p]):.3f} | "
            f"{med([r['cpu_s_per_million'] for r in a]):.3f} | {lost} |\n")
o.write("\nRuns (msg/s):\n\n")
for (name, label), rs in sorted(rows.items()):
    o.write(f"- {name} {label}: " + ", ".join(f"{r['throughput']:,.0f}" for r in rs) + "\n")
PY
cat "$OUT/AUTH.md"
