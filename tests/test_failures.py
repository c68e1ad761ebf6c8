"""Retries, the failure queue, poison messages, transactional handlers and the ``failed show|retry|remove``
commands.  Real databases (SQLite, and PostgreSQL when JOBRUNNER_TEST_POSTGRES is set), real worker processes."""

import json
import sqlite3
import time

import pytest

import jobrunner
from conftest import wait_until
from jobrunner import RetryStrategy

pytestmark = pytest.mark.backends

# --- helpers ------------------------------------------------------------------------


def records(project, kind):
    """(value, unix time) of every recorded call of ``kind``, oldest first (the third field of a record line)."""
    found = []
    if project.out.exists():
        for f in project.out.iterdir():
            if f.name.isdigit():
                for line in f.read_text().splitlines():
                    k, value, ts = line.split(" ")
                    if k == kind:
                        found.append((value, float(ts)))
    return sorted(found, key=lambda r: r[1])


def rows(project):
    """Every row of messenger_messages by id, as dicts."""
    return {r["id"]: r for r in project.query_dicts("SELECT * FROM messenger_messages")}


def raw(project, message_id):
    """The stored bytes (and SQLite's type) of a row's body: to check a body is left untouched."""
    if project.backend == "sqlite":
        return project.query("SELECT typeof(body), hex(body) FROM messenger_messages WHERE id = ?", message_id)[0]
    return project.query("SELECT body FROM messenger_messages WHERE id = ?", message_id)[0]


def insert(project, body, headers, queue="async", body_sql="?", headers_sql="?"):
    """A row written straight into the table, as another tool (or a bug) might; returns its id."""
    now = time.time()
    return project.execute(
        "INSERT INTO messenger_messages (body, headers, queue_name, created_at, available_at) VALUES (%s, %s, ?, ?, ?)"
        % (body_sql, headers_sql), body, headers, queue, now, now)


def cli_ok(project, *args, env=None, input=None):
    result = project.cli(*args, env=env, input=input)
    assert result.returncode == 0, (args, result.returncode, result.stdout, result.stderr)
    return result


def cli_json(project, *args, env=None):
    return json.loads(cli_ok(project, *args, "--json", env=env).stdout)


def failed_list(project, env=None):
    return cli_json(project, "failed", "show", "--max", "1000", env=env)


def failed_detail(project, message_id, env=None):
    return cli_json(project, "failed", "show", message_id, env=env)


def dispatch(project, name, payload, env=None):
    return int(cli_ok(project, "dispatch", name, json.dumps(payload), env=env).stdout)


def summary(entry):
    return {k: entry[k] for k in ("id", "handler", "original_queue", "error_class", "error_message", "attempts")}


FAILAPP = {"JOBRUNNER_APP": "failapp"}


def failapp(project):
    """failapp's JobRunner on this project's database, for in-process workers."""
    import failapp as module

    module.OUT = str(project.out)
    module.jobs.use_dsn(project.dsn)
    module.jobs.setup()
    return module.jobs


def make_ledger(project):
    project.execute("CREATE TABLE IF NOT EXISTS ledger (n TEXT PRIMARY KEY)")


def ledger(project):
    return sorted(r[0] for r in project.query("SELECT n FROM ledger"))


def bodies(project):
    return sorted(r["body"] for r in rows(project).values())


# --- retry strategy -----------------------------------------------------------------


def test_always_failing_handler_is_retried_max_retries_times_with_growing_gaps_then_failed(project):
    msg_id = dispatch(project, "always_fails", {"n": 7})
    result = cli_ok(project, "consume", "async", "--limit", "3", "--time-limit", "20")

    attempts = records(project, "fail")
    assert [v for v, _ in attempts] == ["7", "7", "7"]  # the first attempt and max_retries=2 retries
    gaps = [b - a for (_, a), (_, b) in zip(attempts, attempts[1:])]
    # delay=0.2s, multiplier=2, no jitter: each retry waits its delay (the idle worker wakes when it is due;
    # the upper bound only says it was not left for a --sleep or more)
    assert 0.2 <= gaps[0] < 0.2 + 0.9, gaps
    assert 0.4 <= gaps[1] < 0.4 + 0.9, gaps
    assert "moved to the failure queue after 3 attempt(s): ValueError: always fails 7" in result.stderr

    listed = failed_list(project)
    assert listed["total"] == 1
    [entry] = listed["failed"]
    assert summary(entry) == {"id": msg_id, "handler": "always_fails", "original_queue": "async",
                              "error_class": "ValueError", "error_message": "always fails 7", "attempts": 3}
    assert attempts[-1][1] <= entry["failed_at"] <= time.time()

    row = rows(project)[msg_id]  # the failure queue is rows of the same table
    assert row["queue_name"] == "failed"
    assert json.loads(row["body"]) == {"n": 7}
    headers = json.loads(row["headers"])
    assert headers["handler"] == "always_fails"
    assert headers["original_queue"] == "async"
    assert headers["traceback"].startswith("Traceback (most recent call last)")
    assert headers["traceback"].rstrip().endswith("ValueError: always fails 7")
    assert headers["failed_at"] == entry["failed_at"]


def test_failed_attempt_is_requeued_later_with_its_attempt_count_in_the_headers(project, app):
    msg_id = app.dispatch("always_fails", {"n": 1})
    expected_waits = [0.2, 0.4]  # delay * multiplier ** (retry - 1), no jitter
    for attempt, wait in enumerate(expected_waits, 1):
        assert app.consume("async", limit=1, time_limit=10) == "message limit of 1 reached"
        after = time.time()
        tried_at = records(project, "fail")[-1][1]
        row = rows(project)[msg_id]
        assert row["queue_name"] == "async"
        assert row["delivered_at"] is None
        assert row["attempts"] == attempt
        assert tried_at + wait <= row["available_at"] <= after + wait
        headers = json.loads(row["headers"])
        assert headers["handler"] == "always_fails"
        assert headers["attempts"] == attempt
        assert headers["last_error"] == "ValueError: always fails 1"
        assert "error_class" not in headers  # not failed yet
    assert app.consume("async", limit=1, time_limit=10) == "message limit of 1 reached"
    row = rows(project)[msg_id]
    assert row["queue_name"] == "failed"
    assert json.loads(row["headers"])["attempts"] == 3
    assert [v for v, _ in records(project, "fail")] == ["1", "1", "1"]


def test_backoff_is_exponential_with_ten_percent_jitter_and_capped_by_max_delay():
    exact = RetryStrategy(max_retries=5, delay=1.0, multiplier=2.0, jitter=0.0)
    assert [exact.wait(r) for r in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    capped = RetryStrategy(max_retries=5, delay=1.0, multiplier=2.0, max_delay=3.0, jitter=0.0)
    assert [capped.wait(r) for r in (1, 2, 3, 4)] == [1.0, 2.0, 3.0, 3.0]

    default = RetryStrategy()
    assert (default.max_retries, default.delay, default.multiplier, default.max_delay, default.jitter) == (3, 1.0, 2.0, None, 0.1)
    first = [default.wait(1) for _ in range(300)]
    assert all(0.9 <= w <= 1.1 for w in first)
    assert max(first) - min(first) > 0.1  # really jittered, not a fixed offset
    third = [default.wait(3) for _ in range(300)]
    assert all(3.6 <= w <= 4.4 for w in third)
    capped_jittered = [RetryStrategy(delay=1.0, max_delay=3.0).wait(3) for _ in range(300)]
    assert all(2.7 <= w <= 3.0 for w in capped_jittered)


def test_retry_options_default_to_the_apps_and_a_handler_overrides_only_what_it_sets(tmp_path):
    plain = jobrunner.JobRunner(str(tmp_path / "a.db"))

    @plain.handler
    def anything():
        pass

    assert anything.retry == RetryStrategy(3, 1.0, 2.0, None, 0.1)

    jobs = jobrunner.JobRunner(str(tmp_path / "b.db"), max_retries=7, delay=0.5, multiplier=3.0, max_delay=10.0)

    @jobs.handler
    def inherits():
        pass

    @jobs.handler(max_retries=1, delay=2.0)
    def overrides():
        pass

    assert inherits.retry == RetryStrategy(7, 0.5, 3.0, 10.0, 0.1)
    assert overrides.retry == RetryStrategy(1, 2.0, 3.0, 10.0, 0.1)


def test_unrecoverable_error_fails_at_once_whatever_max_retries_says(project, app):
    msg_id = app.dispatch("unrecoverable", {"n": 4})  # max_retries=5
    assert app.consume("async", limit=1, time_limit=10) == "message limit of 1 reached"
    assert project.values("fail") == ["4"]
    row = rows(project)[msg_id]
    assert row["queue_name"] == "failed"
    headers = json.loads(row["headers"])
    assert headers["error_class"].rsplit(".", 1)[-1] == "UnrecoverableError"
    assert headers["error_message"] == "no point retrying 4"
    assert headers["attempts"] == 1


@pytest.mark.backends
def test_an_error_text_utf8_cannot_encode_is_stored_spelled_out_and_the_worker_goes_on(project, app):
    failing = app.dispatch("missing_file", {"n": 1})  # FileNotFoundError('/tmp/caf\udce9-1.txt'): a lone surrogate
    app.dispatch("note", {"n": 2})
    worker = project.cli("consume", "async", "--limit", "3", "--time-limit", "10")
    assert worker.returncode == 0 and "Traceback" not in worker.stderr, worker.stderr
    assert project.values("fail") == ["1", "1"] and project.values("note") == ["2"]  # retried once, then failed
    headers = json.loads(rows(project)[failing]["headers"])
    assert headers["error_message"] == "/tmp/caf\\udce9-1.txt" and "caf\\udce9" in headers["traceback"]
    shown = project.cli("failed", "show", failing, "-v")
    assert shown.returncode == 0 and "caf\\udce9-1.txt" in shown.stdout


@pytest.mark.postgres  # SQLite's authorizer refuses the COMMIT itself: the handler fails and is retried as usual
def test_a_transactional_handler_that_commits_by_sql_is_failed_at_once_not_run_again(project, app):
    msg_id = app.dispatch("commits_by_sql", {"n": 1})  # max_retries=3
    worker = project.cli("consume", "async", "--limit", "1", "--time-limit", "10")
    assert worker.returncode == 0, worker.stderr
    assert app.run_pending(["async"]) == 0
    assert project.values("fail") == ["1"]  # ran once: a second run would write what the first committed again
    failed = app.failed()
    assert [e.id for e in failed] == [msg_id] and failed[0].headers["attempts"] == 1
    assert "ended the transaction that acknowledges its message" in failed[0].headers["error_message"]


def test_recoverable_error_is_retried_beyond_max_retries(project, app):
    project.out.mkdir()  # the handler keeps its count there
    msg_id = app.dispatch("recoverable", {"n": 2})  # max_retries=0; busy three times, then fine
    assert app.consume("async", limit=4, time_limit=10) == "message limit of 4 reached"
    assert project.values("fail") == ["2", "2", "2"]
    assert project.values("note") == ["2"]
    assert msg_id not in rows(project)  # handled and acknowledged, never failed


def test_handler_past_its_timeout_is_interrupted_and_counts_as_a_failed_attempt(project):
    msg_id = dispatch(project, "too_slow", {"n": 3})  # timeout=0.3s, max_retries=1; sleeps 5s
    started = time.monotonic()
    cli_ok(project, "consume", "async", "--limit", "2", "--time-limit", "20")
    assert time.monotonic() - started < 4.0  # two attempts of 0.3s, not of 5s
    assert project.values("start") == ["3", "3"]
    assert project.values("note") == []
    [entry] = failed_list(project)["failed"]
    assert entry["id"] == msg_id
    assert entry["error_class"] in ("HandlerTimeout", "jobrunner.HandlerTimeout")
    assert entry["error_message"] == "handler ran past its timeout of 0.3s"
    assert entry["attempts"] == 2


def test_worker_dying_mid_handler_counts_the_attempt_so_the_message_ends_in_the_failure_queue(project):
    msg_id = dispatch(project, "crash", {"n": 1})  # queue slow, max_retries=1; calls os._exit(3)
    exits = []
    for _ in range(6):  # bounded: it must not loop forever
        result = project.cli("consume", "slow", "--limit", "1", "--time-limit", "6", "--heartbeat-timeout", "3")
        exits.append(result.returncode)
        if rows(project)[msg_id]["queue_name"] == "failed":
            break
    # two runs die in the handler (first attempt, one retry); the third finds the message exhausted
    assert exits == [3, 3, 0]
    assert project.values("crash") == ["1", "1"]
    detail = failed_detail(project, msg_id)
    assert detail["handler"] == "crash"
    assert detail["original_queue"] == "slow"
    assert detail["error_class"] == "WorkerDied"
    assert detail["payload"] == {"n": 1}
    assert detail["attempts"] == 2  # the handler ran twice; the claim that found it exhausted is no attempt


# --- poison messages ----------------------------------------------------------------

GARBAGE = [
    # body, headers, what the reason says
    ("{not json", '{"handler": "note"}', "body is not valid JSON"),
    ('{"n": 1}', "{}", "no handler named None is registered"),
    ('{"n": 1}', "handler=note", "headers are not a JSON object"),
    ('{"n": 1}', '["note"]', "headers are not a JSON object"),
    ('{"n": 1, "m": 2}', '{"handler": "note"}', "payload does not fit handler note: unexpected argument 'm'"),
    ("{}", '{"handler": "note"}', "payload does not fit handler note: missing argument 'n'"),
    ("[1, 2]", '{"handler": "note"}', "the payload of note must be a JSON object (a dict), not list"),
]


def test_a_message_for_a_handler_this_worker_lacks_is_retried_with_backoff_before_it_fails(project, app):
    # A rolling deploy: an old worker meets a message for a handler only the new code has.
    app.setup()
    msg_id = insert(project, '{"n": 1}', '{"handler": "added_in_the_next_release"}')
    started = time.time()  # the message was available before this; the retry puts it after (50 ms backoff)
    result = cli_ok(project, "consume", "async", "--limit", 1, "--time-limit", "10", "-v")
    assert "no handler named 'added_in_the_next_release' is registered in this worker; retrying in" in result.stderr
    row = rows(project)[msg_id]
    assert row["queue_name"] == "async" and row["available_at"] > started + 0.04  # back on its queue, later
    assert failed_list(project)["total"] == 0
    # the app's strategy (jobapp: max_retries=3, delay 0.05 s) runs out: then, and only then, it fails
    cli_ok(project, "consume", "async", "--limit", 3, "--time-limit", "20")
    detail = failed_detail(project, msg_id)
    assert detail["error_class"] == "jobrunner.InvalidMessage"
    assert detail["error_message"] == "no handler named 'added_in_the_next_release' is registered in this worker"
    assert detail["attempts"] == 4 and detail["payload"] == {"n": 1}


def test_garbage_rows_go_to_the_failure_queue_untouched_while_good_messages_around_them_are_handled(project, app):
    good, garbage = [], {}
    for i, (body, headers, reason) in enumerate(GARBAGE):
        good.append(str(app.dispatch("note", {"n": "good%d" % i})))
        garbage[insert(project, body, headers)] = (body, headers, reason)
    good.append(str(app.dispatch("note", {"n": "good%d" % len(GARBAGE)})))
    before = {i: raw(project, i) for i in garbage}

    total = len(good) + len(garbage)
    result = cli_ok(project, "consume", "async", "--limit", total, "--time-limit", "20")
    assert "message limit of %d reached" % total in result.stderr
    assert project.values() == sorted("good%d" % i for i in range(len(good)))

    listed = failed_list(project)
    assert listed["total"] == len(garbage)
    assert sorted(e["id"] for e in listed["failed"]) == sorted(garbage)
    for message_id, (body, headers, reason) in garbage.items():
        assert raw(project, message_id) == before[message_id]  # the body is left exactly as it was
        detail = failed_detail(project, message_id)
        assert detail["error_class"] == "InvalidMessage"
        assert detail["original_queue"] == "async"
        assert detail["attempts"] == 1
        assert reason in detail["headers"]["reason"], (body, headers, detail)
        assert reason in detail["error_message"]
        try:
            assert detail["payload"] == json.loads(body)
        except ValueError:
            assert detail["payload"] == body
        if not headers.startswith("{"):
            assert detail["headers"]["original_headers"] == headers
        else:
            assert {k: v for k, v in detail["headers"].items() if k in json.loads(headers)} == json.loads(headers)


DECODING_GARBAGE = {
    "body nested too deep": ("[" * 100000, '{"handler": "note"}', "?", "?"),
    "headers nested too deep": ('{"n": "g"}', "[" * 100000, "?", "?"),
    "headers a blob, not UTF-8": ('{"n": "g"}', b"\xff\xfe\x00", "?", "?"),
    "body text not UTF-8": (b'{"n": "\xff"}', '{"handler": "note"}', "CAST(? AS TEXT)", "?"),
}


@pytest.mark.sqlite  # SQLite's own transaction rules, or a handler written for sqlite3
@pytest.mark.parametrize("case", sorted(DECODING_GARBAGE))
def test_garbage_that_breaks_decoding_does_not_stop_the_worker(project, app, case):
    body, headers, body_sql, headers_sql = DECODING_GARBAGE[case]
    app.dispatch("note", {"n": "before"})
    bad = insert(project, body, headers, body_sql=body_sql, headers_sql=headers_sql)
    app.dispatch("note", {"n": "after"})
    stored = raw(project, bad)

    result = project.cli("consume", "async", "--limit", "3", "--time-limit", "3")
    assert project.values() == ["after", "before"], result.stderr
    assert result.returncode == 0, result.stderr
    assert "message limit of 3 reached" in result.stderr
    assert rows(project)[bad]["queue_name"] == "failed"
    assert raw(project, bad) == stored
    assert [e["id"] for e in failed_list(project)["failed"]] == [bad]
    detail = failed_detail(project, bad)
    assert detail["error_class"] == "InvalidMessage"
    assert detail["headers"]["reason"]


def test_an_odd_bookkeeping_header_is_ignored_and_the_message_handled_once(project, app):
    app.dispatch("note", {"n": "before"})
    odd = insert(project, '{"n": "odd"}', '{"handler": "note", "free_retries": "x", "attempts": [1]}')
    app.dispatch("note", {"n": "after"})
    result = project.cli("consume", "async", "--limit", "3", "--time-limit", "3")
    assert result.returncode == 0, result.stderr
    assert "message limit of 3 reached" in result.stderr
    assert project.values() == ["after", "before", "odd"]
    assert odd not in rows(project)


# --- transactional handlers -----------------------------------------------------------


def test_transactional_handler_writes_and_children_appear_only_when_it_succeeds(project, app):
    failing = app.dispatch("transfer", {"n": 1, "fail": True, "children": 2})  # app defaults: 3 retries
    app.dispatch("transfer", {"n": 2, "children": 2})
    # 4 attempts of the failing one, the good one, its two children
    assert app.consume("async", limit=7, time_limit=20) == "message limit of 7 reached"

    assert project.query("SELECT n FROM ledger ORDER BY n") == [(2,)]
    assert project.values() == ["2", "2.0", "2.1"]
    remaining = rows(project)
    assert list(remaining) == [failing]  # no child of the failed one was ever committed
    assert remaining[failing]["queue_name"] == "failed"
    headers = json.loads(remaining[failing]["headers"])
    assert headers["error_message"] == "failed after writing 1"
    assert headers["attempts"] == 4


@pytest.mark.sqlite  # SQLite's own transaction rules, or a handler written for sqlite3
def test_transactional_handler_children_are_invisible_to_others_until_its_transaction_commits(project):
    jobs = failapp(project)
    msg_id = jobs.dispatch("tx", {"n": "t", "children": 2})
    assert jobs.consume("async", limit=1, time_limit=10) == "message limit of 1 reached"
    assert project.values("visible") == ["t:0"]  # seen from another connection while the handler ran
    assert project.values("tx") == ["t"]
    assert ledger(project) == ["t"]
    assert msg_id not in rows(project)
    assert bodies(project) == ['{"n":"t.0"}', '{"n":"t.1"}']


MISBEHAVIOUR = ["raise", "constraint", "commit", "rollback", "execute_commit", "execute_rollback", "close", "or_rollback"]


@pytest.mark.sqlite  # SQLite's own transaction rules, or a handler written for sqlite3
@pytest.mark.parametrize("how", MISBEHAVIOUR)
def test_failed_transactional_handler_leaves_nothing_behind_and_the_next_message_runs_clean(project, how):
    jobs = failapp(project)
    make_ledger(project)
    bad = jobs.dispatch("tx", {"n": "bad", "how": how})  # max_retries=0: straight to the failure queue
    jobs.dispatch("tx", {"n": "good"})
    jobs.dispatch("plain", {"n": "after"})

    # bad, good, plain, and the children of good and plain; in a worker process, as a misbehaving
    # handler could break the worker's state
    result = project.cli("consume", "async", "--limit", "5", "--time-limit", "10", env=FAILAPP)
    assert result.returncode == 0, result.stderr
    assert "message limit of 5 reached" in result.stderr

    assert ledger(project) == ["good"]
    # close and or_rollback return normally: the worker must notice the transaction is gone
    assert project.values("tx") == (["bad", "good"] if how in ("close", "or_rollback") else ["good"])
    # the good transactional handler ran in a transaction of its own, the plain one in none
    assert project.values("visible") == ["after:1", "bad:0", "good:0"]
    assert project.values("note") == ["after.0", "good.0"]
    left = rows(project)
    assert list(left) == [bad]  # the child of bad was rolled back with it
    assert left[bad]["queue_name"] == "failed"
    headers = json.loads(left[bad]["headers"])
    assert headers["attempts"] == 1
    assert headers["error_message"]
    if how == "raise":
        assert (headers["error_class"], headers["error_message"]) == ("RuntimeError", "tx bad failed half-way")
    if how == "constraint":
        assert headers["error_class"] == "sqlite3.IntegrityError"


@pytest.mark.sqlite  # SQLite's own transaction rules, or a handler written for sqlite3
def test_non_transactional_handler_dispatches_are_visible_at_once_and_survive_its_failure(project):
    jobs = failapp(project)
    failing = jobs.dispatch("plain", {"n": "p", "fail": True})  # app default max_retries=0
    jobs.dispatch("plain", {"n": "q"})
    assert jobs.consume("async", limit=4, time_limit=10) == "message limit of 4 reached"
    assert project.values("visible") == ["p:1", "q:1"]
    assert project.values("plain") == ["q"]
    assert project.values("note") == ["p.0", "q.0"]
    left = rows(project)
    assert list(left) == [failing]
    headers = json.loads(left[failing]["headers"])
    assert (left[failing]["queue_name"], headers["error_message"], headers["attempts"]) == (
        "failed", "plain p failed after dispatching", 1)


# --- failed show ----------------------------------------------------------------------


def fail_unrecoverable(project, count, queue=None):
    """``count`` messages failed for real by a worker process; their ids, oldest first."""
    ids = []
    for n in range(1, count + 1):
        args = ["dispatch", "unrecoverable", json.dumps({"n": n})] + (["--queue", queue] if queue else [])
        ids.append(int(cli_ok(project, *args).stdout))
    cli_ok(project, "consume", queue or "async", "--limit", count, "--time-limit", "20")
    assert project.values("fail") == [str(n) for n in range(1, count + 1)]
    return ids


def test_failed_show_lists_newest_first_with_max_and_json(project):
    ids = fail_unrecoverable(project, 3)
    error_class = failed_list(project)["failed"][0]["error_class"]
    assert error_class.rsplit(".", 1)[-1] == "UnrecoverableError"

    lines = cli_ok(project, "failed", "show").stdout.splitlines()
    assert lines[0].split() == ["id", "handler", "queue", "error", "attempts", "failed", "at"]
    assert len(lines) == 4
    for line, message_id, n in zip(lines[1:], reversed(ids), (3, 2, 1)):
        assert line.split()[:4] == [str(message_id), "unrecoverable", "async", error_class + ":"]
        assert "%s: no point retrying %d  1 " % (error_class, n) in line

    lines = cli_ok(project, "failed", "show", "--max", "2").stdout.splitlines()
    assert [line.split()[0] for line in lines[1:3]] == [str(ids[2]), str(ids[1])]
    assert lines[3:] == ["(2 of 3 shown; use --max)"]

    data = cli_json(project, "failed", "show", "--max", "2")
    assert data["total"] == 3
    assert [summary(e) for e in data["failed"]] == [
        {"id": ids[n - 1], "handler": "unrecoverable", "original_queue": "async", "error_class": error_class,
         "error_message": "no point retrying %d" % n, "attempts": 1} for n in (3, 2)]


def test_failed_show_one_id_gives_the_detail_and_the_traceback_with_v(project):
    ids = fail_unrecoverable(project, 2)
    text = cli_ok(project, "failed", "show", ids[1]).stdout
    lines = text.splitlines()
    assert lines[0].split() == ["id", str(ids[1])]
    for key, value in (("handler", "unrecoverable"), ("original queue", "async"), ("error message", "no point retrying 2"),
                       ("attempts", "1"), ("payload", '{"n": 2}')):
        assert "%-15s %s" % (key, value) in lines, (key, lines)
    assert "Traceback" not in text
    assert "no point retrying 1" not in text

    verbose = cli_ok(project, "failed", "show", ids[1], "-v").stdout
    assert verbose.startswith(text.replace("\n(run with -v to see the traceback)\n", ""))
    assert "Traceback (most recent call last)" in verbose
    assert verbose.rstrip().endswith("UnrecoverableError: no point retrying 2")

    detail = failed_detail(project, ids[1])
    assert summary(detail) == dict(summary(failed_list(project)["failed"][0]), id=ids[1])
    assert detail["payload"] == {"n": 2}
    assert "Traceback (most recent call last)" in detail["headers"]["traceback"]
    assert detail["created_at"] <= detail["failed_at"]


def test_failed_show_stats_groups_by_handler_and_error_class(project, app):
    app.setup()
    insert(project, '{"m": 1}', '{"handler": "note"}')
    # failed elsewhere (by a worker of another release, say)
    insert(project, '{"n": 1}', '{"handler": "no_such_handler", "error_class": "InvalidMessage"}', queue="failed")
    for n in (1, 2):
        app.dispatch("unrecoverable", {"n": n})
    cli_ok(project, "consume", "async", "--limit", "3", "--time-limit", "20")
    error_class = next(e["error_class"] for e in failed_list(project)["failed"] if e["handler"] == "unrecoverable")

    data = cli_json(project, "failed", "show", "--stats")
    assert data["failed"] == 4
    assert data["groups"][0] == {"handler": "unrecoverable", "error_class": error_class, "count": 2}
    assert sorted(data["groups"][1:], key=lambda g: g["handler"]) == [
        {"handler": "no_such_handler", "error_class": "InvalidMessage", "count": 1},
        {"handler": "note", "error_class": "InvalidMessage", "count": 1},
    ]
    lines = cli_ok(project, "failed", "show", "--stats").stdout.splitlines()
    assert lines[0].split() == ["handler", "error", "count"]
    assert lines[1].split() == ["unrecoverable", error_class, "2"]
    assert sorted(line.split() for line in lines[2:]) == [["no_such_handler", "InvalidMessage", "1"],
                                                          ["note", "InvalidMessage", "1"]]


# --- failed retry / remove --------------------------------------------------------------


def test_failed_message_replayed_after_the_fault_is_fixed(project):
    fast = {"JOBAPP_RETRY_DELAY": "0.01"}  # fails_unless_fixed: max_retries=5 at the app's default backoff
    msg_id = dispatch(project, "fails_unless_fixed", {"n": 5})
    cli_ok(project, "consume", "async", "--limit", "6", "--time-limit", "20", env=fast)
    assert project.values("fail") == ["5"] * 6
    [entry] = failed_list(project)["failed"]
    assert summary(entry) == {"id": msg_id, "handler": "fails_unless_fixed", "original_queue": "async",
                              "error_class": "RuntimeError", "error_message": "not fixed yet", "attempts": 6}

    # replayed before the fix: a fresh attempt count, so six more attempts before it fails again
    assert cli_ok(project, "failed", "retry", msg_id).stdout == "requeued 1 message(s)\n"
    row = rows(project)[msg_id]
    assert (row["queue_name"], row["attempts"], row["delivered_at"]) == ("async", 0, None)
    headers = json.loads(row["headers"])
    assert headers["handler"] == "fails_unless_fixed"
    assert not {"error_class", "error_message", "traceback", "failed_at", "original_queue"} & set(headers)
    cli_ok(project, "consume", "async", "--limit", "6", "--time-limit", "20", env=fast)
    assert project.values("fail") == ["5"] * 12
    assert failed_list(project)["failed"][0]["attempts"] == 6

    # fixed, replayed, handled
    (project.out / "fixed").touch()
    cli_ok(project, "failed", "retry", msg_id)
    cli_ok(project, "consume", "async", "--limit", "1", "--time-limit", "20", env=fast)
    assert project.values("note") == ["5"]
    assert failed_list(project) == {"failed": [], "total": 0}
    assert rows(project) == {}


def test_failed_retry_of_several_asks_first_and_restores_the_original_queues(project, app):
    on_low = fail_unrecoverable(project, 1, queue="low")[0]
    app.dispatch("unrecoverable", {"n": 2})
    cli_ok(project, "consume", "async", "--limit", "1", "--time-limit", "20")
    on_async = max(rows(project))
    before = rows(project)
    assert {before[i]["queue_name"] for i in (on_low, on_async)} == {"failed"}

    refused = project.cli("failed", "retry", on_low, on_async, input="n\n")
    assert refused.returncode == 1
    assert "Retry 2 failed messages? [y/N]" in refused.stderr
    assert refused.stderr.rstrip().endswith("jobrunner: aborted")
    assert rows(project) == before

    no_answer = project.cli("failed", "retry", "--all", input="")
    assert no_answer.returncode == 1
    assert rows(project) == before

    accepted = project.cli("failed", "retry", on_low, on_async, input="y\n")
    assert accepted.returncode == 0, accepted.stderr
    assert accepted.stdout == "requeued 2 message(s)\n"
    after = rows(project)
    assert (after[on_low]["queue_name"], after[on_low]["attempts"]) == ("low", 0)
    assert (after[on_async]["queue_name"], after[on_async]["attempts"]) == ("async", 0)

    # workers handle them again (and they fail again, the handler being what it is)
    cli_ok(project, "consume", "low", "async", "--limit", "2", "--time-limit", "20")
    assert project.values("fail") == ["1", "1", "2", "2"]
    assert cli_ok(project, "failed", "retry", "--all", "--force", input="").stdout == "requeued 2 message(s)\n"
    assert {r["queue_name"] for r in rows(project).values()} == {"low", "async"}


def test_failed_remove_deletes_asking_before_more_than_one(project):
    ids = fail_unrecoverable(project, 5)

    assert cli_ok(project, "failed", "remove", ids[0], input="").stdout == "removed 1 message(s)\n"
    assert sorted(rows(project)) == ids[1:]

    refused = project.cli("failed", "remove", ids[1], ids[2], input="n\n")
    assert refused.returncode == 1
    assert "Remove 2 failed messages? [y/N]" in refused.stderr
    assert sorted(rows(project)) == ids[1:]
    assert cli_ok(project, "failed", "remove", ids[1], ids[2], input="y\n").stdout == "removed 2 message(s)\n"
    assert sorted(rows(project)) == ids[3:]

    assert project.cli("failed", "remove", "--all", input="n\n").returncode == 1
    assert sorted(rows(project)) == ids[3:]
    assert cli_ok(project, "failed", "remove", "--all", "--force", input="").stdout == "removed 2 message(s)\n"
    assert rows(project) == {}
    assert failed_list(project) == {"failed": [], "total": 0}


def test_unknown_ids_are_a_one_line_error_and_change_nothing(project, app):
    [failed_id] = fail_unrecoverable(project, 1)
    pending = app.dispatch("note", {"n": 1})  # exists, but is not a failed message
    before = rows(project)

    for args in (["retry", failed_id, 999999], ["retry", 999999, failed_id, "--force"], ["remove", failed_id, 999999],
                 ["remove", 999999, failed_id, "--force"], ["show", 999999]):
        result = project.cli("failed", *args, input="y\n")
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert result.stderr == "jobrunner: error: no failed message with id 999999\n", args
        assert rows(project) == before, args
    for verb in ("retry", "remove"):
        result = project.cli("failed", verb, pending, "--force")
        assert (result.returncode, result.stderr) == (2, "jobrunner: error: no failed message with id %d\n" % pending)
        assert rows(project) == before

    for args in (["retry"], ["remove"], ["retry", failed_id, "--all"], ["remove", failed_id, "--all"]):
        result = project.cli("failed", *args, "--force")
        assert result.returncode == 2, args
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert rows(project) == before


def test_failed_retry_all_of_many_shows_progress_and_workers_handle_them_again(project, app):
    app.setup()
    count = 600
    now = time.time()
    headers = json.dumps({"handler": "note", "original_queue": "async", "error_class": "ValueError",
                          "error_message": "boom", "traceback": "...", "attempts": 4, "failed_at": now})
    values = ", ".join(["(?, ?, 'failed', ?, ?, 4)"] * count)
    params = [p for i in range(count) for p in (json.dumps({"n": i}), headers, now, now)]
    project.execute("INSERT INTO messenger_messages (body, headers, queue_name, created_at, available_at, attempts) "
                    "VALUES " + values, *params)
    before = rows(project)

    assert project.cli("failed", "retry", "--all", input="n\n").returncode == 1
    assert rows(project) == before

    result = cli_ok(project, "failed", "retry", "--all", "--force")
    assert result.stdout == "requeued %d message(s)\n" % count
    assert result.stderr == ""  # piped: no progress bar
    after = rows(project)
    assert {(r["queue_name"], r["attempts"], r["delivered_at"]) for r in after.values()} == {("async", 0, None)}
    assert {i: r["body"] for i, r in after.items()} == {i: r["body"] for i, r in before.items()}

    cli_ok(project, "consume", "async", "--limit", count, "--time-limit", "60")
    assert project.values() == sorted(str(i) for i in range(count))
    assert rows(project) == {}


def test_failed_retry_resets_the_whole_attempt_count_including_free_retries(project):
    jobs = failapp(project)
    msg_id = jobs.dispatch("recover_then_fail", {"n": 1})  # max_retries=1: busy twice, then broken
    assert jobs.consume("async", limit=4, time_limit=10) == "message limit of 4 reached"
    assert project.values("attempt") == ["1"] * 4  # two free retries, then the first attempt and its one retry
    assert rows(project)[msg_id]["queue_name"] == "failed"

    cli_ok(project, "failed", "retry", msg_id, env=FAILAPP)
    assert jobs.consume("async", limit=2, time_limit=10) == "message limit of 2 reached"
    # broken from the start now: one attempt and max_retries=1 retry, then the failure queue again
    assert project.values("attempt") == ["1"] * 6
    row = rows(project)[msg_id]
    assert row["queue_name"] == "failed"
    assert json.loads(row["headers"])["attempts"] == 2


def test_error_class_does_not_depend_on_how_the_worker_was_started(project, app):
    in_process = app.dispatch("unrecoverable", {"n": 1})
    app.consume("async", limit=1, time_limit=10)
    from_cli = app.dispatch("unrecoverable", {"n": 2})
    cli_ok(project, "consume", "async", "--limit", "1", "--time-limit", "20")
    classes = {e["id"]: e["error_class"] for e in failed_list(project)["failed"]}
    assert classes[in_process] == classes[from_cli]
    stats = cli_json(project, "failed", "show", "--stats")
    assert stats["groups"] == [{"handler": "unrecoverable", "error_class": classes[from_cli], "count": 2}]


def test_a_nested_transaction_that_raises_rolls_back_alone(project, app):
    app.setup()
    with app.transaction() as db:
        db.execute("CREATE TABLE IF NOT EXISTS ledger (n INTEGER PRIMARY KEY)")
        db.execute("INSERT INTO ledger (n) VALUES (1)")
        outer = app.dispatch("note", {"n": "outer"})
        try:
            with app.transaction():
                db.execute("INSERT INTO ledger (n) VALUES (2)")
                app.dispatch("note", {"n": "inner"})
                raise RuntimeError("inner block fails")
        except RuntimeError:
            pass
    assert project.query("SELECT n FROM ledger") == [(1,)]
    assert project.query("SELECT id FROM messenger_messages") == [(outer,)]


# --- consume failed: the failure queue replayed, one pass ---------------------------------------


def fail_fixable(project, count):
    """``count`` fixed_by_file messages failed for real by a worker process; their ids, oldest first."""
    ids = [dispatch(project, "fixed_by_file", {"n": n}) for n in range(1, count + 1)]
    cli_ok(project, "consume", "async", "--limit", count, "--time-limit", "20")
    assert [e["id"] for e in failed_list(project)["failed"]][:count] == ids[::-1]
    return ids


def history(project, message_id):
    """The error classes and messages of a failed message, the earliest first, the current one last."""
    headers = failed_detail(project, message_id)["headers"]
    earlier = [(e["error_class"], e["error_message"]) for e in headers.get("previous_errors", [])]
    return earlier + [(headers["error_class"], headers["error_message"])]


def test_consume_failed_runs_each_failed_message_once_oldest_first_and_keeps_what_fails_again(project):
    ids = fail_fixable(project, 5)
    for n in (1, 3, 5):
        (project.out / ("fixed-%d" % n)).touch()

    result = cli_ok(project, "consume", "failed", "--time-limit", "20")
    assert "replaying 5 failed message(s), oldest first" in result.stderr
    assert "stopped: every failed message was replayed once (5 messages, 2 failed attempts)" in result.stderr
    assert project.values() == ["1", "3", "5"]
    second_pass = [v for v, _ in sorted(records(project, "fail") + records(project, "note"), key=lambda r: r[1])][5:]
    assert second_pass == ["1", "2", "3", "4", "5"]  # oldest first, each once, then the run ends

    remaining = failed_list(project)["failed"]
    assert [e["id"] for e in remaining] == [ids[3], ids[1]]
    for entry, n in zip(remaining, (4, 2)):
        assert summary(entry) == {"id": ids[n - 1], "handler": "fixed_by_file", "original_queue": "async",
                                  "error_class": "RuntimeError", "error_message": "%d is not fixed" % n, "attempts": 2}
        assert history(project, entry["id"]) == [("RuntimeError", "%d is not fixed" % n)] * 2
    row = rows(project)[ids[1]]
    assert (row["queue_name"], row["delivered_at"], row["claimed_by"]) == ("failed", None, None)
    text = cli_ok(project, "failed", "show", ids[1]).stdout
    assert "earlier error   RuntimeError: 2 is not fixed (" in text

    # --limit 1 handles exactly one, the oldest; it fails a third time
    result = cli_ok(project, "consume", "failed", "--limit", "1", "--time-limit", "20")
    assert "stopped: message limit of 1 reached (1 messages, 1 failed attempts)" in result.stderr
    assert [v for v, _ in records(project, "fail")][7:] == ["2"]
    assert len(history(project, ids[1])) == 3 and len(history(project, ids[3])) == 2

    # fixed now: a pass empties the failure queue, and an empty one is a pass of nothing
    for n in (2, 4):
        (project.out / ("fixed-%d" % n)).touch()
    cli_ok(project, "consume", "failed", "--time-limit", "20")
    assert project.values() == ["1", "2", "3", "4", "5"]
    assert rows(project) == {}
    result = cli_ok(project, "consume", "failed", "--time-limit", "20")
    assert "replaying 0 failed message(s)" in result.stderr


def test_consume_failed_takes_the_filters_of_failed_retry(project):
    broken = fail_unrecoverable(project, 1)
    fixable = fail_fixable(project, 2)
    (project.out / "fixed-1").touch()
    (project.out / "fixed-2").touch()
    assert project.values("fail") == ["1", "1", "2"]

    cli_ok(project, "consume", "failed", "--error", "UnrecoverableError", "--time-limit", "20")
    assert project.values("fail") == ["1", "1", "1", "2"]  # the unrecoverable one ran again, and failed again
    assert project.values() == []
    assert sorted(e["id"] for e in failed_list(project)["failed"]) == sorted(fixable + broken)

    cli_ok(project, "consume", "failed", "--handler", "fixed_by_file", "--time-limit", "20")
    assert project.values() == ["1", "2"]
    assert [e["id"] for e in failed_list(project)["failed"]] == broken
    assert project.values("fail") == ["1", "1", "1", "2"]


def test_consume_failed_with_another_queue_or_filters_without_it_is_refused_in_one_line(project):
    [failed_id] = fail_unrecoverable(project, 1)
    before = rows(project)
    for args, says in ((["failed", "async"], "consume failed replays the failure queue in a run of its own"),
                       (["async", "failed"], "consume failed replays the failure queue in a run of its own"),
                       (["async", "--handler", "note"], "--handler and --error choose failed messages"),
                       (["--error", "ValueError"], "--handler and --error choose failed messages")):
        result = project.cli("consume", *args, "--time-limit", "5")
        assert result.returncode == 2, (args, result.stderr)
        assert len(result.stderr.splitlines()) == 1 and says in result.stderr, (args, result.stderr)
        assert rows(project) == before
    assert project.values("fail") == ["1"]


def test_a_replaying_worker_shows_in_status_and_a_killed_one_leaves_the_message_failed(project, app):
    app.setup()
    gate = project.path / "open"
    headers = json.dumps({"handler": "gate", "original_queue": "slow", "error_class": "ValueError",
                          "error_message": "closed", "attempts": 1, "failed_at": time.time()})
    message_id = insert(project, json.dumps({"n": 1, "path": str(gate)}), headers, queue="failed")

    proc = project.start("consume", "failed", "--time-limit", "20")
    wait_until(lambda: project.values("start") == ["1"])
    data = json.loads(cli_ok(project, "status", "--json").stdout)
    [worker] = data["processes"]
    assert (worker["state"], worker["description"]) == ("RUNNING", "standalone worker on failed")
    assert cli_json(project, "stats")["failed"] == 1  # still a failed message while it is replayed
    proc.kill()
    proc.wait(10)

    # the dead worker's claim is released by the next run, which replays the message again and succeeds
    gate.touch()
    cli_ok(project, "consume", "failed", "--time-limit", "20", env={"JOBRUNNER_HEARTBEAT_TIMEOUT": "1"})
    assert project.values() == ["1"]
    assert message_id not in rows(project)
