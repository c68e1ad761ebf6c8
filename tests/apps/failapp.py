"""A second test app, for tests/test_failures.py: handlers that misbehave in the ways a
transactional handler can, and handlers that report what other connections can see
while they run.  Records go to $JOBAPP_OUT like jobapp's, one file per process."""

import os
import sqlite3
import time

from jobrunner import JobRunner, RecoverableError

OUT = os.environ.get("JOBAPP_OUT", "handled")

jobs = JobRunner(max_retries=0, delay=0.01, jitter=0.0)


def record(kind, value):
    os.makedirs(OUT, exist_ok=True)
    fd = os.open(os.path.join(OUT, str(os.getpid())), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, ("%s %s %.6f\n" % (kind, value, time.time())).encode())
    finally:
        os.close(fd)


def visible(ids):
    """How many of these message ids another connection (another process, say) can see right now."""
    conn = sqlite3.connect(jobs.settings.path, timeout=10)
    try:
        marks = ",".join("?" * len(ids))
        return conn.execute("SELECT COUNT(*) FROM messenger_messages WHERE id IN (%s)" % marks, ids).fetchone()[0]
    finally:
        conn.close()


def bump(name):
    path = os.path.join(OUT, "count-%s" % name)
    os.makedirs(OUT, exist_ok=True)
    count = int(open(path).read()) + 1 if os.path.exists(path) else 1
    with open(path, "w") as f:
        f.write(str(count))
    return count


@jobs.handler
def note(n):
    record("note", n)


@jobs.handler
def plain(n, fail=False):
    """Not transactional: what it dispatches is committed at once, whatever happens next."""
    ids = [jobs.dispatch("note", {"n": "%s.0" % n})]
    record("visible", "%s:%d" % (n, visible(ids)))
    if fail:
        raise RuntimeError("plain %s failed after dispatching" % n)
    record("plain", n)


@jobs.handler(transactional=True)
def tx(db, n, how="ok", children=1):
    """Writes a ledger row and dispatches children, then misbehaves as ``how`` says."""
    db.execute("CREATE TABLE IF NOT EXISTS ledger (n TEXT PRIMARY KEY)")
    db.execute("INSERT INTO ledger (n) VALUES (?)", (str(n),))
    ids = [jobs.dispatch("note", {"n": "%s.%d" % (n, i)}) for i in range(children)]
    record("visible", "%s:%d" % (n, visible(ids)))
    if how == "raise":
        raise RuntimeError("tx %s failed half-way" % n)
    if how == "constraint":
        db.execute("INSERT INTO ledger (n) VALUES (?)", (str(n),))
    elif how == "commit":
        db.commit()
    elif how == "rollback":
        db.rollback()
    elif how == "execute_commit":
        db.execute("COMMIT")
    elif how == "execute_rollback":
        db.execute("ROLLBACK")
    elif how == "close":
        db.close()
    elif how == "or_rollback":
        # SQLite itself ends the whole transaction on this conflict; the handler shrugs and returns.
        try:
            db.execute("INSERT OR ROLLBACK INTO ledger (n) VALUES (?)", (str(n),))
        except sqlite3.IntegrityError:
            pass
    record("tx", n)


@jobs.handler(max_retries=1)
def recover_then_fail(n):
    """Busy twice (RecoverableError: free retries), then broken for good."""
    count = bump("recover_then_fail-%s" % n)
    record("attempt", n)
    if count <= 2:
        raise RecoverableError("busy, try later")
    raise ValueError("broken %s" % n)
