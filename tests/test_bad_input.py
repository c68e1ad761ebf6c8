"""Generated bad input: garbage rows, odd payloads, queue names and command lines.

Whatever comes in, a worker never crashes, a stored message is never lost or
altered, no code runs that the app did not register, and the user never sees
a traceback.
"""

import contextlib
import io
import json
import os
import sqlite3
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jobrunner
from conftest import report

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


class Garbage:
    """A fresh database with a registered handler that records its calls, and nothing else callable."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="jobrunner-fuzz-")
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
        if queue != jobrunner.FAILED_QUEUE:
            # a handler only newer code may have (a rolling deploy): retried later, not failed at once
            assert queue == "async" and names_an_unknown_handler(headers), (body, headers)
    for envelope in g.jobs.failed():
        assert envelope.error  # every failed row says why


@SETTINGS
@given(st.text(max_size=30) | st.binary(max_size=10).map(repr))
def test_odd_queue_names_are_refused_cleanly(queue):
    g = Garbage()
    try:
        g.jobs.dispatch("note", {"n": 1}, queue=queue)
    except jobrunner.InvalidMessage as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert queue == "async"


@SETTINGS
@given(st.integers(min_value=1, max_value=3 * 1024 * 1024))
def test_huge_bodies_are_refused_at_dispatch(size):
    g = Garbage()
    g.jobs.settings = jobrunner.Settings(g.jobs.settings.path, max_body_bytes=1024 * 1024)
    payload = {"n": "x" * size}
    try:
        g.jobs.dispatch("note", payload)
    except jobrunner.InvalidMessage as exc:
        assert size > 1024 * 1024 - 10 and "max_body_bytes" in str(exc)
        assert not os.path.exists(g.jobs.settings.path) or not g.rows()
    else:
        assert size <= 1024 * 1024


WORDS = ["setup", "dispatch", "stats", "handlers", "failed", "show", "retry", "remove", "status", "health",
         "stop-workers", "note", "nope", "--json", "--all", "--force", "--queue", "--delay", "--max", "--stats", "-v",
         "--max-ready", "--max-age", "--limit", "--dsn", "--app", "async", "failed", "-1", "0", "1e309", "nan", "{}",
         '{"n": 1}', '{"n": ', "[1]", "null", "", "💥", "--", "-", "--help", "1", "99999999999999999999"]


@SETTINGS
@given(st.lists(st.sampled_from(WORDS) | st.text(max_size=12), max_size=7))
def test_odd_command_lines_never_show_a_traceback(argv):
    g = Garbage()
    g.jobs.setup()
    kept = g.jobs.dispatch("note", {"n": "kept"})
    before = g.rows()[kept]
    os.environ["JOBRUNNER_DSN"] = g.jobs.settings.path
    os.environ["JOBRUNNER_APP"] = "fuzzapp"
    import fuzzapp

    fuzzapp.jobs.use_dsn(g.jobs.settings.path)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = jobrunner.main(list(argv))
    finally:
        del os.environ["JOBRUNNER_DSN"], os.environ["JOBRUNNER_APP"]
    assert code in (0, 1, 2), (argv, code, err.getvalue())
    assert "Traceback" not in err.getvalue() + out.getvalue()
    if code == 2 and not out.getvalue().startswith("Usage:"):  # the help itself, for `jobrunner` alone
        assert err.getvalue().count("\n") == 1, err.getvalue()
    assert g.rows().get(kept) == before, "a stored message changed"


def test_bad_input_figures():
    report("generated bad input: %d examples each of garbage rows, queue names, body sizes and command lines; "
           "0 worker crashes, 0 tracebacks, 0 stored messages altered" % SETTINGS.max_examples)
