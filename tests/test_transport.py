"""Storage and the Python API: the messenger_messages table in a SQLite file, dispatch, claims, the WAL."""

import json
import os
import sqlite3
import stat
import subprocess
import sys
import threading
import time

import pytest

import jobrunner
from conftest import POSTGRES, REPO, drop_schema, postgres_dsn, query, wait_until
from jobrunner import DatabaseLocked, InvalidMessage, JobRunner


def rows(db):
    """Every stored message, every column, in id order."""
    conn = sqlite3.connect(str(db))
    try:
        return conn.execute("SELECT * FROM messenger_messages ORDER BY id").fetchall()
    finally:
        conn.close()


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def run_python(code, *args, timeout=30, env=None):
    """Run a Python snippet in a fresh interpreter, with the repository importable."""
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=str(REPO), **(env or {})), cwd=str(REPO))


@pytest.fixture
def jobs(tmp_path, backend):
    """A fresh app on its own database (not created yet), with a few handlers: a SQLite file, or a PostgreSQL
    schema of its own for the tests marked `backends`."""
    schema = None
    if backend == "postgres":
        import uuid

        schema = "t_" + uuid.uuid4().hex[:16]
        app = JobRunner(postgres_dsn(schema))
    else:
        app = JobRunner(str(tmp_path / "var" / "jobs.db"))
    app.test_schema = schema

    @app.handler
    def note(n):
        pass

    @app.handler("greet", queue="mail")
    def greet(to, subject="hi", *, sign=None):
        pass

    @app.handler(queue="mail")
    def anything(**kwargs):
        pass

    yield app
    app.close()
    if schema:
        drop_schema(schema)


def q(jobs, sql, *params):
    """Rows of one statement on the database of ``jobs``, through a connection of the test's own."""
    if not getattr(jobs, "test_schema", None):
        return query(jobs.settings.path, sql, *params)
    import psycopg

    with psycopg.connect(POSTGRES, autocommit=True) as conn:
        conn.execute("SET search_path TO %s" % jobs.test_schema)
        return [tuple(row) for row in conn.execute(sql.replace("?", "%s"), params).fetchall()]


def write(jobs, sql, *params):
    """One statement that changes the database of ``jobs``, committed, through a connection of the test's own."""
    if not getattr(jobs, "test_schema", None):
        conn = sqlite3.connect(str(jobs.settings.path), isolation_level=None)
        try:
            conn.execute(sql, params)
        finally:
            conn.close()
        return
    import psycopg

    with psycopg.connect(POSTGRES, autocommit=True) as conn:
        conn.execute("SET search_path TO %s" % jobs.test_schema)
        conn.execute(sql.replace("?", "%s"), params)


# --- the table --------------------------------------------------------------------


def test_dispatch_creates_the_symfony_table_in_wal_mode(jobs):
    db = jobs.settings.path
    assert not os.path.exists(db)
    jobs.dispatch("note", {"n": 1})
    columns = [r[1] for r in query(db, "PRAGMA table_info(messenger_messages)")]
    assert columns[:7] == ["id", "body", "headers", "queue_name", "created_at", "available_at", "delivered_at"]
    # the mode is persistent: a new connection that sets nothing sees it
    assert query(db, "PRAGMA journal_mode") == [("wal",)]


def test_connections_use_the_busy_timeout_and_journal_size_limit_of_the_dsn(tmp_path):
    default = JobRunner(str(tmp_path / "a.db"))
    assert default.transport.connection().execute("PRAGMA busy_timeout").fetchall() == [(10000,)]
    tuned = JobRunner("sqlite:///%s?busy_timeout=2.5&journal_size_limit=1M" % (tmp_path / "b.db"))
    conn = tuned.transport.connection()
    assert conn.execute("PRAGMA busy_timeout").fetchall() == [(2500,)]
    assert conn.execute("PRAGMA journal_size_limit").fetchall() == [(1024 * 1024,)]
    default.transport.close()
    tuned.transport.close()


@pytest.mark.parametrize("analyzed", [False, True])
def test_claims_and_claimed_rows_are_found_on_the_queue_index_without_a_scan(jobs, analyzed):
    jobs.dispatch_many("note", [{"n": i} for i in range(50)])
    jobs.dispatch_many("note", [{"n": i} for i in range(50)], priority=5)
    jobs.dispatch_many("greet", [{"to": str(i)} for i in range(50)], delay=60)
    for worker_id in (1, 2):
        jobs.transport.claim(["async"], worker_id)
    db = jobs.settings.path
    index_sql = query(db, "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'messenger_messages'")
    assert sorted(name for name, _ in index_sql) == ["messenger_messages_queue", "messenger_messages_unique"], index_sql
    assert ("(queue_name, delivered_at DESC, priority DESC, available_at, id, claimed_by)"
            in dict(index_sql)["messenger_messages_queue"])
    conn = sqlite3.connect(db)
    if analyzed:
        conn.execute("ANALYZE")
    for name, params in (("claim", (1.0, 1, "async", 2.0, "paused:async")),
                         ("next_due", ("async", "async", "async", "paused:async")),
                         ("release_worker", (1.0, 1)),
                         ("release_own", (1, "[]")),
                         ("any_unowned", (1.0,)),
                         ("release_unowned", (1.0, 1.0)),
                         ("stats_claimed", ())):
        plan = [r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + jobs.transport.sql[name], params).fetchall()]
        assert any("INDEX messenger_messages_queue (queue_name=? AND delivered_at" in line for line in plan), (name, plan)
        assert not any(("SCAN messenger_messages" in line and "INDEX" not in line) or "TEMP B-TREE" in line
                       for line in plan), (name, plan)
    conn.close()


def test_an_older_jobrunners_indexes_are_replaced_when_a_worker_opens_the_database(project, app):
    app.dispatch("note", {"n": 1})
    app.close()
    with sqlite3.connect(project.db) as conn:
        conn.execute("DROP INDEX messenger_messages_queue")
        conn.execute("CREATE INDEX messenger_messages_next ON messenger_messages (queue_name, priority DESC, "
                     "available_at, id) WHERE delivered_at IS NULL")
        conn.execute("CREATE INDEX messenger_messages_claimed ON messenger_messages (claimed_by) "
                     "WHERE delivered_at IS NOT NULL")
    conn.close()
    result = project.cli("consume", "async", "--limit", "1")
    assert result.returncode == 0, result.stderr
    names = sorted(name for (name,) in project.query("SELECT name FROM sqlite_master WHERE type = 'index' "
                                                     "AND tbl_name = 'messenger_messages'"))
    assert names == ["messenger_messages_queue", "messenger_messages_unique"]
    assert project.values() == ["1"]


@pytest.mark.backends
def test_message_row_has_a_json_body_and_the_handler_name_in_its_headers(jobs):
    before = time.time()
    msg_id = jobs.dispatch("greet", {"to": "a@b.c", "subject": "été ☃"})
    after = time.time()
    (row,) = q(jobs, "SELECT id, body, headers, queue_name, created_at, available_at, delivered_at "
                                       "FROM messenger_messages")
    id_, body, headers, queue, created, available, delivered = row
    assert id_ == msg_id
    assert json.loads(body) == {"to": "a@b.c", "subject": "été ☃"}
    assert json.loads(headers)["handler"] == "greet"
    assert queue == "mail"
    assert before <= created <= after and before <= available <= after
    assert delivered is None


@pytest.mark.backends
def test_delay_sets_available_at_in_the_future(jobs):
    before = time.time()
    jobs.dispatch("note", {"n": 1}, delay=30)
    after = time.time()
    ((available,),) = q(jobs, "SELECT available_at FROM messenger_messages")
    assert before + 30 <= available <= after + 30


def test_setup_is_idempotent_and_keeps_messages(jobs):
    assert jobs.setup() == jobs.settings.path
    jobs.dispatch("note", {"n": 1})
    snapshot = rows(jobs.settings.path)
    jobs.transport.close()
    again = JobRunner(jobs.settings.path)
    again.setup()
    again.transport.close()
    assert rows(jobs.settings.path) == snapshot


def _permissions_script():
    return r"""
import json, os, sys
os.umask(0)
import jobrunner
jobs = jobrunner.JobRunner(sys.argv[1])
@jobs.handler
def note(n):
    pass
jobs.dispatch("note", {"n": 1})
db = jobs.settings.path
modes = {name: oct(os.stat(db + suffix).st_mode & 0o777) for name, suffix in (("db", ""), ("wal", "-wal"), ("shm", "-shm"))}
path, created = os.path.dirname(db), {}
while path != sys.argv[2]:
    created[path] = oct(os.stat(path).st_mode & 0o777)
    path = os.path.dirname(path)
print(json.dumps({"files": modes, "dirs": created}))
"""


def test_database_files_and_directory_are_private(tmp_path):
    # umask 0: whatever is not asked for explicitly would be world-readable
    result = run_python(_permissions_script(), tmp_path / "var" / "jobs.db", tmp_path)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["files"] == {"db": "0o600", "wal": "0o600", "shm": "0o600"}
    assert out["dirs"] == {str(tmp_path / "var"): "0o700"}


def test_every_directory_created_for_the_database_is_private(tmp_path):
    result = run_python(_permissions_script(), tmp_path / "a" / "b" / "jobs.db", tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["dirs"] == {str(tmp_path / "a" / "b"): "0o700", str(tmp_path / "a"): "0o700"}


def test_an_existing_directory_keeps_its_mode(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    result = run_python(_permissions_script(), shared / "jobs.db", tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["dirs"] == {str(shared): "0o755"}


# --- the Python API -----------------------------------------------------------------


@pytest.mark.backends
def test_dispatch_returns_increasing_ids_of_stored_messages(jobs):
    ids = [jobs.dispatch("note", {"n": i}) for i in range(3)]
    assert ids == sorted(ids) and len(set(ids)) == 3
    stored = q(jobs, "SELECT id, body FROM messenger_messages ORDER BY id")
    assert stored == [(ids[i], '{"n":%d}' % i) for i in range(3)]


@pytest.mark.backends
def test_an_app_that_dispatched_before_forking_dispatches_from_both_processes(jobs):
    # gunicorn --preload, multiprocessing: the child inherits whatever the parent had set up for dispatching
    first = jobs.dispatch("note", {"n": 1})
    read, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(write_end, str(jobs.dispatch("note", {"n": 2})).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    child = int(os.read(read, 64) or b"0")
    os.close(read)
    last = jobs.dispatch("note", {"n": 3})
    assert child and len({first, child, last}) == 3
    assert q(jobs, "SELECT body FROM messenger_messages ORDER BY body") == [('{"n":1}',), ('{"n":2}',), ('{"n":3}',)]


@pytest.mark.backends
def test_handler_dispatch_passes_keywords_as_payload(jobs):
    greet = jobs.handlers["greet"]
    msg_id = greet.dispatch(to="x@y.z", sign="me")
    ((body, headers, queue),) = q(jobs, "SELECT body, headers, queue_name FROM messenger_messages WHERE id = ?",
                                      msg_id)
    assert json.loads(body) == {"to": "x@y.z", "sign": "me"}
    assert json.loads(headers)["handler"] == "greet"
    assert queue == "mail"


def test_a_decorated_function_is_still_callable(jobs):
    calls = []

    @jobs.handler(queue="mail")
    def remember(x):
        calls.append(x)
        return x * 2

    assert remember(x=21) == 42 and calls == [21]
    assert jobs.handlers["remember"].queue == "mail"


@pytest.mark.backends
def test_dispatch_queue_overrides_the_handlers_route(jobs):
    msg_id = jobs.dispatch("note", {"n": 1}, queue="mail")
    assert q(jobs, "SELECT queue_name FROM messenger_messages WHERE id = ?", msg_id) == [("mail",)]


@pytest.mark.parametrize("form", ["name-and-payloads", "pairs"])
def test_dispatch_many_writes_every_message_in_one_transaction(jobs, form):
    jobs.setup()
    statements = []
    jobs.transport.connection().set_trace_callback(statements.append)
    if form == "pairs":
        ids = jobs.dispatch_many([("note", {"n": i}) for i in range(100)])
    else:
        ids = jobs.dispatch_many("note", [{"n": i} for i in range(100)])
    jobs.transport.connection().set_trace_callback(None)
    assert len(ids) == 100
    assert [s for s in statements if s.split()[0] in ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE")] == \
        ["BEGIN IMMEDIATE", "COMMIT"]
    stored = query(jobs.settings.path, "SELECT id, body, queue_name FROM messenger_messages ORDER BY id")
    assert stored == [(ids[i], '{"n":%d}' % i, "async") for i in range(100)]


@pytest.mark.backends
def test_dispatch_many_with_pairs_routes_each_message_to_its_handlers_queue(jobs):
    ids = jobs.dispatch_many([("note", {"n": 1}), ("greet", {"to": "a"}), ("anything", {})])
    stored = q(jobs, "SELECT id, body, headers, queue_name FROM messenger_messages ORDER BY id")
    assert [(i, b, json.loads(h)["handler"], q) for i, b, h, q in stored] == [
        (ids[0], '{"n":1}', "note", "async"), (ids[1], '{"to":"a"}', "greet", "mail"), (ids[2], "{}", "anything", "mail")]


def test_dispatch_many_stores_nothing_when_one_payload_is_invalid(jobs):
    jobs.dispatch("note", {"n": 0})
    snapshot = rows(jobs.settings.path)
    with pytest.raises(InvalidMessage):
        jobs.dispatch_many("note", [{"n": 1}, {"n": object()}, {"n": 3}])
    with pytest.raises(InvalidMessage):
        jobs.dispatch_many([("note", {"n": 1}), ("greet", {"nobody": 1})])
    assert rows(jobs.settings.path) == snapshot


def nested(depth):
    value = 1
    for _ in range(depth):
        value = [value]
    return value


BAD_PAYLOADS = [
    pytest.param("note", {"n": object()}, id="object"),
    pytest.param("note", {"n": {1, 2}}, id="set"),
    pytest.param("note", {"n": b"bytes"}, id="bytes"),
    pytest.param("note", {"n": float("nan")}, id="nan"),
    pytest.param("note", {"n": float("inf")}, id="inf"),
    pytest.param("note", {"n": "\ud800"}, id="lone-surrogate"),
    pytest.param("note", {"n": nested(5000)}, id="nested-too-deep"),
    pytest.param("note", [1, 2], id="list-payload"),
    pytest.param("note", "n=1", id="string-payload"),
    pytest.param("note", 3, id="int-payload"),
    pytest.param("note", {}, id="missing-argument"),
    pytest.param("note", {"n": 1, "m": 2}, id="unexpected-argument"),
    pytest.param("greet", {"subject": "x"}, id="missing-first-argument"),
    pytest.param("greet", {"to": "a", "signature": "x"}, id="unexpected-keyword"),
    pytest.param("anything", {1: "x"}, id="non-string-key"),
    pytest.param("nope", {"n": 1}, id="unknown-handler"),
]


@pytest.mark.backends
@pytest.mark.parametrize("name,payload", BAD_PAYLOADS)
def test_invalid_dispatch_raises_invalid_message_and_stores_nothing(jobs, name, payload):
    jobs.dispatch("note", {"n": 0}, delay=5)
    snapshot = q(jobs, "SELECT * FROM messenger_messages ORDER BY id")
    with pytest.raises(InvalidMessage):
        jobs.dispatch(name, payload)
    assert q(jobs, "SELECT * FROM messenger_messages ORDER BY id") == snapshot


@pytest.mark.backends
@pytest.mark.parametrize("options", [{"queue": "nope"}, {"queue": "failed"}, {"queue": "bad queue"},
                                     {"delay": -1}, {"delay": float("nan")}, {"delay": "soon"}])
def test_invalid_queue_or_delay_raises_invalid_message(jobs, options):
    jobs.dispatch("note", {"n": 0})
    snapshot = q(jobs, "SELECT * FROM messenger_messages ORDER BY id")
    with pytest.raises(InvalidMessage):
        jobs.dispatch("note", {"n": 1}, **options)
    assert q(jobs, "SELECT * FROM messenger_messages ORDER BY id") == snapshot


def test_a_payload_over_max_body_bytes_is_refused(tmp_path):
    jobs = JobRunner("sqlite:///%s?max_body_bytes=100" % (tmp_path / "jobs.db"))

    @jobs.handler
    def note(n):
        pass

    jobs.dispatch("note", {"n": "x" * 50})
    with pytest.raises(InvalidMessage):
        jobs.dispatch("note", {"n": "x" * 200})
    assert [json.loads(b) for (b,) in query(jobs.settings.path, "SELECT body FROM messenger_messages")] == [{"n": "x" * 50}]
    jobs.transport.close()


def test_import_and_dispatch_need_only_the_standard_library(tmp_path):
    db = tmp_path / "var" / "jobs.db"
    code = r"""
import importlib.abc, json, sys
BLOCKED = {"click", "psutil", "filelock"}
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ImportError("blocked by the test: " + name)
        return None
sys.meta_path.insert(0, Blocker())
try:
    import click
except ImportError:
    pass
else:
    raise SystemExit("the import hook does not block click")
import jobrunner
jobs = jobrunner.JobRunner("sqlite:///" + sys.argv[1])
@jobs.handler("send_email", queue="async", max_retries=3)
def send_email(to, subject="hi"):
    pass
ids = [jobs.dispatch("send_email", {"to": "a@b.c"}), send_email.dispatch(to="d@e.f")]
ids += jobs.dispatch_many("send_email", [{"to": "1"}, {"to": "2"}])
assert not BLOCKED & set(sys.modules), BLOCKED & set(sys.modules)
print(json.dumps(ids))
"""
    result = run_python(code, db)
    assert result.returncode == 0, result.stderr
    ids = json.loads(result.stdout)
    stored = query(db, "SELECT id, body, headers FROM messenger_messages ORDER BY id")
    assert [(i, json.loads(b), json.loads(h)["handler"]) for i, b, h in stored] == [
        (ids[0], {"to": "a@b.c"}, "send_email"), (ids[1], {"to": "d@e.f"}, "send_email"),
        (ids[2], {"to": "1"}, "send_email"), (ids[3], {"to": "2"}, "send_email")]


# --- locking and claims -------------------------------------------------------------


def _hold_write_lock(db):
    conn = sqlite3.connect(str(db), isolation_level=None, check_same_thread=False)
    conn.execute("BEGIN IMMEDIATE")
    return conn


def test_dispatch_waits_for_a_write_lock_within_the_busy_timeout(jobs):
    jobs.setup()
    holder = _hold_write_lock(jobs.settings.path)
    timer = threading.Timer(0.5, lambda: holder.execute("COMMIT"))
    started = time.monotonic()
    timer.start()
    try:
        msg_id = jobs.dispatch("note", {"n": 1})
    finally:
        timer.join()
        holder.close()
    assert time.monotonic() - started >= 0.4
    assert query(jobs.settings.path, "SELECT id FROM messenger_messages") == [(msg_id,)]


def test_dispatch_raises_database_locked_past_the_busy_timeout(tmp_path):
    jobs = JobRunner("sqlite:///%s?busy_timeout=0.2" % (tmp_path / "jobs.db"))

    @jobs.handler
    def note(n):
        pass

    jobs.dispatch("note", {"n": 0})
    snapshot = rows(jobs.settings.path)
    holder = _hold_write_lock(jobs.settings.path)
    try:
        started = time.monotonic()
        with pytest.raises(DatabaseLocked):
            jobs.dispatch_many("note", [{"n": 1}, {"n": 2}])
        assert 0.15 <= time.monotonic() - started < 5
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert rows(jobs.settings.path) == snapshot
    jobs.transport.close()


_CLAIMER = r"""
import json, os, sys, time
import jobrunner
transport = jobrunner._open_transport(jobrunner.Settings.from_dsn(sys.argv[1]))
transport.setup()
worker_id, go = int(sys.argv[2]), sys.argv[3]
open(go + "-ready-%d" % worker_id, "w").close()
while not os.path.exists(go):
    time.sleep(0.001)
ids = []
while True:
    delivery, settled, version, due = transport.claim(["async"], worker_id)
    if delivery is None:
        break
    ids.append(delivery.id)
print(json.dumps(ids))
"""


@pytest.mark.backends
def test_concurrent_claims_never_hand_one_message_to_two_workers(jobs, tmp_path):
    ids = jobs.dispatch_many("note", [{"n": i} for i in range(600)])
    jobs.transport.close()
    go = tmp_path / "go"
    claimers = [subprocess.Popen([sys.executable, "-c", _CLAIMER, jobs.settings.dsn, str(100 + k), str(go)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO),
                                 env=dict(os.environ, PYTHONPATH=str(REPO))) for k in range(3)]
    try:
        wait_until(lambda: all(os.path.exists("%s-ready-%d" % (go, 100 + k)) for k in range(3)), message="claimers ready")
        go.touch()
        results = [p.communicate(timeout=30) for p in claimers]
    finally:
        for p in claimers:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert [p.returncode for p in claimers] == [0, 0, 0], [err for _, err in results]
    claimed = {100 + k: json.loads(out) for k, (out, _) in enumerate(results)}
    everything = [i for got in claimed.values() for i in got]
    assert sorted(everything) == ids  # each message claimed exactly once
    stored = q(jobs, "SELECT id, claimed_by, attempts, delivered_at IS NOT NULL FROM messenger_messages")
    owner = {i: worker for worker, got in claimed.items() for i in got}
    assert sorted(stored) == [(i, owner[i], 1, 1) for i in ids]


@pytest.mark.backends
def test_claim_takes_the_first_non_empty_queue_then_the_oldest_message(jobs):
    jobs.dispatch("greet", {"to": "later"}, delay=60)
    first_mail = jobs.dispatch("greet", {"to": "a"})
    jobs.dispatch("greet", {"to": "b"})
    first_async = jobs.dispatch("note", {"n": 1})
    transport = jobs.transport
    delivery, _, _, _ = transport.claim(["async", "mail"], 7)
    assert delivery.id == first_async
    delivery, _, _, _ = transport.claim(["async", "mail"], 7)
    assert delivery.id == first_mail


# --- the WAL under load ---------------------------------------------------------------


def test_wal_stays_bounded_under_constant_dispatch_and_consume(project):
    dsn = "sqlite:///%s?journal_size_limit=1M" % project.db
    app = project.app()
    app.use_dsn(dsn)
    app.setup()
    workers = [project.start("consume", "async", env={"JOBRUNNER_DSN": dsn}) for _ in range(2)]
    wait_until(lambda: query(project.db, "SELECT COUNT(*) FROM jobrunner_workers") == [(2,)], message="2 workers")
    wal = str(project.db) + "-wal"
    largest, dispatched = 0, 0
    started = time.monotonic()
    while time.monotonic() - started < 3.0:
        app.dispatch_many("note", [{"n": dispatched + i} for i in range(10)])
        dispatched += 10
        try:
            largest = max(largest, os.stat(wal).st_size)
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    wait_until(lambda: query(project.db, "SELECT COUNT(*) FROM messenger_messages") == [(0,)], timeout=20,
               message="the workers to drain the queue")
    assert len(project.handled("note")) == dispatched
    # SQLite checkpoints every 1000 pages (4 MiB); journal_size_limit truncates the WAL after that.
    # Without working checkpoints this load writes some 40 MiB of WAL in 3 s.
    assert largest < 16 * 1024 * 1024, "WAL reached %.1f MiB" % (largest / 1024 / 1024)
    for w in workers:
        assert w.poll() is None, w.communicate()[1]
    app.transport.close()


def _open_and_use(path, writer, results):
    import jobrunner as jr

    try:
        transport = jr.SqliteTransport(jr.Settings(path))
        if writer:
            with transport.transaction(transport.connection()) as conn:
                conn.execute("INSERT INTO jobrunner_control VALUES ('x', 1)")
        else:
            while not os.path.exists(path):
                pass
            transport.setup()  # every process may be the first to create the tables
            jr._read_status(transport)
        results.put("ok")
    except Exception as exc:  # reported, not raised: the parent counts them
        results.put(repr(exc))


def test_processes_opening_a_new_database_at_once_all_succeed(tmp_path):
    # A new file is still in rollback mode: SQLite may answer SQLITE_BUSY at once, without waiting.
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    outcomes = []
    for trial in range(250):
        path = str(tmp_path / ("new-%d.db" % trial))
        results = ctx.Queue()
        procs = [ctx.Process(target=_open_and_use, args=(path, writer, results)) for writer in (True, False, False)]
        for p in procs:
            p.start()
        outcomes += [results.get(timeout=30) for _ in procs]
        for p in procs:
            p.join()
    assert [o for o in outcomes if o != "ok"] == []


# --- the app's own database is not ours to change -----------------------------------------------


def make_app_database(path, user_version):
    conn = sqlite3.connect(str(path))
    conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO customers (name) VALUES ('ann')")
    conn.execute("PRAGMA user_version = %d" % user_version)
    conn.commit()
    conn.close()


@pytest.mark.parametrize("user_version", [0, 5])
def test_an_app_database_keeps_its_user_version_and_tables(tmp_path, user_version):
    db = tmp_path / "app.db"
    make_app_database(db, user_version)
    app = JobRunner(str(db))

    @app.handler
    def note(n):
        pass

    msg_id = app.dispatch("note", {"n": 1})  # once failed with "no such table" at user_version 5
    assert app.consume("async", limit=1, install_signals=False) == "message limit of 1 reached"
    app.transport.close()
    assert query(db, "PRAGMA user_version") == [(user_version,)]  # the app's migration marker, untouched
    assert query(db, "SELECT name FROM customers") == [("ann",)]
    assert msg_id == 1 and query(db, "SELECT COUNT(*) FROM messenger_messages") == [(0,)]


@pytest.mark.parametrize("args,code", [(("stats",), 2), (("status",), 2), (("failed", "show"), 2),
                                       (("failed", "show", "1"), 2), (("health",), 1)])
def test_commands_that_only_read_leave_a_foreign_database_byte_for_byte_unchanged(tmp_path, args, code):
    db = tmp_path / "app.db"
    make_app_database(db, 5)
    before = db.read_bytes()
    result = subprocess.run([sys.executable, str(REPO / "jobrunner.py"), *args, "--dsn", str(db)], capture_output=True,
                            text=True, cwd=str(tmp_path), env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == code, result.stderr
    said = result.stderr if code == 2 else result.stdout
    assert "has no jobrunner tables" in said and said.count("\n") == 1, said
    assert db.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["app.db"]  # no -wal, -shm or anything else beside it


SYMFONY_SQLITE_TABLE = """
CREATE TABLE messenger_messages (id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL, body CLOB NOT NULL,
    headers CLOB NOT NULL, queue_name VARCHAR(190) NOT NULL, created_at DATETIME NOT NULL,
    available_at DATETIME NOT NULL, delivered_at DATETIME DEFAULT NULL);
CREATE INDEX IDX_75EA56E0FB7336F0 ON messenger_messages (queue_name);
CREATE INDEX IDX_75EA56E0E3BD61CE ON messenger_messages (available_at);
CREATE INDEX IDX_75EA56E016BA31DB ON messenger_messages (delivered_at);
"""


def test_setup_adds_our_columns_to_a_table_symfony_created(tmp_path):
    db = tmp_path / "symfony.db"
    conn = sqlite3.connect(str(db))
    conn.executescript(SYMFONY_SQLITE_TABLE)
    conn.execute("INSERT INTO messenger_messages (body, headers, queue_name, created_at, available_at) "
                 "VALUES ('{\"n\": 1}', '{\"handler\": \"note\"}', 'async', 0, 0)")
    conn.commit()
    conn.close()
    result = subprocess.run([sys.executable, str(REPO / "jobrunner.py"), "setup", "--dsn", str(db)], capture_output=True,
                            text=True, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    columns = [row[1] for row in query(db, "PRAGMA table_info(messenger_messages)")]
    assert columns == ["id", "body", "headers", "queue_name", "created_at", "available_at", "delivered_at",
                       "claimed_by", "attempts", "priority", "unique_key"]
    app = JobRunner(str(db))
    seen = []
    app.handler("note")(lambda n: seen.append(n))
    assert app.consume("async", limit=1, install_signals=False) == "message limit of 1 reached"
    app.transport.close()
    assert seen == [1]


def test_an_older_jobrunner_database_gets_the_new_columns(tmp_path):
    db = tmp_path / "old.db"
    conn = sqlite3.connect(str(db))
    conn.executescript("""
        CREATE TABLE messenger_messages (id INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT NOT NULL, headers TEXT NOT NULL,
            queue_name TEXT NOT NULL, created_at REAL NOT NULL, available_at REAL NOT NULL, delivered_at REAL,
            claimed_by INTEGER, attempts INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE jobrunner_workers (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, host TEXT NOT NULL,
            pid INTEGER NOT NULL, ppid INTEGER NOT NULL, queues TEXT NOT NULL, started_at REAL NOT NULL,
            beat_at REAL NOT NULL, handled INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0,
            rss_bytes INTEGER, message_id INTEGER);
        PRAGMA user_version = 1;
    """)
    conn.close()
    app = JobRunner(str(db))
    app.handler("note")(lambda n: None)
    app.dispatch("note", {"n": 1})
    assert app.consume("async", limit=1, install_signals=False) == "message limit of 1 reached"
    app.transport.close()
    assert "beats" in [row[1] for row in query(db, "PRAGMA table_info(jobrunner_workers)")]


def test_an_sqlite_too_old_for_returning_is_one_line_naming_both_versions(tmp_path):
    code = ("import sqlite3, sys; sqlite3.sqlite_version_info = (3, 31, 1); sqlite3.sqlite_version = '3.31.1'\n"
            "import jobrunner\n"
            "try:\n    jobrunner.JobRunner(sys.argv[1])\n"
            "except jobrunner.StorageError as exc:\n    print(exc)\n")
    result = run_python(code, tmp_path / "x.db")
    assert result.stdout == "jobrunner needs SQLite 3.35.0 or newer; this Python has SQLite 3.31.1\n", result.stderr


def test_keeping_the_wal_bounded_never_waits_for_a_reader_that_holds_it(tmp_path):
    # A reader holding a snapshot starves checkpoints.  A TRUNCATE checkpoint would wait busy_timeout for
    # it while holding writers back; the bound must give up at once instead.
    db = tmp_path / "jobs.db"
    app = JobRunner(str(db), busy_timeout=5, journal_size_limit=0)
    app.handler("note")(lambda n: None)
    app.setup()
    reader = sqlite3.connect(str(db), isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM messenger_messages").fetchall()  # holds its snapshot
    payload = {"n": "x" * 2000}
    for _ in range(6):
        app.dispatch_many("note", [payload] * 500)  # ~6 MB of WAL the reader keeps alive
    assert os.stat(str(db) + "-wal").st_size > 4 * 1024 * 1024
    started = time.monotonic()
    app.transport.maintain()
    assert time.monotonic() - started < 1.0  # not the 5 s busy_timeout
    started = time.monotonic()
    app.dispatch("note", {"n": 1})
    assert time.monotonic() - started < 1.0
    reader.execute("COMMIT")
    reader.close()
    app.transport.maintain()  # no reader now: truncated
    assert os.stat(str(db) + "-wal").st_size == 0
    app.transport.close()


# --- an app's own test suite: eager mode, run_pending, hooks, close ------------------------------


def test_eager_mode_runs_the_handler_inside_dispatch_and_raises_its_error(tmp_path):
    jobs = JobRunner(str(tmp_path / "jobs.db"), eager=True)
    seen = []

    @jobs.handler
    def add(a, b=1):
        seen.append(a + b)

    @jobs.handler
    def boom(n):
        raise KeyError(n)

    @jobs.handler
    async def later(n):
        seen.append(("async", n))

    assert jobs.dispatch("add", {"a": 2}) is None
    add.dispatch(a=5, b=5)
    jobs.dispatch("later", {"n": 1})
    assert seen == [3, 10, ("async", 1)]
    with pytest.raises(KeyError):
        jobs.dispatch("boom", {"n": 7})
    with pytest.raises(InvalidMessage):  # the same checks as a real dispatch
        jobs.dispatch("add", {"c": 1})
    assert not (tmp_path / "jobs.db").exists()  # nothing was stored


def test_run_pending_drains_in_process_with_the_real_retry_rules(tmp_path):
    # the retry delay is the margin for "not due yet" against a stalled machine: 50 ms failed once under load
    with JobRunner(str(tmp_path / "jobs.db"), max_retries=2, delay=0.5, jitter=0) as jobs:
        done, attempts = [], []

        @jobs.handler
        def ok(n):
            done.append(n)

        @jobs.handler
        def flaky(n):
            attempts.append(n)
            if len(attempts) < 3:
                raise ConnectionError("try again")

        jobs.dispatch_many("ok", [{"n": i} for i in range(3)])
        jobs.dispatch("flaky", {"n": 1})
        assert jobs.run_pending() == 4  # three successes and a failed attempt; its retry is not due yet
        assert done == [0, 1, 2] and attempts == [1]
        assert jobs.run_pending() == 0
        time.sleep(0.51)
        assert jobs.run_pending(queues=["async"], limit=5) == 1 and attempts == [1, 1]
        time.sleep(1.01)
        assert jobs.run_pending() == 1 and attempts == [1, 1, 1]
        assert jobs.stats()["queues"][0]["ready"] == 0 and jobs.failed() == []


def test_lifecycle_hooks_see_each_outcome_and_cannot_lose_a_message_by_raising(tmp_path):
    with JobRunner(str(tmp_path / "jobs.db"), max_retries=1, delay=0, jitter=0) as jobs:
        events = []

        @jobs.handler
        def ok(n):
            pass

        @jobs.handler
        def bad(n):
            raise ValueError("bad %s" % n)

        jobs.before(lambda m: events.append(("before", m.handler, m.payload)))
        jobs.on_success(lambda m: events.append(("success", m.handler, m.id)))
        jobs.on_retry(lambda m, e: events.append(("retry", m.handler, str(e))))

        @jobs.on_failure
        def report(message, error):
            events.append(("failure", message.handler, repr(error), message.attempts))
            raise RuntimeError("the error tracker is down")

        ok_id = jobs.dispatch("ok", {"n": 1})
        bad_id = jobs.dispatch("bad", {"n": 2})
        assert jobs.run_pending() == 3
        assert events == [("before", "ok", {"n": 1}), ("success", "ok", ok_id), ("before", "bad", {"n": 2}),
                          ("retry", "bad", "bad 2"), ("before", "bad", {"n": 2}),
                          ("failure", "bad", "ValueError('bad 2')", 2)]
        assert [e.id for e in jobs.failed()] == [bad_id]  # the hook raised; the message is still where it belongs


def test_close_leaves_no_connection_open_even_those_of_other_threads(tmp_path):
    code = """
import threading, warnings, sys
warnings.simplefilter("error", ResourceWarning)
import jobrunner
with jobrunner.JobRunner(sys.argv[1]) as jobs:
    jobs.handler("note")(lambda n: None)
    jobs.dispatch("note", {"n": 1})
    t = threading.Thread(target=lambda: jobs.dispatch("note", {"n": 2}))
    t.start(); t.join()
    jobs.run_pending()
import gc; gc.collect()
print("clean")
"""
    result = run_python(code, tmp_path / "jobs.db", env={"PYTHONWARNINGS": "error::ResourceWarning"})
    assert result.stdout == "clean\n" and "ResourceWarning" not in result.stderr, result.stderr


def test_an_unknown_queue_says_how_to_declare_one(tmp_path):
    jobs = JobRunner(str(tmp_path / "jobs.db"))
    jobs.handler("resize")(lambda path: None)
    with pytest.raises(InvalidMessage, match=r"unknown queue 'low' \(known: async; a queue no handler uses is "
                                             r"declared with JobRunner\(queues=\[...\]\)\)"):
        jobs.dispatch("resize", {"path": "a.png"}, queue="low")
    jobs = JobRunner(str(tmp_path / "jobs.db"), queues=["low"])
    jobs.handler("resize")(lambda path: None)
    assert jobs.dispatch("resize", {"path": "a.png"}, queue="low") == 1
    jobs.close()


def test_close_closes_the_connections_of_every_thread(tmp_path):
    jobs = JobRunner(str(tmp_path / "jobs.db"))
    jobs.handler("note")(lambda n: None)
    jobs.dispatch("note", {"n": 1})
    t = threading.Thread(target=lambda: jobs.dispatch("note", {"n": 2}))
    t.start()
    t.join()
    opened = [conn for _, conn in jobs.transport._opened]
    assert len(opened) == 2
    jobs.close()
    for conn in opened:
        with pytest.raises(sqlite3.ProgrammingError):
            conn.execute("SELECT 1")
    assert jobs.dispatch("note", {"n": 3}) == 3  # and it reopens on next use
    jobs.close()


@pytest.mark.backends
def test_a_batch_claim_settles_each_outcome_fenced_then_claims_across_queues(jobs):
    # What a worker's threads (or --prefetch) do: each outcome applied as alone (a stale one refused), then up
    # to the number wanted, from the first queue that has them.
    notes = [jobs.dispatch("note", {"n": i}) for i in range(3)]
    mails = [jobs.dispatch("greet", {"to": to}) for to in "ab"]
    transport = jobs.transport
    first, settled, _, _ = transport.claim_batch(["async", "mail"], 7, [None, None, None], 3)
    assert [d.id for d in first] == notes and settled == [True, True, True]  # in claim order
    by_id = {d.id: d for d in first}
    later = time.time() + 60
    stale = jobrunner._Delivery(*[getattr(by_id[notes[0]], f) for f in ("id", "body", "headers", "queue", "created_at",
                                                                          "available_at")], 9, 7)  # attempts 9: not the claim
    settles = [jobrunner._Outcome("ack", by_id[notes[0]]), jobrunner._Outcome("ack", stale),
               jobrunner._Outcome("retry", by_id[notes[1]], later, by_id[notes[1]].headers),
               jobrunner._Outcome("fail", by_id[notes[2]], time.time(), by_id[notes[2]].headers), None]
    claimed, settled, _, due = transport.claim_batch(["async", "mail"], 7, settles, 8)
    assert settled == [True, False, True, True, True]
    assert [d.id for d in claimed] == mails
    assert due == pytest.approx(later)  # the retried message is the next one due
    stored = q(jobs, "SELECT id, queue_name, claimed_by, attempts, delivered_at IS NOT NULL FROM messenger_messages "
                     "ORDER BY id")
    assert stored == [(notes[1], "async", None, 1, 0), (notes[2], "failed", None, 1, 0),
                      (mails[0], "mail", 7, 1, 1), (mails[1], "mail", 7, 1, 1)]


@pytest.mark.backends
def test_a_claim_of_a_forgotten_worker_goes_back_at_once_and_another_tools_after_redeliver_timeout(jobs):
    # On PostgreSQL a claim sent by a worker killed mid-statement commits after its death, so after the release of
    # its claims and the removal of its row: nothing but this release would give it back before redeliver_timeout.
    for i in range(3):
        jobs.dispatch("note", {"n": i})
    transport = jobs.transport
    gone = transport.register_worker("w", "h", ["async"], time.time())
    live = transport.register_worker("w", "h", ["async"], time.time())
    transport.unregister_worker(gone)  # as the supervisor does when it reaps it
    late = transport.claim(["async"], gone)[0].id  # ... its last claim still committing
    alive = transport.claim(["async"], live)[0].id
    other_tool = transport.claim(["async"], live)[0].id
    write(jobs, "UPDATE messenger_messages SET claimed_by = NULL WHERE id = ?", other_tool)  # Symfony's: no claimed_by
    assert transport.has_unowned_claims()
    assert transport.release_workers({}) == ([], 1)
    assert q(jobs, "SELECT id, claimed_by FROM messenger_messages WHERE delivered_at IS NOT NULL ORDER BY id") == [
        (alive, live), (other_tool, None)]
    assert not transport.has_unowned_claims()
    write(jobs, "UPDATE messenger_messages SET delivered_at = ? WHERE id = ?", time.time() - 3601, other_tool)
    assert transport.has_unowned_claims()
    assert transport.release_workers({}) == ([], 1)
    assert q(jobs, "SELECT id FROM messenger_messages WHERE delivered_at IS NULL ORDER BY id") == [(late,), (other_tool,)]


@pytest.mark.postgres
def test_libpq_options_with_spaces_reach_the_server_as_written(backend):
    import uuid

    schema = "t_" + uuid.uuid4().hex[:16]
    app = JobRunner(postgres_dsn(schema) + "&options=-c%20statement_timeout%3D5000&application_name=my%20app"
                    "&connect_timeout=3")
    try:
        conn = app.transport.connection()
        shown = [conn.execute("SHOW %s" % name).fetchone()[0] for name in ("statement_timeout", "application_name")]
        assert shown == ["5s", "my app"]
        assert conn.info.get_parameters()["connect_timeout"] == "3"  # not replaced by one from busy_timeout
    finally:
        app.close()
        drop_schema(schema)


@pytest.mark.parametrize("dsn, error", [
    ("postgresql://app:secret@[::1:5432/jobs", "Invalid IPv6 URL"),
    ("postgresql://app:secret@db:99999/jobs", "Port out of range 0-65535"),
    ("postgresql://app:secret@db:abc/jobs", "Port could not be cast to integer value as 'abc'"),
])
def test_a_malformed_postgresql_dsn_is_one_line_without_its_password(tmp_path, dsn, error):
    result = subprocess.run([sys.executable, str(REPO / "jobrunner.py"), "stats", "--dsn", dsn], cwd=tmp_path,
                            capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "jobrunner: error: malformed PostgreSQL DSN: %s\n" % error
    with pytest.raises(jobrunner.ConfigurationError, match="malformed PostgreSQL DSN") as raised:
        JobRunner(dsn)
    assert "secret" not in str(raised.value)


@pytest.mark.postgres
def test_the_longest_names_allowed_work_on_postgresql_and_a_longer_table_is_refused_on_both(backend, tmp_path):
    schema = "s" * 63  # the channel would be jobrunner_<schema>_<table>: far over PostgreSQL's 63 bytes
    table = "t" * 55  # its index names (t..._claimed) take the 63 bytes exactly
    app = JobRunner("%s&table=%s" % (postgres_dsn(schema), table))

    @app.handler
    def note(n):
        pass

    try:
        first = app.dispatch("note", {"n": 1}, unique_key="k")
        assert app.dispatch("note", {"n": 2}, unique_key="k") == first  # the unique index exists
        app.dispatch_many("note", [{"n": 3}])
        assert app.run_pending(["async"]) == 2
    finally:
        app.close()
        drop_schema(schema)
    too_long = "t" * 56
    for dsn in ("%s&table=%s" % (postgres_dsn("s"), too_long), "sqlite:///%s?table=%s" % (tmp_path / "jobs.db", too_long)):
        with pytest.raises(jobrunner.ConfigurationError, match="is 56 characters: at most 55"):
            JobRunner(dsn)


@pytest.mark.backends
def test_connections_closed_one_by_one_are_forgotten_so_a_long_running_server_does_not_grow(jobs):
    # the dashboard opens a connection per request and closes it: 22,000 requests kept 22,000 closed connections
    jobs.setup()
    for _ in range(200):
        jobs.transport.stats()
        jobs.transport.close()
    assert len(jobs.transport._opened) == 0
    jobs.transport.stats()
    assert len(jobs.transport._opened) == 1  # close_all() still finds the open one


def test_jobrunners_own_queues_cannot_be_routed_to(tmp_path):
    # the heartbeat took any message running on "cancelled" for one being cancelled, and deleted it unrun
    path = str(tmp_path / "jobs.db")
    for kwargs in ({"queue": "cancelled"}, {"queues": ["cancelled"]}, {"queue": "failed"}):
        with pytest.raises(jobrunner.ConfigurationError, match="is jobrunner's own"):
            JobRunner(path, **kwargs)
    app = JobRunner(path)
    for queue in ("cancelled", "failed"):
        with pytest.raises(jobrunner.ConfigurationError, match="queue %r is jobrunner's own" % queue):
            app.handler("h", queue=queue)(lambda: None)
    assert app.handlers == {}
