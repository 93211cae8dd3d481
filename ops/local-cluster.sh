#!/usr/bin/env bash
# A whole Kakehashi cluster on loopback, for a person to try: one etcd, N coordinator
# replicas and M relays, each a separate process running the real release binaries.
# Relays register in etcd; coordinators place on them and elect a leader.
#
#   ops/local-cluster.sh                 # 2 coordinators, 2 relays
#   COORDINATORS=3 RELAYS=4 ops/local-cluster.sh
#   SKIP_BUILD=1 ops/local-cluster.sh    # use target/release as it is
#   SKIP_BUILD=1 BIN_DIR=target/debug ops/local-cluster.sh
#   EXTRA_COORDINATOR_ARGS="--redis-url redis://127.0.0.1:6379" ops/local-cluster.sh
#
# Ports are chosen by the OS. Everything (logs, keys, etcd data) lives in one temporary
# directory, printed at start and removed at exit; Ctrl-C stops every process started
# here, by PID. Try: kill -9 a relay's PID, `kill -TERM` one (it drains), or kill the
# leader coordinator, and watch placement carry on.
set -euo pipefail
cd "$(dirname "$0")/.."

COORDINATORS=${COORDINATORS:-2}
RELAYS=${RELAYS:-2}
B=${BIN_DIR:-target/release}

if [[ -z "${SKIP_BUILD:-}" ]]; then
    cargo build --release --bins
fi
for bin in "$B/kakehashi-coordinator" "$B/kakehashi-relay"; do
    [[ -x "$bin" ]] || { echo "missing $bin (build with cargo build --release --bins)" >&2; exit 1; }
done
command -v etcd >/dev/null || { echo "etcd not installed (ops/install-deps.sh)" >&2; exit 1; }

DIR=$(mktemp -d /tmp/kakehashi-local-XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for_file() { # FILE WHAT PID
    for _ in $(seq 1 300); do
        [[ -s "$1" ]] && return 0
        kill -0 "$3" 2>/dev/null || { echo "$2 exited; its log:" >&2; tail -n 30 "$DIR/$2.log" >&2; exit 1; }
        sleep 0.1
    done
    echo "$2 not ready after 30 s" >&2
    exit 1
}

# etcd, one member.
EC=$(free_port)
EP=$(free_port)
ETCD="http://127.0.0.1:$EC"
etcd --name n1 --data-dir "$DIR/etcd" \
    --listen-client-urls "$ETCD" --advertise-client-urls "$ETCD" \
    --listen-peer-urls "http://127.0.0.1:$EP" --initial-advertise-peer-urls "http://127.0.0.1:$EP" \
    --initial-cluster "n1=http://127.0.0.1:$EP" --logger=zap --log-outputs=stderr \
    >"$DIR/etcd.log" 2>&1 &
PIDS+=($!)
ETCD_PID=$!
for _ in $(seq 1 200); do
    ETCDCTL_API=3 etcdctl --endpoints "$ETCD" endpoint health >/dev/null 2>&1 && break
    kill -0 "$ETCD_PID" 2>/dev/null || { tail -n 30 "$DIR/etcd.log" >&2; exit 1; }
    sleep 0.1
done

# The cluster's signing key: every coordinator signs with it, every relay verifies.
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$DIR/signing.key"

for i in $(seq 1 "$COORDINATORS"); do
    name="coordinator-$i"
    # shellcheck disable=SC2086
    "$B/kakehashi-coordinator" --listen 127.0.0.1:0 --etcd-endpoints "$ETCD" \
        --signing-key-file "$DIR/signing.key" --replica-id "$name" \
        --url-file "$DIR/$name.url" ${EXTRA_COORDINATOR_ARGS:-} >"$DIR/$name.log" 2>&1 &
    PIDS+=($!)
    wait_for_file "$DIR/$name.url" "$name" "$!"
    echo "$name  pid $!  $(cat "$DIR/$name.url")"
done
PK=$(sed -n 's/^coordinator public key: //p' "$DIR/coordinator-1.log" | head -n 1)

for j in $(seq 1 "$RELAYS"); do
    name="relay-$j"
    # shellcheck disable=SC2086
    "$B/kakehashi-relay" --relay-id "$name" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
        --coordinator-key "$PK" --etcd-endpoints "$ETCD" --socket-buffer 1048576 \
        --endpoint-file "$DIR/$name.endpoint" ${EXTRA_RELAY_ARGS:-} >"$DIR/$name.log" 2>&1 &
    PIDS+=($!)
    wait_for_file "$DIR/$name.endpoint" "$name" "$!"
    echo "$name  pid $!  $(sed 's/.*addr=\([^,]*\),.*/\1/' "$DIR/$name.endpoint")"
done

URL=$(cat "$DIR/coordinator-1.url")
cat <<EOF

etcd         $ETCD  (pid $ETCD_PID)
directory    $DIR  (logs: *.log)

Try:
  $B/kakehashi ctl --coordinator $URL --json create --tenant acme --operator op1 --mode control
  ETCDCTL_API=3 etcdctl --endpoints $ETCD get --prefix /kakehashi/v1/relays/ --keys-only
  ETCDCTL_API=3 etcdctl --endpoints $ETCD elect -l /kakehashi/v1/leader     # who leads
  kill -TERM <relay pid>     # drain: no new sessions there, participants told to move
  kill -9 <relay pid>        # gone: out of placement within its 3 s lease
Ctrl-C stops everything.
EOF
wait "$ETCD_PID"
