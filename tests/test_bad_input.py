"""Generated bad input: garbage rows, odd payloads, queue names and command lines.

Whatever comes in, a worker never crashes, a stored message is never lost or
altered, no code runs that the app did not register, and the user never sees
a traceback.
"""

import functools
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jobrunner
from conftest import APPS, JOBRUNNER, REPO, count

def counted(name):
    """Count each generated example of a test, and each one that failed (conftest sums and prints them)."""

    def decorate(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            count(name, "examples")
            try:
                return fn(*args, **kwargs)
            except BaseException:
                count(name, "failed")
                raise

        return run

    return decorate

pytestmark = pytest.mark.slow

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
handler_names = st.sampled_from(["note", "nope", "os.system", "__import__", "", "jobrunner.main", "note "])
header_values = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=40),
    st.integers(-2**63, 2**63 - 1),
    json_values.map(json.dumps),
    st.dictionaries(st.sampled_from(["handler", "free_retries", "attempts", "original_queue", "x"]),
                    json_values | handler_names, max_size=4).map(lambda d: json.dumps(d, allow_nan=True)),
    st.fixed_dictionaries({"handler": handler_names}).map(json.dumps),
)
body_values = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=40),
    st.integers(-2**63, 2**63 - 1),
    json_values.map(lambda v: json.dumps(v, allow_nan=True)),
    st.fixed_dictionaries({"n": json_values}).map(lambda v: json.dumps(v, allow_nan=True)),
)


SCRATCH_DIRS = []  # hypothesis runs many examples in one test call, so no fixture can give each its directory


@pytest.fixture(autouse=True, scope="module")
def remove_scratch_dirs():
    yield
    while SCRATCH_DIRS:
        shutil.rmtree(SCRATCH_DIRS.pop(), ignore_errors=True)


class Garbage:
    """A fresh database with a registered handler that records its calls, and nothing else callable."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="jobrunner-fuzz-")
        SCRATCH_DIRS.append(self.dir)
        self.jobs = jobrunner.JobRunner(os.path.join(self.dir, "jobs.db"))
        self.calls = []

        @self.jobs.handler("note")
        def note(n):
            self.calls.append(n)

    def insert(self, rows):
        conn = sqlite3.connect(self.jobs.settings.path, isolation_level=None)
        with conn:
            ids = [conn.execute("INSERT INTO messenger_messages (body, headers, queue_name, created_at, available_at) "
                                "VALUES (?, ?, 'async', 0, 0)", (body, headers)).lastrowid for body, headers in rows]
        conn.close()
        return ids

    def rows(self):
        conn = sqlite3.connect(self.jobs.settings.path)
        rows = conn.execute("SELECT id, body, queue_name, delivered_at FROM messenger_messages").fetchall()
        conn.close()
        return {r[0]: r[1:] for r in rows}


def names_an_unknown_handler(headers):
    try:
        decoded = json.loads(headers)
    except (TypeError, ValueError):
        return False
    return isinstance(decoded, dict) and isinstance(decoded.get("handler"), str) and decoded["handler"] != "note"


@SETTINGS
@given(st.lists(st.tuples(body_values, header_values), min_size=1, max_size=6))
@counted("garbage rows")
def test_garbage_rows_end_in_the_failure_queue_untouched(rows):
    g = Garbage()
    g.jobs.setup()
    good = g.jobs.dispatch("note", {"n": "good"})
    ids = g.insert(rows)
    stored = g.rows()  # as SQLite keeps them (TEXT affinity turns 0 into '0')
    g.jobs.consume("async", limit=len(rows) + 1, time_limit=10, install_signals=False)
    after = g.rows()
    assert good not in after and "good" in g.calls
    for row_id, (body, headers) in zip(ids, rows):
        if row_id not in after:
            # handled: only possible for a well-formed message for the registered handler
            assert json.loads(headers)["handler"] == "note" and isinstance(json.loads(body), dict)
            continue
        stored_body, queue, delivered = after[row_id]
        assert delivered is None
        assert stored_body == stored[row_id][0], "the body of a failed message was altered"
        count("rows", "checked")
        if queue != jobrunner.FAILED_QUEUE:
            # a handler only newer code may have (a rolling deploy): retried later, not failed at once
            assert queue == "async" and names_an_unknown_handler(headers), (body, headers)
    for envelope in g.jobs.failed():
        assert envelope.error  # every failed row says why


@SETTINGS
@given(st.text(max_size=30) | st.binary(max_size=10).map(repr))
@counted("queue names")
def test_odd_queue_names_are_refused_cleanly(queue):
    g = Garbage()
    try:
        g.jobs.dispatch("note", {"n": 1}, queue=queue)
    except jobrunner.InvalidMessage as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert queue == "async"


LIMIT = 1024 * 1024


@pytest.mark.parametrize("offset", [-1, 0, 1])
def test_bodies_are_refused_exactly_above_max_body_bytes(tmp_path, offset):
    jobs = jobrunner.JobRunner(str(tmp_path / "jobs.db"), max_body_bytes=LIMIT)
    jobs.handler("note")(lambda n: None)
    overhead = len(json.dumps({"n": ""}, separators=(",", ":")))
    payload = {"n": "x" * (LIMIT + offset - overhead)}  # a body of LIMIT + offset bytes
    if offset <= 0:
        msg_id = jobs.dispatch("note", payload)
        assert query_one(jobs, "SELECT length(body) FROM messenger_messages WHERE id = ?", msg_id) == LIMIT + offset
    else:
        with pytest.raises(jobrunner.InvalidMessage, match="is %d bytes, over the %d-byte limit" % (LIMIT + 1, LIMIT)):
            jobs.dispatch("note", payload)
        assert not os.path.exists(jobs.settings.path) or query_one(jobs, "SELECT COUNT(*) FROM messenger_messages") == 0
    multibyte = {"n": "é" * ((LIMIT + offset - overhead) // 2)}  # counted in UTF-8 bytes, not characters
    size = len(json.dumps(multibyte, separators=(",", ":"), ensure_ascii=False).encode())
    if size > LIMIT:
        with pytest.raises(jobrunner.InvalidMessage):
            jobs.dispatch("note", multibyte)
    else:
        jobs.dispatch("note", multibyte)
    jobs.transport.close()


def query_one(jobs, sql, *params):
    conn = sqlite3.connect(jobs.settings.path)
    try:
        return conn.execute(sql, params).fetchone()[0]
    finally:
        conn.close()


@SETTINGS
@given(st.integers(min_value=1, max_value=3 * LIMIT))
@counted("body sizes")
def test_huge_bodies_are_refused_at_dispatch(size):
    g = Garbage()
    g.jobs.use_dsn(max_body_bytes=LIMIT)
    payload = {"n": "x" * size}
    body = len(json.dumps(payload, separators=(",", ":")))
    try:
        g.jobs.dispatch("note", payload)
    except jobrunner.InvalidMessage as exc:
        assert body > LIMIT and "max_body_bytes" in str(exc)
        assert not os.path.exists(g.jobs.settings.path) or not g.rows()
    else:
        assert body <= LIMIT


WORDS = ["setup", "dispatch", "consume", "supervise", "stats", "handlers", "failed", "show", "retry", "remove",
         "status", "health", "stop-workers", "note", "nope", "async", "failed", "empty", "--json", "--all", "--force",
         "--queue", "--delay", "--max", "--stats", "-v", "-vvv", "--max-ready", "--max-age", "--limit",
         "--failure-limit", "--memory-limit", "--time-limit", "--sleep", "--numprocs", "--config", "--name",
         "--startsecs", "--log-dir", "--dsn", "--app", "-1", "0", "0.2", "1e309", "nan", "5", "64M", "{}",
         '{"n": 1}', '{"n": ', "[1]", "null", "", "💥", "--", "-", "--help", "1", "99999999999999999999"]


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    """A working directory for the fuzzed commands: whatever they create stays out of the repository."""
    return tmp_path_factory.mktemp("fuzz")


@SETTINGS
@given(argv=st.lists(st.sampled_from(WORDS) | st.text(st.characters(blacklist_characters="\x00",
                                                                    blacklist_categories=("Cs",)), max_size=12),
                     max_size=7))  # a NUL or a lone surrogate cannot be in a command line at all
@counted("command lines")
def test_odd_command_lines_never_show_a_traceback(fuzz_dir, argv):
    g = Garbage()
    g.jobs.setup()
    kept = g.jobs.dispatch("note", {"n": "kept"})
    before = g.rows()[kept]
    env = dict(os.environ, JOBRUNNER_DSN=g.jobs.settings.path, JOBRUNNER_APP="fuzzapp",
               PYTHONPATH=os.pathsep.join([str(APPS), str(REPO)]))
    # every command runs in a process of its own; one that runs (consume, supervise) is stopped by SIGTERM
    proc = subprocess.Popen([sys.executable, JOBRUNNER, *argv], cwd=str(fuzz_dir), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, stdin=subprocess.DEVNULL)
    try:
        out, err = proc.communicate(timeout=4)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise AssertionError("%r did not stop on SIGTERM" % (argv,))
    code = proc.returncode
    assert code in (0, 1, 2), (argv, code, err)
    assert "Traceback" not in err + out, (argv, err)
    if code == 2 and not out.startswith("Usage:"):  # the help itself, for `jobrunner` alone
        assert err.count("\n") == 1, (argv, err)
    assert g.rows().get(kept) == before or argv_consumes(argv), "a stored message changed"


def argv_consumes(argv):
    """A command line that may really have handled (or replayed) the kept message."""
    return any(word in ("consume", "supervise") for word in argv)
