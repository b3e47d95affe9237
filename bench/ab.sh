#!/usr/bin/env bash
# A/B of mqgate builds: each pair runs every binary given, in turn, on a fresh data
# folder (RocksDB, default settings), with the same client scenario, and prints one line
# per run: rate /s, p50 and p99 latency µs, broker CPU µs per message, CPU the host stole (ms),
# and for AMQP the delivered rate over the publisher's (kept_up); each the median of the
# run's rounds. Alternating builds in one sitting is what tells
# a change of a few per cent from this machine's drift (single runs move by 10-20 %).
#
#   cp target/release/mqgate /tmp/mqgate.before   # build, copy, change, build again
#   bench/ab.sh amqp "--size 4096 --messages 100000" 8 /tmp/mqgate.before target/release/mqgate
#   bench/ab.sh mqtt "--qos 1 --fanout 100 --messages 2000" 3 /tmp/mqgate.before target/release/mqgate
#
# Knobs: ROUNDS (3). Ports as compare.sh's mqgate: AMQP 35672, MQTT 21883, admin 35673.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 4 ]] || { echo "usage: bench/ab.sh amqp|mqtt \"client arguments\" PAIRS BINARY..." >&2; exit 2; }
PROTO=$1 ARGS=$2 PAIRS=$3
shift 3
ROUNDS=${ROUNDS:-3}
BIN=target/release
DATA=$(mktemp -d /tmp/mqgate-ab.XXXXXX)
trap 'rm -rf "$DATA"' EXIT
case $PROTO in
  amqp) PORT=35672 ;;
  mqtt) PORT=21883 ;;
  *) echo "ab: protocol amqp or mqtt" >&2; exit 2 ;;
esac
for _ in $(seq 1 "$PAIRS"); do
  for b in "$@"; do
    rm -rf "$DATA/d"
    MQGATE__LISTENERS__ADMIN=127.0.0.1:35673 RUST_LOG=warn \
      "$b" serve --data "$DATA/d" --amqp 127.0.0.1:35672 --mqtt 127.0.0.1:21883 2>"$DATA/log" &
    pid=$!
    for _ in $(seq 100); do
      (echo >/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break
      sleep 0.1
    done
    if [[ $PROTO == amqp ]]; then
      # shellcheck disable=SC2086
      out=$($BIN/amqp_pubsub --url amqp://guest:guest@127.0.0.1:35672/%2f --broker-pid $pid $ARGS --rounds "$ROUNDS" 2>&1 | grep RESULT || true)
    else
      # shellcheck disable=SC2086
      out=$($BIN/mqtt_pubsub --addr 127.0.0.1:21883 --broker-pid $pid $ARGS --rounds "$ROUNDS" 2>&1 | grep RESULT || true)
    fi
    echo "$b $(sed -n 's/.*rate=\([0-9]*\) p50_us=\([0-9]*\) p99_us=\([0-9]*\).*cpu_us=\([0-9.]*\).*steal_ms=\([0-9]*\).*/rate \1 p50_us \2 p99_us \3 cpu_us \4 steal_ms \5/p' <<<"$out") $(sed -n 's/.*kept_up=\([0-9.]*\).*/kept_up \1/p' <<<"$out")"
    kill "$pid"
    wait "$pid" 2>/dev/null || true
  done
done
