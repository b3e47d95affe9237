#!/usr/bin/env python3
"""Drive mqgate's web console (/console/) in headless Chromium, against a running broker.

Environment:
  MQGATE_ADMIN_URL   the admin listener, e.g. http://127.0.0.1:15672
  MQGATE_AMQP_URL    the AMQP listener with credentials, e.g. amqp://guest:guest@127.0.0.1:5672/%2f
  SCREENSHOT_DIR     where <page>.png go (created)
  MQGATE_USER, MQGATE_PASSWORD   an administrator (default guest/guest)
  CHROMIUM, CHROMEDRIVER         the browser and its driver (default: found on PATH)

It makes its own state through AMQP (a queue with a backlog, a queue whose failures go
to its group's DLQ, delayed messages, a connection to close), logs in (a wrong password
first), opens every page and uses each control, checking that what the page shows
changes as it should. It exits 1 when a step fails, when a page shows an error element,
or when the browser's console logged a SEVERE entry that the step did not expect (the
401s of the wrong-password and stale-session checks are expected).

Needs: pip install --require-hashes -r requirements.txt (selenium, pika); Chromium and
chromedriver (Debian: apt-get install chromium chromium-driver).
"""

import base64
import json
import os
import shutil
import sys
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request

os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager download a browser

import pika  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import (  # noqa: E402
    NoAlertPresentException,
    StaleElementReferenceException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402

ADMIN = os.environ.get("MQGATE_ADMIN_URL", "http://127.0.0.1:15672").rstrip("/")
AMQP = os.environ.get("MQGATE_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
SHOTS = os.environ.get("SCREENSHOT_DIR", "console-screenshots")
USER = os.environ.get("MQGATE_USER", "guest")
PASSWORD = os.environ.get("MQGATE_PASSWORD", "guest")
PAGES = ["login", "overview", "topics", "groups", "group", "dlq", "delayed", "connections", "cluster"]

TAG = str(int(time.time() * 1000) % 10_000_000)  # unique names: reruns on one broker work
BACKLOG_Q = f"console-backlog-{TAG}"
WORK_Q = f"console-work-{TAG}"
LATER_X = f"console-later-{TAG}"
FIRST_BATCH, SECOND_BATCH = 7, 5
DEAD = 120  # dead letters: more than one page of a range resend
XSS = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'

failures = []
passed = []
t0 = time.monotonic()


def log(msg):
    print(f"[{time.monotonic() - t0:6.1f}s] {msg}", flush=True)


class Failure(Exception):
    pass


# --------------------------------------------------------------------------- broker side

def http(method, path, body=None):
    req = urllib.request.Request(ADMIN + path, method=method)
    cred = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    req.add_header("Authorization", "Basic " + cred)
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, data=data, timeout=15) as r:
            text = r.read().decode()
    except urllib.error.HTTPError as e:
        raise Failure(f"{method} {path}: {e.code} {e.read().decode(errors='replace')}") from None
    return json.loads(text) if text else None


def amqp_connection():
    p = pika.URLParameters(AMQP)
    p.heartbeat = 0  # the connections idle while the browser works
    p.blocked_connection_timeout = 30
    return pika.BlockingConnection(p)


def publish(ch, queue, n, start=0):
    for i in range(start, start + n):
        ch.basic_publish("", queue, f"backlog {i}".encode(), pika.BasicProperties(delivery_mode=2))


def enc(s):
    return urllib.parse.quote(s, safe="")


# --------------------------------------------------------------------------- browser side

def make_driver():
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    if not chromium or not driver:
        raise SystemExit("chromium and chromedriver are needed (Debian: apt-get install chromium chromium-driver)")
    o = webdriver.ChromeOptions()
    o.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1400,1000", "--disable-extensions", "--no-first-run",
              "--disable-background-networking", "--disable-sync", "--lang=en-US"):
        o.add_argument(a)
    o.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(options=o, service=Service(driver))
    d.set_page_load_timeout(30)
    d.set_script_timeout(10)
    return d


D = None


def js_text(sel):
    """The text of the first element matching `sel`, or None (immune to re-renders)."""
    return D.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;", sel)


def js_visible(sel):
    return D.execute_script(
        "const e = document.querySelector(arguments[0]);"
        "return !!e && !e.hidden && !!(e.offsetWidth || e.offsetHeight || e.getClientRects().length);", sel)


def js_count(sel):
    return D.execute_script("return document.querySelectorAll(arguments[0]).length;", sel)


def wait(desc, fn, timeout=20.0, every=0.25):
    """Poll `fn` until it returns something truthy; fail with `desc` and the last value."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = fn()
        except (StaleElementReferenceException, WebDriverException) as e:
            last = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if isinstance(e, WebDriverException) and "alert" in str(e).lower():
                raise
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise Failure(f"timed out after {timeout:.0f} s waiting for {desc} (last: {last!r})")
        time.sleep(every)


def wait_text(sel, want, timeout=20.0):
    """Wait until the element's text (stripped) equals `want` (or `want(text)` is true)."""
    def check():
        t = js_text(sel)
        t = t.strip() if t is not None else None
        ok = want(t) if callable(want) else t == want
        return ok and (t or True)
    try:
        return wait(f"{sel} to show {want if not callable(want) else 'the expected text'}", check, timeout)
    except Failure as e:
        raise Failure(f"{e}; it shows {js_text(sel)!r}") from None


def click(sel, tries=5):
    for i in range(tries):
        try:
            D.find_element(By.CSS_SELECTOR, sel).click()
            return
        except StaleElementReferenceException:
            if i == tries - 1:
                raise
            time.sleep(0.2)


def accept_confirm(expect_in=None, timeout=5.0):
    def alert():
        try:
            return D.switch_to.alert
        except NoAlertPresentException:
            return None
    a = wait("a confirm dialog", alert, timeout, 0.1)
    text = a.text
    if expect_in and expect_in not in text:
        a.dismiss()
        raise Failure(f"the confirm dialog says {text!r}, expected it to mention {expect_in!r}")
    a.accept()
    return text


def goto(page):
    """Open a page from the navigation bar and wait until it has loaded once."""
    click(f"#nav-{page}")
    wait(f"the {page} page", lambda: D.execute_script(
        "return location.hash.startsWith('#/' + arguments[0]) && !!document.getElementById('page-title')"
        " && ['loaded', 'error'].includes(document.getElementById('view').dataset.state)", page))


def page_errors():
    return D.execute_script(
        "return [...document.querySelectorAll('[data-test=error]')]"
        ".filter(e => !e.hidden && e.getClientRects().length).map(e => e.textContent);")


def assert_no_page_error(page):
    errs = page_errors()
    if errs:
        raise Failure(f"the {page} page shows an error: {errs}")


def shot(name):
    os.makedirs(SHOTS, exist_ok=True)
    path = os.path.join(SHOTS, f"{name}.png")
    D.save_screenshot(path)
    log(f"screenshot {path}")


def console_log(allow_401=False):
    """SEVERE browser-console entries since the last call (failures unless expected)."""
    bad = []
    for e in D.get_log("browser"):
        if e.get("level") != "SEVERE":
            continue
        msg = e.get("message", "")
        if allow_401 and "/api/" in msg and "status of 401" in msg:
            log(f"expected console entry: {msg}")
            continue
        bad.append(msg)
    return bad


# --------------------------------------------------------------------------- steps

STATE = {}


def step(name, fatal=False, allow_401=False):
    def deco(f):
        def run():
            log(f"--- {name}")
            try:
                f()
            except Exception as e:  # noqa: BLE001 - every failure is reported the same way
                msg = f"{name}: {e}" if isinstance(e, Failure) else f"{name}: {traceback.format_exc()}"
                failures.append(msg)
                log("FAIL " + msg)
                try:
                    shot(f"failure-{name.replace(' ', '-')}")
                except Exception:  # noqa: BLE001
                    pass
                if fatal:
                    raise SystemExit(finish())
            else:
                passed.append(name)
                log(f"ok   {name}")
            finally:
                try:
                    for msg in console_log(allow_401):
                        failures.append(f"{name}: browser console: {msg}")
                        log(f"FAIL browser console: {msg}")
                except Exception:  # noqa: BLE001
                    pass
        return run
    return deco


def prepare():
    """The state the pages show, made through AMQP."""
    c = amqp_connection()
    ch = c.channel()
    ch.confirm_delivery()
    ch.queue_declare(BACKLOG_Q, durable=True)
    # Failures go straight to the group's DLQ: x-delivery-limit 0 ends the retry ladder.
    ch.queue_declare(WORK_Q, durable=True, arguments={"x-retry-policy": "rocketmq", "x-delivery-limit": 0})
    for i in range(DEAD):
        body = (XSS + f" job {i}") if i == 0 else f"job {i}"
        ch.basic_publish("", WORK_Q, body.encode(), pika.BasicProperties(
            delivery_mode=2, headers={"x-keys": f"job-{TAG}-{i}"}))
    rejected = 0
    deadline = time.monotonic() + 30
    while rejected < DEAD and time.monotonic() < deadline:
        m, _, _ = ch.basic_get(WORK_Q)
        if m is None:
            time.sleep(0.05)
            continue
        ch.basic_reject(m.delivery_tag, requeue=False)
        rejected += 1
    if rejected < DEAD:
        raise Failure(f"only {rejected} of {DEAD} messages could be rejected")
    # Delayed by an hour, through an x-delayed-message exchange.
    ch.exchange_declare(LATER_X, "x-delayed-message", durable=True, arguments={"x-delayed-type": "direct"})
    ch.queue_bind(BACKLOG_Q, LATER_X, BACKLOG_Q)
    for i in range(2):
        ch.basic_publish(LATER_X, BACKLOG_Q, f"later {i}".encode(), pika.BasicProperties(
            delivery_mode=2, headers={"x-delay": 3_600_000, "x-keys": f"later-{TAG}-{i}"}))
    q = http("GET", f"/api/queues/%2F/{enc(WORK_Q)}")
    STATE["work_group"] = q["mqgate"]["group"]
    q = http("GET", f"/api/queues/%2F/{enc(BACKLOG_Q)}")
    STATE["backlog_group"] = q["mqgate"]["group"]
    STATE["backlog_topic"] = q["mqgate"]["topic"]
    wait(f"{DEAD} dead letters in {STATE['work_group']}'s DLQ", lambda: len(http(
        "GET", f"/api/mqgate/dlq/{enc(STATE['work_group'])}?from=0&limit=1000")) == DEAD, 30)
    STATE["pub"] = (c, ch)
    log(f"prepared: {BACKLOG_Q}, {WORK_Q} ({DEAD} dead letters), 2 delayed on {LATER_X}")


@step("login", fatal=True, allow_401=True)
def step_login():
    D.get(ADMIN + "/console/")
    wait("the login form", lambda: js_visible("#login-form"))
    shot("login")
    # A wrong password shows an error and stays on the form.
    D.find_element(By.ID, "login-user").send_keys(USER)
    D.find_element(By.ID, "login-password").send_keys(PASSWORD + "-wrong")
    click("#login-submit")
    wait("the login error", lambda: js_visible("#login-error"))
    err = js_text("#login-error")
    if "401" not in err and "Login failed" not in err:
        raise Failure(f"the login error does not say why: {err!r}")
    if not js_visible("#login-form"):
        raise Failure("a wrong password left the login form")
    if D.execute_script("return sessionStorage.length") != 0:
        raise Failure("a wrong password was kept in sessionStorage")
    pw = D.find_element(By.ID, "login-password")
    pw.clear()
    pw.send_keys(PASSWORD)
    click("#login-submit")
    wait_text("#page-title", "Overview")
    wait_text("#whoami", USER)
    if not D.execute_script("return !!sessionStorage.getItem('mqgate.console.auth')"):
        raise Failure("the credentials are not in sessionStorage")


@step("overview")
def step_overview():
    if not D.execute_script("return location.hash").startswith("#/overview"):
        goto("overview")
    wait_text("#stat-store-messages", lambda t: t not in (None, "", "–") and int(t.replace(",", "")) >= DEAD)
    wait_text("#stat-memory", lambda t: bool(t) and t.endswith("iB") and not t.startswith("0 "))
    wait_text("#stat-delayed", lambda t: t not in (None, "", "–") and int(t.replace(",", "")) >= 2)
    for sel in ("#stat-publish-rate", "#stat-deliver-rate", "#stat-ack-rate"):
        wait_text(sel, lambda t: bool(t) and t.endswith("/s"))
    wait_text("#stat-connections", lambda t: t not in (None, "", "–") and int(t) >= 1)
    wait_text("#stat-queues", lambda t: t not in (None, "", "–") and int(t) >= 2)
    wait_text("#stat-store-size", lambda t: bool(t) and t.endswith("B") and t != "–")
    # The numbers refresh every 5 s by themselves.
    first = js_text("#updated")
    wait("the overview to refresh by itself", lambda: js_text("#updated") != first, 12)
    assert_no_page_error("overview")
    shot("overview")


@step("topics: a queue's backlog grows")
def step_backlog():
    goto("topics")
    c, ch = STATE["pub"]
    row = f'[data-test=queue-row][data-name="{BACKLOG_Q}"]'
    wait_text(f"{row} [data-test=queue-ready]", "0")
    publish(ch, BACKLOG_Q, FIRST_BATCH)
    STATE["between"] = int(time.time()) + 1  # a whole second after the first batch
    wait_text(f"{row} [data-test=queue-ready]", str(FIRST_BATCH))
    wait_text(f"{row} [data-test=queue-messages]", str(FIRST_BATCH))
    while time.time() < STATE["between"] + 0.3:
        time.sleep(0.1)
    publish(ch, BACKLOG_Q, SECOND_BATCH, FIRST_BATCH)
    total = FIRST_BATCH + SECOND_BATCH
    wait_text(f"{row} [data-test=queue-ready]", str(total))
    # The topic behind the queue, with its queue's offsets.
    trow = f'[data-test=topic-row][data-name="{STATE["backlog_topic"]}"]'
    wait_text(f"{trow} [data-test=topic-messages]", str(total))
    wait_text(f"{trow} [data-test=queue-offsets]", f"#0 0 → {total}: {total}")
    assert_no_page_error("topics")
    shot("topics")


@step("groups: reset a group and see its lag change")
def step_groups():
    goto("groups")
    g = STATE["backlog_group"]
    total = FIRST_BATCH + SECOND_BATCH
    wait_text(f'[data-test=group-row][data-name="{g}"] [data-test=group-lag]', str(total))
    wait_text(f'[data-test=group-row][data-name="{STATE["work_group"]}"] [data-test=group-dlq]', str(DEAD))
    assert_no_page_error("groups")
    shot("groups")
    click(f'[data-test=group-row][data-name="{g}"] [data-test=group-link]')
    wait_text("#group-name", g)
    wait_text("#group-lag", str(total))

    Select(D.find_element(By.ID, "reset-mode")).select_by_value("last")
    click("#reset-submit")
    accept_confirm("last")
    wait_text("#group-lag", "0")
    wait_text("#reset-result", lambda t: bool(t) and f"lag {total} → 0" in t)
    if http("GET", f"/api/mqgate/groups/{enc(g)}")["lag"] != 0:
        raise Failure("the broker's lag is not 0 after the reset to last")

    # To a time between the two batches: only the second batch is left.
    Select(D.find_element(By.ID, "reset-mode")).select_by_value("time")
    when = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(STATE["between"]))
    D.execute_script(
        "const e = document.getElementById('reset-time'); e.value = arguments[0];"
        "e.dispatchEvent(new Event('input', {bubbles: true})); e.dispatchEvent(new Event('change', {bubbles: true}));",
        when)
    click("#reset-submit")
    accept_confirm(when.replace("T", " "))
    wait_text("#group-lag", str(SECOND_BATCH))
    wait_text("#reset-result", lambda t: bool(t) and f"lag 0 → {SECOND_BATCH}" in t)

    Select(D.find_element(By.ID, "reset-mode")).select_by_value("first")
    click("#reset-submit")
    accept_confirm("first")
    wait_text("#group-lag", str(total))
    wait_text("#reset-result", lambda t: bool(t) and f"lag {SECOND_BATCH} → {total}" in t)
    wait_text('[data-test=group-queue-row] [data-test=gq-committed]', "0")
    assert_no_page_error("group")
    shot("group")


@step("dlq: browse and resend")
def step_dlq():
    goto("dlq")
    g = STATE["work_group"]
    wait("the group in the DLQ picker", lambda: D.execute_script(
        "return [...document.querySelectorAll('#dlq-group option')].some(o => o.value === arguments[0])", g))
    Select(D.find_element(By.ID, "dlq-group")).select_by_value(g)
    wait("the DLQ table", lambda: js_count("[data-test=dlq-row]") == 50)
    wait_text("#dlq-count", str(DEAD))
    wait_text("#dlq-group-lag", "0")
    # Bodies are untrusted: shown as text, never run.
    body = js_text('[data-test=dlq-row][data-offset="0"] [data-test=dlq-preview]')
    if not body or "<img" not in body or "<script>" not in body:
        raise Failure(f"the hostile body is not shown as text: {body!r}")
    if js_count("#dlq-table img, #dlq-table script") or D.execute_script("return window.__pwned"):
        raise Failure("a message body was inserted as HTML")
    # Paging.
    click("#dlq-next")
    wait_text("[data-test=dlq-row] [data-test=dlq-offset]", "50")
    click("#dlq-prev")
    wait_text("[data-test=dlq-row] [data-test=dlq-offset]", "0")

    # Resend one selected message: back in its queue (the group's lag grows by one).
    if not D.find_element(By.ID, "dlq-resend-selected").get_attribute("disabled"):
        raise Failure("'Resend selected' is enabled with nothing selected")
    click('[data-test=dlq-select][data-offset="1"]')
    wait_text("#dlq-resend-selected", "Resend selected (1)")
    click("#dlq-resend-selected")
    wait_text("#dlq-result", lambda t: bool(t) and t.startswith("Resent 1 message") and "0 → 1" in t)
    wait_text("#dlq-group-lag", "1")
    q = http("GET", f"/api/queues/%2F/{enc(WORK_Q)}")
    if q["messages_ready"] != 1:
        raise Failure(f"{WORK_Q} has {q['messages_ready']} ready after resending one, not 1")

    # Resend the whole DLQ as a range, with a progress bar.
    rng = D.find_element(By.ID, "dlq-range-from")
    rng.clear()
    rng.send_keys("0")
    click("#dlq-resend-range")
    accept_confirm(f"Resend {DEAD} dead letters")
    wait("the progress bar", lambda: js_visible("#dlq-progress-box"), 5, 0.05)
    wait_text("#dlq-progress-text", f"{DEAD} / {DEAD} resent", 30)
    wait_text("#dlq-result", lambda t: bool(t) and t.startswith(f"Resent {DEAD} messages") and f"1 → {DEAD + 1}" in t, 30)
    if D.execute_script("return document.getElementById('dlq-progress').value") != DEAD:
        raise Failure("the progress bar did not reach the end")
    wait_text("#dlq-group-lag", str(DEAD + 1))
    q = http("GET", f"/api/queues/%2F/{enc(WORK_Q)}")
    if q["messages_ready"] != DEAD + 1:
        raise Failure(f"{WORK_Q} has {q['messages_ready']} ready after the range resend, not {DEAD + 1}")
    assert_no_page_error("dlq")
    shot("dlq")


@step("delayed: list and cancel")
def step_delayed():
    goto("delayed")
    box = D.find_element(By.ID, "delayed-topic")
    box.send_keys(LATER_X)
    click("#delayed-apply")
    wait("the two delayed messages", lambda: js_count("[data-test=delayed-row]") == 2)
    pending = int(js_text("#delayed-pending").replace(",", ""))
    ids = D.execute_script("return [...document.querySelectorAll('[data-test=delayed-row]')].map(r => r.dataset.id)")
    victim = ids[0]
    click(f'[data-test=delayed-cancel][data-id="{victim}"]')
    accept_confirm(victim)
    wait_text("#delayed-result", f"Cancelled {victim}.")
    wait("the cancelled message to leave the table", lambda: js_count("[data-test=delayed-row]") == 1
         and js_count(f'[data-test=delayed-row][data-id="{victim}"]') == 0)
    left = [d["id"] for d in http("GET", f"/api/mqgate/delayed?topic={enc(LATER_X)}")["items"]]
    if victim in left:
        raise Failure(f"the broker still lists {victim}")
    log(f"pending timers {pending} (cancelled ones stay counted until due)")
    assert_no_page_error("delayed")
    shot("delayed")


@step("connections: close one")
def step_connections():
    before = {c["id"] for c in http("GET", "/api/mqgate/connections")}
    victim = amqp_connection()
    vid = wait("the new connection in the API", lambda: ({c["id"] for c in http(
        "GET", "/api/mqgate/connections") if c["protocol"] == "amqp"} - before) or None, 10)
    vid = sorted(vid)[0]
    goto("connections")
    row = f'[data-test=conn-row][data-protocol="amqp"][data-id="{vid}"]'
    wait("the connection's row", lambda: js_count(row) == 1)
    shot("connections")
    click(f'{row} [data-test=conn-close]')
    accept_confirm(f"connection {vid}")
    wait_text("#conn-result", lambda t: bool(t) and t.startswith(f"Closed amqp connection {vid}"))
    wait("the closed connection to leave the table", lambda: js_count(row) == 0, 10)
    if vid in {c["id"] for c in http("GET", "/api/mqgate/connections")}:
        raise Failure(f"the broker still lists connection {vid}")
    closed = None
    try:
        victim.process_data_events(time_limit=2)
        closed = victim.is_closed
    except pika.exceptions.AMQPConnectionError as e:
        closed = True
        log(f"the client saw: {e!r}")
    if not closed:
        raise Failure("the client's connection is still open")
    if js_count("[data-test=conn-row]") < 1:
        raise Failure("the test's own AMQP connection vanished from the list")
    assert_no_page_error("connections")


@step("cluster")
def step_cluster():
    goto("cluster")
    v = http("GET", "/api/mqgate/cluster")
    wait_text("#cluster-backend", v["backend"])
    wait_text("#cluster-replicated", "yes" if v["replicated"] else "no")
    assert_no_page_error("cluster")
    shot("cluster")
    if v["replicated"]:
        return
    # The replicated layout too: the answer of a JetStream cluster stubbed into fetch.
    fake = {
        "backend": "jetstream", "replicated": True, "stream": "MQGATE", "node": "gw-1",
        "this_node": {"role": "owner", "epoch": 41}, "owner": {"node": "gw-1", "lease_revision": 57},
        "first_seq": 1, "last_seq": 1200, "applied": 1200,
        "nodes": [{"node": "gw-1", "role": "owner", "applied": 1200, "lag": 0},
                  {"node": "gw-2", "role": "standby", "applied": 1190, "lag": 10}],
        "replicas": [{"name": "n1", "leader": True, "current": True, "offline": False, "lag": 0},
                     {"name": "n2", "leader": False, "current": True, "offline": False, "lag": 0},
                     {"name": "n3", "leader": False, "current": False, "offline": True, "lag": 35}],
    }
    D.execute_script(
        "const fake = arguments[0]; window.__realFetch = window.fetch;"
        "window.fetch = (url, opts) => String(url).endsWith('/api/mqgate/cluster')"
        "  ? Promise.resolve(new Response(JSON.stringify(fake), {status: 200, headers: {'Content-Type': 'application/json'}}))"
        "  : window.__realFetch(url, opts);", fake)
    try:
        click("#refresh")
        wait_text("#cluster-replicated", "yes")
        wait_text("#cluster-owner", "gw-1")
        wait_text("#cluster-role", "owner")
        wait("the gateways and replicas", lambda: js_count("[data-test=cluster-node-row]") == 2
             and js_count("[data-test=cluster-replica-row]") == 3)
        wait_text('[data-test=cluster-replica-row][data-name="n3"] td:nth-child(4)', "offline")
        assert_no_page_error("cluster (replicated)")
        shot("cluster-replicated")
    finally:
        D.execute_script("if (window.__realFetch) window.fetch = window.__realFetch;")


@step("every page once more without errors")
def step_all_pages():
    for p in ("overview", "topics", "groups", "dlq", "delayed", "connections", "cluster"):
        goto(p)
        time.sleep(0.5)
        assert_no_page_error(p)


@step("logout, and a refused session goes back to login", allow_401=True)
def step_logout():
    click("#logout")
    wait("the login form", lambda: js_visible("#login-form"))
    wait_text("#login-message", "Logged out.")
    if D.execute_script("return sessionStorage.getItem('mqgate.console.auth')"):
        raise Failure("logging out left the credentials in sessionStorage")
    if js_visible("#whoami") or js_visible("#nav"):
        raise Failure("the navigation is still shown after logging out")
    # Credentials the broker refuses (as after a password change): a 401 → the login form.
    bad = base64.b64encode(f"{USER}:{PASSWORD}-changed".encode()).decode()
    D.execute_script("sessionStorage.setItem('mqgate.console.auth', arguments[0]);"
                     "sessionStorage.setItem('mqgate.console.user', arguments[1]); location.hash = '#/topics';", bad, USER)
    wait("the login form after a 401", lambda: js_visible("#login-form"), 15)
    wait_text("#login-message", lambda t: bool(t) and "401" in t)
    # The form keeps the user name; logging in again goes back to the page the session was on.
    if D.find_element(By.ID, "login-user").get_attribute("value") != USER:
        raise Failure("the login form lost the user name")
    D.find_element(By.ID, "login-password").send_keys(PASSWORD)
    click("#login-submit")
    wait_text("#page-title", "Topics & queues")


def finish():
    for p in PAGES:
        if not os.path.exists(os.path.join(SHOTS, f"{p}.png")):
            failures.append(f"no screenshot of the {p} page")
    log(f"{len(passed)} steps passed, {len(failures)} failed")
    for f in failures:
        print("FAILED: " + f, flush=True)
    return 1 if failures else 0


def main():
    global D
    log(f"admin {ADMIN}, amqp {AMQP.split('@')[-1]}, screenshots in {SHOTS}")
    os.makedirs(SHOTS, exist_ok=True)
    for p in PAGES:
        try:
            os.remove(os.path.join(SHOTS, f"{p}.png"))
        except FileNotFoundError:
            pass
    prepare()
    D = make_driver()
    try:
        for s in (step_login, step_overview, step_backlog, step_groups, step_dlq, step_delayed,
                  step_connections, step_cluster, step_all_pages, step_logout):
            s()
        return finish()
    finally:
        try:
            D.quit()
        finally:
            c, _ = STATE.get("pub", (None, None))
            if c is not None and c.is_open:
                c.close()


if __name__ == "__main__":
    sys.exit(main())
