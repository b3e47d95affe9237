#!/usr/bin/env python3
"""Publish->delivery latency of MQTT 3.1.1 QoS 1 at a fixed rate, from a client that
never waits for its PUBACKs.

`mqtt_pubsub --rate` drives rumqttc, whose event loop also handles the PUBACKs; when
the broker answers late (after its fsync), the client's own scheduling is part of the
figure. This probe takes the client out: one thread, raw sockets, a publisher that
sends on its schedule whatever the PUBACKs do (it reads and drops them) and a
subscriber that PUBACKs every delivery. Payload: sequence (u64 BE), send time in
microseconds since the epoch (u64 BE), padding, as `mqgate_bench::stamp` writes it.

    python3 bench/mqtt_rate_probe.py --port 1883 --rate 5000 --messages 15000

Prints the median, p90 and p99 of publish->delivery latency, and the CPU time the
host took from this machine's virtual CPUs meanwhile (`steal`: a throttled VM stalls
every thread at once). It needs no package
beyond Python 3. The client shares the machine's cores with the broker: compare
brokers (or settings) in the same sitting, not against other tools' figures.
"""
import argparse
import select
import socket
import struct
import time


def remaining_length(n):
    out = b""
    while True:
        b, n = n % 128, n // 128
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def utf8(s):
    return struct.pack(">H", len(s)) + s


def connect(host, port, client_id):
    s = socket.create_connection((host, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    vh = utf8(b"MQTT") + bytes([4, 2]) + struct.pack(">H", 60) + utf8(client_id)
    s.sendall(b"\x10" + remaining_length(len(vh)) + vh)
    ack = s.recv(4)
    if len(ack) < 4 or ack[0] != 0x20 or ack[3] != 0:
        raise SystemExit(f"CONNECT refused: {ack!r}")
    return s


def packets(buf):
    """Whole packets at the head of `buf` and what is left."""
    out = []
    while len(buf) >= 2:
        mult, n, i = 1, 0, 1
        while True:
            if i >= len(buf):
                return out, buf
            b = buf[i]
            n += (b & 127) * mult
            mult *= 128
            i += 1
            if not b & 128:
                break
        if len(buf) < i + n:
            return out, buf
        out.append((buf[0], buf[i : i + n]))
        buf = buf[i + n :]
    return out, buf


def stolen_ms():
    """The machine's stolen CPU time so far, ms (`steal` of /proc/stat; 0 elsewhere)."""
    try:
        with open("/proc/stat") as f:
            return int(f.readline().split()[8]) * 10
    except (OSError, IndexError, ValueError):
        return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("--rate", type=int, default=5000, help="publishes per second")
    ap.add_argument("--messages", type=int, default=15000)
    ap.add_argument("--size", type=int, default=128, help="payload bytes (at least 16)")
    a = ap.parse_args()
    topic = b"probe/latency"
    sub = connect(a.host, a.port, b"rate-probe-sub")
    sub_body = struct.pack(">H", 1) + utf8(topic) + b"\x01"
    sub.sendall(b"\x82" + remaining_length(len(sub_body)) + sub_body)
    if sub.recv(5)[:1] != b"\x90":
        raise SystemExit("SUBACK expected")
    pub = connect(a.host, a.port, b"rate-probe-pub")
    sub.setblocking(False)
    pub.setblocking(False)
    pad = b"x" * max(0, a.size - 16)
    lat, buf, sent, pkid = [], b"", 0, 0
    steal0 = stolen_ms()
    start = time.perf_counter()
    deadline = start + a.messages / a.rate + 30
    while len(lat) < a.messages and time.perf_counter() < deadline:
        now = time.perf_counter()
        while sent < a.messages and start + sent / a.rate <= now:
            pkid = pkid % 65535 + 1
            payload = struct.pack(">QQ", sent, time.time_ns() // 1000) + pad
            vh = utf8(topic) + struct.pack(">H", pkid) + payload
            pub.sendall(b"\x32" + remaining_length(len(vh)) + vh)
            sent += 1
        due = start + sent / a.rate if sent < a.messages else now + 0.01
        ready, _, _ = select.select([sub, pub], [], [], max(0.0, due - time.perf_counter()))
        if pub in ready:
            try:
                pub.recv(65536)  # PUBACKs: not waited for
            except BlockingIOError:
                pass
        if sub in ready:
            try:
                buf += sub.recv(65536)
            except BlockingIOError:
                pass
            got, buf = packets(buf)
            t, acks = time.time_ns() // 1000, b""
            for header, d in got:
                if header >> 4 != 3:
                    continue
                at = 2 + struct.unpack(">H", d[:2])[0]
                if header & 6:
                    acks += b"\x40\x02" + d[at : at + 2]
                    at += 2
                lat.append(t - struct.unpack(">Q", d[at + 8 : at + 16])[0])
            if acks:
                sub.sendall(acks)
    if not lat:
        raise SystemExit("nothing delivered")
    lat.sort()
    n = len(lat)
    print(
        f"delivered {n}/{a.messages}: p50 {lat[n // 2]} us, p90 {lat[n * 9 // 10]} us, "
        f"p99 {lat[n * 99 // 100]} us; the host stole {stolen_ms() - steal0} ms of CPU"
    )


if __name__ == "__main__":
    main()
