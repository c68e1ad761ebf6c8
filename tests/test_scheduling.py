"""Periodic handlers, unique keys, priorities, pausing and cancelling: real schedulers, real dispatcher processes,
real workers interrupted mid-handler, on SQLite and PostgreSQL."""

import datetime
import json
import os
import subprocess
import sys
import time

import pytest

import jobrunner
from conftest import wait_for_stderr, wait_until, watch_stderr

PERIODIC = {"JOBRUNNER_APP": "periodicapp"}


# --- the cron parser --------------------------------------------------------------------------------

CRON_TABLE = [
    # expression, tz, after (local), next (local)
    ("* * * * *", "UTC", "2026-11-26T10:07:30", "2026-11-26T10:08:00"),
    ("*/15 * * * *", "UTC", "2026-11-26T10:07:00", "2026-11-26T10:15:00"),
    ("5-10/2 * * * *", "UTC", "2026-11-26T10:07:00", "2026-11-26T10:09:00"),
    ("5/20 * * * *", "UTC", "2026-11-26T10:07:00", "2026-11-26T10:25:00"),  # a start and a step: to the end
    ("5/1 * * * *", "UTC", "2026-11-26T10:07:00", "2026-11-26T10:08:00"),  # not only at minute 5
    ("0 9,17 * * *", "UTC", "2026-11-26T09:00:00", "2026-11-26T17:00:00"),
    ("30 4 * * 1-5", "Europe/Paris", "2026-11-27T05:00:00", "2026-11-30T04:30:00"),  # Friday -> Monday
    ("0 0 * * sun", "UTC", "2026-11-26T00:00:00", "2026-11-29T00:00:00"),
    ("0 0 * * 7", "UTC", "2026-11-26T00:00:00", "2026-11-29T00:00:00"),  # 7 is Sunday too
    ("0 0 1 jan *", "UTC", "2026-11-26T00:00:00", "2027-01-01T00:00:00"),
    ("0 0 29 feb *", "UTC", "2026-03-01T00:00:00", "2028-02-29T00:00:00"),
    ("0 12 1 * mon", "UTC", "2026-11-26T00:00:00", "2026-11-30T12:00:00"),  # day of month OR day of week
    ("@hourly", "UTC", "2026-11-26T10:07:00", "2026-11-26T11:00:00"),
    ("@daily", "UTC", "2026-11-26T10:07:00", "2026-11-27T00:00:00"),
    ("@weekly", "UTC", "2026-11-26T10:07:00", "2026-11-29T00:00:00"),
    ("@monthly", "UTC", "2026-11-26T10:07:00", "2026-12-01T00:00:00"),
    ("@yearly", "UTC", "2026-11-26T10:07:00", "2027-01-01T00:00:00"),
    # DST in Paris: 2026-03-29 02:00 -> 03:00 (02:30 does not exist that day), 2026-10-25 03:00 -> 02:00
    ("30 2 * * *", "Europe/Paris", "2026-03-28T12:00:00", "2026-03-30T02:30:00"),
    ("30 3 * * *", "Europe/Paris", "2026-03-28T12:00:00", "2026-03-29T03:30:00"),
    ("30 2 * * *", "Europe/Paris", "2026-10-24T12:00:00", "2026-10-25T02:30:00"),
    ("0 * * * *", "Europe/Paris", "2026-10-25T01:30:00", "2026-10-25T02:00:00"),
    ("0 9 * * *", "America/New_York", "2026-11-01T08:00:00", "2026-11-01T09:00:00"),
]


@pytest.mark.parametrize("expression,tz,after,expected", CRON_TABLE)
def test_cron_next_times(expression, tz, after, expected):
    from zoneinfo import ZoneInfo

    zone = ZoneInfo(tz)
    start = datetime.datetime.fromisoformat(after).replace(tzinfo=zone).timestamp()
    got = jobrunner._Cron(expression, tz).next_after(start)
    assert datetime.datetime.fromtimestamp(got, zone).replace(tzinfo=None).isoformat() == expected


def test_a_repeated_wall_clock_time_runs_once_on_the_day_dst_ends():
    from zoneinfo import ZoneInfo

    cron = jobrunner._Cron("30 2 * * *", "Europe/Paris")
    first = cron.next_after(datetime.datetime(2026, 10, 25, 0, 0, tzinfo=ZoneInfo("Europe/Paris")).timestamp())
    following = cron.next_after(first)
    assert following - first == 25 * 3600  # 02:30 (summer time) then 02:30 the next day: not the second 02:30


@pytest.mark.parametrize("expression,field", [
    ("* * *", "needs 5 fields"), ("61 * * * *", "cron minute field '61' is out of range"),
    ("* 24 * * *", "cron hour field '24' is out of range"), ("* * 0 * *", "cron day of month field '0' is out of range"),
    ("* * * 13 *", "cron month field '13'"), ("* * * * 8", "cron day of week field '8'"),
    ("* * * * fun", "cron day of week field 'fun' is not valid"), ("*/0 * * * *", "cron minute field '*/0'"),
    ("@every5m", "needs 5 fields"), ("1-2-3 * * * *", "cron minute field '1-2-3' is not valid"),
])
def test_a_bad_cron_expression_is_refused_naming_its_field(expression, field):
    with pytest.raises(jobrunner.ConfigurationError, match=field.replace("*", r"\*").replace("'", "'")):
        jobrunner._Cron(expression)


def test_periodic_registration_checks_its_arguments(tmp_path):
    jobs = jobrunner.JobRunner(str(tmp_path / "j.db"))
    with pytest.raises(jobrunner.ConfigurationError, match="needs a cron expression or every=SECONDS"):
        jobs.periodic()(lambda: None)
    with pytest.raises(jobrunner.ConfigurationError, match="unknown time zone 'Mars/Olympus'"):
        jobs.periodic("* * * * *", tz="Mars/Olympus")(lambda: None)
    with pytest.raises(jobrunner.ConfigurationError, match="takes required arguments user"):
        @jobs.periodic(every=60)
        def needs(user):
            pass
    # each of these passed registration, then stopped the whole schedule at its first tick
    with pytest.raises(jobrunner.ConfigurationError, match=r"cron expression '0 0 30 2 \*' never runs"):
        jobs.periodic("0 0 30 2 *")(lambda: None)
    for every in (1e-300, 0.0009, float("nan"), -1, 10 ** 400, 1e13):
        with pytest.raises(jobrunner.ConfigurationError, match="every must be a number of seconds from 0.001"):
            jobs.periodic(every=every)(lambda: None)
    assert jobs.handlers == {}
    jobs.periodic("0 0 29 2 *", name="leap_day")(lambda: None)  # rare, but it runs
    jobs.periodic(every=0.001, name="often")(lambda: None)
    assert sorted(jobs.handlers) == ["leap_day", "often"]


# --- schedulers --------------------------------------------------------------------------------------


def ticks(project):
    return sorted(int(v) for v in project.values("tick"))


def tick_messages(project):
    rows = project.query("SELECT body FROM messenger_messages WHERE headers LIKE ?", '%"handler":"tick"%')
    return sorted(json.loads(body)["scheduled_at"] for (body,) in rows)


@pytest.mark.backends
def test_two_schedulers_at_once_enqueue_each_tick_once(project):
    project.cli("setup", env=PERIODIC)
    first = project.start("schedule", "-v", env=PERIODIC)
    second = project.start("schedule", "-v", env=PERIODIC)
    wait_until(lambda: len(tick_messages(project)) >= 4, timeout=15, message="four ticks")
    for proc in (first, second):
        proc.terminate()
        assert proc.wait(10) == 0
    enqueued = tick_messages(project)
    assert len(enqueued) == len(set(enqueued)), "a tick enqueued twice: %s" % enqueued
    assert enqueued == list(range(enqueued[0], enqueued[0] + len(enqueued)))  # every second, none skipped


@pytest.mark.backends
def test_ticks_missed_while_no_scheduler_ran_are_enqueued_once(project):
    project.cli("setup", env=PERIODIC)
    scheduler = project.start("schedule", env=PERIODIC)
    wait_until(lambda: len(tick_messages(project)) >= 1, timeout=10, message="a tick")
    scheduler.terminate()
    scheduler.wait(10)
    before = tick_messages(project)
    time.sleep(3.2)  # three ticks pass with no scheduler
    scheduler = project.start("schedule", env=PERIODIC)
    wait_until(lambda: len(tick_messages(project)) > len(before), timeout=10, message="the catch-up tick")
    scheduler.terminate()
    scheduler.wait(10)
    caught_up = tick_messages(project)[len(before)]
    assert caught_up - before[-1] >= 3  # the latest missed tick, once; not one message per missed tick
    assert tick_messages(project)[:len(before) + 1] == before + [caught_up]


@pytest.mark.backends
def test_supervise_runs_the_schedule_and_its_messages_are_ordinary_messages(project):
    from test_supervisor import Supervisors, log_text, supervised, status

    sups = Supervisors(project)
    try:
        sups.start("async", env=PERIODIC)
        wait_until(lambda: len(ticks(project)) >= 2, timeout=15, message="ticks handled by the workers")
        procs = supervised(status(project))
        assert procs["scheduler_00"]["state"] == "RUNNING" and procs["async_00"]["state"] == "RUNNING"
        assert "running the schedule: tick, weekday_report" in log_text(project, "supervisor.log")
        # a second supervisor on the database does not run a second scheduler
        sups.start("async", "--name", "other", env=PERIODIC, log_dir="log2")
        wait_until(lambda: "the schedule runs under another supervisor" in log_text(project, "supervisor.log", "log2"),
                   timeout=10)
        assert "scheduler_01" not in supervised(status(project))
        no = sups.start("async", "--name", "third", "--no-scheduler", env=PERIODIC, log_dir="log3")
        wait_until(lambda: "third_00" in supervised(status(project)), timeout=10)
        assert "schedule" not in log_text(project, "supervisor.log", "log3")
        del no
    finally:
        sups.close()


def test_handlers_show_each_schedule_and_its_next_run(project):
    result = project.cli("handlers", "--json", env=PERIODIC)
    described = {h["name"]: h for h in json.loads(result.stdout)["handlers"]}
    assert described["tick"]["schedule"] == "every 1s"
    assert described["weekday_report"]["schedule"] == "30 4 * * 1-5 (Europe/Paris)"
    assert time.time() < described["tick"]["next_run_at"] <= time.time() + 1
    from zoneinfo import ZoneInfo

    when = datetime.datetime.fromtimestamp(described["weekday_report"]["next_run_at"], ZoneInfo("Europe/Paris"))
    assert (when.hour, when.minute) == (4, 30) and when.isoweekday() <= 5
    assert described["note"]["schedule"] is None and described["note"]["next_run_at"] is None
    text = project.cli("handlers", env=PERIODIC).stdout
    assert "30 4 * * 1-5 (Europe/Paris), next " in text


# --- unique keys ---------------------------------------------------------------------------------------

DISPATCHER = """
import os, sys, time, jobapp
jobapp.jobs.use_dsn(os.environ["JOBRUNNER_DSN"])
while not os.path.exists(sys.argv[1]):
    time.sleep(0.001)
print(jobapp.jobs.dispatch("note", {"n": sys.argv[2]}, unique_key="sync:3"))
"""


@pytest.mark.backends
def test_eight_processes_dispatching_one_unique_key_at_once_store_one_message(project, app):
    app.setup()
    go = project.path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", DISPATCHER, str(go), str(i)], env=project.env, cwd=project.path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(8)]
    time.sleep(0.5)  # all of them started and waiting
    go.touch()
    outputs = [p.communicate(timeout=30) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, [err for _, err in outputs]
    ids = {int(out) for out, _ in outputs}
    assert len(ids) == 1  # every dispatch got the one message's id
    assert project.query("SELECT id, unique_key FROM messenger_messages") == [(ids.pop(), "sync:3")]


@pytest.mark.backends
def test_a_unique_key_is_held_while_queued_delayed_or_running_and_freed_after(project, app):
    first = app.dispatch("note", {"n": 1}, unique_key="k", delay=60)
    assert app.dispatch("note", {"n": 2}, unique_key="k") == first  # a delayed message keeps its key
    assert app.dispatch("note", {"n": 3}, unique_key="other") != first
    assert app.cancel(first) == "waiting"  # cancelled: the key is free
    second = app.dispatch("note", {"n": 4}, unique_key="k")
    assert second != first
    assert app.run_pending(["async"]) == 2  # handled: free again
    third = app.dispatch("always_fails", {"n": 5}, unique_key="k")
    assert app.dispatch("note", {"n": 6}, unique_key="k") == third
    for _ in range(3):  # max_retries=2: three attempts, then the failure queue
        wait_until(lambda: app.run_pending(["async"]) == 1, timeout=5, message="the next attempt")
    assert [e.id for e in app.failed()] == [third]
    assert app.dispatch("note", {"n": 7}, unique_key="k") not in (first, second, third)  # failed: free
    before = project.query("SELECT COUNT(*) FROM messenger_messages")
    for key in ("", "a\x00b", "a\ud800", "k" * 256, 7):  # each refused alike on both databases, nothing stored
        with pytest.raises(jobrunner.InvalidMessage, match="unique_key must be a string"):
            app.dispatch("note", {"n": 8}, unique_key=key)
    assert project.query("SELECT COUNT(*) FROM messenger_messages") == before


# --- priorities ----------------------------------------------------------------------------------------


@pytest.mark.backends
def test_higher_priority_first_then_fifo_within_a_priority(project, app):
    order = [("low1", 0), ("high1", 10), ("low2", 0), ("mid1", 5), ("high2", 10), ("neg", -3), ("mid2", 5)]
    for name, priority in order:
        app.dispatch("note", {"n": name}, priority=priority)
    assert app.run_pending(["async"]) == len(order)
    handled = [v for v, _ in sorted(project.handled("note"), key=lambda r: r[0])]  # recorded with times below
    lines = []
    for f in project.out.iterdir():
        if f.name.isdigit():
            lines += [line.split() for line in f.read_text().splitlines()]
    assert [value for _, value, _ in sorted(lines, key=lambda r: float(r[2]))] == [
        "high1", "high2", "mid1", "mid2", "low1", "low2", "neg"]
    del handled


# --- pausing -------------------------------------------------------------------------------------------


@pytest.mark.backends
def test_a_paused_queue_keeps_its_messages_while_workers_take_their_other_queues(project, app):
    app.setup()
    assert project.cli("pause", "async").stdout == "paused async\n"
    app.dispatch_many("note", [{"n": i} for i in range(3)])  # dispatches are still accepted
    app.dispatch("note_high", {"n": "h"})
    worker = watch_stderr(project.start("consume", "async", "high", "-v"))
    wait_until(lambda: project.values("high") == ["h"], message="the other queue")
    time.sleep(1.0)  # an absence: had the pause not held, async would have been drained in this time
    assert project.values("note") == []
    stats = {q["queue"]: q for q in json.loads(project.cli("stats", "--json").stdout)["queues"]}
    assert stats["async"]["paused"] is True and stats["async"]["ready"] == 3 and stats["high"]["paused"] is False
    assert "paused" in project.cli("stats").stdout
    unhealthy = project.cli("health", "--max-paused", "0")
    assert unhealthy.returncode == 1 and "queue async has been paused for" in unhealthy.stdout
    assert project.cli("health", "--max-paused", "3600").returncode == 0
    worker.terminate()
    worker.wait(10)
    # the pause survives restarts; resuming lets a new worker drain it
    worker = project.start("consume", "async")
    time.sleep(0.5)
    assert project.values("note") == []
    assert project.cli("resume", "async").returncode == 0
    wait_until(lambda: len(project.values("note")) == 3, message="the resumed queue")
    app.pause("async")
    assert {q["queue"]: q["paused"] for q in app.stats()["queues"]}["async"] is True
    app.resume("async")


@pytest.mark.backends
def test_pause_refuses_a_queue_the_app_does_not_route_to_and_any_paused_queue_can_be_resumed(project, app):
    app.setup()
    typo = project.cli("pause", "asnyc")  # the app is imported even beside JOBRUNNER_DSN
    assert typo.returncode == 2 and typo.stdout == ""
    assert typo.stderr.startswith("jobrunner: error: unknown queue 'asnyc' (known: ") and typo.stderr.count("\n") == 1
    assert app.transport.paused() == {}
    app.transport.pause(["retired"])  # paused under a name the app has stopped routing to since
    assert project.cli("resume", "retired").returncode == 0 and app.transport.paused() == {}
    assert project.cli("resume", "retired").returncode == 2  # no longer paused: a name like any other
    # an app that fails to import does not stand in the way of a pause; without one the database is asked
    broken = project.cli("pause", "async", env={"JOBRUNNER_APP": "no_such_module"})
    assert broken.returncode == 0 and "warning: queue names not checked: cannot import app module" in broken.stderr
    app.dispatch("note", {"n": 1})
    for queue, warned in (("async", False), ("elsewhere", True)):
        result = project.cli("pause", queue, env={"JOBRUNNER_APP": ""})
        assert result.returncode == 0 and ("no message, worker or pause names queue 'elsewhere'" in result.stderr) == warned
    assert set(app.transport.paused()) == {"async", "elsewhere"}
    since = app.transport.paused()["async"]
    time.sleep(0.05)
    assert project.cli("pause", "async").returncode == 0
    assert app.transport.paused()["async"] == since  # paused again: still measured from the first pause
    failed = project.cli("pause", "failed")  # replayed by `consume failed` when run: no worker to pause
    assert failed.returncode == 2 and "the failure queue has no workers to pause" in failed.stderr
    assert "failed" not in app.transport.paused()


# --- cancelling ----------------------------------------------------------------------------------------


@pytest.mark.backends
def test_cancel_removes_queued_and_delayed_messages(project, app):
    queued = app.dispatch("note", {"n": 1})
    delayed = app.dispatch("note", {"n": 2}, delay=600)
    result = project.cli("cancel", queued, delayed, "--json")
    assert result.returncode == 0
    assert json.loads(result.stdout) == {"cancelled": {str(queued): "waiting", str(delayed): "waiting"}, "errors": []}
    assert project.query("SELECT COUNT(*) FROM messenger_messages") == [(0,)]
    unknown = project.cli("cancel", queued)
    assert (unknown.returncode, unknown.stderr) == (1, "jobrunner: error: no message %d: unknown, or handled already\n"
                                                    % queued)
    for beyond in (2 ** 63, 10 ** 22, -5):  # no row can have it: the same answer, not a traceback
        unknown = project.cli("cancel", "--", beyond)
        assert (unknown.returncode, unknown.stderr) == (
            1, "jobrunner: error: no message %d: unknown, or handled already\n" % beyond)


@pytest.mark.backends
def test_cancel_interrupts_a_running_handler_within_2s_and_the_worker_goes_on(project, app):
    cancel_running(project, app, "wait_forever")


@pytest.mark.postgres  # on SQLite a running transactional handler holds the one write lock: a cancel waits for it
def test_cancel_interrupts_a_running_transactional_handler_and_rolls_it_back(project, app):
    cancel_running(project, app, "tx_wait")


def cancel_running(project, app, handler):
    running = app.dispatch(handler, {"n": 1})
    after = app.dispatch("slow", {"n": 2, "seconds": 0})
    worker = watch_stderr(project.start("consume", "slow", "-v"))
    wait_until(lambda: project.values("start") == ["1"], message="the handler to start")
    result = project.cli("cancel", running)
    stored = time.monotonic()  # the cancel is in the database once the command returns, however long it took to start
    assert (result.returncode, result.stdout) == (0, "message %d cancelled: its worker stops it\n" % running)
    wait_for_stderr(worker, "message %d (%s) was cancelled while it ran: interrupted" % (running, handler), timeout=5)
    assert time.monotonic() - stored < 2.0  # the heartbeat notices within a second
    wait_until(lambda: project.values("note") == ["2"], message="the next message")  # the worker went on
    assert project.query("SELECT id FROM messenger_messages") == []  # not retried, not in the failure queue
    if handler == "tx_wait":
        assert not project.has_table("ledger")  # its transaction rolled back
    else:
        assert project.values("interrupted") == ["1"]
    assert worker.poll() is None
