# Shared by the perf scripts (sourced): starting and stopping one broker on $PORT, loopback only.
# The caller sets OUT, PORT, BROKER_CPU (empty: unpinned) and, for tern, TERN and WORKERS.

# Builds tern and the load tool, makes $OUT and a fresh $RESULTS (kept with REPORT_ONLY), and a
# scratch $WORK removed on exit together with any broker still running. Sets LT.
prepare_run() {
    cargo build --release -q -p tern -p tern-loadtest
    LT=target/release/tern-loadtest
    mkdir -p "$OUT"
    RESULTS="$OUT/results.jsonl"
    [ -n "${REPORT_ONLY:-}" ] || : > "$RESULTS"
    WORK=$(mktemp -d)
    BPID=
    trap 'kill $BPID 2>/dev/null || true; rm -rf "$WORK"' EXIT
}

# mosquitto with mosquitto's own bounds (tern is run with the same ones).
write_mosquitto_conf() {
    cat > "$WORK/mosquitto.conf" <<CONF
listener $PORT 127.0.0.1
allow_anonymous true
persistence false
max_inflight_messages 20
max_queued_messages 1000
set_tcp_nodelay true
log_dest none
CONF
}

# start_broker tern|mosquitto: pinned to $BROKER_CPU (unpinned if empty); sets BPID.
start_broker() {
    local pin=()
    [ -n "${BROKER_CPU:-}" ] && pin=(taskset -c "$BROKER_CPU")
    case "$1" in
        tern)
            # The same bounds as the mosquitto configuration above, for a like-for-like run.
            printf 'port = %s\nworkers = %s\nmax_inflight_messages = 20\nmax_queued_messages = 1000\nlog_level = "warn"\n' \
                "$PORT" "${WORKERS:-1}" > "$WORK/tern-compare.toml"
            "${pin[@]}" "$TERN" -c "$WORK/tern-compare.toml" 2>/dev/null &
            ;;
        tern-config) "${pin[@]}" "$TERN" -c "$2" 2>/dev/null & ;;
        mosquitto) "${pin[@]}" mosquitto -c "$WORK/mosquitto.conf" 2>/dev/null & ;;
    esac
    BPID=$!
    wait_port "$PORT" "$1"
}

# wait_port PORT NAME: until something accepts on 127.0.0.1:PORT (5 s at most).
wait_port() {
    for _ in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "$2 did not start" >&2
    exit 1
}

stop_broker() {
    kill "$BPID" 2>/dev/null || true
    wait "$BPID" 2>/dev/null || true
    BPID=
}
