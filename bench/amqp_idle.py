#!/usr/bin/env python3
"""Broker memory per idle AMQP connection: open N connections (PLAIN guest/guest, vhost /,
one channel each), leave them idle, and print the broker's RSS growth per connection.

    ./target/release/mqgate serve --memory --amqp 127.0.0.1:35672 &
    python3 bench/amqp_idle.py --port 35672 --pid $! --connections 10000

The client is plain asyncio sockets (no AMQP library), so it runs on any Python 3.
"""
import argparse
import asyncio
import resource
import struct
import time


def frame(ty, ch, payload):
    return struct.pack(">BHI", ty, ch, len(payload)) + payload + b"\xce"


def method(ch, cls, mid, args=b""):
    return frame(1, ch, struct.pack(">HH", cls, mid) + args)


def shortstr(s):
    return bytes([len(s)]) + s


HANDSHAKE_2 = method(0, 10, 31, struct.pack(">HIH", 16, 131072, 0)) + method(
    0, 10, 40, shortstr(b"/") + shortstr(b"") + b"\x00"
) + method(1, 20, 10, b"\x00")
START_OK = method(
    0,
    10,
    11,
    struct.pack(">I", 0)
    + shortstr(b"PLAIN")
    + struct.pack(">I", 12)
    + b"\x00guest\x00guest"
    + shortstr(b"en_US"),
)


async def read_frame(r):
    hdr = await r.readexactly(7)
    ty, ch, size = struct.unpack(">BHI", hdr)
    payload = await r.readexactly(size + 1)
    return ty, payload[:-1]


async def open_conn(host, port):
    r, w = await asyncio.open_connection(host, port)
    w.write(b"AMQP\x00\x00\x09\x01")
    await read_frame(r)  # start
    w.write(START_OK)
    await read_frame(r)  # tune
    w.write(HANDSHAKE_2)
    await read_frame(r)  # open-ok
    ty, p = await read_frame(r)  # channel.open-ok
    assert p[:4] == b"\x00\x14\x00\x0b", p
    return r, w


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5672)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--connections", type=int, default=5000)
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    time.sleep(1)
    before = rss_kib(a.pid)
    conns = []
    t = time.time()
    for i in range(0, a.connections, 200):
        conns += await asyncio.gather(
            *(open_conn(a.host, a.port) for _ in range(min(200, a.connections - i)))
        )
    took = time.time() - t
    await asyncio.sleep(3)
    after = rss_kib(a.pid)
    per = (after - before) / len(conns)
    print(
        f"{len(conns)} idle AMQP connections (one channel each) in {took:.1f} s: "
        f"broker RSS {before / 1024:.1f} MiB -> {after / 1024:.1f} MiB, "
        f"{per:.1f} KiB per connection"
    )
    for _, w in conns:
        w.close()


asyncio.run(main())
