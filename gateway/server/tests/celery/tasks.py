"""The Celery app that scenario.py runs through mqgate (gateway/server/tests/celery.rs).

Broker: $MQGATE_AMQP_URL. Result backend: $MQGATE_RESULT_BACKEND, default rpc://
(results come back as AMQP messages on the client's own reply queue).
"""

import os
import time

from celery import Celery

app = Celery(
    "tasks",
    broker=os.environ.get("MQGATE_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    backend=os.environ.get("MQGATE_RESULT_BACKEND", "rpc://"),
)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    # One message at a time per process, acknowledged after the task ran.
    worker_prefetch_multiplier=1,
    task_acks_late=True,
    broker_connection_retry_on_startup=True,
    result_expires=300,
)


@app.task
def add(x, y):
    return x + y


@app.task(bind=True, max_retries=5)
def flaky(self, fail_times=2):
    """Fails `fail_times` times, retrying itself a second later each time, then
    succeeds: returns how many retries it took and when each try ran."""
    if self.request.retries < fail_times:
        raise self.retry(countdown=1, exc=RuntimeError(f"try {self.request.retries + 1} fails"))
    return {"retries": self.request.retries, "ran_at": time.time()}


@app.task
def stamp(tag):
    """Returns when it ran (wall clock), for the countdown check."""
    return {"tag": tag, "ran_at": time.time()}
