#!/usr/bin/env python3
"""Python's own clients with their default settings, as their users run them: pika and
py-amqp (Celery's client) over AMQP 0-9-1, paho-mqtt over MQTT 3.1.1. One publisher
process and one consumer process per round (an application's producer and its worker
are separate processes), each a plain loop of the client's blocking API:

- pika: `BlockingConnection`; the publisher (`--confirms`: `confirm_delivery()`, which
  makes each `basic_publish` wait for its confirm) sends persistent messages; the
  consumer `basic_consume`s with `auto_ack=False` and `basic_ack`s each message in its
  callback (multiple=False). No `basic_qos` unless `--prefetch`: pika sends none.
- pyamqp: py-amqp as Celery drives it: `confirm_publish` off (Celery's default), the
  worker's `basic_qos(prefetch)` (Celery: 4 x concurrency) and one `basic_ack` a message
  from `drain_events`.
- paho: paho-mqtt 2.x, its default window (`max_inflight_messages` 20); the publisher
  calls `publish(qos=1)` for every message (paho queues what its window does not take),
  the subscriber takes them at QoS 1 (paho PUBACKs each after its callback).

Every body carries a sequence number and the send time, so the consumer counts loss,
duplicates and end-to-end latency. Prints a line per round and a RESULT line in
bench/compare.sh's format (medians over the rounds): rate = messages delivered per
second (first publish to last delivery), kept_up = that rate over the publisher's own
(confirmed, for confirms) rate, cpu_us = the broker's user+system CPU time per message
(/proc/PID/stat of --broker-pid and BENCH_EXTRA_PIDS).

  target/bench-venv/bin/python bench/pyclients.py --client pika --amqp-url \
      amqp://guest:guest@127.0.0.1:5672/%2f --broker-pid PID --durable --confirms \
      --prefetch 100 --messages 20000 --rounds 3

The clients: `python3 -m venv target/bench-venv && target/bench-venv/bin/pip install -r
bench/requirements.txt` (bench/compare.sh makes that venv when it is missing).
"""

import argparse
import multiprocessing as mp
import os
import random
import statistics
import struct
import sys
import time
import urllib.parse

STAMP = struct.Struct("<QQ")  # sequence number, send time (µs since the epoch)
IDLE_TIMEOUT = 15.0  # a consumer that gets nothing for this long stops (the rest is lost)


def now_us():
    return time.time_ns() // 1000


def body(seq, size, pad):
    return STAMP.pack(seq, now_us()) + pad[: max(0, size - STAMP.size)]


def paced(rate, start, i):
    """Sleep until message i is due at `rate` per second from `start` (monotonic)."""
    if rate:
        wait = start + i / rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)


def publish_all(a, sync, send):
    """Once the round starts, hand `send` every message's body (paced at `--rate`); the
    round's start and when the last publish was handed over (for pika with confirms,
    confirmed: its `basic_publish` waits)."""
    pad = bytes(a.size)
    sync.wait_go()
    start = time.monotonic()
    for i in range(a.messages):
        paced(a.rate, start, i)
        send(body(i, a.size, pad))
    return start, time.monotonic()


class Tally:
    """What a consumer saw."""

    def __init__(self, n):
        self.n = n
        self.seen = bytearray(n)
        self.got = 0
        self.dup = 0
        self.lat = []
        self.last = time.monotonic()

    def add(self, data):
        seq, sent = STAMP.unpack_from(data)
        self.lat.append(now_us() - sent)
        if seq < self.n and not self.seen[seq]:
            self.seen[seq] = 1
            self.got += 1
        else:
            self.dup += 1
        self.last = time.monotonic()

    def done(self):
        return self.got >= self.n

    def waiting(self):
        """Not done, and something came within IDLE_TIMEOUT (else the rest is lost)."""
        return not self.done() and time.monotonic() - self.last < IDLE_TIMEOUT

    def stop(self, pids):
        """The consumer has what it will get: the broker's CPU time and the machine's
        steal now (before the consumer cancels, deletes its queue and closes)."""
        self.cpu_end, self.steal_end = cpu_seconds(pids), steal_seconds()

    def result(self):
        return {
            "got": self.got,
            "dup": self.dup,
            "lat": self.lat,
            "last": self.last,
            "cpu_end": self.cpu_end,
            "steal_end": self.steal_end,
        }


# ---- pika -----------------------------------------------------------------------------


def pika_params(url):
    import pika

    return pika.URLParameters(url)


def pika_consumer(a, queue, ready, out):
    import pika

    conn = pika.BlockingConnection(pika_params(a.amqp_url))
    ch = conn.channel()
    ch.queue_declare(queue=queue, durable=a.durable)
    if a.prefetch:
        ch.basic_qos(prefetch_count=a.prefetch)
    t = Tally(a.messages)

    def on_message(ch, method, _props, data):
        t.add(data)
        ch.basic_ack(delivery_tag=method.delivery_tag)
        if t.done():
            ch.stop_consuming()

    tag = ch.basic_consume(queue=queue, on_message_callback=on_message, auto_ack=False)
    ready.set()
    while t.waiting():
        conn.process_data_events(time_limit=1)
    t.stop(a.pids)
    ch.basic_cancel(tag)
    ch.queue_delete(queue=queue)
    conn.close()
    out.put(t.result())


def pika_publisher(a, queue, sync, out):
    import pika

    conn = pika.BlockingConnection(pika_params(a.amqp_url))
    ch = conn.channel()
    if a.confirms:
        ch.confirm_delivery()
    props = pika.BasicProperties(delivery_mode=2 if a.durable else 1)

    def send(data):
        ch.basic_publish(exchange="", routing_key=queue, body=data, properties=props)

    start, end = publish_all(a, sync, send)
    conn.close()
    out.put({"start": start, "end": end})


# ---- py-amqp (Celery's client) -------------------------------------------------------


def pyamqp_conn(url, confirm=False):
    import amqp

    u = urllib.parse.urlparse(url)
    vhost = urllib.parse.unquote(u.path[1:]) if len(u.path) > 1 else "/"
    conn = amqp.Connection(
        host=f"{u.hostname}:{u.port or 5672}",
        userid=urllib.parse.unquote(u.username or "guest"),
        password=urllib.parse.unquote(u.password or "guest"),
        virtual_host=vhost,
        confirm_publish=confirm,
    )
    conn.connect()
    return conn


def pyamqp_consumer(a, queue, ready, out):
    conn = pyamqp_conn(a.amqp_url)
    ch = conn.channel()
    ch.queue_declare(queue=queue, durable=a.durable, auto_delete=False)
    if a.prefetch:
        ch.basic_qos(0, a.prefetch, False)
    t = Tally(a.messages)

    def on_message(msg):
        t.add(msg.body)
        ch.basic_ack(msg.delivery_tag)

    tag = ch.basic_consume(queue=queue, callback=on_message)
    ready.set()
    import socket

    while t.waiting():
        try:
            conn.drain_events(timeout=1)
        except socket.timeout:
            pass
    t.stop(a.pids)
    ch.basic_cancel(tag)
    ch.queue_delete(queue)
    conn.close()
    out.put(t.result())


def pyamqp_publisher(a, queue, sync, out):
    import amqp

    conn = pyamqp_conn(a.amqp_url, confirm=a.confirms)
    ch = conn.channel()
    mode = 2 if a.durable else 1

    def send(data):
        ch.basic_publish(amqp.Message(data, delivery_mode=mode), exchange="", routing_key=queue)

    start, end = publish_all(a, sync, send)
    conn.close()
    out.put({"start": start, "end": end})


# ---- paho-mqtt -----------------------------------------------------------------------


def paho_client(a, cid):
    import paho.mqtt.client as mqtt

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv311)
    host, port = a.mqtt_addr.rsplit(":", 1)
    return c, host, int(port)


def paho_consumer(a, topic, ready, out):
    import threading

    c, host, port = paho_client(a, f"py-sub-{os.getpid()}")
    t = Tally(a.messages)
    finished = threading.Event()
    subscribed = threading.Event()

    def on_connect(c, _u, _f, rc, _p):
        if rc.is_failure:
            print(f"pyclients: the subscriber's CONNECT was refused: {rc}", file=sys.stderr)
            return
        c.subscribe(topic, qos=a.qos)

    def on_subscribe(_c, _u, _mid, _rcs, _p):
        subscribed.set()

    def on_message(_c, _u, msg):
        t.add(msg.payload)
        if t.done():
            finished.set()

    c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
    c.connect(host, port, keepalive=60)
    c.loop_start()
    if not subscribed.wait(30):
        sys.exit("pyclients: the subscriber got no SUBACK")
    ready.set()
    while t.waiting():
        finished.wait(1)
    t.stop(a.pids)
    c.disconnect()
    c.loop_stop()
    out.put(t.result())


def paho_publisher(a, topic, sync, out):
    import threading

    c, host, port = paho_client(a, f"py-pub-{os.getpid()}")
    acked = [0]
    all_acked = threading.Event()
    connected = threading.Event()

    def on_connect(_c, _u, _f, rc, _p):
        if not rc.is_failure:
            connected.set()

    def on_publish(_c, _u, _mid, _rc, _p):
        acked[0] += 1
        if acked[0] >= a.messages:
            all_acked.set()

    c.on_connect, c.on_publish = on_connect, on_publish
    c.connect(host, port, keepalive=60)
    c.loop_start()
    if not connected.wait(30):
        sys.exit("pyclients: the publisher's CONNECT got no CONNACK, or a refusal")
    start, _ = publish_all(a, sync, lambda data: c.publish(topic, data, qos=a.qos))
    if not all_acked.wait(300):
        sys.exit(f"pyclients: {a.messages - acked[0]} publishes got no PUBACK in 300 s")
    end = time.monotonic()
    c.disconnect()
    c.loop_stop()
    out.put({"start": start, "end": end})


CLIENTS = {
    "pika": (pika_publisher, pika_consumer),
    "pyamqp": (pyamqp_publisher, pyamqp_consumer),
    "paho": (paho_publisher, paho_consumer),
}

# ---- measuring -----------------------------------------------------------------------


def cpu_seconds(pids):
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def steal_seconds():
    with open("/proc/stat") as f:
        return int(f.readline().split()[8]) / os.sysconf("SC_CLK_TCK")


def pct(sorted_values, p):
    if not sorted_values:
        return 0
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * p / 100))]


class Sync:
    """The publisher says it is connected (and set up: confirms), then waits for go."""

    def __init__(self, ctx):
        self.connected, self.go = ctx.Event(), ctx.Event()

    def wait_go(self):
        self.connected.set()
        self.go.wait()


def abort(procs, why):
    for p in procs:
        p.kill()
    sys.exit(f"pyclients: {why}")


def wait_for(event, proc, procs, what, limit=60):
    """Wait for `event`; if `proc` dies or `limit` seconds pass first, stop `procs`."""
    deadline = time.monotonic() + limit
    while not event.wait(0.2):
        if not proc.is_alive() or time.monotonic() > deadline:
            abort(procs, what)


def take(out, proc, procs, limit):
    """What `proc` put on `out`; if it died without a word, or said nothing for `limit`
    seconds (a publisher held by the broker's flow control forever), stop `procs`."""
    import queue

    deadline = time.monotonic() + limit
    while True:
        try:
            return out.get(timeout=1)
        except queue.Empty:
            if not proc.is_alive() and out.empty():
                abort(procs, "a client process died (its error is above)")
            if time.monotonic() > deadline:
                abort(procs, f"a client process said nothing for {limit} s")


def round_(a, n, pids):
    publisher, consumer = CLIENTS[a.client]
    name = f"bench-py-{os.getpid()}-{n}-{random.randrange(1 << 30)}"
    if a.client == "paho":
        name = "bench/py/" + name
    ctx = mp.get_context("fork")
    ready, sync = ctx.Event(), Sync(ctx)
    cons_out, pub_out = ctx.Queue(), ctx.Queue()
    cons = ctx.Process(target=consumer, args=(a, name, ready, cons_out))
    cons.start()
    wait_for(ready, cons, (cons,), "the consumer did not start")
    pub = ctx.Process(target=publisher, args=(a, name, sync, pub_out))
    pub.start()
    wait_for(sync.connected, pub, (cons, pub), "the publisher did not connect")
    cpu0, steal0 = cpu_seconds(pids), steal_seconds()
    sync.go.set()
    # Each side reports unless it died: the consumer stops IDLE_TIMEOUT after its last
    # message (it reads the broker's CPU time as it stops), the publisher once its last
    # publish is handed over (confirmed with confirms; acknowledged, paho).
    c = take(cons_out, cons, (cons, pub), a.messages / 100 + 120)
    p = take(pub_out, pub, (cons, pub), 120)
    cpu1, steal1 = c["cpu_end"], c["steal_end"]
    cons.join()
    pub.join()
    lat = sorted(c["lat"])
    delivered_in = max(c["last"] - p["start"], 1e-9)
    rate = c["got"] / delivered_in
    pub_rate = a.messages / max(p["end"] - p["start"], 1e-9)
    cpu = (cpu1 - cpu0) * 1e6 / max(c["got"], 1) if cpu0 is not None and cpu1 is not None else float("nan")
    r = {
        "rate": rate,
        "p50": pct(lat, 50),
        "p99": pct(lat, 99),
        "p999": pct(lat, 99.9),
        "cpu": cpu,
        "lost": a.messages - c["got"],
        "dup": c["dup"],
        "kept_up": rate / pub_rate if pub_rate else 0,
        "pub_rate": pub_rate,
        "steal_ms": (steal1 - steal0) * 1e3,
    }
    print(
        f"round {n}: {r['rate']:.0f} msg/s delivered, {pub_rate:.0f} published, p50 {r['p50']} µs, "
        f"p99 {r['p99']} µs, p99.9 {r['p999']} µs, broker CPU {r['cpu']:.1f} µs/msg, lost {r['lost']}, "
        f"dup {r['dup']}, stolen {r['steal_ms']:.0f} ms",
        flush=True,
    )
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--client", choices=sorted(CLIENTS), required=True)
    ap.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/%2f")
    ap.add_argument("--mqtt-addr", default="127.0.0.1:1883")
    ap.add_argument("--broker-pid", type=int)
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--rate", type=float, default=0, help="messages per second (0: flat out)")
    ap.add_argument("--durable", action="store_true", help="AMQP: durable queue, persistent messages")
    ap.add_argument("--confirms", action="store_true", help="AMQP: publisher confirms, each awaited")
    ap.add_argument("--prefetch", type=int, default=0, help="AMQP: basic.qos prefetch (0: none sent)")
    ap.add_argument("--qos", type=int, default=1, help="MQTT: QoS of publish and subscription")
    a = ap.parse_args()
    pids = [a.broker_pid] if a.broker_pid else []
    pids += [int(p) for p in os.environ.get("BENCH_EXTRA_PIDS", "").split(",") if p]
    a.pids = pids
    rounds = [round_(a, n, pids) for n in range(1, a.rounds + 1)]

    def med(k):
        return statistics.median(r[k] for r in rounds)

    print(
        f"median: {med('rate'):.0f} msg/s, p50 {med('p50'):.0f} µs, p99 {med('p99'):.0f} µs, "
        f"broker CPU {med('cpu'):.1f} µs/msg, kept up {med('kept_up'):.2f}"
    )
    print(
        f"RESULT rate={med('rate'):.0f} p50_us={med('p50'):.0f} p99_us={med('p99'):.0f} "
        f"p999_us={med('p999'):.0f} cpu_us={med('cpu'):.2f} lost={sum(r['lost'] for r in rounds)} "
        f"dup={sum(r['dup'] for r in rounds)} kept_up={med('kept_up'):.2f} "
        f"pub_rate={med('pub_rate'):.0f} steal_ms={med('steal_ms'):.0f}"
    )


if __name__ == "__main__":
    main()
