"""Handlers that misbehave in the ways a hard review found: they swallow their timeout, exit the
process, are coroutines, leave children behind.  JOBRUNNER_APP=hardapp; records go to $JOBAPP_OUT."""

import asyncio
import os
import subprocess
import sys
import time

from jobapp import jobs, record, sql  # the same JobRunner as jobapp: its handlers are here too


@jobs.handler(queue="hard", timeout=0.3, max_retries=0)
def swallows_exception(n):
    record("start", n)
    try:
        time.sleep(5)
    except Exception:
        record("swallowed", n)
    record("note", n)


@jobs.handler(queue="hard", timeout=0.3, max_retries=0)
def swallows_everything(n):
    record("start", n)
    try:
        time.sleep(5)
    except BaseException:  # noqa: B036 - exactly what a careless handler does
        record("swallowed", n)
    record("note", n)


@jobs.handler(queue="hard", timeout=0.021, max_retries=0)
def at_the_edge(n):
    """Returns right about when its timeout fires: done once, or failed, never done and then retried."""
    time.sleep(0.02)
    record("done", n)


@jobs.handler(queue="hard", max_retries=0)
def exits(n, code=3):
    record("start", n)
    sys.exit(code)


@jobs.handler(queue="hard", max_retries=0)
def interrupts(n):
    record("start", n)
    raise KeyboardInterrupt


@jobs.handler(queue="hard")
def spawns(n):
    """Starts a grandchild that inherits stdout and outlives the handler, then takes its time."""
    subprocess.Popen(["sh", "-c", "sleep 1; echo grandchild %s" % n])
    subprocess.Popen(["sleep", "30"])
    record("start", n)
    time.sleep(30)


@jobs.handler(queue="aio", max_retries=1, delay=0.01)
async def fetch(n, fail=False, seconds=0.0):
    await asyncio.sleep(seconds)
    if fail:
        record("fail", n)
        raise ConnectionError("unreachable %s" % n)
    record("note", n)


@jobs.handler(queue="aio", timeout=0.3, max_retries=0)
async def slow_fetch(n):
    record("start", n)
    try:
        await asyncio.sleep(5)
    except asyncio.CancelledError:
        record("cancelled", n)
        raise
    record("note", n)


@jobs.handler(queue="aio", transactional=True, max_retries=0)
async def async_tx(db, n, fail=False):
    db.execute("CREATE TABLE IF NOT EXISTS ledger (n TEXT PRIMARY KEY)")
    db.execute(sql(db, "INSERT INTO ledger (n) VALUES (?)"), (str(n),))
    await asyncio.sleep(0)
    if fail:
        raise RuntimeError("async_tx %s failed after writing" % n)
    record("note", n)


@jobs.handler(queue="hard", transactional=True, max_retries=0)
def tx_note(db, n):
    db.execute("CREATE TABLE IF NOT EXISTS ledger (n TEXT PRIMARY KEY)")
    db.execute(sql(db, "INSERT INTO ledger (n) VALUES (?)"), (str(n),))
    record("note", n)


@jobs.handler(queue="hard", max_retries=0)
def prints_pid(n):
    record("note", "%s:%d" % (n, os.getpid()))


@jobs.handler(queue="hard", timeout=0.5, max_retries=1)
def stuck_in_c(n, marker):
    """Blocks SIGALRM, as a C extension deep in a call may: Python cannot interrupt it (once)."""
    import signal

    record("start", n)
    if not os.path.exists(marker):
        open(marker, "w").close()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(30)
    record("note", n)


@jobs.handler(queue="hard", max_retries=0)
def busy_later(n, seconds):
    from jobrunner import RecoverableError

    record("attempt", n)
    raise RecoverableError("the mail server says later", retry_after=seconds)


@jobs.handler(queue="hard")
def pragma(n):
    conn = jobs.transport.connection()
    record("synchronous", conn.execute("PRAGMA synchronous").fetchall()[0][0])
