"""The app the tests drive.  Handlers record what they did, one line per call, in a
file per process under $JOBAPP_OUT, so a test can count exactly who handled what."""

import os
import sqlite3
import sys
import time

from jobrunner import JobRunner, RecoverableError, UnrecoverableError

OUT = os.environ.get("JOBAPP_OUT", "handled")

jobs = JobRunner(delay=float(os.environ.get("JOBAPP_RETRY_DELAY", "0.05")), queues=["empty"])


def sql(db, text):
    """``text`` with the placeholders of ``db``'s driver: ``?`` for sqlite3, ``%s`` for psycopg."""
    return text if isinstance(db, sqlite3.Connection) else text.replace("?", "%s")


def record(kind, value):
    os.makedirs(OUT, exist_ok=True)
    fd = os.open(os.path.join(OUT, str(os.getpid())), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, ("%s %s %.6f\n" % (kind, value, time.time())).encode())
    finally:
        os.close(fd)


@jobs.handler
def note(n):
    record("note", n)


@jobs.handler(queue="high")
def note_high(n):
    record("high", n)


@jobs.handler(queue="low")
def note_low(n):
    record("low", n)


@jobs.handler
def spawn(n):
    """Not transactional: dispatches on its worker's own connection."""
    jobs.dispatch("note", {"n": "%s.0" % n})


@jobs.handler(max_retries=2, delay=0.2, multiplier=2.0, jitter=0.0)
def always_fails(n):
    record("fail", n)
    raise ValueError("always fails %s" % n)


@jobs.handler(max_retries=5)
def fails_unless_fixed(n):
    if not os.path.exists(os.path.join(OUT, "fixed")):
        record("fail", n)
        raise RuntimeError("not fixed yet")
    record("note", n)


@jobs.handler(max_retries=5)
def unrecoverable(n):
    record("fail", n)
    raise UnrecoverableError("no point retrying %s" % n)


@jobs.handler(max_retries=1, delay=0.01)
def missing_file(n):
    """Fails naming a file as os.fsdecode() gives an undecodable name: with a lone surrogate."""
    record("fail", n)
    raise FileNotFoundError(os.fsdecode(b"/tmp/caf\xe9-%d.txt" % n))


@jobs.handler(max_retries=0)
def fixed_by_file(n):
    """Fails at once until a file ``fixed-<n>`` appears beside the records."""
    if not os.path.exists(os.path.join(OUT, "fixed-%s" % n)):
        record("fail", n)
        raise RuntimeError("%s is not fixed" % n)
    record("note", n)


@jobs.handler(max_retries=0, delay=0.01)
def recoverable(n, times=3):
    path = os.path.join(OUT, "recoverable-%s" % n)
    count = int(open(path).read()) if os.path.exists(path) else 0
    with open(path, "w") as f:
        f.write(str(count + 1))
    if count < times:
        record("fail", n)
        raise RecoverableError("try again")
    record("note", n)


@jobs.handler(queue="slow")
def slow(n, seconds=1.0):
    record("start", n)
    time.sleep(seconds)
    record("note", n)


@jobs.handler(queue="slow", max_retries=1, delay=0.01)
def crash(n):
    record("crash", n)
    sys.stdout.flush()
    os._exit(3)


@jobs.handler(timeout=0.3, max_retries=1, delay=0.01)
def too_slow(n):
    record("start", n)
    time.sleep(5)
    record("note", n)


@jobs.handler(timeout=0.3, max_retries=1, delay=0.01)
def too_slow_loop(n):
    """Past its timeout in Python code (short sleeps): a handler in a thread can be interrupted there."""
    record("start", n)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(0.01)
    record("note", n)


@jobs.handler(transactional=True)
def transfer(db, n, fail=False, children=0):
    db.execute("CREATE TABLE IF NOT EXISTS ledger (n INTEGER PRIMARY KEY)")
    db.execute(sql(db, "INSERT INTO ledger (n) VALUES (?)"), (n,))
    for i in range(children):
        jobs.dispatch("note", {"n": "%s.%d" % (n, i)})
    if fail:
        raise RuntimeError("failed after writing %s" % n)
    record("note", n)


@jobs.handler(transactional=True, max_retries=0)
def commits_itself(db, n):
    db.execute("CREATE TABLE IF NOT EXISTS ledger (n INTEGER PRIMARY KEY)")
    db.execute("INSERT INTO ledger (n) VALUES (?)", (n,))
    db.commit()


@jobs.handler(queue="slow")
def gate(n, path):
    """Runs until the test opens the gate (creates ``path``): no timing to guess."""
    record("start", n)
    while not os.path.exists(path):
        time.sleep(0.01)
    record("note", n)


@jobs.handler(queue="slow", max_retries=3)
def wait_forever(n):
    """Runs until interrupted; records that it was."""
    record("start", n)
    try:
        time.sleep(60)
    except BaseException:
        record("interrupted", n)
        raise
    record("note", n)


@jobs.handler(transactional=True, max_retries=3)
def commits_by_sql(db, n):
    """Ends its transaction with a COMMIT statement, which psycopg cannot refuse as it refuses db.commit()."""
    db.execute("CREATE TABLE IF NOT EXISTS ledger (n INTEGER PRIMARY KEY)")
    db.execute(sql(db, "INSERT INTO ledger (n) VALUES (?) ON CONFLICT DO NOTHING"), (n,))
    record("fail", n)
    db.execute("COMMIT")


@jobs.handler(queue="slow", transactional=True, max_retries=0)
def tx_slow(db, n, seconds=1.5):
    record("start", n)
    db.execute("SELECT 1")
    time.sleep(seconds)
    db.execute("SELECT 1")
    record("note", n)


@jobs.handler(queue="slow", transactional=True, max_retries=0)
def tx_once(db, n):
    db.execute("SELECT 1")
    record("note", n)


@jobs.handler(queue="slow", transactional=True)
def tx_wait(db, n):
    db.execute("CREATE TABLE IF NOT EXISTS ledger (n INTEGER PRIMARY KEY)")
    db.execute(sql(db, "INSERT INTO ledger (n) VALUES (?)"), (n,))
    record("start", n)
    time.sleep(60)
