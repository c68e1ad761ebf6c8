"""The worker: `consume` with its limits, priorities, delays, signals and `stop-workers`, as real processes,
on SQLite and PostgreSQL."""

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from conftest import REPO, wait_for_stderr, wait_until, watch_stderr

pytestmark = pytest.mark.backends


def messages(project):
    """(id, queue, delivered?, attempts) of every stored message."""
    return project.query("SELECT id, queue_name, delivered_at IS NOT NULL, attempts FROM messenger_messages ORDER BY id")


def worker_count(project):
    try:
        return project.query("SELECT COUNT(*) FROM jobrunner_workers")[0][0]
    except sqlite3.OperationalError:
        return 0


def records(project):
    """Every recorded handler call as (kind, value, time, pid), in the order they happened."""
    out = []
    if project.out.exists():
        for f in project.out.iterdir():
            if f.name.isdigit():
                for line in f.read_text().splitlines():
                    kind, value, t = line.split(" ")
                    out.append((kind, value, float(t), int(f.name)))
    return sorted(out, key=lambda r: r[2])


def sequence(project):
    return [(kind, value) for kind, value, _, _ in records(project)]


def finish(proc, timeout=15):
    """Wait for a started process; return (exit code, stderr)."""
    if hasattr(proc, "err_thread"):  # its stderr is being watched: wait for the end of it
        proc.wait(timeout=timeout)
        proc.err_thread.join(timeout=timeout)
        return proc.returncode, "".join(proc.err_lines)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


# --- exactly once --------------------------------------------------------------------


def test_consume_limit_handles_hundreds_of_messages_each_exactly_once(project, app):
    ids = app.dispatch_many("note", [{"n": i} for i in range(310)])
    result = project.cli("consume", "async", "--limit", "300", "--time-limit", "30")
    assert result.returncode == 0, result.stderr
    assert "message limit of 300 reached" in result.stderr
    handled = [v for v, _ in project.handled("note")]
    assert sorted(handled) == sorted(str(i) for i in range(300))  # each once, the oldest first
    assert messages(project) == [(i, "async", 0, 0) for i in ids[300:]]
    assert worker_count(project) == 0


def test_two_concurrent_consumers_handle_each_message_exactly_once(project, app):
    app.setup()
    workers = [project.start("consume", "async", "--limit", "200", "--time-limit", "30") for _ in range(2)]
    wait_until(lambda: worker_count(project) == 2, message="two registered workers")
    app.dispatch_many("note", [{"n": i} for i in range(400)])
    for w in workers:
        code, err = finish(w, timeout=30)
        assert code == 0, err
        assert "message limit of 200 reached" in err
    handled = project.handled("note")
    assert sorted(v for v, _ in handled) == sorted(str(i) for i in range(400))
    per_pid = {}
    for _, pid in handled:
        per_pid[pid] = per_pid.get(pid, 0) + 1
    assert sorted(per_pid) == sorted(w.pid for w in workers) and set(per_pid.values()) == {200}
    assert messages(project) == []


# --- delays and priorities --------------------------------------------------------------


def test_a_delayed_message_is_handled_once_due_and_not_before(project, app):
    late = app.dispatch("note", {"n": "late"}, delay=1.5)
    app.dispatch("note", {"n": "now"})
    ((due,),) = project.query("SELECT available_at FROM messenger_messages WHERE id = ?", late)
    # --sleep 5: the worker must wake for the due message, not on its idle poll
    result = project.cli("consume", "async", "--limit", "2", "--sleep", "5", "--time-limit", "20")
    assert result.returncode == 0, result.stderr
    (now_kind, now_value, _, _), (late_kind, late_value, late_at, _) = records(project)
    assert (now_kind, now_value, late_kind, late_value) == ("note", "now", "note", "late")
    assert due <= late_at < due + 1.0
    assert messages(project) == []


def test_queues_are_consumed_in_the_order_given(project, app):
    for i in range(3):
        app.dispatch("note_low", {"n": i})
        app.dispatch("note", {"n": i})
        app.dispatch("note_high", {"n": i})
    result = project.cli("consume", "high", "async", "low", "--limit", "9", "--time-limit", "20")
    assert result.returncode == 0, result.stderr
    assert sequence(project) == [("high", "0"), ("high", "1"), ("high", "2"), ("note", "0"), ("note", "1"),
                                 ("note", "2"), ("low", "0"), ("low", "1"), ("low", "2")]


def test_a_new_message_on_a_higher_queue_goes_before_the_rest_of_a_lower_one(project, app):
    worker = project.start("consume", "high", "slow", "--time-limit", "20")
    app.dispatch_many("slow", [{"n": i, "seconds": 0.5} for i in (1, 2, 3)])
    wait_until(lambda: project.values("start") == ["1"], message="slow 1 to start")
    app.dispatch("note_high", {"n": "h"})
    wait_until(lambda: project.values("note") == ["1", "2", "3"], message="the slow messages")
    worker.send_signal(signal.SIGTERM)
    code, err = finish(worker)
    assert code == 0, err
    assert sequence(project) == [("start", "1"), ("note", "1"), ("high", "h"), ("start", "2"), ("note", "2"),
                                 ("start", "3"), ("note", "3")]


# --- limits ----------------------------------------------------------------------------


def test_failure_limit_stops_the_worker_after_that_many_failed_attempts(project, app):
    ids = app.dispatch_many("always_fails", [{"n": i} for i in (1, 2, 3)])
    result = project.cli("consume", "async", "--failure-limit", "2", "--time-limit", "20")
    assert result.returncode == 0, result.stderr
    assert "failure limit of 2 reached" in result.stderr
    assert project.values("fail") == ["1", "2"]
    # the two failures wait for their retry; the third message was never touched
    assert messages(project) == [(ids[0], "async", 0, 1), (ids[1], "async", 0, 1), (ids[2], "async", 0, 0)]


def test_memory_limit_stops_the_worker_between_messages(project, app):
    # The limit sits between the first message and the second: the first grows the worker by 128 MiB.
    supapp = {"JOBRUNNER_APP": "supapp"}
    grow = project.cli("dispatch", "grow", '{"n": 1, "mb": 128}', env=supapp)
    ids = [int(grow.stdout)] + app.dispatch_many("note", [{"n": i} for i in range(2, 4)])
    result = project.cli("consume", "async", "--memory-limit", "100M", "--time-limit", "20", env=supapp)
    assert result.returncode == 0, result.stderr
    assert re.search(r"stopped: memory limit of 100\.0M exceeded \(RSS 1\d\d\.\dM\) \(1 messages", result.stderr), \
        result.stderr
    assert project.values("note") == ["1"]  # the first message, and not one more
    assert messages(project) == [(i, "async", 0, 0) for i in ids[1:]]


def test_a_memory_limit_below_the_workers_own_footprint_is_refused_at_start(project, app):
    app.dispatch_many("note", [{"n": i} for i in range(3)])
    result = project.cli("consume", "async", "--memory-limit", "1M", "--time-limit", "20")
    assert result.returncode == 1
    assert "stopped: memory limit of 1.0M is below this worker's own footprint (RSS " in result.stderr
    assert project.values("note") == [] and len(messages(project)) == 3


@pytest.mark.parametrize("size", ["128M", "1G"])
def test_memory_limit_takes_sizes_with_units(project, app, size):
    app.dispatch_many("note", [{"n": i} for i in range(2)])
    result = project.cli("consume", "async", "--memory-limit", size, "--limit", "2", "--time-limit", "20")
    assert result.returncode == 0, result.stderr
    assert "message limit of 2 reached" in result.stderr and "memory limit" not in result.stderr
    assert project.values("note") == ["0", "1"]


def test_time_limit_stops_an_idle_worker(project, app):
    app.setup()
    started = time.monotonic()
    result = project.cli("consume", "async", "--time-limit", "1", timeout=20)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert "time limit of 1s reached" in result.stderr
    assert 1.0 <= elapsed < 4.0


def test_time_limit_stops_a_busy_worker_after_its_current_message(project, app):
    app.dispatch_many("slow", [{"n": i, "seconds": 0.4} for i in range(5)])
    result = project.cli("consume", "slow", "--time-limit", "1", timeout=20)
    assert result.returncode == 0, result.stderr
    assert "time limit of 1s reached" in result.stderr
    handled = project.values("note")
    assert handled == project.values("start") and 2 <= len(handled) <= 3
    assert [row[2:] for row in messages(project)] == [(0, 0)] * (5 - len(handled))


def test_a_long_sleep_does_not_delay_a_new_message(project, app):
    app.setup()
    worker = project.start("consume", "async", "--sleep", "5")
    wait_until(lambda: worker_count(project) == 1, message="the worker to register")
    time.sleep(0.2)  # let it go idle: the wake-up must come from the commit, not from the start of the loop
    sent = time.time()
    app.dispatch("note", {"n": 1})
    wait_until(lambda: project.values("note") == ["1"], timeout=4, message="the message to be handled")
    (_, _, handled_at, _), = records(project)
    assert handled_at - sent < 1.0
    worker.send_signal(signal.SIGTERM)
    code, err = finish(worker)
    assert code == 0, err


@pytest.mark.parametrize("flags,handled_line,traceback_line", [
    ((), False, False), (("-v",), True, False), (("-vv",), True, True), (("-vvv",), True, True)])
def test_verbosity_adds_a_line_per_message_then_details(project, app, flags, handled_line, traceback_line):
    app.dispatch("note", {"n": 1})
    app.dispatch("unrecoverable", {"n": 2})
    result = project.cli("consume", "async", "--limit", "2", "--time-limit", "20", *flags)
    assert result.returncode == 0, result.stderr
    assert ("handled by note" in result.stderr) is handled_line, result.stderr
    assert ("Traceback (most recent call last)" in result.stderr) is traceback_line, result.stderr
    assert "moved to the failure queue" in result.stderr  # errors are always logged


# --- signals and stop-workers -------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_lets_the_current_message_finish_then_exits_0(project, app, sig):
    first, second = app.dispatch_many("slow", [{"n": 1, "seconds": 1.0}, {"n": 2, "seconds": 1.0}])
    worker = project.start("consume", "slow")
    wait_until(lambda: project.values("start") == ["1"], message="the slow handler to start")
    worker.send_signal(sig)
    code, err = finish(worker)
    assert code == 0, err
    assert "received %s" % sig.name in err
    assert project.values("note") == ["1"] and project.values("start") == ["1"]
    assert messages(project) == [(second, "slow", 0, 0)]  # the first is gone; the second untouched
    assert worker_count(project) == 0


def test_sigterm_stops_an_idle_worker_at_once(project, app):
    app.setup()
    worker = project.start("consume", "async")
    wait_until(lambda: worker_count(project) == 1, message="the worker to register")
    sent = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    code, err = finish(worker)
    assert code == 0, err
    assert time.monotonic() - sent < 1.5
    assert worker_count(project) == 0


def test_stop_workers_stops_every_idle_worker(project, app):
    app.setup()
    workers = [project.start("consume", "async") for _ in range(3)]
    wait_until(lambda: worker_count(project) == 3, message="three registered workers")
    result = project.cli("stop-workers")
    assert result.returncode == 0, result.stderr
    assert "asked 3 running worker(s)" in result.stdout
    for w in workers:
        code, err = finish(w, timeout=10)
        assert code == 0, err
        assert "stop-workers was requested" in err
    assert worker_count(project) == 0
    # the request is for the workers running then, not for the ones started afterwards
    later = project.start("consume", "async", "--limit", "1", "--time-limit", "20")
    app.dispatch("note", {"n": 1})
    code, err = finish(later, timeout=25)
    assert code == 0, err
    assert "message limit of 1 reached" in err and project.values("note") == ["1"]


def test_stop_workers_lets_a_busy_worker_finish_its_message(project, app):
    gate = project.path / "gate"
    first, second = app.dispatch_many("gate", [{"n": 1, "path": str(gate)}, {"n": 2, "path": str(gate)}])
    worker = watch_stderr(project.start("consume", "slow"))
    wait_until(lambda: project.values("start") == ["1"], message="the first message to start")
    assert project.cli("stop-workers").returncode == 0
    # the worker has seen the request (its heartbeat relays it) while the handler still runs
    wait_for_stderr(worker, "stop-workers was requested: finishing message %d (gate) first" % first)
    gate.touch()
    code, err = finish(worker)
    assert code == 0, err
    assert "stopped: stop-workers was requested" in err
    assert project.values("note") == ["1"] and project.values("start") == ["1"]
    assert messages(project) == [(second, "slow", 0, 0)]


_DISPATCH_DEEPEST = r"""
import jobapp
import jobrunner
value, accepted = 1, 0
for depth in range(1, 1001):
    value = [value]
    try:
        jobapp.jobs.dispatch("note", {"n": value})
    except (jobrunner.InvalidMessage, RecursionError):
        break
    accepted = depth
jobapp.jobs.transport.connection().execute("DELETE FROM messenger_messages WHERE id < (SELECT MAX(id) FROM messenger_messages)")
print(accepted)
"""


def test_every_payload_dispatch_accepts_is_handled_by_a_worker(project, app):
    # dispatched from a shallow stack (a script), the deepest payload dispatch accepts must not crash the worker
    app.setup()
    env = dict(project.env, PYTHONPATH=os.pathsep.join([str(REPO), project.env["PYTHONPATH"]]))
    made = subprocess.run([sys.executable, "-c", _DISPATCH_DEEPEST], cwd=project.path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    depth = int(made.stdout)
    assert depth > 10 and len(messages(project)) == 1
    result = project.cli("consume", "async", "--limit", "1", "--time-limit", "5")
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.returncode == 0, result.stderr[-2000:]
    assert project.values("note") == ["[" * depth + "1" + "]" * depth]
    assert messages(project) == []


# --- regressions ----------------------------------------------------------------------


@pytest.mark.sqlite
def test_a_second_signal_interrupts_a_transactional_handler_and_leaves_nothing_locked(project, tmp_path):
    app_file = tmp_path / "txslowapp.py"
    app_file.write_text(
        "import time\nfrom jobrunner import JobRunner\njobs = JobRunner(max_retries=0)\n"
        "@jobs.handler(transactional=True)\ndef hold(db, n):\n"
        "    db.execute('CREATE TABLE IF NOT EXISTS t (n)')\n    db.execute('INSERT INTO t VALUES (?)', (n,))\n"
        "    open(%r, 'w').write('started')\n    time.sleep(30)\n" % str(tmp_path / "started"))
    env = {"JOBRUNNER_APP": "txslowapp", "PYTHONPATH": "%s:%s" % (tmp_path, project.env["PYTHONPATH"])}
    assert project.cli("dispatch", "hold", '{"n": 1}', env=env).returncode == 0
    worker = watch_stderr(project.start("consume", "async", env=env))
    wait_until(lambda: (tmp_path / "started").exists(), message="the handler to start")
    worker.send_signal(signal.SIGTERM)
    # the first signal was handled (not merely sent) before the second goes
    wait_for_stderr(worker, "received SIGTERM: finishing message 1 (hold) first; a second signal aborts it")
    worker.send_signal(signal.SIGTERM)
    code, err = finish(worker)
    assert code == 1, err
    assert "twice" in err and "Traceback" not in err
    # the message is back, its attempt given back; its write rolled back (with the table it created)
    assert messages(project) == [(1, "async", 0, 0)]
    conn = sqlite3.connect(str(project.db), timeout=0.5)
    assert conn.execute("SELECT name FROM sqlite_master WHERE name = 't'").fetchall() == []
    conn.execute("BEGIN IMMEDIATE")  # and the database is not locked
    conn.execute("ROLLBACK")
    conn.close()
    assert worker_count(project) == 0


@pytest.mark.sqlite
def test_a_row_with_a_non_numeric_available_at_does_not_crash_the_worker(project, app):
    app.dispatch("note", {"n": 1})
    conn = sqlite3.connect(str(project.db))
    with conn:
        conn.execute("INSERT INTO messenger_messages (body, headers, queue_name, created_at, available_at) "
                     "VALUES ('{\"n\": 2}', '{\"handler\": \"note\"}', 'async', 0, 'soon')")
    result = project.cli("consume", "async", "--time-limit", "1.5")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert project.values() == ["1"]


def test_a_huge_sleep_is_accepted(project, app):
    app.dispatch("note", {"n": 1})
    result = project.cli("consume", "async", "--sleep", "1e10", "--limit", "1", timeout=20)
    assert result.returncode == 0, result.stderr
    assert project.values() == ["1"]


# --- handlers that misbehave (tests/apps/hardapp.py) ---------------------------------------------

HARD = {"JOBRUNNER_APP": "hardapp"}


def hard_dispatch(project, name, **payload):
    import json

    result = project.cli("dispatch", name, json.dumps(payload), env=HARD)
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


def failed_headers(project, message_id):
    import json

    [(queue, headers)] = project.query("SELECT queue_name, headers FROM messenger_messages WHERE id = ?", message_id)
    assert queue == "failed"
    return json.loads(headers)


@pytest.mark.parametrize("name", ["swallows_exception", "swallows_everything"])
def test_a_handler_cannot_swallow_its_timeout(project, name):
    msg_id = hard_dispatch(project, name, n=1)
    started = time.monotonic()
    result = project.cli("consume", "hard", "--limit", "1", "--time-limit", "20", env=HARD)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 4  # interrupted at 0.3 s, not after its 5 s sleep
    headers = failed_headers(project, msg_id)
    assert headers["error_class"] == "jobrunner.HandlerTimeout"
    if name == "swallows_exception":  # `except Exception` does not see the interruption at all
        assert project.values("swallowed") == [] and project.values("note") == []
    else:  # `except BaseException` caught it and carried on: still a timed-out attempt, not a success
        assert project.values("swallowed") == ["1"] and project.values("note") == ["1"]
        assert "caught the interruption" in headers["error_message"]


def test_an_alarm_that_lands_after_the_handler_returned_is_ignored(app):
    # SIGALRM may be handled once the handler has returned, back in the worker's own frame: that must not
    # turn the success into a timeout.  Inside the handler's frames, it interrupts.
    import sys as _sys

    import jobrunner

    worker = app.worker(["async"], install_signals=False)
    handler = app.handlers["too_slow"]
    lane = worker._lanes[0]
    lane.current = (None, handler, {})
    lane.call_frame = _sys._getframe()
    lane.alarm_armed = True
    worker._on_alarm(signal.SIGALRM, lane.call_frame)  # back in the caller's frame: ignored
    assert lane.alarm_armed and not lane.alarm_fired

    def inside_the_handler():
        worker._on_alarm(signal.SIGALRM, _sys._getframe())

    with pytest.raises(jobrunner._Interrupted) as raised:
        inside_the_handler()
    assert isinstance(raised.value.error, jobrunner.HandlerTimeout) and lane.alarm_fired
    assert not isinstance(raised.value, Exception)  # a handler's `except Exception:` cannot catch it


@pytest.mark.parametrize("name,error_class", [("exits", "SystemExit"), ("interrupts", "KeyboardInterrupt")])
def test_sys_exit_or_keyboard_interrupt_in_a_handler_is_a_failed_attempt_recorded_with_its_cause(
        project, name, error_class):
    msg_id = hard_dispatch(project, name, n=1)
    other = hard_dispatch(project, "prints_pid", n=2)
    result = project.cli("consume", "hard", "--time-limit", "20", env=HARD)
    assert result.returncode == 1  # the worker stops, and says why
    assert "stopped: handler %s raised %s" % (name, error_class) in result.stderr
    headers = failed_headers(project, msg_id)
    assert headers["error_class"] == error_class and headers["attempts"] == 1
    assert "Traceback (most recent call last)" in headers["traceback"]
    assert project.query("SELECT queue_name, delivered_at FROM messenger_messages WHERE id = ?", other) == [
        ("hard", None)]  # the next message is untouched, for the next worker
    assert project.query("SELECT COUNT(*) FROM jobrunner_workers") == [(0,)]


def test_a_generator_handler_is_refused_when_it_is_registered():
    import jobrunner

    jobs = jobrunner.JobRunner("/tmp/never-created-jobrunner-test.db")
    with pytest.raises(jobrunner.ConfigurationError, match="handler numbers is a generator function"):
        @jobs.handler
        def numbers(n):
            yield n
    with pytest.raises(jobrunner.ConfigurationError, match="handler agen is a generator function"):
        @jobs.handler
        async def agen(n):
            yield n
    assert jobs.handlers == {} and not os.path.exists("/tmp/never-created-jobrunner-test.db")


def test_coroutine_handlers_are_awaited_retried_and_failed(project):
    import json

    ok = hard_dispatch(project, "fetch", n=1, seconds=0.01)
    bad = hard_dispatch(project, "fetch", n=2, fail=True)
    slow = hard_dispatch(project, "slow_fetch", n=3)
    tx_ok = hard_dispatch(project, "async_tx", n=4)
    tx_bad = hard_dispatch(project, "async_tx", n=5, fail=True)
    result = project.cli("consume", "aio", "--limit", 6, "--time-limit", "30", "-v", env=HARD)
    assert result.returncode == 0, result.stderr
    assert "never awaited" not in result.stderr
    assert project.values("note") == ["1", "4"]  # the bodies really ran
    assert project.values("fail") == ["2", "2"]  # the first attempt and its one retry
    assert project.values("start") == ["3"] and project.values("cancelled") == ["3"]  # the timeout cancels the task
    rows = dict(project.query("SELECT id, headers FROM messenger_messages WHERE queue_name = 'failed'"))
    assert sorted(rows) == [bad, slow, tx_bad]
    assert json.loads(rows[bad])["error_class"] == "ConnectionError"
    assert json.loads(rows[slow])["error_class"] == "jobrunner.HandlerTimeout"
    assert project.query("SELECT n FROM ledger") == [("4",)]  # the failed coroutine's write rolled back
    assert ok not in dict(project.query("SELECT id, 1 FROM messenger_messages")) and tx_ok != tx_bad


@pytest.mark.sqlite
def test_a_transactional_handler_that_cannot_get_the_write_lock_goes_back_without_spending_an_attempt(project):
    from conftest import hold_write_lock

    import hardapp
    import jobapp

    jobs = hardapp.jobs
    jobs.use_dsn(str(project.db), busy_timeout=0.3)
    jobapp.OUT = str(project.out)
    msg_id = jobs.dispatch("tx_note", {"n": 1})  # max_retries=0: one failed attempt would fail it for good
    worker = jobs.worker(["hard"], install_signals=False)
    delivery, _, _, _ = jobs.transport.claim(["hard"], 99)  # the worker's claim, then another process takes the lock
    assert (delivery.id, delivery.attempts) == (msg_id, 1)
    locker = hold_write_lock(project.db, 1.5)
    outcome = worker._process(delivery, worker._lanes[0])  # the handler's BEGIN IMMEDIATE times out after 0.3 s
    assert outcome.kind == "release" and worker.failed == 0
    locker.wait(10)
    assert jobs.transport.settle(outcome)
    assert project.query("SELECT queue_name, delivered_at, attempts FROM messenger_messages") == [("hard", None, 0)]
    # the message is then handled normally, its single attempt intact
    assert jobs.consume("hard", limit=1, install_signals=False) == "message limit of 1 reached"
    assert project.values("note") == ["1"] and project.query("SELECT COUNT(*) FROM messenger_messages") == [(0,)]
    jobs.transport.close()


def test_a_wall_clock_step_does_not_make_a_live_worker_look_dead(project, app):
    # Worker A runs a 6 s handler.  Its wall-clock beat times are made to look ancient (what a reaper sees
    # when its clock steps forward): A's beat counter still moves, so the reaper B must not release its claim.
    dsn = project.dsn_with(heartbeat_interval=0.2, heartbeat_timeout=1.5)
    env = {"JOBRUNNER_DSN": dsn}
    app.dispatch("slow", {"n": 1, "seconds": 6})
    a = project.start("consume", "slow", "--limit", "1", env=env)
    wait_until(lambda: project.values("start") == ["1"], message="A to start the slow message")
    b = project.start("consume", "slow", "--time-limit", "8", env=env)
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline and a.poll() is None:
        project.execute("UPDATE jobrunner_workers SET beat_at = 0")
        time.sleep(0.1)
    assert finish(a)[0] == 0
    finish(b)
    assert project.values("start") == ["1"] and project.values("note") == ["1"]  # one run: never released


@pytest.mark.sqlite
def test_an_idle_worker_is_not_woken_into_a_claim_by_other_workers_heartbeats(project, app):
    app.setup()
    siblings = [project.start("consume", "low", "--time-limit", "8") for _ in range(5)]  # each beats once a second
    wait_until(lambda: worker_count(project) == 5, message="the siblings")
    result = project.cli("consume", "async", "--sleep", "10", "--time-limit", "5", "-vvv")
    assert result.returncode == 0, result.stderr
    claims = result.stderr.count("sql: UPDATE messenger_messages SET delivered_at")
    # ~25 sibling beats woke it; a cheap read sent it back to sleep each time instead of a write transaction
    assert claims <= 2, claims
    assert result.stderr.count("sql: WITH RECURSIVE p(v)") >= 10  # the cheap look at the queues' next message
    for s in siblings:
        s.terminate()


# --- what the README promises -----------------------------------------------------------------


def test_an_acknowledgement_after_the_claim_was_lost_is_refused(project, app):
    # A is frozen mid-handler past the heartbeat timeout; B takes the message over and finishes it; A wakes
    # up and finishes too: its acknowledgement is refused, and the message was handled exactly twice.
    dsn = project.dsn_with(heartbeat_interval=0.2, heartbeat_timeout=1.5)
    env = {"JOBRUNNER_DSN": dsn}
    msg_id = app.dispatch("slow", {"n": 1, "seconds": 1.0})
    a = watch_stderr(project.start("consume", "slow", env=env))
    wait_until(lambda: project.values("start") == ["1"], message="A to start")
    a.send_signal(signal.SIGSTOP)
    b = project.start("consume", "slow", "--limit", "1", env=env)
    code_b, err_b = finish(b, timeout=30)
    assert code_b == 0, err_b  # B released A's claim, then handled the message
    assert len(project.values("note")) == 1
    a.send_signal(signal.SIGCONT)
    code, err = finish(a, timeout=30)
    assert code == 1  # declared dead while frozen: it says so and stops
    assert "message %d: claim was released while handling it (worker thought dead); outcome refused" % msg_id in err
    assert "this worker was declared dead after missing its heartbeats" in err
    assert project.values("start") == ["1", "1"] and project.values("note") == ["1", "1"]
    assert messages(project) == []  # acknowledged once, by B; nothing failed


def test_a_transactional_handler_that_lost_its_claim_rolls_back_its_writes(project):
    import hardapp
    import jobapp

    jobs = hardapp.jobs
    jobs.use_dsn(project.dsn)
    jobapp.OUT = str(project.out)
    msg_id = jobs.dispatch("tx_note", {"n": 1})
    worker = jobs.worker(["hard"], install_signals=False)
    worker_id = jobs.transport.register_worker("frozen", "here", ["hard"], time.time())
    delivery, _, _, _ = jobs.transport.claim(["hard"], worker_id)
    dead, released = jobs.transport.release_workers({worker_id: None})  # another worker's reaper thought it dead
    assert (dead, released) == ([worker_id], 1)
    assert worker._process(delivery, worker._lanes[0]) is None  # the handler ran, then its acknowledgement was refused
    assert project.values("note") == ["1"]
    assert not project.has_table("ledger")  # its write rolled back
    assert messages(project) == [(msg_id, "hard", 0, 1)]  # still there, for whoever holds it now
    jobs.transport.close()


def test_a_handler_stuck_where_python_cannot_interrupt_it_is_abandoned_and_retried(project):
    marker = project.path / "stuck-once"
    msg_id = hard_dispatch(project, "stuck_in_c", n=1, marker=str(marker))
    dsn = project.dsn_with(heartbeat_interval=0.2, heartbeat_timeout=1.5)
    started = time.monotonic()
    result = project.cli("consume", "hard", "--time-limit", "30", env=dict(HARD, JOBRUNNER_DSN=dsn))
    assert result.returncode == 70, result.stderr
    assert 5.0 < time.monotonic() - started < 15  # its 0.5 s timeout, then 5 s of grace
    assert "handler stuck past its timeout of 0.5s where Python cannot interrupt it; exiting" in result.stderr
    # the next worker finds the claim of a dead process and retries the message (its attempt counted)
    result = project.cli("consume", "hard", "--limit", "1", "--time-limit", "20", env=dict(HARD, JOBRUNNER_DSN=dsn))
    assert result.returncode == 0, result.stderr
    assert project.values("start") == ["1", "1"] and project.values("note") == ["1"]
    assert messages(project) == []
    del msg_id


def test_recoverable_error_retry_after_sets_when_the_retry_happens(project):
    msg_id = hard_dispatch(project, "busy_later", n=1, seconds=30)  # max_retries=0 would fail any other error
    before = time.time()
    result = project.cli("consume", "hard", "--limit", "1", "--time-limit", "10", env=HARD)
    assert result.returncode == 0, result.stderr
    [(queue, available, attempts)] = project.query("SELECT queue_name, available_at, attempts FROM "
                                                       "messenger_messages WHERE id = ?", msg_id)
    assert queue == "hard" and attempts == 1
    assert before + 30 <= available <= time.time() + 30  # retry_after, not the strategy's delay


def test_consume_with_no_queue_takes_every_queue_of_the_app_in_registration_order(project, app):
    app.dispatch("note_low", {"n": "low"})
    app.dispatch("note_high", {"n": "high"})
    app.dispatch("note", {"n": "async"})
    result = project.cli("consume", "--limit", "3", "--time-limit", "10")
    assert result.returncode == 0, result.stderr
    assert "consuming async, high, low, slow, empty" in result.stderr  # handlers' queues in order, then declared ones
    assert [(kind, value) for kind, value, _, _ in records(project)] == [("note", "async"), ("high", "high"),
                                                                        ("low", "low")]


@pytest.mark.sqlite
@pytest.mark.parametrize("dsn_options,expected", [("", 1), ("?synchronous=FULL", 2)])
def test_the_synchronous_option_is_applied_on_the_workers_connection(project, dsn_options, expected):
    hard_dispatch(project, "pragma", n=1)
    env = dict(HARD, JOBRUNNER_DSN="sqlite:///%s%s" % (project.db, dsn_options))
    assert project.cli("consume", "hard", "--limit", "1", "--time-limit", "10", env=env).returncode == 0
    assert project.values("synchronous") == [str(expected)]  # 1 NORMAL, 2 FULL


def test_memory_limits_and_status_work_without_psutil(project, app, tmp_path):
    blocker = tmp_path / "nopsutil"
    blocker.mkdir()
    (blocker / "psutil.py").write_text("raise ImportError('psutil is not installed here')\n")
    env = {"JOBRUNNER_APP": "supapp", "PYTHONPATH": "%s:%s" % (blocker, project.env["PYTHONPATH"])}
    assert project.cli("dispatch", "grow", '{"n": 1, "mb": 128}', env=env).returncode == 0
    worker = watch_stderr(project.start("consume", "async", "--memory-limit", "100M", "--sleep", "0.2", env=env))
    code, err = finish(worker)
    assert code == 0, err
    assert re.search(r"stopped: memory limit of 100\.0M exceeded \(RSS 1\d\d\.\dM\)", err), err
    idle = project.start("consume", "low", env=env)
    wait_until(lambda: worker_count(project) == 1, message="a worker")
    time.sleep(1.2)  # one heartbeat records its memory
    result = project.cli("status", env=env)
    assert result.returncode == 0 and re.search(r"rss \d+\.\dM", result.stdout), result.stdout
    idle.terminate()


@pytest.mark.sqlite
def test_vvv_logs_every_sql_statement(project, app):
    app.dispatch("note", {"n": 1})
    result = project.cli("consume", "async", "--limit", "1", "-vvv")
    assert result.returncode == 0
    assert "SQL sql: BEGIN IMMEDIATE" in result.stderr
    assert "SQL sql: UPDATE messenger_messages SET delivered_at" in result.stderr
    assert re.search(r"SQL sql: DELETE FROM messenger_messages WHERE id = 1 AND claimed_by = \d+ AND attempts = 1",
                     result.stderr)
    assert "SQL sql:" not in project.cli("consume", "async", "--limit", "0", "-vv").stderr
