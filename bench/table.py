#!/usr/bin/env python3
"""Turn bench/compare.sh's raw lines (scenario, broker, key=value...) into markdown:
the measured figures per broker, then mqgate's ratios against each peer and the sink."""
import sys

rows = {}  # scenario -> broker -> {key: value}
order = []
for line in open(sys.argv[1]):
    parts = line.rstrip("\n").split("\t")
    if len(parts) < 3:
        continue
    name, broker, kv = parts[0], parts[1], parts[2]
    vals = dict(p.split("=", 1) for p in kv.split() if "=" in p)
    if name not in rows:
        rows[name] = {}
        order.append(name)
    rows[name][broker] = vals


def f(v, k):
    try:
        return float(v.get(k, "nan"))
    except ValueError:
        return float("nan")


def fmt(x, nd=0):
    return "-" if x != x else f"{x:,.{nd}f}"


print("| scenario | broker | rate /s | p50 µs | p99 µs | p99.9 µs | broker CPU µs | lost | dup | notes |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
for name in order:
    for broker, v in rows[name].items():
        notes = []
        if "failed" in v:
            notes.append("failed")
        if "kib_per_conn" in v:
            notes.append(f"{v['kib_per_conn']} KiB/idle conn; 10 clients: {v.get('small_rate')} /s at {v.get('small_cpu_us')} µs")
        if "kept_up" in v and broker != "sink":
            # amqp_pubsub's publisher awaits confirms; pyclients' as its client does
            # (confirmed with confirms, PUBACKed with paho, written without either).
            notes.append(f"delivered at {v['kept_up']} of the publisher's rate")
        if broker == "sink":
            notes.append("publish only (ceiling)")
        if f(v, "steal_ms") >= 10:
            notes.append(f"the host stole {fmt(f(v, 'steal_ms'))} ms of CPU from this VM")
        print(
            f"| {name} | {broker} | {fmt(f(v, 'rate'))} | {fmt(f(v, 'p50_us'))} | {fmt(f(v, 'p99_us'))} "
            f"| {fmt(f(v, 'p999_us'))} | {fmt(f(v, 'cpu_us'), 1)} | {v.get('lost', '-')} | {v.get('dup', '-')} | {'; '.join(notes)} |"
        )

print()
print("mqgate ÷ peer: throughput (higher is better), broker CPU per message (lower is better);")
print("at a fixed rate (`/s` scenarios) p99 latency (lower is better) instead of throughput.")
print()
print("| scenario | peer | throughput × | CPU/msg × | p99 × | mqgate ÷ sink ceiling |")
print("|---|---|---:|---:|---:|---:|")
for name in order:
    r = rows[name]
    m = r.get("mqgate")
    if not m:
        continue
    sink = r.get("sink")
    ceiling = fmt(f(m, "rate") / f(sink, "rate"), 2) if sink else "-"
    fixed = name.endswith("/s")
    for peer in ("rabbitmq", "mosquitto", "mqgate-js"):
        p = r.get(peer)
        if not p:
            continue
        thr = "-" if fixed else fmt(f(m, "rate") / f(p, "rate"), 2)
        cpu = fmt(f(m, "cpu_us") / f(p, "cpu_us"), 2)
        p99 = fmt(f(m, "p99_us") / f(p, "p99_us"), 2) if fixed else "-"
        print(f"| {name} | {peer} | {thr} | {cpu} | {p99} | {ceiling} |")
