"""Shared fixtures: every test gets its own project directory with a fresh SQLite
file, runs the real command line in real processes, and leaves none behind."""

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


FIGURES = []


def report(line):
    """A figure for the end-of-run summary (the README's Reliability section quotes them); a callable is asked
    at the end of the run, and reports nothing when it returns None."""
    FIGURES.append(line)


def pytest_terminal_summary(terminalreporter):
    """Figures as the tests that produced them counted them; a callable reports only if its tests ran."""
    lines = [line() if callable(line) else line for line in FIGURES]
    lines = [line for line in lines if line]
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


class Project:
    """A user's project directory: the test app, a database, and the processes started on it."""

    def __init__(self, path):
        self.path = path
        self.db = path / "var" / "jobs.db"
        self.out = path / "handled"
        self.env = dict(os.environ, JOBRUNNER_APP="jobapp", JOBRUNNER_DSN=str(self.db), JOBAPP_OUT=str(self.out),
                        PYTHONPATH=os.pathsep.join([str(APPS), str(REPO)]), PYTHONUNBUFFERED="1")
        self.processes = []

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
                    for line in f.read_text().splitlines():
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
        jobapp.jobs.use_dsn(str(self.db))
        return jobapp.jobs

    def close(self):
        for proc in self.processes:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.communicate(timeout=10)


@pytest.fixture
def project(tmp_path):
    p = Project(tmp_path)
    yield p
    p.close()


@pytest.fixture
def app(project):
    return project.app()
