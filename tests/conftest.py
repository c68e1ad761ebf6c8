"""Shared fixtures: every test gets its own project directory with a fresh SQLite
file, runs the real command line in real processes, and leaves none behind."""

import collections
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
APPS = Path(__file__).resolve().parent / "apps"
JOBRUNNER = str(REPO / "jobrunner.py")

sys.path.insert(0, str(APPS))


# Figures for the end-of-run summary (the README's Reliability section quotes them), as the tests that ran counted
# them.  A test adds them to its own report, so that they reach the summary from pytest-xdist's workers too.
FIGURES = []
COUNTS = collections.Counter()  # (name, what) -> n, summed over every test (and worker) that counted
_PENDING = {"figures": [], "counts": collections.Counter()}


def report(line):
    """A line for the end-of-run summary."""
    _PENDING["figures"].append(line)


def count(name, what, n=1):
    """Add to a counter of the end-of-run summary (generated examples, checked rows)."""
    _PENDING["counts"][name, what] += n


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    result = yield
    if call.when == "teardown":
        test_report = result.get_result()
        test_report.user_properties.extend(("figure", line) for line in _PENDING["figures"])
        test_report.user_properties.extend(("count", [name, what, n]) for (name, what), n in _PENDING["counts"].items())
        _PENDING["figures"], _PENDING["counts"] = [], collections.Counter()


def pytest_runtest_logreport(report):
    if report.when != "teardown":
        return
    for key, value in report.user_properties:
        if key == "figure":
            FIGURES.append(value)
        elif key == "count":
            COUNTS[value[0], value[1]] += value[2]


def _bad_input_figure():
    names = sorted({name for name, what in COUNTS if what == "examples"})
    if not names:
        return None
    parts = ["%s: %d examples, %d failed" % (name, COUNTS[name, "examples"], COUNTS[name, "failed"]) for name in names]
    return "generated bad input (hypothesis): " + "; ".join(parts) + "; %d stored rows checked unaltered" % COUNTS[
        "rows", "checked"]


def pytest_terminal_summary(terminalreporter):
    """Figures as the tests that produced them counted them: only those of tests that ran."""
    lines = FIGURES + [line for line in [_bad_input_figure()] if line]
    if lines:
        terminalreporter.section("reliability figures")
        for line in lines:
            terminalreporter.write_line(line)


def query(db, sql, *params):
    """Rows of one SQL statement on a database file, through a connection of the test's own."""
    conn = sqlite3.connect(str(db))
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


_LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
"""


def hold_write_lock(db, seconds):
    """Another process that holds the database's write lock for ``seconds``; returns once it holds it."""
    locker = subprocess.Popen([sys.executable, "-c", _LOCKER, str(db), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert locker.stdout.readline().strip() == "locked"
    return locker


def wait_until(condition, timeout=10.0, interval=0.02, message="condition"):
    """Poll ``condition`` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, message))
        time.sleep(interval)


def watch_stderr(proc):
    """Collect a started process's stderr line by line in a thread, so a test can wait for one line."""
    proc.err_lines = []

    def pump():
        for line in proc.stderr:
            proc.err_lines.append(line)

    proc.err_thread = threading.Thread(target=pump, daemon=True)
    proc.err_thread.start()
    return proc


def wait_for_stderr(proc, text, timeout=10.0):
    """Wait until a watched process has written a line containing ``text``."""
    return wait_until(lambda: any(text in line for line in proc.err_lines), timeout=timeout, message=repr(text))


# --- the two backends ---------------------------------------------------------------------------
#
# Tests marked `backends` run on SQLite and on PostgreSQL; PostgreSQL needs JOBRUNNER_TEST_POSTGRES (a DSN to
# a database where each test creates and drops a schema of its own).  Unset, those runs are skipped; set but
# unreachable, they fail: CI sets it, and a skipped PostgreSQL test there would hide a broken backend.

POSTGRES = os.environ.get("JOBRUNNER_TEST_POSTGRES")


def pytest_configure(config):
    config.addinivalue_line("markers", "backends: run on SQLite and on PostgreSQL (JOBRUNNER_TEST_POSTGRES)")
    config.addinivalue_line("markers", "sqlite: about SQLite itself; not run on PostgreSQL")
    config.addinivalue_line("markers", "postgres: about PostgreSQL itself; run on PostgreSQL only")


def pytest_generate_tests(metafunc):
    if "backend" not in metafunc.fixturenames:
        return
    if metafunc.definition.get_closest_marker("postgres"):
        metafunc.parametrize("backend", ["postgres"], indirect=True)
    elif metafunc.definition.get_closest_marker("backends") and not metafunc.definition.get_closest_marker("sqlite"):
        metafunc.parametrize("backend", ["sqlite", "postgres"], indirect=True)


def pytest_sessionfinish(session, exitstatus):
    """CI sets JOBRUNNER_TEST_REQUIRE_POSTGRES: a run where no PostgreSQL test ran is a failed run."""
    if hasattr(session.config, "workerinput"):  # a pytest-xdist worker: the controller sums what every worker ran
        return
    if os.environ.get("JOBRUNNER_TEST_REQUIRE_POSTGRES") and not COUNTS["backend", "postgres"] and session.testscollected:
        sys.stderr.write("\nno PostgreSQL test ran, and JOBRUNNER_TEST_REQUIRE_POSTGRES is set\n")
        session.exitstatus = 1


@pytest.fixture
def backend(request):
    name = getattr(request, "param", "sqlite")
    if name == "postgres":
        if not POSTGRES:
            pytest.skip("PostgreSQL tests need JOBRUNNER_TEST_POSTGRES (a DSN; CI sets it)")
        try:
            import psycopg

            psycopg.connect(POSTGRES, connect_timeout=5).close()
        except Exception as exc:  # set but unusable: a failure, never a skip
            pytest.fail("JOBRUNNER_TEST_POSTGRES=%s is set but unusable: %s" % (POSTGRES, exc))
        count("backend", "postgres")
    return name


def postgres_dsn(schema):
    return "%s%sschema=%s" % (POSTGRES, "&" if "?" in POSTGRES else "?", schema)


def drop_schema(schema):
    import psycopg

    with psycopg.connect(POSTGRES, autocommit=True) as conn:
        # whatever a killed process still holds goes first
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                     "AND application_name = %s", (schema,))
        conn.execute("DROP SCHEMA IF EXISTS %s CASCADE" % schema)


class Project:
    """A user's project directory: the test app, a database, and the processes started on it."""

    def __init__(self, path, backend="sqlite"):
        self.path = path
        self.backend = backend
        self.out = path / "handled"
        if backend == "postgres":
            import uuid

            self.schema = "t_" + uuid.uuid4().hex[:16]
            self.db = None  # no file: tests about the file are SQLite's
            self.dsn = postgres_dsn(self.schema) + "&application_name=" + self.schema
        else:
            self.schema = None
            self.db = path / "var" / "jobs.db"
            self.dsn = str(self.db)
        self.env = dict(os.environ, JOBRUNNER_APP="jobapp", JOBRUNNER_DSN=self.dsn, JOBAPP_OUT=str(self.out),
                        PYTHONPATH=os.pathsep.join([str(APPS), str(REPO)]), PYTHONUNBUFFERED="1")
        self.processes = []

    @property
    def where(self):
        """The database as jobrunner names it in messages."""
        import jobrunner

        return jobrunner._open_transport(jobrunner.Settings.from_dsn(self.dsn)).where

    def query(self, sql, *params):
        """Rows of one SQL statement (``?`` placeholders) on this project's database, through a connection of
        the test's own."""
        if self.backend == "sqlite":
            return query(self.db, sql, *params)
        import psycopg

        try:
            with psycopg.connect(POSTGRES, autocommit=True) as conn:
                conn.execute("SET search_path TO %s" % self.schema)
                cursor = conn.execute(sql.replace("?", "%s"), params)
                return [tuple(row) for row in cursor.fetchall()] if cursor.description else cursor.rowcount
        except psycopg.errors.UndefinedTable:
            raise sqlite3.OperationalError("no such table")  # as SQLite says it, for tests that wait for a table

    def query_dicts(self, sql, *params):
        """Rows as dicts of column name to value."""
        if self.backend == "sqlite":
            conn = sqlite3.connect(str(self.db), timeout=10)
            conn.row_factory = sqlite3.Row
            conn.text_factory = lambda b: b.decode("utf-8", "replace")  # garbage rows must not break the test's reads
            try:
                return [dict(row) for row in conn.execute(sql, params).fetchall()]
            finally:
                conn.close()
        import psycopg
        from psycopg.rows import dict_row

        with psycopg.connect(POSTGRES, autocommit=True, row_factory=dict_row) as conn:
            conn.execute("SET search_path TO %s" % self.schema)
            return conn.execute(sql.replace("?", "%s"), params).fetchall()

    def dsn_with(self, **options):
        """This project's DSN with options added to its query string."""
        query_string = "&".join("%s=%s" % item for item in options.items())
        if self.backend == "sqlite":
            return "sqlite:///%s?%s" % (self.db, query_string)
        return "%s&%s" % (self.dsn, query_string)

    def has_table(self, name):
        if self.backend == "sqlite":
            return bool(query(self.db, "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", name))
        return bool(self.query("SELECT 1 FROM information_schema.tables WHERE table_schema = ? AND table_name = ?",
                               self.schema, name))

    def execute(self, sql, *params):
        """Run one writing statement; return the new row's id for an INSERT (``RETURNING id`` on PostgreSQL)."""
        if self.backend == "sqlite":
            conn = sqlite3.connect(str(self.db), timeout=10, isolation_level=None)
            try:
                return conn.execute(sql, params).lastrowid
            finally:
                conn.close()
        if sql.lstrip().upper().startswith("INSERT"):
            return self.query(sql + " RETURNING id", *params)[0][0]
        return self.query(sql, *params)

    def cli(self, *args, timeout=60, input=None, env=None):
        """Run ``python jobrunner.py ARGS`` to completion."""
        return subprocess.run([sys.executable, JOBRUNNER, *map(str, args)], cwd=self.path, env=dict(self.env, **(env or {})),
                              capture_output=True, text=True, timeout=timeout, input=input)

    def start(self, *args, env=None, **kwargs):
        """Start ``python jobrunner.py ARGS`` in the background; it is killed at teardown."""
        proc = subprocess.Popen([sys.executable, JOBRUNNER, *map(str, args)], cwd=self.path,
                                env=dict(self.env, **(env or {})), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, **kwargs)
        self.processes.append(proc)
        return proc

    def handled(self, kind="note"):
        """Every recorded call of ``kind`` as (value, pid), across processes."""
        lines = []
        if self.out.exists():
            for f in self.out.iterdir():
                if f.name.isdigit():
                    text = f.read_text()
                    # only whole lines: a write the reader meets halfway (across a page) shows its first part
                    for line in text[:text.rfind("\n") + 1].splitlines():
                        k, value = line.split(" ")[:2]
                        if k == kind:
                            lines.append((value, int(f.name)))
        return lines

    def values(self, kind="note"):
        return sorted(v for v, _ in self.handled(kind))

    def app(self):
        """A JobRunner on this project's database with the test app's handlers."""
        import jobapp

        jobapp.OUT = str(self.out)
        jobapp.jobs.use_dsn(self.dsn)
        return jobapp.jobs

    def close(self):
        for proc in self.processes:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.communicate(timeout=10)
        if self.schema:
            import jobapp

            jobapp.jobs.close()
            drop_schema(self.schema)


@pytest.fixture
def project(tmp_path, backend):
    p = Project(tmp_path, backend)
    yield p
    p.close()


@pytest.fixture
def app(project):
    return project.app()
