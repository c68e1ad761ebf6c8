"""The command line: setup, dispatch, handlers, stats, app and DSN discovery, and bad input."""

import json
import os
import stat
import time

import pytest

from conftest import query, wait_until

NO_APP = {"JOBRUNNER_APP": ""}
NO_DSN = {"JOBRUNNER_DSN": ""}


def snapshot(db):
    """Every stored message, every column: what bad input must leave alone."""
    return query(db, "SELECT * FROM messenger_messages ORDER BY id")


def assert_one_line_error(result, *words):
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jobrunner: error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def write_module(project, name, text):
    (project.path / (name + ".py")).write_text(text)


HELLO_APP = """
from jobrunner import JobRunner
jobs = JobRunner("sqlite:///app.db")

@jobs.handler(queue="greetings")
def hello(who):
    pass
"""

TWO_APPS = """
from jobrunner import JobRunner
a = JobRunner("sqlite:///a.db")
b = JobRunner("sqlite:///b.db")

@a.handler
def from_a(x):
    pass

@b.handler
def from_b(y):
    pass
"""


def handler_names(result):
    assert result.returncode == 0, result.stderr
    return sorted(h["name"] for h in json.loads(result.stdout)["handlers"])


# --- setup and dispatch ---------------------------------------------------------------


def test_setup_creates_the_database_and_is_idempotent(project):
    result = project.cli("setup")
    assert result.returncode == 0, result.stderr
    assert str(project.db) in result.stdout
    tables = {name for (name,) in query(project.db, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "messenger_messages" in tables
    assert query(project.db, "PRAGMA journal_mode") == [("wal",)]
    assert stat.S_IMODE(os.stat(project.db).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(project.db.parent).st_mode) == 0o700
    project.cli("dispatch", "note", '{"n": 1}')
    before = snapshot(project.db)
    assert project.cli("setup").returncode == 0
    assert snapshot(project.db) == before and len(before) == 1


def test_setup_works_from_a_dsn_alone(project):
    other = project.path / "data" / "other.db"
    result = project.cli("setup", "--dsn", other, env=NO_APP)
    assert result.returncode == 0, result.stderr
    assert query(other, "SELECT COUNT(*) FROM messenger_messages") == [(0,)]


def test_dispatch_prints_the_id_of_the_stored_message(project):
    first = project.cli("dispatch", "note", '{"n": 1}')
    second = project.cli("dispatch", "note", '{"n": 2}')
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    ids = [int(first.stdout.strip()), int(second.stdout.strip())]
    stored = query(project.db, "SELECT id, body, headers, queue_name, delivered_at FROM messenger_messages ORDER BY id")
    assert [(i, json.loads(b), json.loads(h)["handler"], q, d) for i, b, h, q, d in stored] == [
        (ids[0], {"n": 1}, "note", "async", None), (ids[1], {"n": 2}, "note", "async", None)]


def test_dispatch_queue_and_delay_options(project):
    result = project.cli("dispatch", "note", '{"n": 1}', "--queue", "high", "--delay", "30")
    assert result.returncode == 0, result.stderr
    ((queue, created, available),) = query(project.db, "SELECT queue_name, created_at, available_at FROM messenger_messages "
                                                       "WHERE id = ?", int(result.stdout))
    assert queue == "high"
    assert 29.9 < available - created < 30.1


def test_consume_creates_the_database_on_first_use(project):
    assert not project.db.exists()
    result = project.cli("consume", "async", "--time-limit", "0.2")
    assert result.returncode == 0, result.stderr
    assert query(project.db, "SELECT COUNT(*) FROM messenger_messages") == [(0,)]


# --- handlers and stats -----------------------------------------------------------------


def test_handlers_lists_every_registered_handler(project, app):
    import jobapp

    # jobapp's own handlers (another test may have imported hardapp, which adds to the same JobRunner)
    ours = {name: h for name, h in app.handlers.items() if h.fn.__module__ == jobapp.__name__}
    result = project.cli("handlers", "--json")
    described = {h["name"]: h for h in json.loads(result.stdout)["handlers"]}
    assert sorted(described) == sorted(ours)
    for name, handler in ours.items():
        assert described[name]["queue"] == handler.queue
        assert described[name]["max_retries"] == handler.retry.max_retries
    text = project.cli("handlers")
    assert text.returncode == 0, text.stderr
    first_words = [line.split()[0] for line in text.stdout.splitlines()[1:] if line.strip()]
    assert sorted(first_words) == sorted(ours)


def test_stats_counts_ready_delayed_in_flight_and_failed_messages(project, app):
    app.dispatch("unrecoverable", {"n": 0})
    assert project.cli("consume", "async", "--limit", "1", "--time-limit", "20").returncode == 0
    sent_before = time.time()
    app.dispatch_many("note", [{"n": i} for i in range(3)])
    sent_after = time.time()
    app.dispatch_many("note", [{"n": i} for i in range(3, 5)], delay=60)
    app.dispatch("note_high", {"n": 0})
    app.dispatch("slow", {"n": 1, "seconds": 10})
    project.start("consume", "slow")  # holds the slow message; killed at teardown
    wait_until(lambda: project.values("start") == ["1"], message="the slow message to be claimed")

    asked_before = time.time()
    result = project.cli("stats", "--json")
    asked_after = time.time()
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    ages = {q["queue"]: q.pop("oldest_ready_age_s") for q in data["queues"]}
    assert data == {
        "queues": [
            {"queue": "async", "ready": 3, "delayed": 2, "in_flight": 0, "paused": False},
            {"queue": "high", "ready": 1, "delayed": 0, "in_flight": 0, "paused": False},
            {"queue": "slow", "ready": 0, "delayed": 0, "in_flight": 1, "paused": False},
        ],
        "failed": 1,
    }
    assert asked_before - sent_after - 0.001 <= ages["async"] <= asked_after - sent_before + 0.001
    assert 0 <= ages["high"] <= ages["async"]
    assert ages["slow"] is None

    text = project.cli("stats")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[-1] == "failed: 1"
    assert [line.split()[:4] for line in lines if line.startswith("async")] == [["async", "3", "2", "0"]]
    assert [line.split()[:4] for line in lines if line.startswith("slow")] == [["slow", "0", "0", "1"]]

    # with a DSN and no app: the queues that hold messages
    bare = project.cli("stats", "--json", "--dsn", project.db, env=NO_APP)
    assert bare.returncode == 0, bare.stderr
    data = json.loads(bare.stdout)
    assert [(q["queue"], q["ready"], q["delayed"], q["in_flight"]) for q in data["queues"]] == [
        ("async", 3, 2, 0), ("high", 1, 0, 0), ("slow", 0, 0, 1)]
    assert data["failed"] == 1


def test_stats_of_an_empty_database_lists_the_queues_running_workers_consume(project):
    project.cli("setup")
    result = project.cli("stats", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"queues": [], "failed": 0}
    project.start("consume", "low", "high")
    wait_until(lambda: query(project.db, "SELECT COUNT(*) FROM jobrunner_workers") == [(1,)], message="a worker")
    data = json.loads(project.cli("stats", "--json").stdout)
    assert data == {"queues": [{"queue": q, "ready": 0, "delayed": 0, "in_flight": 0, "oldest_ready_age_s": None,
                                "paused": False} for q in ("high", "low")], "failed": 0}


# --- finding the app and the database ---------------------------------------------------------


def test_app_option_wins_over_the_environment(project):
    write_module(project, "core_helloapp", HELLO_APP)
    assert handler_names(project.cli("handlers", "--json", "--app", "core_helloapp")) == ["hello"]
    assert "note" in handler_names(project.cli("handlers", "--json"))  # JOBRUNNER_APP=jobapp


def test_app_attribute_picks_one_of_several_runners(project):
    write_module(project, "core_twoapps", TWO_APPS)
    assert handler_names(project.cli("handlers", "--json", "--app", "core_twoapps:b")) == ["from_b"]
    assert handler_names(project.cli("handlers", "--json", "--app", "core_twoapps:a")) == ["from_a"]
    assert_one_line_error(project.cli("handlers", "--app", "core_twoapps"), "core_twoapps:")
    assert_one_line_error(project.cli("handlers", "--app", "core_twoapps:c"))
    assert_one_line_error(project.cli("handlers", "--app", "no_such_module_here"), "no_such_module_here")


def test_pyproject_names_the_app_when_nothing_else_does(project):
    write_module(project, "core_helloapp", HELLO_APP)
    (project.path / "pyproject.toml").write_text('[tool.jobrunner]\napp = "core_helloapp:jobs"\n')
    assert handler_names(project.cli("handlers", "--json", env=NO_APP)) == ["hello"]
    assert "note" in handler_names(project.cli("handlers", "--json"))  # the environment wins over the file
    (project.path / "pyproject.toml").write_text('[tool.jobrunner]\napp = "missing_app_module"\n')
    assert_one_line_error(project.cli("handlers", env=NO_APP), "missing_app_module")
    (project.path / "pyproject.toml").write_text('[tool.jobrunner\napp = \n')
    assert_one_line_error(project.cli("handlers", env=NO_APP), "pyproject.toml")


def test_dsn_comes_from_the_option_then_the_environment_then_the_app(project):
    write_module(project, "core_helloapp", HELLO_APP)
    env = dict(NO_DSN, JOBRUNNER_APP="core_helloapp")
    assert project.cli("dispatch", "hello", '{"who": "app"}', env=env).returncode == 0
    env_db, option_db = project.path / "env.db", project.path / "option.db"
    assert project.cli("dispatch", "hello", '{"who": "env"}', env=dict(env, JOBRUNNER_DSN=str(env_db))).returncode == 0
    result = project.cli("dispatch", "hello", '{"who": "option"}', "--dsn", "sqlite:///option.db",
                         env=dict(env, JOBRUNNER_DSN=str(env_db)))
    assert result.returncode == 0, result.stderr
    for db, who in ((project.path / "app.db", "app"), (env_db, "env"), (option_db, "option")):
        assert query(db, "SELECT body, queue_name FROM messenger_messages") == [('{"who":"%s"}' % who, "greetings")]


@pytest.mark.parametrize("args", [("dispatch", "note", '{"n": 1}'), ("consume", "async", "--limit", "1"), ("handlers",)])
def test_a_command_that_needs_an_app_says_how_to_give_one(project, args):
    project.cli("setup")
    before = snapshot(project.db)
    assert_one_line_error(project.cli(*args, env=NO_APP), "--app", "JOBRUNNER_APP", "pyproject.toml")
    assert snapshot(project.db) == before


@pytest.mark.parametrize("args", [("stats",), ("setup",), ("stop-workers",)])
def test_a_command_with_neither_app_nor_dsn_says_how_to_give_one(project, args):
    assert_one_line_error(project.cli(*args, env=dict(NO_APP, **NO_DSN)), "--dsn", "--app")
    assert not project.db.exists()


# --- bad input: one line, exit 2, nothing stored changed -----------------------------------------


@pytest.fixture
def stocked(project, app):
    """A database holding ready, delayed, claimed and failed messages."""
    app.dispatch("unrecoverable", {"n": 0})
    app.worker(["async"], limit=1, install_signals=False).run()  # in this process: quicker than the command
    app.dispatch_many("note", [{"n": i} for i in range(3)])
    app.dispatch("note", {"n": 9}, delay=60)
    app.dispatch("note_high", {"n": 1})
    delivery, _, _, _ = app.transport.claim(["high"], 4242)
    assert delivery is not None
    app.transport.close()
    before = snapshot(project.db)
    assert [row[3] for row in before] == ["failed", "async", "async", "async", "async", "high"]
    return before


BAD_COMMANDS = [
    pytest.param(("dispatch", "note", '{"n": 1'), id="malformed-json"),
    pytest.param(("dispatch", "note", "n=1"), id="not-json"),
    pytest.param(("dispatch", "note", "[1, 2]"), id="json-list"),
    pytest.param(("dispatch", "note", '"text"'), id="json-string"),
    pytest.param(("dispatch", "note", "3"), id="json-number"),
    pytest.param(("dispatch", "note", "null"), id="json-null"),
    pytest.param(("dispatch", "nope", '{"n": 1}'), id="unknown-handler"),
    pytest.param(("dispatch", "note", "{}"), id="missing-argument"),
    pytest.param(("dispatch", "note", '{"n": 1, "extra": 2}'), id="unexpected-argument"),
    pytest.param(("dispatch", "note", '{"n": NaN}'), id="nan-not-serializable"),
    pytest.param(("dispatch", "note", '{"n": -Infinity}'), id="infinity-not-serializable"),
    pytest.param(("dispatch", "note", '{"n": "\\ud800"}'), id="lone-surrogate"),
    pytest.param(("dispatch", "note", '{"n": %s}' % ("[" * 5000 + "]" * 5000)), id="nested-too-deep"),
    pytest.param(("dispatch", "note", '{"n": 1}', "--delay", "-1"), id="negative-delay"),
    pytest.param(("dispatch", "note", '{"n": 1}', "--delay", "soon"), id="non-numeric-delay"),
    pytest.param(("dispatch", "note", '{"n": 1}', "--queue", "nope"), id="unknown-dispatch-queue"),
    pytest.param(("dispatch", "note", '{"n": 1}', "--queue", "failed"), id="dispatch-to-failed"),
    pytest.param(("dispatch", "note", '{"n": 1}', "--queue", "a queue"), id="invalid-queue-name"),
    pytest.param(("dispatch", "note", '{"n": 1}', "--unique-key", "a\udcffb"), id="lone-surrogate-unique-key"),
    pytest.param(("web", "--port", "99999"), id="port-out-of-range"),
    pytest.param(("health", "--ping-file", "x.ping", "--max-failed", "0"), id="ping-file-with-a-database-check"),
    pytest.param(("failed", "show", "1", "--handler", "note"), id="failed-show-id-with-a-filter"),
    pytest.param(("failed", "show", "1", "--stats"), id="failed-show-id-with-stats"),
    pytest.param(("consume", "async", "--ping-file", "/nonexistent/w.ping"), id="ping-file-in-no-directory"),
    pytest.param(("pause", "nope"), id="pause-unknown-queue"),
    pytest.param(("consume", "async", "--limit", "-1"), id="negative-limit"),
    pytest.param(("consume", "async", "--limit", "ten"), id="non-numeric-limit"),
    pytest.param(("consume", "async", "--limit", "1.5"), id="fractional-limit"),
    pytest.param(("consume", "async", "--failure-limit", "-1"), id="negative-failure-limit"),
    pytest.param(("consume", "async", "--failure-limit", "x"), id="non-numeric-failure-limit"),
    pytest.param(("consume", "async", "--time-limit", "-1"), id="negative-time-limit"),
    pytest.param(("consume", "async", "--time-limit", "soon"), id="non-numeric-time-limit"),
    pytest.param(("consume", "async", "--time-limit", "nan"), id="nan-time-limit"),
    pytest.param(("consume", "async", "--memory-limit", "-1"), id="negative-memory-limit"),
    pytest.param(("consume", "async", "--memory-limit", "-128M"), id="negative-memory-limit-unit"),
    pytest.param(("consume", "async", "--memory-limit", "lots"), id="non-numeric-memory-limit"),
    pytest.param(("consume", "async", "--memory-limit", "12Q"), id="unknown-memory-unit"),
    pytest.param(("consume", "async", "--sleep", "-1"), id="negative-sleep"),
    pytest.param(("consume", "nope"), id="unknown-queue"),
    pytest.param(("consume", "high", "nope"), id="one-unknown-queue"),
]


@pytest.mark.parametrize("args", BAD_COMMANDS)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(project, stocked, args):
    if args[0] == "consume" and "--time-limit" not in args:
        args += ("--time-limit", "3")  # were the bad input accepted, the worker still ends
    assert_one_line_error(project.cli(*args, timeout=20))
    assert snapshot(project.db) == stocked
    assert query(project.db, "SELECT COUNT(*) FROM jobrunner_workers") == [(0,)]


BAD_DB_COMMANDS = [
    pytest.param(("setup",), id="setup"),
    pytest.param(("dispatch", "note", '{"n": 1}'), id="dispatch"),
    pytest.param(("consume", "async", "--limit", "1", "--time-limit", "3"), id="consume"),
    pytest.param(("stats",), id="stats"),
    pytest.param(("stop-workers",), id="stop-workers"),
]


@pytest.mark.parametrize("where", ["under-a-file", "in-a-file-as-dir", "in-proc", "unwritable-dir"])
@pytest.mark.parametrize("args", BAD_DB_COMMANDS)
def test_a_database_path_that_cannot_be_created_is_one_line_exit_2(project, stocked, args, where):
    afile = project.path / "afile"
    afile.write_text("a regular file\n")
    db = {"under-a-file": afile / "sub" / "jobs.db", "in-a-file-as-dir": afile / "jobs.db",
          "in-proc": "/proc/jobrunner-test/jobs.db", "unwritable-dir": "/sys/jobrunner-test.db"}[where]
    if where == "unwritable-dir" and not os.path.isdir("/sys"):
        pytest.skip("no /sys here")
    line = assert_one_line_error(project.cli(*args, "--dsn", db, timeout=20))
    assert str(db) in line
    assert afile.read_text() == "a regular file\n"
    assert not os.path.exists("/proc/jobrunner-test") and not os.path.exists("/sys/jobrunner-test.db")
    assert snapshot(project.db) == stocked


@pytest.mark.parametrize("content", [pytest.param(os.urandom(8192), id="random-bytes"),
                                     pytest.param(b"name,email\nann,a@b.c\n" * 100, id="text")])
@pytest.mark.parametrize("args", BAD_DB_COMMANDS)
def test_a_file_that_is_not_sqlite_is_one_line_exit_2_and_left_alone(project, stocked, args, content):
    bad = project.path / "notadb.db"
    bad.write_bytes(content)
    line = assert_one_line_error(project.cli(*args, "--dsn", bad, timeout=20))
    assert str(bad) in line
    assert bad.read_bytes() == content
    assert sorted(os.listdir(project.path)) == sorted(["var", "handled", "notadb.db"])
    assert snapshot(project.db) == stocked


@pytest.mark.parametrize("dsn", ["sqlite://two-slashes.db", "postgres://host/db", ":memory:", "sqlite:///x.db?nope=1",
                                 "sqlite:///x.db?busy_timeout=soon", "sqlite:///x.db?busy_timeout=-1",
                                 "sqlite:///x.db?synchronous=SOMETIMES"])
def test_a_bad_dsn_is_one_line_exit_2(project, stocked, dsn):
    assert_one_line_error(project.cli("dispatch", "note", '{"n": 1}', "--dsn", dsn))
    assert sorted(os.listdir(project.path)) == sorted(["var", "handled"])
    assert snapshot(project.db) == stocked


# --- regressions: inputs that once printed a traceback ----------------------------------------


def test_odd_inputs_give_one_line_and_exit_2(project, tmp_path):
    project.cli("setup")
    cases = [("failed", "show", "--max", "99999999999999999999")]
    bad_quote = tmp_path / "quote.ini"
    bad_quote.write_text('[program:w]\ncommand = consume "async\n')
    not_utf8 = tmp_path / "latin.ini"
    not_utf8.write_bytes(b"[program:w]\ncommand = consume async \xe9\xff\n")
    cases += [("supervise", "--config", str(bad_quote)), ("supervise", "--config", str(not_utf8))]
    for args in cases:
        result = project.cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, (args, result.stderr)


def test_a_pyproject_with_an_odd_tool_table_is_not_a_crash(project):
    (project.path / "pyproject.toml").write_text('[tool]\njobrunner = "x"\n')
    env = dict(project.env)
    del env["JOBRUNNER_APP"]
    import subprocess
    import sys

    from conftest import JOBRUNNER

    result = subprocess.run([sys.executable, JOBRUNNER, "handlers"], cwd=project.path, env=env, capture_output=True,
                            text=True)
    assert result.returncode == 2 and "no app" in result.stderr and "Traceback" not in result.stderr


def test_every_command_that_prints_data_can_print_json(project):
    def as_json(*args, code=0):
        result = project.cli(*args, "--json")
        assert result.returncode == code, (args, result.stderr)
        return json.loads(result.stdout)

    assert as_json("setup") == {"database": str(project.db)}
    first = as_json("dispatch", "always_fails", '{"n": 1}')["id"]  # max_retries=2: fails for good on the 3rd attempt
    second = as_json("dispatch", "always_fails", '{"n": 2}')["id"]
    assert as_json("stop-workers") == {"asked": 0}
    assert project.cli("consume", "async", "--limit", "6", "--time-limit", "20").returncode == 0
    assert sorted(m["id"] for m in as_json("failed", "show")["failed"]) == [first, second]
    assert as_json("failed", "show", first)["error_class"] == "ValueError"
    assert as_json("failed", "show", "--stats")["failed"] == 2
    assert as_json("failed", "retry", first) == {"requeued": 1}
    assert as_json("failed", "remove", "--all", "--force") == {"removed": 1}  # the second one
    assert query(project.db, "SELECT id, queue_name FROM messenger_messages") == [(first, "async")]
    assert [q["queue"] for q in as_json("stats")["queues"]] == ["async"]
    assert as_json("status") == {"processes": []}
    health = as_json("health", code=1)
    assert health["healthy"] is False and health["reasons"][0].startswith("no worker is running")
    assert [h["name"] for h in as_json("handlers")["handlers"]][:2] == ["note", "note_high"]


# --- hardening -----------------------------------------------------------------------------------

BROKEN_APP = """
import os
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "imported"), "a") as f:
    f.write("imported\\n")
raise RuntimeError("the mail server is down")
"""


@pytest.mark.parametrize("args,code", [(("stats",), 0), (("failed", "show"), 0), (("status",), 0),
                                       (("health", "--allow-no-workers"), 0), (("setup",), 0),
                                       (("stop-workers",), 0), (("failed", "retry", "--all", "--force"), 0)])
def test_commands_that_need_only_the_database_never_import_the_app_when_given_a_dsn(project, args, code):
    project.cli("setup")
    write_module(project, "brokenapp", BROKEN_APP)
    result = project.cli(*args, env={"JOBRUNNER_APP": "brokenapp"})  # JOBRUNNER_DSN is set
    assert result.returncode == code, result.stderr
    assert not (project.path / "imported").exists()


def test_an_app_that_fails_to_import_is_one_line_and_v_shows_its_traceback(project):
    write_module(project, "brokenapp", BROKEN_APP)
    line = assert_one_line_error(project.cli("handlers", "--app", "brokenapp"))
    assert line == ("jobrunner: error: app module 'brokenapp' failed to import: RuntimeError: the mail server is down "
                    "(-v shows the traceback)")
    result = project.cli("consume", "async", "--app", "brokenapp", "-v")
    assert result.returncode == 2
    assert "Traceback (most recent call last)" in result.stderr and 'brokenapp.py", line 5' in result.stderr
    assert result.stderr.splitlines()[-1].startswith("jobrunner: error: app module 'brokenapp' failed to import")


def test_jobrunner_alone_and_a_group_alone_show_their_help(project):
    for args, words in (((), ["Commands:", "consume", "supervise", "failed"]), (("failed",), ["retry", "remove", "show"])):
        result = project.cli(*args)
        assert result.stdout.startswith("Usage: jobrunner"), result
        assert all(word in result.stdout for word in words)
        assert result.returncode in (0, 2) and "error" not in result.stderr


def insert_failed(project, headers, body='{"n": 1}', db=None):
    import sqlite3

    conn = sqlite3.connect(str(db or project.db))
    with conn:
        message_id = conn.execute("INSERT INTO messenger_messages (body, headers, queue_name, created_at, available_at) "
                                  "VALUES (?, ?, 'failed', 1, 1)", (body, json.dumps(headers))).lastrowid
    conn.close()
    return message_id


def test_stats_and_status_escape_control_characters_in_stored_names(project):
    import sqlite3

    project.cli("setup")
    conn = sqlite3.connect(str(project.db))
    with conn:
        conn.execute("INSERT INTO messenger_messages (body, headers, queue_name, created_at, available_at) "
                     "VALUES ('{}', '{\"handler\": \"note\"}', ?, 1, 1)", ("q\x1b]0;pwned\x07",))
        conn.execute("INSERT INTO jobrunner_workers (name, host, pid, ppid, queues, started_at, beat_at) "
                     "VALUES (?, 'h', 1, 0, 'async', ?, ?)", ("w\x1b]0;pwned\x07", time.time(), time.time()))
    conn.close()
    for args in (("stats",), ("status",)):
        shown = project.cli(*args)
        assert shown.returncode == 0 and "\x1b" not in shown.stdout and "\\x1b]0;pwned\\x07" in shown.stdout


def test_status_metrics_and_health_read_text_where_a_process_row_holds_numbers(project):
    import sqlite3

    project.cli("setup")
    conn = sqlite3.connect(str(project.db))
    with conn:  # rows as another tool could leave them
        conn.execute("INSERT INTO jobrunner_workers (name, host, pid, ppid, queues, started_at, beat_at, handled, "
                     "rss_bytes) VALUES ('w', 'h', 'x', 0, 'async', 'then', 'now', 'many', '12MB')")
        conn.execute("INSERT INTO jobrunner_processes (name, program, host, supervisor_pid, state, pid, state_since, "
                     "started_at, updated_at) VALUES ('p', 'p', 'h', 'one', 'RUNNING', 'two', 'x', 'y', 'z')")
    conn.close()
    for args in (("status",), ("status", "--json"), ("metrics",), ("health",)):
        result = project.cli(*args)
        assert result.returncode in (0, 1) and "Traceback" not in result.stderr, (args, result.stderr)
    assert project.cli("health").returncode == 1  # nothing it can trust is running


def test_json_output_stays_strict_json_when_a_stored_row_holds_infinity(project):
    project.cli("setup")
    stored = insert_failed(project, {"handler": "note", "attempts": 1e400, "error_class": "X"}, body='{"n": NaN}')

    def strict(text):
        return json.loads(text, parse_constant=lambda name: pytest.fail("not JSON: %s" % name))

    listed = strict(project.cli("failed", "show", "--json").stdout)
    assert [m["id"] for m in listed["failed"]] == [stored]
    detail = strict(project.cli("failed", "show", stored, "--json").stdout)
    assert detail["payload"] == {"n": "nan"}


def test_failed_show_escapes_terminal_control_characters_in_stored_text(project):
    project.cli("setup")
    evil = "\x1b[2J\x1b]0;owned\x07\u202eclear\x9b31m"
    msg_id = insert_failed(project, {"handler": "note" + evil, "error_class": "Boom" + evil, "error_message": evil,
                                     "traceback": "Traceback\n  " + evil + "\nBoom", "original_queue": "async"},
                           body=json.dumps({"n": evil}))
    for args in (("failed", "show"), ("failed", "show", msg_id, "-v"), ("failed", "show", "--stats")):
        result = project.cli(*args)
        assert result.returncode == 0, result.stderr
        assert not any(ch in result.stdout for ch in "\x1b\x07\x9b\u202e"), repr(result.stdout)
        assert "\\x1b" in result.stdout
    assert json.loads(project.cli("failed", "show", msg_id, "--json").stdout)["error_message"] == evil  # JSON: as stored


def test_a_database_error_in_a_failed_command_is_one_line(project, tmp_path):
    import sqlite3

    odd = tmp_path / "odd.db"
    conn = sqlite3.connect(str(odd))
    conn.executescript("CREATE TABLE messenger_messages (id INTEGER PRIMARY KEY, body TEXT);"
                       "CREATE TABLE jobrunner_workers (id INTEGER); CREATE TABLE jobrunner_processes (name TEXT);"
                       "CREATE TABLE jobrunner_control (key TEXT); CREATE TABLE jobrunner_schedules (name TEXT);"
                       "CREATE TABLE jobrunner_minutes (minute REAL);"
                       "PRAGMA user_version = 1;")
    conn.close()
    for args in (("failed", "show"), ("failed", "show", "3"), ("failed", "retry", "3"), ("failed", "retry", "--all"),
                 ("failed", "remove", "--all", "--force"), ("stats",), ("status",)):
        line = assert_one_line_error(project.cli(*args, "--dsn", odd))
        assert str(odd) in line and ("no such column" in line or "set up by another jobrunner version" in line)


def test_failed_retry_routes_a_message_with_no_original_queue_to_its_handler_or_says_why_it_stays(project):
    project.cli("setup")
    moved = insert_failed(project, {"handler": "note_high", "error_class": "X"})
    result = project.cli("failed", "retry", moved)  # a DSN alone: no app to ask which queue note_high uses
    assert result.returncode == 1
    assert result.stdout == "requeued 0 message(s)\n"
    assert result.stderr == ("message %d stays in the failure queue: its original queue is unknown and no registered "
                             "handler 'note_high' routes it\n" % moved)
    assert query(project.db, "SELECT queue_name FROM messenger_messages WHERE id = ?", moved) == [("failed",)]
    # with the app and no DSN, the app names the database (jobapp: ./jobrunner.db) and knows the handler's queue
    default_db = project.path / "jobrunner.db"
    assert project.cli("setup", "--dsn", default_db).returncode == 0
    moved = insert_failed(project, {"handler": "note_high", "error_class": "X"}, db=default_db)
    result = project.cli("failed", "retry", moved, env=NO_DSN)
    assert (result.returncode, result.stdout, result.stderr) == (0, "requeued 1 message(s)\n", "")
    assert query(default_db, "SELECT queue_name FROM messenger_messages WHERE id = ?", moved) == [("high",)]
    # an original queue that is one of jobrunner's own is no queue to go back to: the handler's is
    for own in ("failed", "cancelled"):
        moved = insert_failed(project, {"handler": "note_high", "error_class": "X", "original_queue": own}, db=default_db)
        assert project.cli("failed", "retry", moved, env=NO_DSN).returncode == 0
        assert query(default_db, "SELECT queue_name FROM messenger_messages WHERE id = ?", moved) == [("high",)]


def test_a_failed_message_being_replayed_is_neither_requeued_nor_removed(project):
    # `consume failed` holds it: requeued, a second worker would run it at the same time
    project.cli("setup")
    replaying = insert_failed(project, {"handler": "note", "error_class": "X", "original_queue": "async"})
    import sqlite3

    conn = sqlite3.connect(str(project.db))
    with conn:
        conn.execute("UPDATE messenger_messages SET delivered_at = ?, claimed_by = 1 WHERE id = ?", (time.time(), replaying))
    conn.close()
    retried = project.cli("failed", "retry", replaying)
    assert retried.returncode == 1 and retried.stdout == "requeued 0 message(s)\n"
    assert "`consume failed` is replaying it right now" in retried.stderr
    assert project.cli("failed", "remove", replaying, "--force").stdout == "removed 0 message(s)\n"
    assert query(project.db, "SELECT queue_name FROM messenger_messages WHERE id = ?", replaying) == [("failed",)]


# --- the first hour ---------------------------------------------------------------------------------


def test_commands_use_the_librarys_default_database_and_say_which_with_v(project, tmp_path):
    here = tmp_path / "plain"
    here.mkdir()
    env = dict(NO_APP, **NO_DSN)
    code = "from jobrunner import JobRunner\njobs = JobRunner()\njobs.handler('note')(lambda n: None)\n" \
           "jobs.dispatch('note', {'n': 1})\njobs.close()\n"
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", code], cwd=here, env=dict(project.env, **env), check=True)
    import conftest

    result = subprocess.run([sys.executable, conftest.JOBRUNNER, "stats", "--json", "-v"], cwd=here,
                            env=dict(project.env, **env), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["queues"][0]["ready"] == 1
    assert result.stderr == "jobrunner: database %s (from the default)\n" % (here / "jobrunner.db")


def test_a_worker_that_had_to_create_its_database_says_so_loudly(project, tmp_path):
    result = project.cli("consume", "async", "--time-limit", "0.5", "--dsn", tmp_path / "elsewhere" / "web.db")
    assert result.returncode == 0
    assert "consuming async from %s" % (tmp_path / "elsewhere" / "web.db") in result.stderr
    assert "WARNING created a new, empty database at %s: is it the one your app dispatches to?" % (
        tmp_path / "elsewhere" / "web.db") in result.stderr
    project.cli("setup")
    assert "created a new" not in project.cli("consume", "async", "--time-limit", "0.5").stderr


def test_python_dash_m_jobrunner_runs_the_command_line(project):
    import subprocess
    import sys

    project.cli("setup")
    result = subprocess.run([sys.executable, "-m", "jobrunner", "stats", "--json"], cwd=project.path, env=project.env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"queues": [], "failed": 0}


def test_ctrl_c_during_a_slow_handler_says_at_once_that_it_finishes_the_message(project, app):
    import pty
    import select
    import signal
    import subprocess
    import sys

    import conftest

    gate = project.path / "gate"
    app.dispatch("gate", {"n": 1, "path": str(gate)})
    master, slave = pty.openpty()
    worker = subprocess.Popen([sys.executable, conftest.JOBRUNNER, "consume", "slow"], cwd=project.path,
                              env=project.env, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    try:
        wait_until(lambda: project.values("start") == ["1"], message="the handler to start")
        worker.send_signal(signal.SIGINT)
        seen, deadline = b"", time.monotonic() + 0.5  # at once: not after the heartbeat's second
        while b"Ctrl-C again" not in seen and time.monotonic() < deadline:
            if select.select([master], [], [], 0.05)[0]:
                seen += os.read(master, 4096)
        assert b"finishing message 1 (gate); Ctrl-C again to abort it" in seen, seen
        gate.touch()
        assert worker.wait(timeout=10) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
        os.close(master)


# --- PostgreSQL DSNs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dsn,message", [
    ("postgresql://postgres@127.0.0.1:5432/test?table=x;drop", "table must be a lowercase SQL name"),
    ("postgresql://postgres@127.0.0.1:5432/test?schema=Robert'); DROP", "schema must be a lowercase SQL name"),
    ("postgresql://postgres@127.0.0.1:5432/test?synchronous=FULL", "DSN option 'synchronous' does not apply to PostgreSQL"),
    ("sqlite:///x.db?schema=s", "DSN option 'schema' does not apply to SQLite"),
    ("postgresql://postgres@127.0.0.1:5432/test?pgbouncer=maybe", "DSN option pgbouncer='maybe' is not a valid bool"),
    ("postgresql://postgres:secret@127.0.0.1:1/test", "cannot reach database postgresql://postgres@127.0.0.1:1/test"),
])
def test_a_bad_postgresql_dsn_is_one_line_exit_2_and_never_shows_the_password(project, dsn, message):
    line = assert_one_line_error(project.cli("stats", "--dsn", dsn, timeout=30))
    assert message in line and "secret" not in line


def test_a_postgresql_dsn_without_psycopg_names_the_extra_to_install(project, tmp_path):
    blocker = tmp_path / "nopsycopg"
    blocker.mkdir()
    (blocker / "psycopg.py").write_text("raise ImportError('no psycopg here')\n")
    env = {"PYTHONPATH": "%s:%s" % (blocker, project.env["PYTHONPATH"])}
    line = assert_one_line_error(project.cli("stats", "--dsn", "postgresql://u@h/db", env=env))
    assert line == "jobrunner: error: a postgresql:// DSN needs psycopg 3: pip install 'jobrunner[postgres]'"
    # and the SQLite path never needed it
    assert project.cli("setup", env=env).returncode == 0


# --- terminal manners ----------------------------------------------------------------------------------


def run_on_a_terminal(project, *args, env=None):
    """Run the command with stdout and stderr on a pseudo-terminal; return (exit code, what it showed)."""
    import pty
    import select
    import subprocess
    import sys

    import conftest

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, conftest.JOBRUNNER, *map(str, args)], cwd=project.path,
                            env=dict(project.env, **(env or {})), stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    shown = b""
    try:
        while True:
            ready = select.select([master], [], [], 20)[0]
            if not ready:
                break
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(master)
    return proc.wait(20), shown.decode("utf-8", "replace")


def test_big_failed_actions_show_progress_on_a_terminal_only(project, app):
    app.setup()
    now = time.time()
    headers = json.dumps({"handler": "note", "original_queue": "async", "error_class": "ValueError"})
    project.execute("INSERT INTO messenger_messages (body, headers, queue_name, created_at, available_at) VALUES "
                    + ", ".join(["(?, ?, 'failed', ?, ?)"] * 600),
                    *[v for i in range(600) for v in (json.dumps({"n": i}), headers, now, now)])
    code, shown = run_on_a_terminal(project, "failed", "retry", "--all", "--force")
    assert code == 0 and "Retry" in shown and "100%" in shown and "requeued 600 message(s)" in shown
    assert query(project.db, "SELECT COUNT(*) FROM messenger_messages WHERE queue_name = 'async'") == [(600,)]


def test_status_colors_states_on_a_terminal_but_not_piped_nor_with_no_color(project, app):
    app.setup()
    project.execute("INSERT INTO jobrunner_processes (name, program, host, supervisor_pid, state, pid, state_since, "
                    "updated_at, description) VALUES ('w_00', 'w', 'elsewhere', 1, 'FATAL', NULL, ?, ?, 'broken')",
                    time.time(), time.time() + 3600)
    code, shown = run_on_a_terminal(project, "status")
    assert code == 0 and "\x1b[31mFATAL" in shown
    assert "\x1b[" not in run_on_a_terminal(project, "status", env={"NO_COLOR": "1"})[1]
    piped = project.cli("status")
    assert "FATAL" in piped.stdout and "\x1b[" not in piped.stdout
