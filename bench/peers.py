"""The peers measured beside jobrunner, doing the same work: Huey's SqliteHuey and a bare SQLite claim/ack loop.

Each drain handler records what it handled exactly as bench_app.record does.
"""

import json
import multiprocessing as mp
import os
import sqlite3
import time


def record_line(out, n):
    with open(os.path.join(out, str(os.getpid())), "a") as f:
        f.write("%09d\n" % n)


def huey(directory, n, workers, wait_handled):
    """Huey's SqliteHuey: n tasks enqueued one call each, drained by its process consumer with its fastest polling."""
    from huey import SqliteHuey
    from huey.consumer import Consumer

    out = os.path.join(directory, "out")
    huey = SqliteHuey(filename=os.path.join(directory, "huey.db"))

    @huey.task()
    def record(i):
        record_line(out, i)

    started = time.perf_counter()
    for i in range(n):
        record(i)
    enqueue = n / (time.perf_counter() - started)

    def run():
        Consumer(huey, workers=workers, worker_type="process", periodic=False, initial_delay=0.001, max_delay=0.01,
                 backoff=1.0).run()

    proc = mp.get_context("fork").Process(target=run)
    started = time.perf_counter()
    proc.start()
    wait_handled(n)
    drain = n / (time.perf_counter() - started)
    os.kill(proc.pid, 15)
    proc.join(10)
    return {"enqueue": enqueue, "drain": drain}


_BARE_CLAIM = ("UPDATE messenger_messages SET delivered_at=? WHERE id=(SELECT id FROM messenger_messages WHERE queue_name=? "
               "AND delivered_at IS NULL AND available_at<=? ORDER BY available_at, id LIMIT 1) RETURNING id, body, headers")


def _bare_connect(path):
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def _bare_worker(path, out, record, results, wait=0.0):
    conn = _bare_connect(path)
    done = 0
    while True:
        conn.execute("BEGIN IMMEDIATE")
        now = time.time()
        row = conn.execute(_BARE_CLAIM, (now, "async", now)).fetchone()
        conn.execute("COMMIT")
        if row is None:
            break
        body = json.loads(row[1])
        json.loads(row[2])
        if wait:
            time.sleep(wait)
        if record:
            record_line(out, body["n"])
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("DELETE FROM messenger_messages WHERE id=?", (row[0],))
        conn.execute("COMMIT")
        done += 1
    results.put(done)


def bare(directory, n, workers, record=True, wait=0.0):
    """The bare claim/ack loop of ../shared/bench/raw_sqlite.py: one UPDATE ... RETURNING and one DELETE per message.

    ``wait``: seconds each handler waits (an I/O-bound handler).
    """
    path = os.path.join(directory, "bare.db")
    out = os.path.join(directory, "out")
    conn = _bare_connect(path)
    conn.execute("CREATE TABLE messenger_messages (id INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT NOT NULL, headers TEXT NOT NULL, "
                 "queue_name TEXT NOT NULL, created_at REAL NOT NULL, available_at REAL NOT NULL, delivered_at REAL)")
    conn.execute("CREATE INDEX ix ON messenger_messages (queue_name, available_at, id) WHERE delivered_at IS NULL")
    insert = "INSERT INTO messenger_messages (body, headers, queue_name, created_at, available_at) VALUES (?,?,?,?,?)"
    headers = json.dumps({"type": "record"})
    started = time.perf_counter()
    for i in range(n):
        now = time.time()
        conn.execute(insert, (json.dumps({"n": i}), headers, "async", now, now))
    enqueue = n / (time.perf_counter() - started)
    conn.execute("DELETE FROM messenger_messages")
    started = time.perf_counter()
    conn.execute("BEGIN IMMEDIATE")
    now = time.time()
    conn.executemany(insert, [(json.dumps({"n": i}), headers, "async", now, now) for i in range(n)])
    conn.execute("COMMIT")
    batch = n / (time.perf_counter() - started)
    conn.close()
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    started = time.perf_counter()
    with open(os.path.join(directory, "bare.started.tmp"), "w") as f:
        f.write(repr(started))
    os.replace(f.name, os.path.join(directory, "bare.started"))  # whole, as the watcher may read it at once
    procs = [ctx.Process(target=_bare_worker, args=(path, out, record, results, wait)) for _ in range(workers)]
    for p in procs:
        p.start()
    handled = sum(results.get() for _ in procs)
    drain = n / (time.perf_counter() - started)
    for p in procs:
        p.join()
    assert handled == n, (handled, n)
    return {"enqueue": enqueue, "batch": batch, "drain": drain}
