#!/usr/bin/env bash
# The same scenarios, with the same clients (lapin, rumqttc), against mqgate (RocksDB,
# default durability: fsync before any acknowledgement), RabbitMQ (Debian's
# rabbitmq-server, with its MQTT plugin), Mosquitto (Debian's mosquitto, default
# settings) and bench_sink (a do-nothing server that only acknowledges: what the clients
# alone can drive here). One broker at a time, each on loopback; prints a table with
# the ratios. Needs `cargo build --release --workspace --bins` first.
#
#   bench/compare.sh                      # everything (about 20 minutes on 2 cores)
#   ONLY="amqp" bench/compare.sh          # scenarios whose name contains "amqp"
#   BROKERS="mqgate mosquitto" bench/compare.sh
#   BROKERS="mqgate mqgate-js" ONLY=durable bench/compare.sh
#
# The `py-*` rows drive Python's own clients with their defaults (bench/pyclients.py:
# pika, py-amqp as Celery uses it, paho-mqtt), from a venv at target/bench-venv (PY
# names another interpreter) made here from bench/requirements.txt when it is missing;
# without one they are skipped.
#
# mqgate-js: mqgate on the jetstream backend over three NATS servers started here on
# loopback (R3, sync_interval always; `nats-server` from NATS_SERVER, PATH, or the one
# the tests installed under target/); its broker CPU is mqgate's plus the three
# servers' (BENCH_EXTRA_PIDS). The QoS 0, transient and many-client scenarios are left
# out for it (they do not touch the log, or take the whole machine).
#
# Knobs (environment): ROUNDS (3), MESSAGES (100000), OUT (the markdown table, default
# /tmp/mqgate-compare.md), RAW (the per-run lines, default /tmp/mqgate-compare.tsv).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
MESSAGES=${MESSAGES:-100000}
BROKERS=${BROKERS:-"mqgate rabbitmq mosquitto sink"}
ONLY=${ONLY:-}
OUT=${OUT:-/tmp/mqgate-compare.md}
RAW=${RAW:-/tmp/mqgate-compare.tsv}
BIN=target/release
WORK=$(mktemp -d /tmp/mqgate-compare.XXXXXX)
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

for b in mqgate bench_sink amqp_pubsub mqtt_pubsub mqtt_many_topics; do
  [[ -x $BIN/$b ]] || { echo "compare: $BIN/$b missing: cargo build --release --workspace --bins" >&2; exit 1; }
done

# Ports: each broker on its own, so a leftover of one never answers for another.
MQGATE_AMQP=127.0.0.1:35672 MQGATE_MQTT=127.0.0.1:21883
RABBIT_AMQP=127.0.0.1:5672 RABBIT_MQTT=127.0.0.1:1883
MOSQ_MQTT=127.0.0.1:11883
SINK_AMQP=127.0.0.1:45672 SINK_MQTT=127.0.0.1:41883
NATS_PIDS=""

nats_bin() {
  if [[ -n ${NATS_SERVER:-} ]]; then echo "$NATS_SERVER"; return; fi
  if command -v nats-server >/dev/null; then command -v nats-server; return; fi
  for p in target/debug/nats-server-*/bin/nats-server target/release/nats-server-*/bin/nats-server; do
    [[ -x $p ]] && { echo "$p"; return; }
  done
  echo "compare: no nats-server (set NATS_SERVER, or run the jetstream tests once to install it)" >&2
  return 1
}

PY=${PY:-target/bench-venv/bin/python}
py_ready() { "$PY" -c 'import amqp, paho.mqtt, pika' >/dev/null 2>&1; }
if ! py_ready && [[ $PY == target/bench-venv/bin/python ]]; then
  echo "compare: making target/bench-venv for the py-* rows (bench/requirements.txt)" >&2
  rm -rf target/bench-venv
  { python3 -m venv target/bench-venv && target/bench-venv/bin/pip install -q -r bench/requirements.txt; } >&2 ||
    rm -rf target/bench-venv
fi
PY_OK=0
if py_ready; then PY_OK=1; else echo "compare: no Python clients ($PY); the py-* rows are skipped" >&2; fi

PID=""
: >"$RAW"

wait_port() { # host:port
  # Long enough for the ephemeral ports a 10,000-client scenario left in TIME_WAIT.
  for _ in $(seq 1 900); do
    (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "compare: nothing listens on $1" >&2
  return 1
}

start() { # broker
  case $1 in
    mqgate)
      rm -rf "$WORK/mqgate-data"
      MQGATE__LISTENERS__ADMIN=127.0.0.1:35673 RUST_LOG=warn \
        $BIN/mqgate serve --data "$WORK/mqgate-data" --amqp $MQGATE_AMQP --mqtt $MQGATE_MQTT \
        2>"$WORK/mqgate.log" &
      PID=$!
      wait_port $MQGATE_AMQP && wait_port $MQGATE_MQTT ;;
    mqgate-js)
      local nats
      nats=$(nats_bin) || return 1
      rm -rf "$WORK/js" && mkdir -p "$WORK/js"
      NATS_PIDS=""
      for i in 1 2 3; do
        printf '%s\n' "server_name: n$i" "listen: 127.0.0.1:3422$i" "http: 127.0.0.1:3822$i" \
          "jetstream { store_dir: \"$WORK/js/n$i\", sync_interval: always }" \
          "cluster { name: bench, listen: 127.0.0.1:3622$i, routes: [nats-route://127.0.0.1:36221, nats-route://127.0.0.1:36222, nats-route://127.0.0.1:36223] }" \
          >"$WORK/js/n$i.conf"
        "$nats" -c "$WORK/js/n$i.conf" 2>"$WORK/js/n$i.log" &
        NATS_PIDS="$NATS_PIDS${NATS_PIDS:+,}$!"
      done
      for i in 1 2 3; do
        for _ in $(seq 1 300); do
          curl -sf "http://127.0.0.1:3822$i/healthz" >/dev/null 2>&1 && break
          sleep 0.1
        done
      done
      printf '%s\n' '[store]' 'backend = "jetstream"' "path = \"$WORK/js/view\"" '[store.jetstream]' \
        'servers = ["nats://127.0.0.1:34221", "nats://127.0.0.1:34222", "nats://127.0.0.1:34223"]' \
        'node_id = "bench"' >"$WORK/js/gw.toml"
      MQGATE__LISTENERS__ADMIN=127.0.0.1:35673 RUST_LOG=warn \
        $BIN/mqgate serve --config "$WORK/js/gw.toml" --amqp $MQGATE_AMQP --mqtt $MQGATE_MQTT \
        2>"$WORK/mqgate-js.log" &
      PID=$!
      export BENCH_EXTRA_PIDS=$NATS_PIDS
      wait_port $MQGATE_AMQP && wait_port $MQGATE_MQTT ;;
    rabbitmq)
      rabbitmq-plugins enable --offline rabbitmq_mqtt >/dev/null
      rabbitmq-server -detached >/dev/null 2>&1
      # The node registers with epmd a moment after -detached returns.
      for _ in $(seq 1 60); do
        rabbitmqctl -q await_startup >/dev/null 2>&1 && break
        sleep 1
      done
      PID=$(pgrep -f 'beam.smp.*rabbit' | head -1)
      wait_port $RABBIT_AMQP && wait_port $RABBIT_MQTT ;;
    mosquitto)
      printf 'listener %s %s\nallow_anonymous true\n' "${MOSQ_MQTT#*:}" "${MOSQ_MQTT%:*}" >"$WORK/mosquitto.conf"
      mosquitto -c "$WORK/mosquitto.conf" 2>"$WORK/mosquitto.log" &
      PID=$!
      wait_port $MOSQ_MQTT ;;
    sink)
      $BIN/bench_sink --amqp $SINK_AMQP --mqtt $SINK_MQTT 2>"$WORK/sink.log" &
      PID=$!
      wait_port $SINK_AMQP && wait_port $SINK_MQTT ;;
  esac
}

stop() { # broker
  case $1 in
    rabbitmq) rabbitmqctl stop >/dev/null 2>&1 || true ;;
    *) kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true ;;
  esac
  if [[ -n $NATS_PIDS ]]; then
    # shellcheck disable=SC2086
    kill ${NATS_PIDS//,/ } 2>/dev/null || true
    wait 2>/dev/null || true
    NATS_PIDS=""
    unset BENCH_EXTRA_PIDS
  fi
  PID=""
}
trap 'stop "${CURRENT:-}" 2>/dev/null; rm -rf "$WORK"' EXIT

amqp_url() {
  case $1 in
    mqgate | mqgate-js) echo "amqp://guest:guest@$MQGATE_AMQP/%2f" ;;
    rabbitmq) echo "amqp://guest:guest@$RABBIT_AMQP/%2f" ;;
    sink) echo "amqp://guest:guest@$SINK_AMQP/%2f" ;;
  esac
}
mqtt_addr() {
  case $1 in
    mqgate | mqgate-js) echo $MQGATE_MQTT ;;
    rabbitmq) echo $RABBIT_MQTT ;;
    mosquitto) echo $MOSQ_MQTT ;;
    sink) echo $SINK_MQTT ;;
  esac
}

# name | protocol | arguments. The sink runs each with --publish-only.
SCENARIOS=(
  "amqp-transient-128B|amqp|--size 128"
  "amqp-transient-4KiB|amqp|--size 4096"
  "amqp-durable-confirms-128B|amqp|--durable --size 128"
  "amqp-durable-confirms-4KiB|amqp|--durable --size 4096"
  # Bodies that do not compress (random bytes, different in every message): the rows
  # above send zeros after the stamp, which the log's LZ4 reduces to nothing.
  "amqp-transient-4KiB-random|amqp|--size 4096 --random"
  "amqp-durable-confirms-4KiB-random|amqp|--durable --size 4096 --random"
  "amqp-fanout-1to4|amqp|--fanout 4 --size 128"
  "amqp-durable-5000/s|amqp|--durable --size 128 --rate 5000 --messages 25000"
  "mqtt-qos0-1to1|mqtt|--qos 0"
  "mqtt-qos1-1to1|mqtt|--qos 1"
  "mqtt-qos0-4to4|mqtt|--qos 0 --pairs 4 --messages $((MESSAGES / 4))"
  "mqtt-qos1-4to4|mqtt|--qos 1 --pairs 4 --messages $((MESSAGES / 4))"
  "mqtt-qos1-fanout-1to100|mqtt|--qos 1 --fanout 100 --messages $((MESSAGES / 50))"
  "mqtt-qos1-5000/s|mqtt|--qos 1 --rate 5000 --messages 25000"
  "mqtt-10k-topics|many|--qos 1 --messages 20000"
  # Clients' default settings (issue 14): rumqttc keeps 100 QoS 1 publishes in flight
  # (paho 20); pika, amqplib and Celery ack each message on its own.
  "defaults-mqtt-qos1-1to1|mqtt|--qos 1 --inflight 100"
  "defaults-mqtt-qos1-1to1-window20|mqtt|--qos 1 --inflight 20"
  "defaults-mqtt-qos1-4to4|mqtt|--qos 1 --inflight 100 --pairs 4 --messages $((MESSAGES / 4))"
  "defaults-mqtt-qos1-5000/s|mqtt|--qos 1 --inflight 100 --rate 5000 --messages 25000"
  "defaults-amqp-durable-ack1-prefetch100|amqp|--durable --ack-every 1 --prefetch 100"
  "defaults-amqp-durable-ack1-prefetch1000|amqp|--durable --ack-every 1 --prefetch 1000"
  # The same acks, each handed to lapin without awaiting it before the next delivery,
  # as pika and py-amqp (Celery) write an ack and go on: lapin's awaited ack is a round
  # trip through its I/O loop per message, the ceiling of the two rows above.
  "defaults-amqp-durable-ack1-nowait-prefetch100|amqp|--durable --ack-every 1 --prefetch 100 --ack-nowait"
  "defaults-amqp-durable-ack1-nowait-prefetch1000|amqp|--durable --ack-every 1 --prefetch 1000 --ack-nowait"
  # Does the consumer keep up over a long run (~30-60 s here, RabbitMQ ~100 s)? The
  # notes give the delivered rate over the publisher's confirmed rate.
  "defaults-amqp-durable-ack1-nowait-prefetch100-2M|amqp|--durable --ack-every 1 --prefetch 100 --ack-nowait --messages 2000000 --rounds 1"
  # Python's clients with their defaults (bench/pyclients.py), publisher and consumer
  # in processes of their own: pika with each publish awaiting its confirm (what
  # `confirm_delivery()` does), then pika as it comes (no confirms, no basic.qos);
  # py-amqp as a Celery worker with concurrency 2 drives it (prefetch 4 x 2, no
  # publisher confirms); paho-mqtt with its window of 20, flat out and paced.
  "py-pika-durable-confirms-ack1-prefetch100|py|--client pika --durable --confirms --prefetch 100 --messages 10000"
  "py-pika-durable-ack1|py|--client pika --durable --messages 20000"
  "py-celery-pyamqp-durable-ack1-prefetch8|py|--client pyamqp --durable --prefetch 8 --messages 20000"
  "py-paho-qos1-1to1|py|--client paho --qos 1 --messages 20000"
  "py-paho-qos1-1000/s|py|--client paho --qos 1 --rate 1000 --messages 10000"
  # As many idle subscribers as one process may hold here (20,000 file descriptors).
  "mqtt-19k-idle|many|--qos 1 --messages 20000 --large 19000"
)

run() { # broker scenario-line
  local broker=$1 name proto args line
  IFS='|' read -r name proto args <<<"$2"
  [[ -z $ONLY || $name == *$ONLY* ]] || return 0
  local extra=""
  [[ $broker == sink ]] && extra="--publish-only"
  [[ $args == *--messages* ]] || args="--messages $MESSAGES $args"
  [[ $args == *--rounds* ]] || args="--rounds $ROUNDS $args"
  if [[ $broker == mqgate-js ]]; then
    [[ $proto == many || $name == *transient* || $name == *qos0* || $name == *-2M ]] && return 0
  fi
  # The Python clients count deliveries, which the sink makes none of.
  [[ $proto == py && $broker == sink ]] && return 0
  case $proto in
    amqp)
      [[ $broker == mosquitto ]] && return 0
      # shellcheck disable=SC2086
      line=$($BIN/amqp_pubsub --url "$(amqp_url "$broker")" --broker-pid "$PID" \
        $args $extra | tee >(cat >&2) | grep '^RESULT' || true) ;;
    mqtt)
      # shellcheck disable=SC2086
      line=$($BIN/mqtt_pubsub --addr "$(mqtt_addr "$broker")" --broker-pid "$PID" \
        $args $extra | tee >(cat >&2) | grep '^RESULT' || true) ;;
    py)
      [[ $PY_OK == 1 ]] || return 0
      [[ $broker == mosquitto && $args != *paho* ]] && return 0
      # shellcheck disable=SC2086
      line=$($PY bench/pyclients.py --amqp-url "$(amqp_url "$broker")" \
        --mqtt-addr "$(mqtt_addr "$broker")" --broker-pid "$PID" $args \
        | tee >(cat >&2) | grep '^RESULT' || true) ;;
    many)
      # 10,000 / 19,000 idle subscribed clients: the sink delivers nothing and RabbitMQ's MQTT
      # plugin takes minutes to connect them; Mosquitto and mqgate only.
      [[ $broker == mqgate || $broker == mosquitto ]] || return 0
      # shellcheck disable=SC2086
      line=$($BIN/mqtt_many_topics --addr "$(mqtt_addr "$broker")" --broker-pid "$PID" \
        $args | tee >(cat >&2) | grep '^RESULT' || true) ;;
  esac
  [[ -n $line ]] || line="RESULT failed=1"
  printf '%s\t%s\t%s\n' "$name" "$broker" "${line#RESULT }" >>"$RAW"
}

for broker in $BROKERS; do
  echo "== $broker" >&2
  CURRENT=$broker
  if ! start "$broker"; then
    echo "compare: $broker did not start; skipped" >&2
    stop "$broker"
    continue
  fi
  for s in "${SCENARIOS[@]}"; do
    echo "-- $broker: ${s%%|*}" >&2
    run "$broker" "$s"
  done
  stop "$broker"
  CURRENT=""
done

python3 bench/table.py "$RAW" | tee "$OUT"
echo "compare: table in $OUT, raw lines in $RAW" >&2
