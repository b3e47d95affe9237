#!/usr/bin/env python3
"""Celery and Flower through mqgate (run by gateway/server/tests/celery.rs; any broker
speaking AMQP 0-9-1 with RabbitMQ's management API will do, RabbitMQ itself included).

Environment:
  MQGATE_AMQP_URL        the broker, amqp://guest:guest@127.0.0.1:5672//
  MQGATE_ADMIN_URL       its management API's base, http://127.0.0.1:15672
  MQGATE_ADMIN_USER/PASS for Flower's broker_api (guest/guest)
  MQGATE_RESULT_BACKEND  Celery's result backend (tasks.py: rpc://)
  MQGATE_CELERY_LOGS     where the worker and Flower logs go (a new temporary folder)

Steps, each checked:
  1. a worker (prefork, 2 processes) starts; 50 `add` tasks, one task that fails twice
     and retries itself (countdown 1 s) and one task with countdown=3 run, with the
     right results, the retries in the worker log, and the countdown task not before 3 s;
  2. Flower starts with --broker_api on the broker's management API; its broker page
     (GET /broker) lists the `celery` queue with message counts and the worker as its
     consumer;
  3. the worker stops; 20 tasks wait in `celery`: Flower shows 20 messages, 20 ready,
     no consumer;
  4. a worker starts again and runs those 20; Flower shows the queue empty;
  5. Flower and the worker stop cleanly (SIGTERM, exit code 0).
Exits 0, or prints what failed with the end of the worker and Flower logs and exits 1.
"""

import base64
import ctypes
import html
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
AMQP_URL = os.environ["MQGATE_AMQP_URL"]
ADMIN_URL = os.environ["MQGATE_ADMIN_URL"].rstrip("/")
ADMIN_USER = os.environ.get("MQGATE_ADMIN_USER", "guest")
ADMIN_PASS = os.environ.get("MQGATE_ADMIN_PASS", "guest")
LOGS = os.environ.get("MQGATE_CELERY_LOGS") or tempfile.mkdtemp(prefix="mqgate-celery-")
os.makedirs(LOGS, exist_ok=True)
T_START = time.monotonic()

sys.path.insert(0, HERE)
import tasks  # noqa: E402  (reads MQGATE_AMQP_URL)


class Failed(Exception):
    pass


def log(msg):
    print(f"[{time.monotonic() - T_START:6.2f}s] {msg}", flush=True)


def check(cond, msg):
    if not cond:
        raise Failed(msg)


def tail(path, n=60):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError as e:
        return f"({path}: {e})\n"


def _die_with_parent():
    """In the child: SIGTERM when this script dies (even by SIGKILL from the test's
    timeout), so no worker or Flower outlives it."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Proc:
    """A celery subprocess (worker or Flower) in its own process group, output to a log."""

    def __init__(self, name, args):
        self.name = name
        self.log = os.path.join(LOGS, f"{name}.log")
        self.out = open(self.log, "ab")
        self.p = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tasks", *args],
            cwd=HERE,
            stdin=subprocess.DEVNULL,
            stdout=self.out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    def alive(self):
        return self.p.poll() is None

    def stop(self, timeout=20):
        """SIGTERM and wait: the exit code (None when it had to be SIGKILLed)."""
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return None
        self.kill_group()
        self.out.close()
        return self.p.returncode

    def kill(self):
        self.kill_group()
        try:
            self.p.kill()
            self.p.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            pass

    def kill_group(self):
        """SIGKILL whatever is left in its process group (the pool's children)."""
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except OSError:
            pass


def start_worker(tag):
    w = Proc(
        f"worker-{tag}",
        [
            "worker",
            "--pool", "prefork",
            "--concurrency", "2",
            "--loglevel", "INFO",
            "--hostname", f"scenario-{tag}-{os.getpid()}@%h",
            "--queues", "celery",
        ],
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        check(w.alive(), f"the worker exited at start with {w.p.returncode}")
        with open(w.log, errors="replace") as f:
            if re.search(r"scenario-\S+ ready\.", f.read()):
                return w
        time.sleep(0.2)
    raise Failed("the worker was not ready within 30 s")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def broker_api():
    u = urllib.parse.urlsplit(ADMIN_URL)
    cred = f"{urllib.parse.quote(ADMIN_USER, '')}:{urllib.parse.quote(ADMIN_PASS, '')}"
    return f"{u.scheme}://{cred}@{u.netloc}{u.path}/api/"


def http_get(url, timeout=5, auth=None):
    req = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read().decode("utf-8", "replace")


def flower_queues(port):
    """The rows of Flower's broker table: {queue: {column: text}}."""
    status, page = http_get(f"http://127.0.0.1:{port}/broker")
    check(status == 200, f"GET /broker answered {status}")
    table = re.search(r'<table id="queue-table".*?</table>', page, re.S)
    check(table, f"no queue table in Flower's broker page:\n{page[-3000:]}")
    head = [html.unescape(re.sub(r"<[^>]+>", "", c)).strip()
            for c in re.findall(r"<th[^>]*>(.*?)</th>", table.group(0), re.S)]
    rows = {}
    for row in re.findall(r"<tr id=[^>]*>(.*?)</tr>", table.group(0), re.S):
        cells = [html.unescape(re.sub(r"<[^>]+>", "", c)).strip()
                 for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
        rows[cells[0]] = dict(zip(head, cells))
    return rows, table.group(0)


def at_least_one(v):
    return v.isdigit() and int(v) >= 1


def wait_flower_row(port, queue, want, timeout=20):
    """Poll Flower's broker page until `queue`'s row has the `want` column values (a
    string, or a test of it): the management API's counts may lag (RabbitMQ refreshes
    them every 5 s)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            rows, table = flower_queues(port)
            row = rows.get(queue)
            last = row if row is not None else f"no row for {queue!r}; table:\n{table}"
            if row is not None:
                for col in ("Messages", "Unacked", "Ready", "Consumers"):
                    check(re.fullmatch(r"\d+", row.get(col, "")),
                          f"Flower's {col} for {queue} is not a count: {row}")
                if all(v(row.get(k, "")) if callable(v) else row.get(k) == v
                       for k, v in want.items()):
                    return row
        except (OSError, urllib.error.URLError) as e:
            last = f"GET /broker failed: {e}"
        if time.monotonic() > deadline:
            shown = {k: v if isinstance(v, str) else v.__name__ for k, v in want.items()}
            raise Failed(f"Flower's broker page never showed {queue} with {shown}; last: {last}")
        time.sleep(0.5)


def get_all(results, timeout):
    deadline = time.monotonic() + timeout
    out = []
    for r in results:
        left = deadline - time.monotonic()
        check(left > 0, f"results not all in within {timeout} s ({len(out)} of {len(results)})")
        try:
            out.append(r.get(timeout=left, interval=0.05))
        except Exception as e:  # noqa: BLE001  (report whatever the task raised)
            raise Failed(f"task {r.id} ({r.state}): {type(e).__name__}: {e}") from e
    return out


def scenario(procs):
    log(f"broker {AMQP_URL.split('@')[-1]}, management API {ADMIN_URL}, logs in {LOGS}")
    # Leftovers of an earlier run on a long-lived broker (RabbitMQ) would skew the counts.
    purged = tasks.app.control.purge()
    log(f"purged {purged} old message(s) from celery")

    worker = start_worker("1")
    procs.append(worker)
    log("worker 1 ready")

    # 1. 50 adds, a task that retries twice, a task with a 3 s countdown.
    t_adds = time.time()
    adds = [tasks.add.delay(i, 2 * i) for i in range(50)]
    t_flaky = time.time()
    flaky = tasks.flaky.delay(2)
    t_countdown = time.time()
    delayed = tasks.stamp.apply_async(("countdown",), countdown=3)
    sums = get_all(adds, 30)
    check(sums == [3 * i for i in range(50)], f"wrong sums: {sums}")
    log(f"50 add tasks: all right, in {time.time() - t_adds:.2f} s")

    res = get_all([flaky], 30)[0]
    check(res["retries"] == 2, f"the retrying task succeeded after {res['retries']} retries, not 2")
    took = res["ran_at"] - t_flaky
    check(took >= 2.0, f"the retrying task's third try ran {took:.2f} s after submission (< 2 s)")
    retried = len(re.findall(rf"tasks\.flaky\[{flaky.id}\] retry: Retry in 1s", open(worker.log).read()))
    check(retried == 2, f"the worker logged {retried} retries of the retrying task, not 2")
    log(f"retrying task: failed twice, retried (1 s apart), succeeded {took:.2f} s after submission")

    res = get_all([delayed], 30)[0]
    late = res["ran_at"] - t_countdown
    check(late >= 3.0, f"the countdown=3 task ran {late:.3f} s after submission, before 3 s")
    check(late < 15.0, f"the countdown=3 task ran only {late:.3f} s after submission")
    log(f"countdown=3 task: ran {late:.2f} s after submission")

    # 2. Flower's broker tab through the management API.
    port = free_port()
    flower = Proc("flower", [
        "flower", f"--port={port}", "--address=127.0.0.1",
        f"--broker_api={broker_api()}",
    ])
    procs.append(flower)
    deadline = time.monotonic() + 30
    while True:
        check(flower.alive(), f"Flower exited at start with {flower.p.returncode}")
        try:
            http_get(f"http://127.0.0.1:{port}/healthcheck", timeout=2)
            break
        except (OSError, urllib.error.URLError):
            check(time.monotonic() < deadline, "Flower did not answer within 30 s")
            time.sleep(0.3)
    log(f"Flower up on port {port}")
    row = wait_flower_row(port, "celery", {"Messages": "0", "Ready": "0", "Unacked": "0",
                                           "Consumers": at_least_one})
    log(f"Flower's broker page, worker up: celery {row}")

    # 3. No worker: 20 tasks wait in the queue.
    code = worker.stop()
    procs.remove(worker)
    check(code == 0, f"worker 1 exited with {code} on SIGTERM")
    log("worker 1 stopped (SIGTERM, exit 0)")
    waiting = [tasks.add.delay(1000 + i, 1) for i in range(20)]
    row = wait_flower_row(port, "celery",
                          {"Messages": "20", "Ready": "20", "Unacked": "0", "Consumers": "0"})
    log(f"Flower's broker page, 20 tasks waiting: celery {row}")

    # 4. A new worker runs them.
    worker = start_worker("2")
    procs.append(worker)
    sums = get_all(waiting, 30)
    check(sums == [1001 + i for i in range(20)], f"wrong sums for the waiting tasks: {sums}")
    log("worker 2 ran the 20 waiting tasks")
    row = wait_flower_row(port, "celery", {"Messages": "0", "Ready": "0", "Unacked": "0",
                                           "Consumers": at_least_one})
    log(f"Flower's broker page, queue drained: celery {row}")

    # 5. Clean stops.
    for p in list(procs):
        code = p.stop()
        procs.remove(p)
        check(code == 0, f"{p.name} exited with {code} on SIGTERM\n{tail(p.log, 30)}")
        log(f"{p.name} stopped (exit 0)")
    for name in ("worker-1", "worker-2"):
        text = open(os.path.join(LOGS, f"{name}.log"), errors="replace").read()
        errors = [l for l in text.splitlines()
                  if re.search(r"\b(ERROR|CRITICAL)\b", l) and "Retry in" not in l]
        check(not errors, f"{name} logged errors:\n" + "\n".join(errors[:20]))


def main():
    procs = []
    try:
        scenario(procs)
    except BaseException as e:  # noqa: BLE001  (report, clean up, exit 1)
        print(f"\nFAILED after {time.monotonic() - T_START:.1f} s: {type(e).__name__}: {e}",
              flush=True)
        for name in sorted(os.listdir(LOGS)):
            print(f"\n--- end of {name} ({os.path.join(LOGS, name)}) ---\n"
                  f"{tail(os.path.join(LOGS, name))}", flush=True)
        for p in procs:
            p.stop(timeout=5)
        return 1
    finally:
        try:
            tasks.app.close()
        except Exception:  # noqa: BLE001
            pass
    log("celery scenario: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
